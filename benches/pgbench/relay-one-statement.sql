WITH b AS (SELECT seq FROM seaport_outbox WHERE published_at IS NULL ORDER BY seq LIMIT 256)
UPDATE seaport_outbox o SET published_at = 1, attempts = attempts + 1 FROM b WHERE o.seq = b.seq RETURNING o.event_id, o.topic, o.envelope, o.traceparent;
