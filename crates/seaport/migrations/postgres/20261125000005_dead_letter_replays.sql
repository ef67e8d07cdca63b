-- When a dead letter was last sent back to its consumer, and how often.
ALTER TABLE seaport_dead_letters ADD COLUMN replayed_at BIGINT;
ALTER TABLE seaport_dead_letters ADD COLUMN replays BIGINT NOT NULL DEFAULT 0;
