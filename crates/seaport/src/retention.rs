//! Retention: old inbox records and expired idempotency keys are deleted in bounded batches (short transactions, no long locks), by one instance at a time (on
//! PostgreSQL a transaction-level advisory lock elects the sweeper of each round). Outbox rows
//! need none: the relay deletes each one once the broker confirmed it.

use std::time::Duration;

use tokio::sync::watch;

use crate::store::{Db, Tx, now_ms};
use crate::{on_conn, on_pool};

#[derive(Clone, Debug)]
pub struct RetentionConfig {
    /// Inbox records older than this are deleted. Must exceed the longest redelivery / replay
    /// horizon, or a late duplicate would run its handler again.
    pub inbox: Duration,
    /// Rows deleted per transaction.
    pub batch: i64,
    /// Pause between rounds.
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            inbox: Duration::from_secs(7 * 24 * 3600),
            batch: 1000,
            interval: Duration::from_secs(60),
        }
    }
}

/// A retention setting that would let duplicates through.
#[derive(Debug, thiserror::Error)]
#[error(
    "inbox retention {retention:?} is shorter than the redelivery horizon {horizon:?} (attempts × (ack wait + max backoff)): a late redelivery would find no inbox record and run its handler again; keep inbox records longer"
)]
pub struct RetentionError {
    pub retention: Duration,
    pub horizon: Duration,
}

impl RetentionConfig {
    /// Check that inbox records outlive `horizon`, the longest time after which a message can
    /// still be delivered again (see `RunnerConfig::redelivery_horizon`).
    pub fn check_inbox_covers(&self, horizon: Duration) -> Result<(), RetentionError> {
        if self.inbox < horizon {
            return Err(RetentionError {
                retention: self.inbox,
                horizon,
            });
        }
        Ok(())
    }
}

/// What one round deleted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Swept {
    pub inbox: u64,
    pub idempotency_keys: u64,
    /// Another instance held the sweeper lock; this one did nothing.
    pub skipped: bool,
}

/// What a sweep would delete now: the rows [`sweep_once`] selects, counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Eligible {
    pub inbox: u64,
    pub idempotency_keys: u64,
}

impl Eligible {
    pub fn total(&self) -> u64 {
        self.inbox + self.idempotency_keys
    }
}

/// The cutoffs of the two kinds at `now` (ms): inbox records processed before the first,
/// idempotency keys expired at the second.
fn cutoffs(config: &RetentionConfig, now: i64) -> [i64; 2] {
    [now - config.inbox.as_millis() as i64, now]
}

/// Second key of the sweeper's advisory lock (first: the relay's namespace).
const SWEEPER_LOCK: i32 = 1_000;

/// Delete one batch of each kind. Returns `skipped` if another instance is sweeping.
pub async fn sweep_once(db: &Db, config: &RetentionConfig) -> Result<Swept, sqlx::Error> {
    let mut swept = Swept::default();
    let [inbox_cutoff, keys_cutoff] = cutoffs(config, now_ms());
    let statements: [(&str, i64); 2] = [
        (
            "DELETE FROM seaport_inbox WHERE (consumer, message_id) IN
                (SELECT consumer, message_id FROM seaport_inbox WHERE processed_at < $1 LIMIT $2)",
            inbox_cutoff,
        ),
        (
            "DELETE FROM seaport_idempotency_keys WHERE (scope, key) IN
                (SELECT scope, key FROM seaport_idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
            keys_cutoff,
        ),
    ];
    for (i, (sql, cutoff)) in statements.into_iter().enumerate() {
        let mut tx = db.begin_write().await?;
        if let Tx::Postgres(t) = &mut tx {
            let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
                .bind(crate::outbox::relay::LOCK_NAMESPACE)
                .bind(SWEEPER_LOCK)
                .fetch_one(&mut **t)
                .await?;
            if !mine {
                let _ = tx.rollback().await;
                swept.skipped = true;
                return Ok(swept);
            }
        }
        let n =
            on_conn!(&mut tx, c => sqlx::query(sql).bind(cutoff).bind(config.batch).execute(c).await?.rows_affected());
        tx.commit().await?;
        match i {
            0 => swept.inbox = n,
            _ => swept.idempotency_keys = n,
        }
    }
    Ok(swept)
}

/// Count what [`sweep_once`] would delete now (same conditions), e.g. to size a progress bar.
/// Reads only; the counts use the same indexes as the deletes.
pub async fn eligible(db: &Db, config: &RetentionConfig) -> Result<Eligible, sqlx::Error> {
    let [inbox_cutoff, keys_cutoff] = cutoffs(config, now_ms());
    let queries: [(&str, i64); 2] = [
        (
            "SELECT COUNT(*) FROM seaport_inbox WHERE processed_at < $1",
            inbox_cutoff,
        ),
        (
            "SELECT COUNT(*) FROM seaport_idempotency_keys WHERE expires_at <= $1",
            keys_cutoff,
        ),
    ];
    let mut counts = [0u64; 2];
    for (count, (sql, cutoff)) in counts.iter_mut().zip(queries) {
        let n: i64 = on_pool!(db, p => sqlx::query_scalar(sql).bind(cutoff).fetch_one(p).await?);
        *count = n.max(0) as u64;
    }
    let [inbox, idempotency_keys] = counts;
    Ok(Eligible {
        inbox,
        idempotency_keys,
    })
}

/// Sweep every `interval` until `shutdown`; a round that hit the batch size continues at once.
pub async fn run(db: Db, config: RetentionConfig, mut shutdown: watch::Receiver<bool>) {
    loop {
        let full = match sweep_once(&db, &config).await {
            Ok(s) => [s.inbox, s.idempotency_keys].iter().any(|n| *n as i64 >= config.batch),
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep failed");
                false
            }
        };
        let pause = if full {
            Duration::from_millis(10)
        } else {
            config.interval
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
