UPDATE seaport_outbox SET published_at = 1, attempts = attempts + 1
 WHERE seq = ANY(ARRAY(
     SELECT seq FROM seaport_outbox
     WHERE published_at IS NULL AND partition = ANY('{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}'::bigint[])
     ORDER BY seq LIMIT 1024
     FOR UPDATE SKIP LOCKED))
 RETURNING seq, event_id, topic, envelope, traceparent;
