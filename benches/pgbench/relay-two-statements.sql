SELECT seq, event_id, topic, envelope, traceparent FROM seaport_outbox WHERE published_at IS NULL ORDER BY seq LIMIT 256;
BEGIN;
UPDATE seaport_outbox SET published_at = 1, attempts = attempts + 1 WHERE seq IN (SELECT seq FROM seaport_outbox WHERE published_at IS NULL ORDER BY seq LIMIT 256);
COMMIT;
