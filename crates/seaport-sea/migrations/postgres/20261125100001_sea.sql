-- The reference "sea" service's own tables on PostgreSQL (same shape as on SQLite).

CREATE TABLE cases (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    title           TEXT    NOT NULL,
    description     TEXT,
    customer_id     TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'open',
    correlation_id  TEXT    NOT NULL,
    created_at      TEXT    NOT NULL
);

CREATE TABLE analytics_counts (
    event_type  TEXT    NOT NULL,
    day         TEXT    NOT NULL,
    count       BIGINT  NOT NULL,
    PRIMARY KEY (event_type, day)
);

CREATE TABLE notifications (
    id          BIGSERIAL PRIMARY KEY,
    event_id    TEXT    NOT NULL,
    case_id     TEXT    NOT NULL,
    recipient   TEXT    NOT NULL,
    template    TEXT    NOT NULL,
    status      TEXT    NOT NULL DEFAULT 'pending',
    created_at  TEXT    NOT NULL
);

CREATE TABLE audit_log (
    seq             BIGSERIAL PRIMARY KEY,
    event_id        TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    source          TEXT    NOT NULL,
    subject         TEXT,
    correlation_id  TEXT,
    causation_id    TEXT,
    event_time      TEXT,
    recorded_at     TEXT    NOT NULL,
    envelope        TEXT    NOT NULL
);
CREATE INDEX audit_log_correlation ON audit_log (correlation_id, seq);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TABLE consumer_effects (
    id              BIGSERIAL PRIMARY KEY,
    consumer        TEXT    NOT NULL,
    event_id        TEXT    NOT NULL,
    correlation_id  TEXT,
    effect          TEXT    NOT NULL,
    recorded_at     TEXT    NOT NULL
);
CREATE INDEX consumer_effects_correlation ON consumer_effects (correlation_id);
CREATE INDEX consumer_effects_event ON consumer_effects (event_id);
