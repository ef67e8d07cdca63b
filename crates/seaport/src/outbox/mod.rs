//! Outbox + Publish: an event is written in the *same* transaction as the domain change that
//! caused it, so both commit or neither does. The [`relay`] moves committed rows to the broker.
//!
//! ```ignore
//! let mut tx = store.begin_write().await?;
//! sqlx::query("INSERT INTO cases ...").execute(&mut *tx).await?;
//! outbox.insert(&mut tx, &event).await?;
//! tx.commit().await?;            // the relay wakes up now
//! ```

pub mod relay;

use sqlx::{Row, SqliteConnection};

use crate::broker::valid_subject;
use crate::event::Event;
use crate::store::now_ms;

/// The table the outbox lives in (the SQLite update hook watches it).
pub const TABLE: &str = "seaport_outbox";

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

impl Outbox {
    pub fn new() -> Self {
        Outbox::default()
    }

    /// Insert `event` in the caller's transaction; it is published under a subject equal to its
    /// CloudEvents `type` (e.g. `sea.cases.created`). Returns the outbox sequence number.
    pub async fn insert(&self, tx: &mut SqliteConnection, event: &Event) -> Result<i64, OutboxError> {
        self.insert_to(tx, &event.ty, event).await
    }

    /// Insert `event` to be published under `topic`.
    pub async fn insert_to(&self, tx: &mut SqliteConnection, topic: &str, event: &Event) -> Result<i64, OutboxError> {
        event.validate()?;
        if !valid_subject(topic) {
            return Err(OutboxError::Subject(topic.to_owned()));
        }
        let seq = sqlx::query_scalar(
            "INSERT INTO seaport_outbox (event_id, topic, ordering_key, envelope, created_at)
             VALUES (?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(&event.id)
        .bind(topic)
        .bind(&event.subject)
        .bind(event.to_json())
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        Ok(seq)
    }
}

/// What `seaport outbox status` shows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OutboxStatus {
    pub unpublished: i64,
    pub published: i64,
    /// Unpublished rows whose last publish attempt failed.
    pub failing: i64,
    /// Age of the oldest unpublished event, in milliseconds (the relay's lag).
    pub oldest_unpublished_age_ms: Option<i64>,
}

/// Read the outbox backlog.
pub async fn status(conn: &mut SqliteConnection) -> Result<OutboxStatus, sqlx::Error> {
    let r = sqlx::query(
        "SELECT
            COALESCE(SUM(published_at IS NULL), 0),
            COALESCE(SUM(published_at IS NOT NULL), 0),
            COALESCE(SUM(published_at IS NULL AND last_error IS NOT NULL), 0),
            MIN(CASE WHEN published_at IS NULL THEN created_at END)
         FROM seaport_outbox",
    )
    .fetch_one(conn)
    .await?;
    let oldest: Option<i64> = r.get(3);
    Ok(OutboxStatus {
        unpublished: r.get(0),
        published: r.get(1),
        failing: r.get(2),
        oldest_unpublished_age_ms: oldest.map(|t| (now_ms() - t).max(0)),
    })
}
