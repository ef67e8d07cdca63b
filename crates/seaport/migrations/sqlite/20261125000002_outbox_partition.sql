-- The relay partition of an outbox row (hash of its ordering key); see the PostgreSQL schema.
ALTER TABLE seaport_outbox ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
CREATE INDEX seaport_inbox_processed ON seaport_inbox (processed_at);
CREATE INDEX seaport_inbox_correlation ON seaport_inbox (correlation_id);
CREATE INDEX seaport_outbox_published ON seaport_outbox (published_at) WHERE published_at IS NOT NULL;
