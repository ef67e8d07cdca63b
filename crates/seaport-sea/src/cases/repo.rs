//! The SQL of the cases context (the same statements run on SQLite and PostgreSQL).

use chrono::{SecondsFormat, Utc};
use seaport::store::{Conn, Db};
use seaport::{on_conn, on_pool};
use uuid::Uuid;

use super::{Case, NewCase};
use crate::crm::CheckedCustomer;

const COLUMNS: &str = "id, title, description, customer_id, status, correlation_id, created_at, customer_check, customer_name, customer_email, paid_at";

pub async fn insert<'c>(
    tx: impl Into<Conn<'c>>,
    new: NewCase,
    checked: &CheckedCustomer,
    correlation_id: &str,
) -> Result<Case, sqlx::Error> {
    let case = Case {
        id: Uuid::now_v7().to_string(),
        title: new.title,
        description: new.description,
        customer_id: new.customer_id,
        status: "open".to_owned(),
        correlation_id: correlation_id.to_owned(),
        created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        customer_check: checked.check.as_str().to_owned(),
        customer_name: checked.customer.as_ref().map(|c| c.name.clone()),
        customer_email: checked.customer.as_ref().map(|c| c.email.to_string()),
        paid_at: None,
    };
    on_conn!(tx, c => sqlx::query(
        "INSERT INTO cases (id, title, description, customer_id, status, correlation_id, created_at,
                            customer_check, customer_name, customer_email)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&case.id)
    .bind(&case.title)
    .bind(&case.description)
    .bind(&case.customer_id)
    .bind(&case.status)
    .bind(&case.correlation_id)
    .bind(&case.created_at)
    .bind(&case.customer_check)
    .bind(&case.customer_name)
    .bind(&case.customer_email)
    .execute(c)
    .await
    .map(|_| ()))?;
    Ok(case)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Case>, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM cases WHERE id = $1"));
    on_pool!(db, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await)
}

/// One page in creation order, and the total count.
pub async fn list(db: &Db, offset: u64, limit: u64) -> Result<(Vec<Case>, u64), sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM cases ORDER BY seq LIMIT $1 OFFSET $2"));
    on_pool!(db, p => {
        let cases = sqlx::query_as(sql).bind(limit as i64).bind(offset as i64).fetch_all(p).await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cases").fetch_one(p).await?;
        Ok((cases, total as u64))
    })
}

/// Keyset page: cases after position `after` (their `seq`), in creation order, with each one's
/// position. Cost does not depend on how deep the page is.
pub async fn list_after(db: &Db, after: i64, limit: u64) -> Result<Vec<(i64, Case)>, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT seq, {COLUMNS} FROM cases WHERE seq > $1 ORDER BY seq LIMIT $2"
    ));
    let rows: Vec<Keyed> = on_pool!(db, p => sqlx::query_as(sql).bind(after).bind(limit as i64).fetch_all(p).await)?;
    Ok(rows.into_iter().map(|k| (k.seq, k.case)).collect())
}

#[derive(sqlx::FromRow)]
struct Keyed {
    seq: i64,
    #[sqlx(flatten)]
    case: Case,
}

/// Record a confirmed payment (the first confirmation wins). `false`: no such case.
pub async fn mark_paid<'c>(tx: impl Into<Conn<'c>>, id: &str, at: &str) -> Result<bool, sqlx::Error> {
    let n = on_conn!(tx, c => sqlx::query("UPDATE cases SET paid_at = COALESCE(paid_at, $2) WHERE id = $1")
        .bind(id)
        .bind(at)
        .execute(c)
        .await?
        .rows_affected());
    Ok(n == 1)
}
