//! The SQL of the cases context.

use chrono::{SecondsFormat, Utc};
use sqlx::SqliteConnection;
use uuid::Uuid;

use super::{Case, NewCase};

pub async fn insert(tx: &mut SqliteConnection, new: NewCase, correlation_id: &str) -> Result<Case, sqlx::Error> {
    let case = Case {
        id: Uuid::now_v7().to_string(),
        title: new.title,
        description: new.description,
        customer_id: new.customer_id,
        status: "open".to_owned(),
        correlation_id: correlation_id.to_owned(),
        created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    sqlx::query(
        "INSERT INTO cases (id, title, description, customer_id, status, correlation_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&case.id)
    .bind(&case.title)
    .bind(&case.description)
    .bind(&case.customer_id)
    .bind(&case.status)
    .bind(&case.correlation_id)
    .bind(&case.created_at)
    .execute(tx)
    .await?;
    Ok(case)
}

pub async fn get(conn: &mut SqliteConnection, id: &str) -> Result<Option<Case>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, title, description, customer_id, status, correlation_id, created_at FROM cases WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// One page in creation order, and the total count.
pub async fn list(conn: &mut SqliteConnection, offset: u64, limit: u64) -> Result<(Vec<Case>, u64), sqlx::Error> {
    let cases = sqlx::query_as(
        "SELECT id, title, description, customer_id, status, correlation_id, created_at FROM cases
         ORDER BY seq LIMIT ? OFFSET ?",
    )
    .bind(limit as i64)
    .bind(offset as i64)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cases").fetch_one(conn).await?;
    Ok((cases, total as u64))
}
