//! The outbox relay: moves committed outbox rows to the broker, at least once, and deletes a row
//! only after the broker confirmed it. A crash between the two means the row is published again
//! on restart; the broker drops the copy (dedupe by message id = event id) and the consumers'
//! inbox would drop it too.
//!
//! **Deleted, not marked.** Every row in the outbox is unpublished; the broker's stream is the
//! record of what was published. On PostgreSQL a delete only stamps the row's version as gone,
//! where marking it published wrote a whole new version, envelope included, plus an entry in
//! every index: about three times the database's work per event, which capped the relay.
//!
//! **Never skipping a late commit.** The relay does not keep a "last published seq" cursor (the
//! bug that loses events elsewhere: seq 10 is assigned, seq 11 commits first, the cursor moves
//! past 10, then 10 commits and is never seen). It always selects the rows that are still
//! unpublished, oldest first; a row that commits late is simply found on the next pass. On SQLite
//! there is one writer at a time, so seq order *is* commit order. On PostgreSQL rows become
//! visible in commit order and are published as they become visible.
//!
//! **Many relays (PostgreSQL).** Rows carry a partition (hash of the ordering key, the event's
//! `subject`). Each partition is owned by at most one relay at a time through a session-level
//! advisory lock held on a dedicated connection; a relay publishes only the partitions it owns,
//! one batch at a time, in seq order, and hands a partition over only between batches. So the
//! events of one key are published by one relay, in order. A relay that dies loses its
//! connection and with it its locks; the others take the partitions over within a rebalance
//! interval. Relays share partitions fairly: each takes `ceil(16 / live relays)`, counting live
//! relays by their lock connections (`application_name = 'seaport-relay'`).
//!
//! **Handing a partition over.** The advisory lock alone would not keep per-key order when a
//! relay's lock connection dies while its claims are still in flight on its other connections:
//! the lock is free at once, and another relay's claims would skip the rows those claims hold
//! and publish the key's later events first. So ownership is also recorded in the database
//! (`seaport_relay_partitions`, a token per lock connection) and fenced: a claim takes a fence
//! lock shared in its `BEGIN` and holds it to its end, and claims only partitions whose row names
//! its relay. A relay that takes partitions writes its own token there, then takes the fence
//! exclusively (and lets it go at once), which waits for every claim in flight. Claims begun
//! after that read the new owner, so the previous owner's take no more of the partition; claims
//! begun while it waits come back empty rather than wait (see [`CLAIM_BEGIN`]). Row locks would do the same but turn every overlap of claims into a
//! multixact; advisory locks live only in the lock table.
//!
//! On SQLite the relay reads under `BEGIN IMMEDIATE`: woken by the commit hook of a writer that is
//! still finishing its commit, it waits for that writer and then sees its rows.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use tokio::sync::watch;

use super::PARTITIONS;
use crate::broker::{Broker, MSG_ID_HEADER, OutgoingMessage, PendingPublish};
use crate::crash::crash_point;
use crate::event::CLOUDEVENTS_JSON;
use crate::on_conn;
use crate::store::{Db, PgStore};

/// First key of the advisory locks of relay partitions (the second is the partition).
pub const LOCK_NAMESPACE: i32 = 0x5EA9;
/// `application_name` of the relays' lock connections, by which relays count each other.
pub const RELAY_APPLICATION: &str = "seaport-relay";

/// How a claim's transaction begins, in one round trip. Asynchronous commit: losing a claim's
/// deletes in a database crash only republishes (see [`Relay::drain`]). No sorts, bitmap or
/// sequential scans: before the outbox is first analysed (a new database, or a burst of inserts since),
/// PostgreSQL estimates a handful of rows and plans to sort all of them to find the oldest batch,
/// or to scan the whole table for the delete. Each claim would then cost more as the backlog
/// grows. Without those, the only plan left walks the primary key in seq order, stops at the
/// limit, and deletes by primary key.
///
/// It also takes the handover fence (see [`PartitionLocks`]) shared, if it gets it without
/// waiting, and notes whether in `seaport.fenced`: held until the claim ends, taken before the
/// claim's statement takes its snapshot (which must see any new owner that has passed the fence).
/// Without it the claim takes nothing. Claims' shared locks never conflict with each other. A
/// relay taking partitions over waits for them, and while it waits, new claims do not get the
/// fence (a request waiting for the lock conflicts): they come back empty instead of queueing
/// behind the takeover, which itself waits for the claims still in flight, whose commits the
/// drain may only make after its next claim.
#[doc(hidden)]
pub const CLAIM_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL synchronous_commit TO off; \
     SET LOCAL enable_sort TO off; SET LOCAL enable_bitmapscan TO off; SET LOCAL enable_seqscan TO off; \
     SELECT set_config('seaport.fenced', pg_try_advisory_xact_lock_shared(24233, 100)::text, true)";

/// Second key of the handover fence (with [`LOCK_NAMESPACE`]; [`CLAIM_BEGIN`] spells both out).
/// One fence for all partitions: a claim takes one lock, not one per partition.
pub const FENCE_KEY: i32 = 100;

