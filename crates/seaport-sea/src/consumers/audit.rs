//! audit__from_sea: the append-only log of every event (database triggers refuse updates and
//! deletes); `/trace` reads it.

use async_trait::async_trait;
use seaport::Event;
use seaport::consumer::{Handler, HandlerContext, HandlerError};

use super::{now, record_effect};

pub struct Audit;

#[async_trait]
impl Handler for Audit {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO audit_log (event_id, event_type, source, subject, correlation_id, causation_id, event_time, recorded_at, envelope)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(&event.id)
        .bind(&event.ty)
        .bind(&event.source)
        .bind(&event.subject)
        .bind(&event.correlationid)
        .bind(&event.causationid)
        .bind(event.time.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
        .bind(now())
        .bind(String::from_utf8_lossy(&event.to_json()).into_owned())
        .fetch_one(&mut *ctx.tx)
        .await?;
        record_effect(ctx.tx, ctx.consumer, event, &format!("appended audit entry #{seq}")).await?;
        Ok(())
    }
}
