-- Seaport's own tables on SQLite. Tracked in `_seaport_migrations`, so they never clash with the
-- migrations of the service that embeds the library.

-- Outbox + Publish: rows written in the caller's transaction, moved to the broker by the relay.
-- SQLite has one writer at a time, so `seq` (assigned inside the writing transaction) is also the
-- commit order: a row with a lower seq can never commit after a row with a higher one.
CREATE TABLE seaport_outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT    NOT NULL UNIQUE,
    topic         TEXT    NOT NULL,          -- broker subject, e.g. sea.cases.created
    ordering_key  TEXT,                      -- the event's CloudEvents subject (e.g. the case id)
    envelope      BLOB    NOT NULL,          -- the CloudEvents JSON
    created_at    INTEGER NOT NULL,          -- unix ms
    published_at  INTEGER,                   -- unix ms, set only after the broker confirmed
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE INDEX seaport_outbox_unpublished ON seaport_outbox (seq) WHERE published_at IS NULL;

-- Embedded durable broker: streams, an append-only message log, durable consumers.
CREATE TABLE seaport_broker_streams (
    name      TEXT PRIMARY KEY,
    subjects  TEXT NOT NULL                  -- JSON array of subject filters, e.g. ["sea.>"]
);

CREATE TABLE seaport_broker_messages (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    stream        TEXT    NOT NULL REFERENCES seaport_broker_streams (name),
    msg_id        TEXT    NOT NULL,          -- publish dedupe key (Nats-Msg-Id on JetStream)
    subject       TEXT    NOT NULL,
    headers       TEXT    NOT NULL,          -- JSON object
    payload       BLOB    NOT NULL,
    published_at  INTEGER NOT NULL,
    UNIQUE (stream, msg_id)
);
CREATE INDEX seaport_broker_messages_stream ON seaport_broker_messages (stream, seq);

CREATE TABLE seaport_broker_consumers (
    stream          TEXT    NOT NULL REFERENCES seaport_broker_streams (name),
    name            TEXT    NOT NULL,        -- the durable name
    filter_subject  TEXT    NOT NULL,
    ack_wait_ms     INTEGER NOT NULL,
    max_deliver     INTEGER NOT NULL,
    delivered_seq   INTEGER NOT NULL DEFAULT 0, -- every message up to here has been handed out
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (stream, name)
);

-- Messages handed out and not yet acknowledged. A row disappears on ack. `visible_at` is when
-- the message may be delivered again (ack wait expired, or nak delay elapsed).
CREATE TABLE seaport_broker_pending (
    stream          TEXT    NOT NULL,
    consumer        TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    delivery_count  INTEGER NOT NULL,
    visible_at      INTEGER NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'exhausted')),
    PRIMARY KEY (stream, consumer, seq)
);
CREATE INDEX seaport_broker_pending_due ON seaport_broker_pending (stream, consumer, state, visible_at);

-- Inbox + Idempotency: one row per (consumer, message) processed; written in the handler's
-- transaction, so the effect and the record commit together.
CREATE TABLE seaport_inbox (
    consumer        TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    correlation_id  TEXT,
    processed_at    INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);

-- Messages that exhausted their deliveries: nothing is dropped silently.
CREATE TABLE seaport_dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer        TEXT    NOT NULL,
    stream          TEXT    NOT NULL,
    stream_seq      INTEGER NOT NULL,
    message_id      TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    headers         TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    delivery_count  INTEGER NOT NULL,
    last_error      TEXT    NOT NULL,
    failed_at       INTEGER NOT NULL,
    UNIQUE (consumer, stream, stream_seq)
);

-- Idempotency-Key: the stored response of a completed request, scoped to the caller.
CREATE TABLE seaport_idempotency_keys (
    scope        TEXT    NOT NULL,            -- the caller (principal / client id)
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,            -- sha256 of method, path and body
    status       INTEGER NOT NULL,
    headers      TEXT    NOT NULL,            -- JSON array of [name, value]
    body         BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX seaport_idempotency_expiry ON seaport_idempotency_keys (expires_at);
