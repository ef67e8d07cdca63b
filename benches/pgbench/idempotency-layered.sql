\set token random(1, 1000000000000)
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT * FROM seaport_idempotency_open('anonymous', 'key-' || :token, :token);
INSERT INTO cases (id, title, description, customer_id, status, correlation_id, created_at, customer_check, customer_name, customer_email) VALUES (gen_random_uuid()::text, 'Printer on fire', 'Third floor', 'cust-1', 'open', gen_random_uuid()::text, '2026-11-26T09:00:00Z', 'unverified', NULL, NULL);
INSERT INTO seaport_outbox (event_id, topic, ordering_key, partition, envelope, created_at, traceparent) VALUES (gen_random_uuid()::text, 'sea.cases.created', 'case-1', 3, convert_to(repeat('x', 600), 'UTF8'), 1, '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01') RETURNING seq;
INSERT INTO seaport_idempotency_keys AS k (scope, key, fingerprint, status, headers, body, created_at, expires_at, token, locked_until) VALUES ('anonymous', 'key-' || :token, 'fingerprint-of-the-request-0123456789abcdef', 201, '[["content-type","application/json"],["location","/cases/x"]]', convert_to(repeat('y', 400), 'UTF8'), 1, 86400001, 'token-' || :token, 0) ON CONFLICT (scope, key) DO UPDATE SET status = excluded.status WHERE k.expires_at <= 1 OR (k.status = 0 AND k.locked_until <= 1 AND k.fingerprint = excluded.fingerprint) RETURNING 1;
COMMIT;
