-- When a dead letter was last sent back to its consumer, and how often.
ALTER TABLE seaport_dead_letters ADD COLUMN replayed_at INTEGER;
ALTER TABLE seaport_dead_letters ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
