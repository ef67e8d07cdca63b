-- The relay deletes a row once the broker confirmed it, instead of marking it published (see the
-- PostgreSQL migration of the same name). Every row left is unpublished: `seq` (the rowid)
-- orders them.
DELETE FROM seaport_outbox WHERE published_at IS NOT NULL;
DROP INDEX seaport_outbox_unpublished;
DROP INDEX seaport_outbox_published;
ALTER TABLE seaport_outbox DROP COLUMN published_at;
