//! Outbox + Publish: an event is written in the *same* transaction as the domain change that
//! caused it, so both commit or neither does. The [`relay`] moves committed rows to the broker.
//!
//! ```ignore
//! let mut tx = pool.begin().await?;                 // your own sqlx transaction (SQLite or PostgreSQL)
//! sqlx::query("INSERT INTO cases ...").execute(&mut *tx).await?;
//! outbox.insert(&mut tx, &event).await?;
//! tx.commit().await?;                               // the relay wakes up now
//! ```

pub mod relay;

use sqlx::Row;

use crate::broker::valid_subject;
use crate::event::Event;
use crate::on_conn;
use crate::store::{Conn, Db, now_ms};

/// The table the outbox lives in (the SQLite update hook watches it).
pub const TABLE: &str = "seaport_outbox";

/// Number of relay partitions. An event's partition is a hash of its ordering key (its
/// CloudEvents `subject`), so all events of one key share a partition, and each partition is
/// relayed by one relay at a time.
pub const PARTITIONS: i64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("invalid event: {0}")]
    Event(#[from] crate::event::EventError),
    #[error("event type {0:?} is not a valid broker subject")]
    Subject(String),
    #[error("outbox storage: {0}")]
    Storage(#[from] sqlx::Error),
}

/// Writes events into the outbox inside the caller's transaction.
#[derive(Clone, Debug, Default)]
pub struct Outbox {
    _private: (),
}

/// The partition of an ordering key: FNV-1a, stable across processes, versions and platforms.
pub fn partition_of(key: &str) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % PARTITIONS as u64) as i64
}

impl Outbox {
    pub fn new() -> Self {
        Outbox::default()
    }

    /// Insert `event` in the caller's transaction; it is published under a subject equal to its
    /// CloudEvents `type` (e.g. `sea.cases.created`). Returns the outbox sequence number.
    pub async fn insert<'c>(&self, tx: impl Into<Conn<'c>>, event: &Event) -> Result<i64, OutboxError> {
        self.insert_to(tx, &event.ty, event).await
    }

    /// Insert `event` to be published under `topic`.
    pub async fn insert_to<'c>(&self, tx: impl Into<Conn<'c>>, topic: &str, event: &Event) -> Result<i64, OutboxError> {
        event.validate()?;
        if !valid_subject(topic) {
            return Err(OutboxError::Subject(topic.to_owned()));
        }
        let partition = partition_of(event.subject.as_deref().unwrap_or(&event.id));
        let envelope = event.to_json();
        let now = now_ms();
        let traceparent = event.extensions.get("traceparent").and_then(|v| v.as_str());
        let seq = on_conn!(tx, c => sqlx::query_scalar(
            "INSERT INTO seaport_outbox (event_id, topic, ordering_key, partition, envelope, created_at, traceparent)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
        )
        .bind(&event.id)
        .bind(topic)
        .bind(&event.subject)
        .bind(partition)
        .bind(&envelope)
        .bind(now)
        .bind(traceparent)
        .fetch_one(c)
        .await)?;
        Ok(seq)
    }
}

/// What `seaport outbox status` shows. Published rows are not counted: the relay deletes a row
/// once the broker confirmed it (the broker's stream is the record of what was published).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OutboxStatus {
    pub unpublished: i64,
    /// Unpublished rows whose last publish attempt failed.
    pub failing: i64,
    /// Age of the oldest unpublished event, in milliseconds (the relay's lag).
    pub oldest_unpublished_age_ms: Option<i64>,
}

const STATUS_SQL: &str = "SELECT
        COUNT(*), COUNT(*) FILTER (WHERE last_error IS NOT NULL), MIN(created_at)
     FROM seaport_outbox";

/// Read the outbox backlog.
pub async fn status(db: &Db) -> Result<OutboxStatus, sqlx::Error> {
    let (unpublished, failing, oldest): (i64, i64, Option<i64>) = crate::on_pool!(db, p => {
        let r = sqlx::query(STATUS_SQL).fetch_one(p).await?;
        (r.get(0), r.get(1), r.get(2))
    });
    Ok(OutboxStatus {
        unpublished,
        failing,
        oldest_unpublished_age_ms: oldest.map(|t| (now_ms() - t).max(0)),
    })
}
