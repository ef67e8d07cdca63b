//! The consumers of the sea service.
//!
//! Fan-out: analytics, notifications and audit each have their own durable name
//! (`{consumer}__from_{source}`), so each sees every event on `sea.>`, with its own inbox.
//! Consumer group: `sea_service__context` (see [`context`]), one durable name shared by every
//! worker instance, so each webhook is processed by one of them.

pub mod analytics;
pub mod audit;
pub mod context;
pub mod notifications;

use chrono::{SecondsFormat, Utc};
use seaport::Event;
use seaport::on_conn;
use seaport::store::Tx;

pub use analytics::Analytics;
pub use audit::Audit;
pub use context::ServiceContext;
pub use notifications::Notifications;

pub const ANALYTICS: &str = "analytics__from_sea";
pub const NOTIFICATIONS: &str = "notifications__from_sea";
pub const AUDIT: &str = "audit__from_sea";
pub const CONTEXT: &str = "sea_service__context";

/// Record what a consumer did for an event (for `/trace` and the exactly-once checks), in the
/// handler's transaction.
pub async fn record_effect(tx: &mut Tx, consumer: &str, event: &Event, effect: &str) -> Result<(), sqlx::Error> {
    let at = now();
    on_conn!(tx, c => sqlx::query(
        "INSERT INTO consumer_effects (consumer, event_id, correlation_id, effect, recorded_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(consumer)
    .bind(&event.id)
    .bind(&event.correlationid)
    .bind(effect)
    .bind(&at)
    .execute(c)
    .await
    .map(|_| ()))
}

/// [`record_effect`] for a batch of events (`Handler::handle_batch`): one statement.
pub async fn record_effects(tx: &mut Tx, consumer: &str, effects: &[(&Event, String)]) -> Result<(), sqlx::Error> {
    let at = now();
    let rows = serde_json::to_string(
        &effects
            .iter()
            .map(|(e, effect)| (&e.id, &e.correlationid, effect))
            .collect::<Vec<_>>(),
    )
    .expect("strings serialise");
    match tx {
        Tx::Postgres(tx) => sqlx::query(
            "INSERT INTO consumer_effects (consumer, event_id, correlation_id, effect, recorded_at)
             SELECT $1, r->>0, r->>1, r->>2, $3 FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n",
        )
        .bind(consumer)
        .bind(rows)
        .bind(&at)
        .execute(&mut **tx)
        .await
        .map(|_| ()),
        Tx::Sqlite(_) => on_conn!(tx, c => sqlx::query(
            "INSERT INTO consumer_effects (consumer, event_id, correlation_id, effect, recorded_at)
             SELECT $1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), $3
             FROM json_each($2) ORDER BY key",
        )
        .bind(consumer)
        .bind(rows)
        .bind(&at)
        .execute(c)
        .await
        .map(|_| ())),
    }
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use seaport::naming::{DurableName, parse};

    #[test]
    fn the_context_group_follows_the_group_convention() {
        assert!(
            matches!(parse(super::CONTEXT), Ok(DurableName::Group { ref service, ref context })
            if service == "sea_service" && context == "context")
        );
    }

    #[test]
    fn consumer_names_follow_the_fan_out_convention() {
        for name in [super::ANALYTICS, super::NOTIFICATIONS, super::AUDIT] {
            assert!(
                matches!(parse(name), Ok(DurableName::FanOut { ref source, .. }) if source == "sea"),
                "{name}"
            );
        }
    }
}
