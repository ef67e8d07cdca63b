//! The SQL behind every pattern, one obvious place per backend.
//!
//! `sqlite` is the embedded default: one file holds the service's tables, the outbox, the inbox
//! and the embedded broker's log.

pub mod sqlite;

/// Milliseconds since the Unix epoch: the one clock format the SQL tables use.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
