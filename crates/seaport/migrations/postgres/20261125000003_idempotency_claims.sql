-- Idempotency keys are claimed before the handler runs: `token` names the request holding the
-- claim, `locked_until` when an unfinished claim (crashed request) may be taken over.
ALTER TABLE seaport_idempotency_keys ADD COLUMN token TEXT NOT NULL DEFAULT '';
ALTER TABLE seaport_idempotency_keys ADD COLUMN locked_until BIGINT NOT NULL DEFAULT 0;