/// The claim: the oldest rows of the partitions `$1` above seq `$3` (the drain's horizon, see
/// [`Horizon`]), at most `$2`, deleted and returned, in a transaction that commits only once the
/// broker confirmed them. `SKIP LOCKED` passes over rows claimed by a transaction still open
/// (the batch being published). `= ANY(ARRAY(…))` makes the delete a primary-key lookup per
/// claimed row; as a join, PostgreSQL may hash it against a scan of the whole table.
///
/// Only partitions whose owner row names this relay's token `$4` are claimed, and only if
/// [`CLAIM_BEGIN`] took the fence (see [`PartitionLocks`]).
///
/// Each row also carries the claim's own transaction id and the statement's snapshot (which
/// transactions were still running when it looked); they move the horizon. Only the first row's
/// are read.
#[doc(hidden)]
pub const CLAIM_SQL: &str = "DELETE FROM seaport_outbox
     WHERE seq = ANY(ARRAY(
         SELECT seq FROM seaport_outbox
         WHERE partition = ANY(ARRAY(
                 SELECT partition FROM seaport_relay_partitions
                 WHERE partition = ANY($1) AND owner = $4
                   AND current_setting('seaport.fenced', true) = 'true'))
           AND seq > $3
         ORDER BY seq LIMIT $2
         FOR UPDATE SKIP LOCKED))
     RETURNING seq, event_id, topic, envelope, traceparent,
         (SELECT pg_current_xact_id()::text::bigint),
         (SELECT pg_current_snapshot()::text)";

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Rows claimed per statement and published per round trip (all in flight at once on
    /// JetStream). 1024 rather than 256 drains a backlog on PostgreSQL about 20% faster
    /// (BENCHMARKS.md): fewer claims and commits, and JetStream keeps more in flight. Under a
    /// steady trickle a batch is whatever has committed, so this does not delay anything.
    pub batch_size: usize,
    /// Fallback scan when no commit signal arrives (lost notifications, reconnects).
    pub poll_interval: Duration,
    /// Ceiling of the retry delay while the broker refuses messages.
    pub max_backoff: Duration,
    /// How often a PostgreSQL relay checks its partitions and takes or gives some.
    pub rebalance_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1024,
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            rebalance_interval: Duration::from_secs(1),
        }
    }
}

/// What one pass of the relay did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RelayPass {
    pub published: usize,
    pub failed: usize,
}

pub struct Relay {
    db: Db,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
    partitions: Option<PartitionLocks>,
    /// PostgreSQL: the horizon the last drain ended with, if it ended cleanly (see
    /// [`KeptHorizon`]).
    kept: Option<KeptHorizon>,
    /// The last drain ended because a claim came back empty (not to let a rebalance in): what
    /// commits after it is announced by the commit signal, so [`Relay::run`] need not look again.
    ran_dry: bool,
}

/// A drain's [`Horizon`], kept for the next drain of the same relay.
///
/// **Why.** A horizon that starts again at the beginning of the outbox makes each drain's first
/// claim walk every index entry of rows deleted since the table was last vacuumed. Under a steady
/// trickle nearly every commit starts a drain, and that walk grew with the dead rows: 1.7 ms per
/// drain after 200,000 deleted rows, more than the whole claim (BENCHMARKS.md, tenth round).
///
/// **Why it stays true.** The horizon's proof (see [`Horizon`]) does not end with the drain: a
/// row at or below it was claimed by this relay, and a writer that takes a seq later gets a
/// higher one. It breaks only when a claimed row comes back or another relay's rows become ours:
/// - a claim rolled back (a refusal, a failed commit, an error): the horizon is not kept;
/// - the owned partitions changed (or the lock connection did): [`PartitionLocks::generation`];
/// - anything this relay cannot see, such as a claim's asynchronously committed delete lost in a
///   database crash: the horizon is kept at most [`RelayConfig::poll_interval`], the relay's
///   fallback, after which a drain starts from the beginning again.
struct KeptHorizon {
    horizon: Horizon,
    generation: u64,
    since: Instant,
}

impl Relay {
    pub fn new(db: impl Into<Db>, broker: Arc<dyn Broker>, config: RelayConfig) -> Self {
        let db = db.into();
        let partitions = match &db {
            Db::Postgres(pg) => Some(PartitionLocks::new(pg.clone())),
            Db::Sqlite(_) => None,
        };
        Relay {
            db,
            broker,
            config,
            partitions,
            kept: None,
            ran_dry: false,
        }
    }

    /// The partitions this relay currently owns (all of them on SQLite).
    pub fn owned_partitions(&self) -> Vec<i64> {
        match &self.partitions {
            Some(p) => p.owned.iter().copied().collect(),
            None => (0..PARTITIONS).collect(),
        }
    }

    /// Publish one batch of rows (oldest first) and delete the confirmed ones.
    pub async fn run_once(&mut self) -> Result<RelayPass, sqlx::Error> {
        if let Some(locks) = &mut self.partitions {
            locks.rebalance_if_due(self.config.rebalance_interval).await;
        }
        if self.partitions.is_some() {
            let Some(claim) = self.claim(Horizon::START).await? else {
                return Ok(RelayPass::default());
            };
            let (confirmed, failed) = self.publish(&claim.batch).await;
            let pass = RelayPass {
                published: confirmed.len(),
                failed: failed.len(),
            };
            claim.settle(confirmed, failed).await?;
            return Ok(pass);
        }
        let batch = self.fetch_batch().await?;
        if batch.seqs.is_empty() {
            return Ok(RelayPass::default());
        }
        let (confirmed, failed) = self.publish(&batch).await;
        let pass = RelayPass {
            published: confirmed.len(),
            failed: failed.len(),
        };
        delete_published(&self.db, confirmed, failed).await?;
        Ok(pass)
    }

