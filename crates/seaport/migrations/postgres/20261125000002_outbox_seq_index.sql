-- The relay reads unpublished rows in seq order, filtered by the partitions it owns. An index in
-- seq order makes that a short index scan whatever the backlog; the (partition, seq) index made
-- PostgreSQL sort the whole backlog for every batch.
DROP INDEX seaport_outbox_unpublished;
CREATE INDEX seaport_outbox_unpublished ON seaport_outbox (seq) WHERE published_at IS NULL;
