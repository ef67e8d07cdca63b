-- Fencing of relay partition ownership (`outbox/relay.rs`, "Handing a partition over").
--
-- A relay owns a partition through a session advisory lock on its lock connection. If that
-- connection dies while the relay still has claims of the partition in flight on its other
-- connections, another relay can take the lock at once, and its claims would skip the rows
-- still locked by those claims and publish the key's later events before them.
--
-- So the lock is not enough on its own. A claim takes only partitions whose row here names its
-- relay's token and whose fence lock (an advisory lock) its BEGIN took, shared. A relay that takes
-- a partition writes its own token here, then takes the partition's fence lock exclusively, which
-- waits for every claim in flight; claims begun after that read the new owner.
CREATE TABLE seaport_relay_partitions (
    partition BIGINT PRIMARY KEY,
    -- A random token of the owning relay's lock connection (not its pid: pids are reused).
    owner TEXT NOT NULL
);
