//! The outbox relay: moves committed outbox rows to the broker, in commit order, at least once.
//!
//! A row is marked published only after the broker confirmed it. A crash between the two means
//! the row is published again on restart; the broker drops the copy (dedupe by message id =
//! event id) and the consumers' inbox would drop it too.
//!
//! On SQLite the outbox `seq` is the commit order (one writer at a time), so reading unpublished
//! rows by `seq` follows commit order. The relay reads under `BEGIN IMMEDIATE`: woken by the
//! commit hook of a writer that is still finishing its commit, it waits for that writer and then
//! sees its rows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::watch;

use crate::broker::{Broker, MSG_ID_HEADER, OutgoingMessage};
use crate::crash::crash_point;
use crate::event::CLOUDEVENTS_JSON;
use crate::store::now_ms;
use crate::store::sqlite::SqliteStore;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Rows published per round trip.
    pub batch_size: usize,
    /// Fallback scan when no commit signal arrives (commits from other processes).
    pub poll_interval: Duration,
    /// Ceiling of the retry delay while the broker refuses messages.
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 256,
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
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
    store: SqliteStore,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
}

struct Row_ {
    seq: i64,
    message: OutgoingMessage,
}

impl Relay {
    pub fn new(store: SqliteStore, broker: Arc<dyn Broker>, config: RelayConfig) -> Self {
        Relay { store, broker, config }
    }

    /// Publish one batch of unpublished rows (oldest first) and mark the confirmed ones.
    pub async fn run_once(&self) -> Result<RelayPass, sqlx::Error> {
        let rows = self.fetch_batch().await?;
        if rows.is_empty() {
            return Ok(RelayPass::default());
        }
        crash_point("relay.before_publish");
        let messages: Vec<OutgoingMessage> = rows.iter().map(|r| r.message.clone()).collect();
        let results = self.broker.publish(&messages).await;
        crash_point("relay.after_publish");

        let mut pass = RelayPass::default();
        let mut tx = self.store.begin_write().await?;
        let now = now_ms();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(_) => {
                    sqlx::query("UPDATE seaport_outbox SET published_at = ?, attempts = attempts + 1 WHERE seq = ?")
                        .bind(now)
                        .bind(row.seq)
                        .execute(&mut *tx)
                        .await?;
                    pass.published += 1;
                }
                Err(e) => {
                    sqlx::query("UPDATE seaport_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?")
                        .bind(e.to_string())
                        .bind(row.seq)
                        .execute(&mut *tx)
                        .await?;
                    pass.failed += 1;
                }
            }
        }
        tx.commit().await?;
        Ok(pass)
    }

    async fn fetch_batch(&self) -> Result<Vec<Row_>, sqlx::Error> {
        let mut tx = self.store.begin_write().await?;
        let rows = sqlx::query(
            "SELECT seq, event_id, topic, envelope FROM seaport_outbox
             WHERE published_at IS NULL ORDER BY seq LIMIT ?",
        )
        .bind(self.config.batch_size as i64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let id: String = r.get(1);
                let headers = BTreeMap::from([
                    (MSG_ID_HEADER.to_owned(), id.clone()),
                    ("content-type".to_owned(), CLOUDEVENTS_JSON.to_owned()),
                ]);
                Row_ {
                    seq: r.get(0),
                    message: OutgoingMessage {
                        id,
                        subject: r.get(2),
                        headers,
                        payload: r.get(3),
                    },
                }
            })
            .collect())
    }

    /// Run until `shutdown` changes to `true`: drain the outbox, then sleep until the next commit
    /// signal or the poll interval; back off exponentially while the broker fails.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut commits = self.store.outbox_commits();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *shutdown.borrow() {
                return;
            }
            commits.borrow_and_update();
            let wait = match self.run_once().await {
                Ok(pass) if pass.failed == 0 && pass.published == self.config.batch_size => {
                    backoff = Duration::from_millis(50);
                    continue; // more may be waiting
                }
                Ok(pass) if pass.failed == 0 => {
                    backoff = Duration::from_millis(50);
                    if pass.published > 0 {
                        continue;
                    }
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
                tokio::select! {
                    _ = commits.changed() => {}
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}
