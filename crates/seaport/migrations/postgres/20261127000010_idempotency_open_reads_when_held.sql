-- `seaport_idempotency_open` also reads the key's row when another transaction holds the key.
-- A request that only replays a completed key holds its lock for a moment too; a duplicate
-- arriving in that moment got 409 ("in flight") for a request that had long completed. Now it
-- gets the row (`o_held` false) and replays it; only a key with no completed row answers 409.
CREATE OR REPLACE FUNCTION seaport_idempotency_open(p_scope TEXT, p_key TEXT, p_lock BIGINT)
RETURNS TABLE (o_held BOOLEAN, o_fingerprint TEXT, o_status BIGINT, o_headers TEXT, o_body BYTEA,
               o_token TEXT, o_locked_until BIGINT, o_expires_at BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_held BOOLEAN := pg_try_advisory_xact_lock(p_lock);
BEGIN
    RETURN QUERY SELECT v_held, k.fingerprint, k.status, k.headers, k.body, k.token, k.locked_until,
                        k.expires_at
        FROM (SELECT 1) AS one
        LEFT JOIN seaport_idempotency_keys AS k ON k.scope = p_scope AND k.key = p_key;
END
$$;