    /// Publish everything that is unpublished now, until a claim comes back empty or the broker
    /// refuses something.
    ///
    /// On PostgreSQL this is a pipeline of claims. A claim is one statement that deletes the
    /// oldest rows of the owned partitions, `RETURNING` them, in a transaction that stays open
    /// while they are published: nothing is committed before the broker confirmed it. While
    /// batch *n* is being published, batch *n+1* is claimed (its `FOR UPDATE SKIP LOCKED` passes
    /// over the rows of batch *n*, locked by its open transaction, and it starts above the
    /// drain's [`Horizon`], which never passes a row that can still commit) and batch *n-1*
    /// commits. A drain ends when a claim comes back empty, or after the claim made when its
    /// partitions became due for a rebalance.
    /// Messages are sent in claim order, and in seq order within a claim, with up to a batch of
    /// them in flight at once across claims (see [`Pipeline`]); a claim commits once all of its
    /// messages are confirmed. A refused message stops the drain: nothing is sent after its
    /// answer arrives (the messages already in flight, at most a batch, may still be stored),
    /// claims not wholly confirmed are rolled back, and only their confirmed rows are deleted
    /// (the refused ones keep the reason), in a transaction of their own.
    ///
    /// Claims commit with `synchronous_commit = off`: a delete lost in a database crash only
    /// means the row is published again, which the broker's duplicate window (message id = event
    /// id) and the consumers' inbox absorb. Nothing the relay deletes was acknowledged to anyone.
    /// A relay that dies mid-publish leaves its claim uncommitted: the rows stay in the outbox.
    pub async fn drain(&mut self) -> Result<RelayPass, sqlx::Error> {
        if self.partitions.is_none() {
            // SQLite: one writer at a time; fetch, publish (the embedded broker writes to the
            // same file) and delete cannot overlap anyway.
            let mut total = RelayPass::default();
            loop {
                let pass = self.run_once().await?;
                total.published += pass.published;
                total.failed += pass.failed;
                if pass.published == 0 || pass.failed > 0 {
                    self.ran_dry = pass.published == 0 && pass.failed == 0;
                    return Ok(total);
                }
            }
        }
        if let Some(locks) = &mut self.partitions {
            locks.rebalance_if_due(self.config.rebalance_interval).await;
        }
        let broker = self.broker.clone();
        let mut pipeline = Pipeline::new(self.config.batch_size.max(1));
        // A drain's partitions do not change until it ends. A claimed row comes back only when
        // its claim rolls back: after a refusal or a short answer (the drain stops sending), or
        // a claim whose commit failed (its messages were all confirmed already, so sending them
        // again only makes duplicates, which the broker and inboxes drop). The next drain then
        // starts from the beginning; after a clean drain it starts where this one ended.
        let generation = self.partitions.as_ref().map_or(0, |l| l.generation);
        let mut kept = match self.kept.take() {
            Some(k) if k.generation == generation && k.since.elapsed() < self.config.poll_interval => k,
            _ => KeptHorizon {
                horizon: Horizon::default(),
                generation,
                since: Instant::now(),
            },
        };
        let horizon = &mut kept.horizon;
        self.ran_dry = false;
        let mut ran_dry = false;
        let mut next = self.claim(horizon.seq).await;
        loop {
            let claim = match next {
                Ok(Some(c)) => c,
                Ok(None) => {
                    ran_dry = true;
                    break;
                }
                Err(e) => {
                    pipeline.error.get_or_insert(e);
                    break;
                }
            };
            horizon.claimed(&claim);
            let ((), claimed) = tokio::join!(pipeline.send(&*broker, claim), self.claim(horizon.seq));
            // A drain under steady load never runs dry: hand back to `run` when partitions are
            // due for a rebalance, so other relays can get their share.
            let rebalance = self
                .partitions
                .as_ref()
                .is_some_and(|l| l.due(self.config.rebalance_interval));
            if pipeline.stopped() {
                // The claim made meanwhile is given back unpublished (rolled back).
                if let Ok(Some(unused)) = claimed {
                    let _ = unused.tx.rollback().await;
                }
                break;
            }
            if rebalance {
                // The claim made meanwhile is sent (its partitions are still this relay's):
                // rolling it back would only have the next drain claim it again.
                // A claim that failed took nothing; the next drain tries again.
                if let Ok(Some(last)) = claimed {
                    pipeline.send(&*broker, last).await;
                }
                break;
            }
            next = claimed;
        }
        let (pass, gave_back) = pipeline.finish().await;
        if matches!(&pass, Ok(p) if p.failed == 0) && !gave_back {
            self.kept = Some(kept);
            self.ran_dry = ran_dry;
        }
        pass
    }

    /// PostgreSQL: where the next drain's first claim starts (`None`: at the beginning), and
    /// how long that horizon has been kept.
    #[doc(hidden)]
    pub fn kept_horizon(&self) -> Option<(i64, Duration)> {
        self.kept
            .as_ref()
            .filter(|k| k.horizon.seq != Horizon::START)
            .map(|k| (k.horizon.seq, k.since.elapsed()))
    }

    /// Publish a batch (all messages in flight at once); split the seqs into confirmed and
    /// refused (with the broker's reason).
    async fn publish(&self, batch: &Batch) -> (Vec<i64>, Vec<(i64, String)>) {
        crash_point("relay.before_publish");
        let results = self.broker.publish(&batch.messages).await;
        crash_point("relay.after_publish");
        let mut confirmed = Vec::with_capacity(batch.seqs.len());
        let mut failed = Vec::new();
        for (seq, result) in batch.seqs.iter().zip(results) {
            match result {
                Ok(_) => confirmed.push(*seq),
                Err(e) => failed.push((*seq, e.to_string())),
            }
        }
        crate::telemetry::published(confirmed.len(), failed.len());
        (confirmed, failed)
    }

