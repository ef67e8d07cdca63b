-- The reference "sea" service's own tables (tracked in the usual `_sqlx_migrations`).

CREATE TABLE cases (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- stable listing order
    id              TEXT    NOT NULL UNIQUE,            -- UUIDv7
    title           TEXT    NOT NULL,
    description     TEXT,
    customer_id     TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'open',
    correlation_id  TEXT    NOT NULL,
    created_at      TEXT    NOT NULL                    -- RFC 3339
);

-- analytics__from_sea: counts by event type and day.
CREATE TABLE analytics_counts (
    event_type  TEXT    NOT NULL,
    day         TEXT    NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (event_type, day)
);

-- notifications__from_sea: one row per notification to send.
CREATE TABLE notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL,
    case_id     TEXT    NOT NULL,
    recipient   TEXT    NOT NULL,
    template    TEXT    NOT NULL,
    status      TEXT    NOT NULL DEFAULT 'pending',
    created_at  TEXT    NOT NULL
);

-- audit__from_sea: the append-only log behind /trace.
CREATE TABLE audit_log (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
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
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- What each consumer did for each event, for /trace and for the exactly-once checks.
-- Deliberately no unique key: a duplicate effect must be visible, not hidden.
CREATE TABLE consumer_effects (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer        TEXT    NOT NULL,
    event_id        TEXT    NOT NULL,
    correlation_id  TEXT,
    effect          TEXT    NOT NULL,
    recorded_at     TEXT    NOT NULL
);
CREATE INDEX consumer_effects_correlation ON consumer_effects (correlation_id);
CREATE INDEX consumer_effects_event ON consumer_effects (event_id);
