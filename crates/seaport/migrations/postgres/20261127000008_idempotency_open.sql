-- Open an Idempotency-Key for one request in the caller's transaction: take the key's
-- transaction-level advisory lock (held until that transaction ends, or its connection drops),
-- then read the key's row. One round trip instead of two, and still in that order: a function
-- marked VOLATILE reads with a snapshot taken after the lock was granted, so it sees the commit
-- of whichever request held the lock before (a single SQL statement could not: its snapshot is
-- taken before anything in it runs). Returns one row: `o_held` false if another transaction
-- holds the key (409); otherwise the key's row, all NULL if it has none.
CREATE FUNCTION seaport_idempotency_open(p_scope TEXT, p_key TEXT, p_lock BIGINT)
RETURNS TABLE (o_held BOOLEAN, o_fingerprint TEXT, o_status BIGINT, o_headers TEXT, o_body BYTEA,
               o_token TEXT, o_locked_until BIGINT, o_expires_at BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(p_lock) THEN
        RETURN QUERY SELECT false, NULL::TEXT, NULL::BIGINT, NULL::TEXT, NULL::BYTEA, NULL::TEXT,
                            NULL::BIGINT, NULL::BIGINT;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, k.fingerprint, k.status, k.headers, k.body, k.token, k.locked_until,
                        k.expires_at
        FROM (SELECT 1) AS one
        LEFT JOIN seaport_idempotency_keys AS k ON k.scope = p_scope AND k.key = p_key;
END
$$;
