-- Seaport's own tables on PostgreSQL. Tracked in `_seaport_migrations`.
-- Integers are BIGINT (i64) and times unix milliseconds, as on SQLite, so the same SQL runs on both.

-- Outbox + Publish. `partition` = hash(ordering key) mod 16 (computed by the library): each
-- partition is relayed by one relay at a time, which keeps per-key order with many relays.
CREATE TABLE seaport_outbox (
    seq           BIGSERIAL PRIMARY KEY,
    event_id      TEXT    NOT NULL UNIQUE,
    topic         TEXT    NOT NULL,
    ordering_key  TEXT,
    partition     BIGINT  NOT NULL DEFAULT 0,
    envelope      BYTEA   NOT NULL,
    created_at    BIGINT  NOT NULL,
    published_at  BIGINT,
    attempts      BIGINT  NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE INDEX seaport_outbox_unpublished ON seaport_outbox (partition, seq) WHERE published_at IS NULL;
CREATE INDEX seaport_outbox_published ON seaport_outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake relays in any process the moment a transaction that wrote to the outbox commits
-- (NOTIFY is delivered at commit, never before).
CREATE FUNCTION seaport_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('seaport_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER seaport_outbox_notify AFTER INSERT ON seaport_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION seaport_outbox_notify();

CREATE TABLE seaport_inbox (
    consumer        TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    correlation_id  TEXT,
    processed_at    BIGINT  NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX seaport_inbox_processed ON seaport_inbox (processed_at);
CREATE INDEX seaport_inbox_correlation ON seaport_inbox (correlation_id);

CREATE TABLE seaport_dead_letters (
    id              BIGSERIAL PRIMARY KEY,
    consumer        TEXT    NOT NULL,
    stream          TEXT    NOT NULL,
    stream_seq      BIGINT  NOT NULL,
    message_id      TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    headers         TEXT    NOT NULL,
    payload         BYTEA   NOT NULL,
    delivery_count  BIGINT  NOT NULL,
    last_error      TEXT    NOT NULL,
    failed_at       BIGINT  NOT NULL,
    UNIQUE (consumer, stream, stream_seq)
);

CREATE TABLE seaport_idempotency_keys (
    scope        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    status       BIGINT  NOT NULL,             -- 0 while the first request is in flight
    headers      TEXT    NOT NULL,
    body         BYTEA   NOT NULL,
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX seaport_idempotency_expiry ON seaport_idempotency_keys (expires_at);
