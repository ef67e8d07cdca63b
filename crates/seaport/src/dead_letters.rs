//! Dead letters: messages that exhausted their deliveries, kept with their headers, payload,
//! delivery count, last error and consumer; listed, shown and replayed by operators.
//!
//! Each dead letter is a row of `seaport_dead_letters` (the source of truth for the operator
//! commands) and, when a [`DeadLetterQueue`] is configured, also a `seaport.dead_letter` event
//! on its own stream (`SEA_DLQ` in the sea service), written through the outbox in the same
//! transaction: other tools can subscribe to dead letters as they happen.
//!
//! A replay publishes the stored message again under a fresh message id (so broker dedupe does
//! not drop it) on its original subject, addressed to the consumer that failed
//! ([`REPLAY_FOR_HEADER`]). That consumer processes it (its inbox has no record of it: the failed
//! attempts rolled back); every other consumer of the subject acks it unprocessed, and would
//! drop it in its inbox anyway, because it already processed that event id.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use crate::broker::{Broker, MSG_ID_HEADER, Message, OutgoingMessage};
use crate::event::Event;
use crate::outbox::{Outbox, OutboxError};
use crate::store::{Db, Tx, now_ms};
use crate::{on_conn, on_pool};

/// Header naming the one consumer a replayed message is for.
pub const REPLAY_FOR_HEADER: &str = "seaport-replay-for";
/// Header naming the message id a replay copies.
pub const REPLAY_OF_HEADER: &str = "seaport-replay-of";
/// CloudEvents type of the events announcing dead letters on the dead-letter stream.
pub const DEAD_LETTER_EVENT: &str = "seaport.dead_letter";

/// The stream dead letters are announced on: subjects `{subject_prefix}.{consumer}`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterQueue {
    pub stream: String,
    pub subject_prefix: String,
}

impl DeadLetterQueue {
    /// The convention: stream `{STREAM}_DLQ`, subjects `{root}_dlq.{consumer}` (e.g. `SEA_DLQ`,
    /// `sea_dlq.analytics__from_sea`), outside the source stream's own subjects.
    pub fn beside(stream: &str, subject_root: &str) -> Self {
        DeadLetterQueue {
            stream: format!("{stream}_DLQ"),
            subject_prefix: format!("{subject_root}_dlq"),
        }
    }

    pub fn subject(&self, consumer: &str) -> String {
        format!("{}.{consumer}", self.subject_prefix)
    }
}

/// Store a dead letter in `tx` (once per consumer and stream position: a repeated call, e.g.
/// after the worker died before acking, updates the row instead of adding one) and, the first
/// time, announce it on `queue` through the outbox. `parent` is the decoded event, if it was
/// decodable, so the announcement keeps its correlation id.
pub async fn record(
    tx: &mut Tx,
    consumer: &str,
    message: &Message,
    delivery_count: u32,
    error: &str,
    queue: Option<&DeadLetterQueue>,
    parent: Option<&Event>,
) -> Result<(), OutboxError> {
    let now = now_ms();
    let existing: Option<i64> = on_conn!(&mut *tx, c => sqlx::query_scalar(
        "SELECT id FROM seaport_dead_letters WHERE consumer = $1 AND stream = $2 AND stream_seq = $3",
    )
    .bind(consumer)
    .bind(&message.stream)
    .bind(message.stream_seq as i64)
    .fetch_optional(c)
    .await?);
    if let Some(id) = existing {
        on_conn!(&mut *tx, c => sqlx::query(
            "UPDATE seaport_dead_letters SET delivery_count = $1, last_error = $2, failed_at = $3 WHERE id = $4",
        )
        .bind(delivery_count as i64)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(c)
        .await
        .map(|_| ()))?;
        return Ok(());
    }
    let headers = serde_json::to_string(&message.headers).expect("string map serialises");
    on_conn!(&mut *tx, c => sqlx::query(
        "INSERT INTO seaport_dead_letters
            (consumer, stream, stream_seq, message_id, subject, headers, payload, delivery_count, last_error, failed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(consumer)
    .bind(&message.stream)
    .bind(message.stream_seq as i64)
    .bind(&message.id)
    .bind(&message.subject)
    .bind(&headers)
    .bind(&message.payload)
    .bind(delivery_count as i64)
    .bind(error)
    .bind(now)
    .execute(c)
    .await
    .map(|_| ()))?;
    if let Some(queue) = queue {
        let payload = match serde_json::from_slice::<serde_json::Value>(&message.payload) {
            Ok(json) => serde_json::json!({ "payload": json }),
            Err(_) => serde_json::json!({
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(&message.payload)
            }),
        };
        let mut data = serde_json::json!({
            "consumer": consumer,
            "stream": message.stream,
            "stream_seq": message.stream_seq,
            "message_id": message.id,
            "subject": message.subject,
            "headers": message.headers,
            "delivery_count": delivery_count,
            "last_error": error,
        });
        data.as_object_mut()
            .expect("object")
            .extend(payload.as_object().expect("object").clone());
        let mut announcement =
            Event::new(DEAD_LETTER_EVENT, format!("/seaport/consumers/{consumer}"), data).with_subject(&message.id);
        if let Some(parent) = parent {
            announcement = announcement.caused_by(parent);
        }
        Outbox::new()
            .insert_to(&mut *tx, &queue.subject(consumer), &announcement)
            .await?;
    }
    Ok(())
}

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
    headers.insert(REPLAY_OF_HEADER.to_owned(), dl.message_id.clone());
    headers.insert(REPLAY_FOR_HEADER.to_owned(), dl.consumer.clone());
    let message = OutgoingMessage {
        id: replay_id,
        subject: dl.subject.clone(),
        headers,
        payload: payload.into(),
    };
    broker.publish(std::slice::from_ref(&message)).await.remove(0)?;
    let mut tx = db.begin_write().await?;
    on_conn!(&mut tx, c => sqlx::query("UPDATE seaport_dead_letters SET replayed_at = $1, replays = replays + 1 WHERE id = $2")
        .bind(now_ms())
        .bind(id)
        .execute(c)
        .await
        .map(|_| ()))?;
    tx.commit().await?;
    Ok(())
}
