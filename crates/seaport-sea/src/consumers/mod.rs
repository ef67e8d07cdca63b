//! The fan-out consumers of the sea service. Each has its own durable name
//! (`{consumer}__from_{source}`), so each sees every event on `sea.>`; each has its own inbox.

pub mod analytics;
pub mod audit;
pub mod notifications;

use chrono::{SecondsFormat, Utc};
use seaport::Event;
use sqlx::SqliteConnection;

pub use analytics::Analytics;
pub use audit::Audit;
pub use notifications::Notifications;

pub const ANALYTICS: &str = "analytics__from_sea";
pub const NOTIFICATIONS: &str = "notifications__from_sea";
pub const AUDIT: &str = "audit__from_sea";

/// Record what a consumer did for an event (for `/trace` and the exactly-once checks), in the
/// handler's transaction.
pub async fn record_effect(
    tx: &mut SqliteConnection,
    consumer: &str,
    event: &Event,
    effect: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO consumer_effects (consumer, event_id, correlation_id, effect, recorded_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(consumer)
    .bind(&event.id)
    .bind(&event.correlationid)
    .bind(effect)
    .bind(now())
    .execute(tx)
    .await?;
    Ok(())
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}
