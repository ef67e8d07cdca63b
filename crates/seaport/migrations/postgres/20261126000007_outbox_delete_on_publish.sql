-- The relay deletes a row once the broker confirmed it, instead of marking it published: the
-- broker's stream is the record of what was published. A delete only stamps the row's version
-- as gone; marking it wrote a whole new version (envelope included) and an entry in every
-- index, about three times the database's work per event (BENCHMARKS.md). Every row left is
-- unpublished, so the primary key alone serves the relay's seq-order scan.
DELETE FROM seaport_outbox WHERE published_at IS NOT NULL;
-- Drops the two partial indexes on it too.
ALTER TABLE seaport_outbox DROP COLUMN published_at;
