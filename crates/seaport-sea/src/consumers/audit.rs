//! audit__from_sea: the append-only log of every event (database triggers refuse updates and
//! deletes); `/trace` reads it.

use async_trait::async_trait;
use seaport::Event;
use seaport::consumer::{Handler, HandlerContext, HandlerError};
use seaport::on_conn;

use super::{now, record_effect};

pub struct Audit;

#[async_trait]
impl Handler for Audit {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let consumer = ctx.consumer;
        let time = event
            .time
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        let envelope = String::from_utf8_lossy(&event.to_json()).into_owned();
        let at = now();
        let seq: i64 = on_conn!(ctx.tx().await?, c => sqlx::query_scalar(
            "INSERT INTO audit_log (event_id, event_type, source, subject, correlation_id, causation_id, event_time, recorded_at, envelope)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq",
        )
        .bind(&event.id)
        .bind(&event.ty)
        .bind(&event.source)
        .bind(&event.subject)
        .bind(&event.correlationid)
        .bind(&event.causationid)
        .bind(&time)
        .bind(&at)
        .bind(&envelope)
        .fetch_one(c)
        .await)?;
        record_effect(
            ctx.tx().await?,
            consumer,
            event,
            &format!("appended audit entry #{seq}"),
        )
        .await?;
        Ok(())
    }
}
