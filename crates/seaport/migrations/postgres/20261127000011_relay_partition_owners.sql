-- Fencing of relay partition ownership (`outbox/relay.rs`, "Handing a partition over").
--
-- A relay owns a partition through a session advisory lock on its lock connection. If that
-- connection dies while the relay still has claims of the partition in flight on its other
-- connections, another relay can take the lock at once, and its claims would skip the rows
-- still locked by those claims and publish the key's later events before them.
--
-- So the lock is not enough on its own: a relay that takes a partition writes its owner token
-- here (an UPDATE, which waits for every claim that still holds the row FOR SHARE), and a claim
-- takes only partitions whose row names its own relay's token, holding that row FOR SHARE until
-- it commits. Once the new owner's write is done, no claim of the old owner is in flight and
-- no later one takes the partition.
CREATE TABLE seaport_relay_partitions (
    partition BIGINT PRIMARY KEY,
    -- A random token of the owning relay's lock connection (not its pid: pids are reused).
    owner TEXT NOT NULL
);
