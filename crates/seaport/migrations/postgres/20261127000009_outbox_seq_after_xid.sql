-- An outbox row's writer holds its transaction id before it takes its seq. The relay relies on
-- this to skip the rows it has already claimed without ever skipping a late commit
-- (`outbox/relay.rs`, "The claim horizon"): once every transaction id up to one taken after a
-- claim has ended, no row with a seq up to that claim's highest can still appear.
--
-- Without it a writer could take a seq, then (descheduled) get its transaction id only after the
-- relay had looked, and commit a row below the relay's horizon. CASE evaluates its condition
-- first and `pg_current_xact_id()` assigns the id if the transaction has none yet; an insert
-- would assign it a moment later anyway, so this costs nothing measurable.
ALTER TABLE seaport_outbox ALTER COLUMN seq SET DEFAULT
    (CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('seaport_outbox_seq_seq'::regclass) END);
-- Seqs must be handed out in the order they are asked for: a per-session cache would let a
-- writer take a seq below one already committed by another.
ALTER SEQUENCE seaport_outbox_seq_seq CACHE 1;
