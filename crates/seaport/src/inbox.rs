//! Inbox + Idempotency: record `(consumer, message id)` in the same transaction as the handler's
//! effects. If the record already exists the message was processed before (a redelivery or a
//! re-publish) and the handler must not run again.

use sqlx::SqliteConnection;

use crate::store::now_ms;

/// Record that `consumer` processes `message_id`. Returns `false` if it already did.
pub async fn record(
    tx: &mut SqliteConnection,
    consumer: &str,
    message_id: &str,
    correlation_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO seaport_inbox (consumer, message_id, correlation_id, processed_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(correlation_id)
    .bind(now_ms())
    .execute(tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Has `consumer` processed `message_id`?
pub async fn contains(conn: &mut SqliteConnection, consumer: &str, message_id: &str) -> Result<bool, sqlx::Error> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM seaport_inbox WHERE consumer = ? AND message_id = ?")
        .bind(consumer)
        .bind(message_id)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}
