//! Dead letters: messages that exhausted their deliveries, kept with their headers, payload,
//! delivery count, last error and consumer; listed, shown and replayed by operators.
//!
//! A replay publishes the stored message again under a fresh message id (so broker dedupe does
//! not drop it) on its original subject. The consumer that failed processes it (its inbox has no
//! record of it: the failed attempts rolled back); every other consumer of the subject drops it
//! in its inbox, because it already processed that event id.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::broker::{Broker, MSG_ID_HEADER, OutgoingMessage};
use crate::on_pool;
use crate::store::{Db, now_ms};

#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub consumer: String,
    pub stream: String,
    pub stream_seq: i64,
    pub message_id: String,
    pub subject: String,
    pub delivery_count: i64,
    pub last_error: String,
    pub failed_at: i64,
    pub replayed_at: Option<i64>,
    pub replays: i64,
}

const COLUMNS: &str = "id, consumer, stream, stream_seq, message_id, subject, delivery_count, last_error, failed_at, replayed_at, replays";

/// All dead letters, oldest first.
pub async fn list(db: &Db) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM seaport_dead_letters ORDER BY id"));
    on_pool!(db, p => sqlx::query_as(sql).fetch_all(p).await)
}

/// One dead letter with its headers and payload.
pub async fn get(db: &Db, id: i64) -> Result<Option<(DeadLetter, BTreeMap<String, String>, Vec<u8>)>, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM seaport_dead_letters WHERE id = $1"));
    let Some(dl): Option<DeadLetter> = on_pool!(db, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await)? else {
        return Ok(None);
    };
    let (headers, payload): (String, Vec<u8>) = on_pool!(db, p =>
        sqlx::query_as("SELECT headers, payload FROM seaport_dead_letters WHERE id = $1").bind(id).fetch_one(p).await)?;
    Ok(Some((dl, serde_json::from_str(&headers).unwrap_or_default(), payload)))
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no dead letter with id {0}")]
    NotFound(i64),
    #[error("the broker refused the replay: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
}

/// Send a dead letter back to its subject (see the module docs); records the replay.
pub async fn replay(db: &Db, broker: &dyn Broker, id: i64) -> Result<(), ReplayError> {
    let (dl, mut headers, payload) = get(db, id).await?.ok_or(ReplayError::NotFound(id))?;
    let replay_id = format!("{}~replay-{}-{}", dl.message_id, dl.id, dl.replays + 1);
    headers.insert(MSG_ID_HEADER.to_owned(), replay_id.clone());
    headers.insert("seaport-replay-of".to_owned(), dl.message_id.clone());
    let message = OutgoingMessage {
        id: replay_id,
        subject: dl.subject.clone(),
        headers,
        payload,
    };
    broker.publish(std::slice::from_ref(&message)).await.remove(0)?;
    let mut tx = db.begin_write().await?;
    crate::on_conn!(&mut tx, c => sqlx::query("UPDATE seaport_dead_letters SET replayed_at = $1, replays = replays + 1 WHERE id = $2")
        .bind(now_ms())
        .bind(id)
        .execute(c)
        .await
        .map(|_| ()))?;
    tx.commit().await?;
    Ok(())
}