    /// SQLite: the oldest rows, read under the write lock.
    async fn fetch_batch(&self) -> Result<Batch, sqlx::Error> {
        let Db::Sqlite(s) = &self.db else {
            unreachable!("PostgreSQL relays claim rows instead")
        };
        let mut tx = s.begin_write().await?;
        let rows =
            sqlx::query("SELECT seq, event_id, topic, envelope, traceparent FROM seaport_outbox ORDER BY seq LIMIT $1")
                .bind(self.config.batch_size as i64)
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Batch::from_rows(rows.iter().map(decode).collect()))
    }

    /// PostgreSQL: claim the oldest rows of the owned partitions with a seq above `after`,
    /// deleted in a transaction left open until [`Claim::settle`]; `None` if there are none.
    async fn claim(&self, after: i64) -> Result<Option<Claim>, sqlx::Error> {
        let (Db::Postgres(p), Some(locks)) = (&self.db, &self.partitions) else {
            unreachable!("only PostgreSQL relays claim rows")
        };
        if locks.owned.is_empty() {
            return Ok(None);
        }
        let owned: Vec<i64> = locks.owned.iter().copied().collect();
        let mut tx = p.pool().begin_with(CLAIM_BEGIN).await?;
        let claimed = sqlx::query(CLAIM_SQL)
            .bind(&owned)
            .bind(self.config.batch_size as i64)
            .bind(after)
            .bind(&locks.token)
            .fetch_all(&mut *tx)
            .await;
        let rows = match claimed {
            Ok(rows) => rows,
            Err(e) => {
                // Ended now: dropped, its locks would last until the connection goes back to the
                // pool, and a claim meanwhile would skip its rows (see `delete_published`).
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        let Some(first) = rows.first() else {
            tx.rollback().await?;
            return Ok(None);
        };
        // Unreadable (never expected): the claim then only moves no horizon.
        let snapshot = first
            .try_get::<i64, _>(5)
            .ok()
            .zip(first.try_get::<&str, _>(6).ok().and_then(Snapshot::parse));
        let mut batch = Batch::from_rows(rows.iter().map(decode).collect());
        // RETURNING follows no order; publish in seq order.
        batch.sort();
        Ok(Some(Claim {
            tx,
            batch,
            snapshot,
            db: self.db.clone(),
        }))
    }

    /// Run until `shutdown` changes to `true`: drain the outbox, then sleep until the next commit
    /// signal or the poll interval; back off exponentially while the broker fails.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut commits = self.db.outbox_commits();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *shutdown.borrow() {
                if let Some(locks) = &mut self.partitions {
                    locks.release_all().await;
                }
                return;
            }
            commits.borrow_and_update();
            let wait = match self.drain().await {
                Ok(pass) if pass.failed == 0 && pass.published > 0 && !self.ran_dry => {
                    backoff = Duration::from_millis(50);
                    continue; // it stopped for a rebalance: rows are waiting
                }
                Ok(pass) if pass.failed == 0 => {
                    backoff = Duration::from_millis(50);
                    None
                }
                Ok(pass) => {
                    tracing::warn!(
                        failed = pass.failed,
                        published = pass.published,
                        "broker refused events; retrying"
                    );
                    Some(backoff)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay pass failed; retrying");
                    Some(backoff)
                }
            };
            if let Some(delay) = wait {
                backoff = (backoff * 2).min(self.config.max_backoff);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            } else {
                // Idle: a PostgreSQL relay must still wake to rebalance partitions.
                let idle = match &self.partitions {
                    Some(_) => self.config.poll_interval.min(self.config.rebalance_interval),
                    None => self.config.poll_interval,
                };
                tokio::select! {
                    _ = commits.changed() => {}
                    _ = tokio::time::sleep(idle) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

/// A batch read from the outbox: seqs and the messages to publish, side by side.
#[derive(Default)]
struct Batch {
    seqs: Vec<i64>,
    messages: Vec<OutgoingMessage>,
}

impl Batch {
    /// Rows of `seq, event_id, topic, envelope, traceparent` as messages.
    fn from_rows(rows: Vec<OutboxRow>) -> Batch {
        let (seqs, messages) = rows
            .into_iter()
            .map(|(seq, id, topic, payload, traceparent)| {
                let mut headers = BTreeMap::from([
                    (MSG_ID_HEADER.to_owned(), id.clone()),
                    ("content-type".to_owned(), CLOUDEVENTS_JSON.to_owned()),
                ]);
                // The trace context travels as a header too, for tools that do not read payloads.
                if let Some(t) = traceparent {
                    tracing::debug!(event_id = %id, traceparent = %t, "relaying");
                    headers.insert("traceparent".to_owned(), t);
                }
                (
                    seq,
                    OutgoingMessage {
                        id,
                        subject: topic,
                        headers,
                        payload: payload.into(),
                    },
                )
            })
            .unzip();
        Batch { seqs, messages }
    }

    fn sort(&mut self) {
        let mut pairs: Vec<(i64, OutgoingMessage)> = std::mem::take(&mut self.seqs)
            .into_iter()
            .zip(std::mem::take(&mut self.messages))
            .collect();
        pairs.sort_unstable_by_key(|(seq, _)| *seq);
        (self.seqs, self.messages) = pairs.into_iter().unzip();
    }
}

/// `seq, event_id, topic, envelope, traceparent` of an outbox row.
type OutboxRow = (i64, String, String, Vec<u8>, Option<String>);

/// A row of `seq, event_id, topic, envelope, traceparent`.
fn decode<R: Row>(r: &R) -> OutboxRow
where
    usize: sqlx::ColumnIndex<R>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// Rows claimed by a PostgreSQL relay: deleted in `tx`, which is still open.
struct Claim {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    batch: Batch,
    /// The claim's transaction id, and which transactions were running when it looked (`None`:
    /// unreadable, and then the claim moves no horizon).
    snapshot: Option<(i64, Snapshot)>,
    db: Db,
}

/// A PostgreSQL snapshot as `pg_current_snapshot()::text` prints it: `xmin:xmax:xip,…`.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    /// Every transaction id below this had ended.
    xmin: i64,
    /// Transaction ids from this one on count as still running.
    xmax: i64,
    /// Transaction ids between the two still running.
    xip: Vec<i64>,
}

impl Snapshot {
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(str::parse).collect::<Result<_, _>>().ok()?,
        };
        parts.next().is_none().then_some(Snapshot { xmin, xmax, xip })
    }

    /// Had transaction `xid` ended (committed or rolled back) when the snapshot was taken?
    fn ended(&self, xid: i64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// The claim horizon of a PostgreSQL drain: a seq at or below which no row can be waiting for
/// it, so that each claim starts its scan above it instead of at the start of the outbox.
///
/// **Why.** A claim walks the primary key in seq order. Without a starting point it passes, on
/// every claim, over the rows of the claims before it: rows still locked by the claims in
/// flight, and the index entries of rows already deleted. That was half of PostgreSQL's work per
/// event in the relay benchmark (BENCHMARKS.md, fifth round).
///
/// **Why not simply the last claim's highest seq.** A row below it may still commit: its writer
/// took its seq earlier and commits later. Starting above it would publish that key's later rows
/// first (tests `a_row_that_commits_behind_the_relay_still_goes_out_before_its_key_goes_on`,
/// `two_relays_and_two_workers_keep_per_key_order_and_exactly_once_effects`).
///
/// **When a claim's highest seq `M` becomes safe.** A writer of a row with a seq up to `M` took
/// its transaction id before its seq (the outbox's seq default, migration `20261127000009`),
/// hence before `M` was taken (seqs are handed out in order: no sequence cache), before `M`
/// committed, and before the claim that returned `M` looked, and assigned its own id `X`. So
/// when that claim looked, such a writer had ended, or was running: listed in its snapshot, or
/// with an id from the snapshot's `xmax` up to `X` (PostgreSQL counts those as "not yet
/// started"). Those are the ids the claim *waits for*, less the drain's own claims, which only
/// delete. Once a claim (the same one or a later one) finds them all ended, no row up to `M` can
/// still appear, and every one that did was visible to that claim. That claim took every visible
/// unclaimed row above the horizon up to its own highest seq `H`, so the horizon can move to
/// `min(M, H)`. On an otherwise idle database a claim waits for nothing and moves the horizon to
/// its own highest seq at once.
///
/// Every row below the horizon has therefore been claimed by this relay. A claimed row comes back
/// only if its claim rolls back, after which the drain sends nothing more, and the next drain
/// starts from the beginning; after a clean drain the next one starts from its horizon (see
/// [`KeptHorizon`]). A long transaction anywhere on the server (transaction ids are
/// server-wide) only holds the horizon where it is: claims then scan from there, as all did
/// before.
///
/// **Assumed:** nothing but the relay of a partition locks or updates its outbox rows (`SKIP
/// LOCKED` takes any skipped row as this drain's), and rows get their seq from the column
/// default. Both held before the horizon too: a row locked by someone else was skipped then as
/// well, and its key's later rows could go out first.
#[derive(Debug)]
struct Horizon {
    /// Claims start above this seq.
    seq: i64,
    /// Claims not yet known safe: their highest seq and the transaction ids they wait for.
    pending: VecDeque<(i64, Vec<i64>)>,
    /// This drain's latest claims' transaction ids.
    own: VecDeque<i64>,
}

impl Horizon {
    /// Below every seq.
    const START: i64 = i64::MIN;
    /// Claims remembered; one forgotten only leaves the horizon lower than it could be.
    const REMEMBERED: usize = 64;
    /// A claim that would wait for more transaction ids than this never moves the horizon.
    const MAX_WAIT: i64 = 4096;

    /// A claim came back: remember it, and move the horizon over every claim it proves safe.
    fn claimed(&mut self, claim: &Claim) {
        if let (Some(&highest), Some((xid, snapshot))) = (claim.batch.seqs.last(), &claim.snapshot) {
            self.advance(highest, *xid, snapshot);
        }
    }

    /// A claim with transaction id `xid` and snapshot `snapshot` returned seqs up to `highest`.
    fn advance(&mut self, highest: i64, xid: i64, snapshot: &Snapshot) {
        if self.own.len() == Self::REMEMBERED {
            self.own.pop_front();
        }
        self.own.push_back(xid);
        if xid - snapshot.xmax <= Self::MAX_WAIT {
            let waits: Vec<i64> = (snapshot.xip.iter().copied())
                .chain(snapshot.xmax..xid)
                .filter(|x| !self.own.contains(x))
                .collect();
            if self.pending.len() == Self::REMEMBERED {
                self.pending.pop_front();
            }
            self.pending.push_back((highest, waits));
        }
        let proven = (self.pending.iter())
            .filter(|(_, waits)| waits.iter().all(|x| snapshot.ended(*x)))
            .map(|(seq, _)| (*seq).min(highest))
            .max();
        if let Some(seq) = proven {
            self.seq = self.seq.max(seq);
        }
        let horizon = self.seq;
        self.pending.retain(|(seq, _)| *seq > horizon);
    }
}

impl Default for Horizon {
    fn default() -> Self {
        Horizon {
            seq: Self::START,
            pending: VecDeque::new(),
            own: VecDeque::new(),
        }
    }
}

impl Claim {
    /// After the broker answered: commit if it confirmed everything. Otherwise (something was
    /// refused, or not sent after a refusal) roll the claim back and delete exactly the
    /// confirmed rows, recording the reason on the refused ones
    /// (the claim's own transaction cannot give a deleted row back). Until then nobody else
    /// publishes these rows: this relay owns their partitions and claims nothing more before
    /// its drain ends, which waits for this.
    async fn settle(self, confirmed: Vec<i64>, failed: Vec<(i64, String)>) -> Result<(), sqlx::Error> {
        if confirmed.len() == self.batch.seqs.len() {
            return self.tx.commit().await;
        }
        self.tx.rollback().await?;
        delete_published(&self.db, confirmed, failed).await
    }
}

/// The PostgreSQL drain's publishing pipeline: up to `window` messages in flight, across
/// claims, as the raw JetStream loop keeps them. Waiting for a whole batch to be confirmed
/// before sending the next left the broker idle at every batch boundary.
///
/// Messages go out in claim order, and within a claim in seq order. A claim is settled (see
/// [`Claim::settle`]) once all of its messages that were sent have been answered. A refused
/// message stops the pipeline: nothing more is sent, the messages already in flight (at most
/// a window, as within one batch before) are answered and settled, and the drain returns.
struct Pipeline {
    window: usize,
    /// Sent, not yet answered: the claim each belongs to, its seq and its confirmation.
    in_flight: VecDeque<(u64, i64, PendingPublish)>,
    /// Claims with messages in flight or being sent, oldest first.
    claims: VecDeque<InFlightClaim>,
    next_id: u64,
    /// Commits of wholly confirmed claims, at most two pending (a slow database slows the
    /// relay instead of growing the number of open transactions).
    settling: VecDeque<tokio::task::JoinHandle<Result<(), sqlx::Error>>>,
    /// Answered claims not wholly confirmed, settled only in [`Pipeline::finish`]. Their
    /// settle rolls the claim back, which unlocks their rows, then deletes the confirmed ones:
    /// run while the drain's next claim is still open, that claim could take those rows and
    /// the delete would wait for it, while the drain waits for the delete.
    partial: Vec<InFlightClaim>,
    total: RelayPass,
    /// The broker refused a message.
    refused: bool,
    error: Option<sqlx::Error>,
}

/// At most this many messages in flight, whatever the batch size.
const MAX_WINDOW: usize = 4096;

/// At most this many claims with messages in flight: each holds a transaction (a pooled
/// connection) open until its messages are answered. Small claims under a moderate load
/// would otherwise open one after the other until the pool ran dry.
const CLAIMS_IN_FLIGHT: usize = 2;

struct InFlightClaim {
    id: u64,
    claim: Claim,
    /// All of its messages that will be sent have been.
    sealed: bool,
    sent: usize,
    confirmed: Vec<i64>,
    failed: Vec<(i64, String)>,
}

impl Pipeline {
    fn new(window: usize) -> Self {
        // Below async-nats' limit of publish acks in flight (5000): over it, sending would wait
        // for a permit that only answered confirmations give back.
        let window = window.clamp(1, MAX_WINDOW);
        Pipeline {
            window,
            in_flight: VecDeque::with_capacity(window),
            claims: VecDeque::new(),
            next_id: 0,
            settling: VecDeque::new(),
            partial: Vec::new(),
            total: RelayPass::default(),
            refused: false,
            error: None,
        }
    }

    /// A message was refused or a commit failed: send nothing more.
    fn stopped(&self) -> bool {
        self.refused || self.error.is_some()
    }

    /// Send a claim's messages, each as soon as the window has room.
    async fn send(&mut self, broker: &dyn Broker, mut claim: Claim) {
        while self.claims.len() >= CLAIMS_IN_FLIGHT && !self.in_flight.is_empty() {
            self.answer_oldest().await;
        }
        crash_point("relay.before_publish");
        let id = self.next_id;
        self.next_id += 1;
        let messages = std::mem::take(&mut claim.batch.messages);
        let seqs = claim.batch.seqs.clone();
        self.claims.push_back(InFlightClaim {
            id,
            claim,
            sealed: false,
            sent: 0,
            confirmed: Vec::with_capacity(seqs.len()),
            failed: Vec::new(),
        });
        let mut next = 0;
        while next < messages.len() && !self.stopped() {
            if self.in_flight.len() >= self.window {
                self.answer_oldest().await;
                continue;
            }
            let end = messages.len().min(next + self.window - self.in_flight.len());
            let pending = broker.send(&messages[next..end]).await;
            let before = self.in_flight.len();
            self.in_flight
                .extend(seqs[next..end].iter().zip(pending).map(|(seq, p)| (id, *seq, p)));
            // A broker that answers fewer than it was given: the rest count as not sent, and
            // nothing more is sent (as after a refusal), so the drain ends and the claim's
            // unsent rows come back before anything after them goes out.
            let answered = self.in_flight.len() - before;
            self.claims.back_mut().expect("pushed above").sent += answered;
            if answered < end - next {
                self.refused = true;
            }
            next = end;
            self.take_ready().await;
        }
        self.claims.back_mut().expect("pushed above").sealed = true;
        self.settle_answered().await;
    }

    /// Wait for the oldest message's answer, then take the ones already there.
    async fn answer_oldest(&mut self) {
        let Some((id, seq, pending)) = self.in_flight.pop_front() else {
            return;
        };
        let result = pending.await;
        self.record(id, seq, result);
        self.take_ready().await;
    }

    /// Take the answers already there, oldest first (a broker that cannot pipeline answers at
    /// once, so a refusal stops the pipeline before anything else is sent), and settle.
    async fn take_ready(&mut self) {
        while let Some((_, _, pending)) = self.in_flight.front_mut() {
            let Some(result) = futures_util::FutureExt::now_or_never(pending) else {
                break;
            };
            let (id, seq, _) = self.in_flight.pop_front().expect("front exists");
            self.record(id, seq, result);
        }
        self.settle_answered().await;
    }

    fn record(&mut self, id: u64, seq: i64, result: Result<crate::broker::PublishAck, crate::broker::BrokerError>) {
        let claim = self
            .claims
            .iter_mut()
            .find(|c| c.id == id)
            .expect("a message in flight belongs to a claim in flight");
        match result {
            Ok(_) => claim.confirmed.push(seq),
            Err(e) => {
                claim.failed.push((seq, e.to_string()));
                self.refused = true;
            }
        }
    }

    /// Settle the oldest claims whose sent messages are all answered, in claim order.
    async fn settle_answered(&mut self) {
        while let Some(c) = self.claims.front()
            && c.sealed
            && c.confirmed.len() + c.failed.len() == c.sent
        {
            let c = self.claims.pop_front().expect("front exists");
            crash_point("relay.after_publish");
            crate::telemetry::published(c.confirmed.len(), c.failed.len());
            self.total.published += c.confirmed.len();
            self.total.failed += c.failed.len();
            if c.confirmed.len() != c.claim.batch.seqs.len() {
                self.partial.push(c);
                continue;
            }
            while self.settling.len() >= 2 {
                if let Some(s) = self.settling.pop_front()
                    && let Err(e) = join_task(s).await
                {
                    self.error.get_or_insert(e);
                }
            }
            self.settling
                .push_back(tokio::spawn(c.claim.settle(c.confirmed, c.failed)));
        }
    }

    /// Answer and settle everything in flight, once the drain holds no other claim open;
    /// every settle ends before this returns, even after an error: a settle that rolls its
    /// claim back and then deletes the confirmed rows must not race the next drain (or another
    /// relay after a rebalance) into publishing those rows again.
    /// Answer and settle everything; also whether a claim was rolled back (rows came back).
    async fn finish(mut self) -> (Result<RelayPass, sqlx::Error>, bool) {
        while !self.in_flight.is_empty() {
            self.answer_oldest().await;
        }
        self.settle_answered().await;
        debug_assert!(self.claims.is_empty(), "every claim is sealed before finish");
        for s in std::mem::take(&mut self.settling) {
            if let Err(e) = join_task(s).await {
                self.error.get_or_insert(e);
            }
        }
        let gave_back = !self.partial.is_empty() || self.refused;
        for c in std::mem::take(&mut self.partial) {
            if let Err(e) = c.claim.settle(c.confirmed, c.failed).await {
                self.error.get_or_insert(e);
            }
        }
        match self.error {
            Some(e) => (Err(e), true),
            None => (Ok(self.total), gave_back),
        }
    }
}

/// Delete the `confirmed` rows and count an attempt (with the reason) on the `failed` ones.
async fn delete_published(db: &Db, confirmed: Vec<i64>, failed: Vec<(i64, String)>) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    match delete_and_record(&mut tx, &confirmed, &failed).await {
        Ok(()) => tx.commit().await,
        Err(e) => {
            // Ended now, not when the connection goes back to the pool: until then its row locks
            // would have the next claim skip these rows and publish their keys' later events.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

async fn delete_and_record(
    tx: &mut crate::store::Tx,
    confirmed: &[i64],
    failed: &[(i64, String)],
) -> Result<(), sqlx::Error> {
    match &mut *tx {
        crate::store::Tx::Postgres(t) => {
            // Losing these deletes in a crash only republishes (see `Relay::drain`): no fsync wait.
            sqlx::query("SET LOCAL synchronous_commit TO off")
                .execute(&mut **t)
                .await?;
            sqlx::query("DELETE FROM seaport_outbox WHERE seq = ANY($1)")
                .bind(confirmed)
                .execute(&mut **t)
                .await?;
        }
        crate::store::Tx::Sqlite(t) => {
            for seq in confirmed {
                sqlx::query("DELETE FROM seaport_outbox WHERE seq = $1")
                    .bind(seq)
                    .execute(&mut **t)
                    .await?;
            }
        }
    }
    for (seq, error) in failed {
        on_conn!(&mut *tx, c => sqlx::query("UPDATE seaport_outbox SET attempts = attempts + 1, last_error = $1 WHERE seq = $2")
            .bind(error)
            .bind(seq)
            .execute(c)
            .await
            .map(|_| ()))?;
    }
    Ok(())
}

async fn join_task(task: tokio::task::JoinHandle<Result<(), sqlx::Error>>) -> Result<(), sqlx::Error> {
    task.await
        .map_err(|e| sqlx::Error::Protocol(format!("the relay's commit task failed: {e}")))?
}

/// How long a relay taking a partition over waits for the previous owner's claims in flight
/// before it gives the partition up until its next rebalance.
const TAKEOVER_WAIT: &str = "5s";

/// The relay partitions one relay owns, as session advisory locks on a dedicated connection,
/// recorded in `seaport_relay_partitions` and fenced (see the module docs and [`take_over`]).
struct PartitionLocks {
    store: PgStore,
    conn: Option<PgConnection>,
    /// Names the current lock connection in `seaport_relay_partitions`; new with each connection.
    token: String,
    owned: BTreeSet<i64>,
    last: Option<Instant>,
    /// Changes whenever `owned` or the lock connection does: a drain's kept horizon only holds
    /// for the partitions it was proven on.
    generation: u64,
}

impl PartitionLocks {
    fn new(store: PgStore) -> Self {
        PartitionLocks {
            store,
            conn: None,
            token: String::new(),
            owned: BTreeSet::new(),
            last: None,
            generation: 0,
        }
    }

    fn due(&self, every: Duration) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= every)
    }

    async fn rebalance_if_due(&mut self, every: Duration) {
        if !self.due(every) {
            return;
        }
        self.last = Some(Instant::now());
        let before = (self.token.clone(), self.owned.clone());
        if let Err(e) = self.rebalance().await {
            // Without a working lock connection we cannot know what we own: own nothing.
            tracing::warn!(error = %e, "relay lost its partition locks; reconnecting");
            self.owned.clear();
            self.conn = None;
            self.generation += 1;
        }
        if before != (self.token.clone(), self.owned.clone()) {
            self.generation += 1;
        }
    }

    async fn rebalance(&mut self) -> Result<(), sqlx::Error> {
        if self.conn.is_none() {
            let options = self
                .store
                .pool()
                .connect_options()
                .as_ref()
                .clone()
                .application_name(RELAY_APPLICATION)
                .options([("lock_timeout", TAKEOVER_WAIT)]);
            self.conn = Some(PgConnection::connect_with(&options).await?);
            // Owner rows written through an earlier connection no longer count as ours.
            self.token = uuid::Uuid::now_v7().to_string();
        }
        let conn = self.conn.as_mut().expect("connected above");
        // What we really hold, according to the server.
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT objid::BIGINT FROM pg_locks
             WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND classid = $1::oid AND objsubid = 2 AND granted
               AND objid::BIGINT < $2",
        )
        .bind(LOCK_NAMESPACE as i64)
        .bind(PARTITIONS)
        .fetch_all(&mut *conn)
        .await?;
        self.owned = held.into_iter().collect();
        let relays: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(RELAY_APPLICATION)
        .fetch_one(&mut *conn)
        .await?;
        let fair = (PARTITIONS + relays.max(1) - 1) / relays.max(1);
        while self.owned.len() as i64 > fair {
            let p = *self.owned.iter().next_back().expect("non-empty");
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(LOCK_NAMESPACE)
                .bind(p as i32)
                .execute(&mut *conn)
                .await?;
            self.owned.remove(&p);
        }
        let mut taken = Vec::new();
        if (self.owned.len() as i64) < fair {
            for p in 0..PARTITIONS {
                if (self.owned.len() + taken.len()) as i64 >= fair {
                    break;
                }
                if self.owned.contains(&p) {
                    continue;
                }
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(LOCK_NAMESPACE)
                    .bind(p as i32)
                    .fetch_one(&mut *conn)
                    .await?;
                if got {
                    taken.push(p);
                }
            }
        }
        if !taken.is_empty() && take_over(conn, &taken, &self.token).await? {
            self.owned.extend(taken);
        }
        Ok(())
    }

    async fn release_all(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
        self.owned.clear();
        self.generation += 1;
    }
}

/// Write `token` as the owner of `partitions`, whose advisory locks `conn` has just taken, then
/// pass the fence: wait (up to [`TAKEOVER_WAIT`]) for the claims in flight, which may still be
/// a previous owner's. `false` if they did not end in time, after giving the partitions back
/// (their rows already name us, so nobody claims them until they are taken again).
async fn take_over(conn: &mut PgConnection, partitions: &[i64], token: &str) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "INSERT INTO seaport_relay_partitions (partition, owner) SELECT p, $2 FROM unnest($1::bigint[]) AS p
         ON CONFLICT (partition) DO UPDATE SET owner = EXCLUDED.owner",
    )
    .bind(partitions)
    .bind(token)
    .execute(&mut *conn)
    .await?;
    let fenced = sqlx::query("SELECT pg_advisory_lock($1, $2), pg_advisory_unlock($1, $2)")
        .bind(LOCK_NAMESPACE)
        .bind(FENCE_KEY)
        .execute(&mut *conn)
        .await;
    match fenced {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            tracing::warn!(
                ?partitions,
                "the claims in flight did not end within {TAKEOVER_WAIT}; leaving the partitions for now"
            );
            for p in partitions {
                sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(LOCK_NAMESPACE)
                    .bind(*p as i32)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::{Horizon, Snapshot};

    #[test]
    fn claims_take_the_fence() {
        let fence = format!(
            "pg_try_advisory_xact_lock_shared({}, {})::text, true)",
            super::LOCK_NAMESPACE,
            super::FENCE_KEY,
        );
        assert!(super::CLAIM_BEGIN.ends_with(&fence), "{}", super::CLAIM_BEGIN);
        assert!(
            super::FENCE_KEY as i64 >= super::PARTITIONS,
            "the fence key is no partition's"
        );
    }

    fn snap(xmin: i64, xmax: i64, xip: &[i64]) -> Snapshot {
        Snapshot {
            xmin,
            xmax,
            xip: xip.to_vec(),
        }
    }

    #[test]
    fn snapshots_parse_as_postgresql_prints_them() {
        assert_eq!(Snapshot::parse("730:730:"), Some(snap(730, 730, &[])));
        assert_eq!(Snapshot::parse("10:20:12,15"), Some(snap(10, 20, &[12, 15])));
        for bad in ["", "10", "10:20", "10:20:x", "10:20:1:2", "10:20:1,"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad:?}");
        }
        let s = snap(10, 20, &[12, 15]);
        assert!(s.ended(9) && s.ended(13) && s.ended(19));
        assert!(!s.ended(12) && !s.ended(15) && !s.ended(20) && !s.ended(25));
    }

    #[test]
    fn on_an_idle_database_a_claim_moves_the_horizon_to_its_highest_seq() {
        let mut h = Horizon::default();
        // Only the drain's own earlier claim (100) is running.
        h.advance(50, 100, &snap(100, 100, &[]));
        assert_eq!(h.seq, 50);
        h.advance(90, 101, &snap(100, 101, &[100]));
        assert_eq!(h.seq, 90);
    }

    #[test]
    fn a_running_writer_holds_the_horizon_until_it_has_ended() {
        let mut h = Horizon::default();
        // Writer 95 is running: it may hold a seq up to 50.
        h.advance(50, 100, &snap(95, 100, &[95]));
        assert_eq!(h.seq, Horizon::START);
        h.advance(80, 101, &snap(95, 101, &[95, 100]));
        assert_eq!(h.seq, Horizon::START, "95 still running");
        // 95 ended; this claim saw its rows, up to its own highest seq 70 (< 80).
        h.advance(70, 103, &snap(101, 103, &[101]));
        assert_eq!(
            h.seq, 70,
            "min(50, 70) from the first claim; the second waits for 95 too"
        );
        h.advance(120, 104, &snap(103, 104, &[]));
        assert_eq!(h.seq, 120);
    }

    #[test]
    fn ids_assigned_after_the_snapshot_are_waited_for_until_a_later_snapshot_sees_them_end() {
        let mut h = Horizon::default();
        // xmax 100 but the claim got 103: 100..=102 may be writers PostgreSQL counted as not
        // yet started although they held a seq.
        h.advance(50, 103, &snap(100, 100, &[]));
        assert_eq!(h.seq, Horizon::START);
        // 101 and 102 ended, 100 is still running.
        h.advance(60, 104, &snap(100, 104, &[100, 103]));
        assert_eq!(h.seq, Horizon::START);
        // A snapshot whose xmax has not reached them cannot tell: still waiting.
        let mut h2 = Horizon::default();
        h2.advance(50, 103, &snap(100, 100, &[]));
        h2.advance(60, 104, &snap(100, 101, &[]));
        assert_eq!(h2.seq, Horizon::START);
        // All ended; 105 (another writer) is running, so this claim's own 70 is not yet safe.
        h.advance(70, 106, &snap(104, 106, &[104, 105]));
        assert_eq!(h.seq, 60);
    }
}
