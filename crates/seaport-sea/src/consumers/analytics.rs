//! analytics__from_sea: counts events by type and day.

use async_trait::async_trait;
use seaport::Event;
use seaport::consumer::{Handler, HandlerContext, HandlerError};
use seaport::on_conn;

use super::record_effect;

pub struct Analytics;

#[async_trait]
impl Handler for Analytics {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let consumer = ctx.consumer;
        let day = event
            .time
            .unwrap_or_else(chrono::Utc::now)
            .format("%Y-%m-%d")
            .to_string();
        let count: i64 = on_conn!(ctx.tx().await?, c => sqlx::query_scalar(
            "INSERT INTO analytics_counts (event_type, day, count) VALUES ($1, $2, 1)
             ON CONFLICT (event_type, day) DO UPDATE SET count = analytics_counts.count + 1
             RETURNING count",
        )
        .bind(&event.ty)
        .bind(&day)
        .fetch_one(c)
        .await)?;
        record_effect(
            ctx.tx().await?,
            consumer,
            event,
            &format!("counted {} on {day} (now {count})", event.ty),
        )
        .await?;
        Ok(())
    }
}
