//! analytics__from_sea: counts events by type and day.

use async_trait::async_trait;
use seaport::Event;
use seaport::consumer::{BatchContext, Handler, HandlerContext, HandlerError};
use seaport::on_conn;

use super::{record_effect, record_effects};

pub struct Analytics;

#[async_trait]
impl Handler for Analytics {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let consumer = ctx.consumer;
        let day = day_of(event);
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

    fn handles_batches(&self) -> bool {
        true
    }

    /// A batch bumps each (type, day) counter once, by how many of its events it has, instead of
    /// once per event: the counter row is what every analytics transaction would queue on.
    async fn handle_batch(&self, ctx: &mut BatchContext<'_>, events: &[&Event]) -> Result<(), HandlerError> {
        let consumer = ctx.consumer;
        // Counters in first-seen order: every batch locks the rows it bumps in a stable order.
        let mut groups: Vec<((&str, String), i64)> = Vec::new();
        let days: Vec<String> = events.iter().map(|e| day_of(e)).collect();
        for (event, day) in events.iter().zip(&days) {
            match groups.iter_mut().find(|((t, d), _)| *t == event.ty && d == day) {
                Some((_, n)) => *n += 1,
                None => groups.push(((event.ty.as_str(), day.clone()), 1)),
            }
        }
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        // The count after this batch, per counter; each event gets its running value back.
        let mut running: Vec<((&str, String), i64)> = Vec::with_capacity(groups.len());
        for ((ty, day), n) in &groups {
            let after: i64 = on_conn!(ctx.tx().await?, c => sqlx::query_scalar(
                "INSERT INTO analytics_counts (event_type, day, count) VALUES ($1, $2, $3)
                 ON CONFLICT (event_type, day) DO UPDATE SET count = analytics_counts.count + $3
                 RETURNING count",
            )
            .bind(*ty)
            .bind(day)
            .bind(*n)
            .fetch_one(c)
            .await)?;
            running.push(((*ty, day.clone()), after - n));
        }
        let mut effects = Vec::with_capacity(events.len());
        for (event, day) in events.iter().zip(&days) {
            let (_, count) = running
                .iter_mut()
                .find(|((t, d), _)| *t == event.ty && d == day)
                .expect("every event's counter was bumped");
            *count += 1;
            effects.push((*event, format!("counted {} on {day} (now {count})", event.ty)));
        }
        record_effects(ctx.tx().await?, consumer, &effects).await?;
        Ok(())
    }
}

fn day_of(event: &Event) -> String {
    event
        .time
        .unwrap_or_else(chrono::Utc::now)
        .format("%Y-%m-%d")
        .to_string()
}
