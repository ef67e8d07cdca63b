//! Inbox + Idempotency: record `(consumer, message id)` in the same transaction as the handler's
//! effects. If the record already exists the message was processed before (a redelivery or a
//! re-publish) and the handler must not run again. On PostgreSQL a concurrent insert of the same
//! record waits for the first transaction, then sees the conflict: two workers can never both
//! commit effects for one message.

use crate::store::{Conn, Db, now_ms};
use crate::{on_conn, on_pool};

/// Record that `consumer` processes `message_id`. Returns `false` if it already did.
pub async fn record<'c>(
    tx: impl Into<Conn<'c>>,
    consumer: &str,
    message_id: &str,
    correlation_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let done = on_conn!(tx, c => sqlx::query(
        "INSERT INTO seaport_inbox (consumer, message_id, correlation_id, processed_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(correlation_id)
    .bind(now)
    .execute(c)
    .await?
    .rows_affected());
    Ok(done == 1)
}

/// Record several `(message id, correlation id)` at once (one statement: the inbox rows of a
/// batched transaction). Returns how many were new; fewer than `records.len()` means some
/// message was processed before, or is being processed by another worker right now.
pub async fn record_many<'c>(
    tx: impl Into<Conn<'c>>,
    consumer: &str,
    records: &[(String, Option<String>)],
) -> Result<u64, sqlx::Error> {
    let now = now_ms();
    let inserted = match tx.into() {
        Conn::Postgres(c) => {
            let (ids, correlations): (Vec<&str>, Vec<Option<&str>>) =
                records.iter().map(|(id, corr)| (id.as_str(), corr.as_deref())).unzip();
            sqlx::query(
                "INSERT INTO seaport_inbox (consumer, message_id, correlation_id, processed_at)
                 SELECT $1, m, c, $4 FROM UNNEST($2::text[], $3::text[]) AS r(m, c)
                 ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(ids)
            .bind(correlations)
            .bind(now)
            .execute(c)
            .await?
            .rows_affected()
        }
        Conn::Sqlite(c) => {
            let rows = serde_json::to_string(records).expect("strings serialise");
            // `WHERE true`: SQLite's grammar needs it between a SELECT and an upsert clause.
            sqlx::query(
                "INSERT INTO seaport_inbox (consumer, message_id, correlation_id, processed_at)
                 SELECT $1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), $3 FROM json_each($2) WHERE true
                 ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(rows)
            .bind(now)
            .execute(c)
            .await?
            .rows_affected()
        }
    };
    Ok(inserted)
}

/// Has `consumer` processed `message_id`?
pub async fn contains<'c>(conn: impl Into<Conn<'c>>, consumer: &str, message_id: &str) -> Result<bool, sqlx::Error> {
    let found: Option<String> = on_conn!(conn, c => sqlx::query_scalar("SELECT message_id FROM seaport_inbox WHERE consumer = $1 AND message_id = $2")
        .bind(consumer)
        .bind(message_id)
        .fetch_optional(c)
        .await?);
    Ok(found.is_some())
}

/// Has `consumer` processed `message_id`? Read from the pool, outside any transaction.
pub async fn contains_in(db: &Db, consumer: &str, message_id: &str) -> Result<bool, sqlx::Error> {
    let found: Option<String> = on_pool!(db, p => sqlx::query_scalar("SELECT message_id FROM seaport_inbox WHERE consumer = $1 AND message_id = $2")
        .bind(consumer)
        .bind(message_id)
        .fetch_optional(p)
        .await?);
    Ok(found.is_some())
}

/// The batch check on PostgreSQL: one primary-key lookup per id, whatever plan is cached. A
/// plain join (or `message_id = ANY($2)`) planned while the inbox was empty is cached as a scan
/// of all of the consumer's records (a hash join), which costs more with every record; the
/// `LATERAL … LIMIT 1` cannot be flattened into such a join.
#[doc(hidden)]
pub const PROCESSED_AMONG_SQL: &str = "SELECT m.id FROM UNNEST($2::text[]) AS m(id),
     LATERAL (SELECT 1 FROM seaport_inbox i WHERE i.consumer = $1 AND i.message_id = m.id LIMIT 1) AS hit";

/// Which of `message_ids` has `consumer` processed? One query for a whole batch.
pub async fn processed_among(
    db: &Db,
    consumer: &str,
    message_ids: &[String],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let found: Vec<String> = match db {
        Db::Postgres(p) => {
            sqlx::query_scalar(PROCESSED_AMONG_SQL)
                .bind(consumer)
                .bind(message_ids)
                .fetch_all(p.pool())
                .await?
        }
        Db::Sqlite(s) => {
            let ids = serde_json::to_string(message_ids).expect("strings serialise");
            sqlx::query_scalar(
                "SELECT message_id FROM seaport_inbox
                 WHERE consumer = $1 AND message_id IN (SELECT value FROM json_each($2))",
            )
            .bind(consumer)
            .bind(ids)
            .fetch_all(s.pool())
            .await?
        }
    };
    Ok(found.into_iter().collect())
}
