//! notifications__from_sea: queues a notification for each new case, and announces it with a
//! `sea.notifications.queued` event (same correlation id, the case event as causation).

use async_trait::async_trait;
use seaport::Event;
use seaport::consumer::{Handler, HandlerContext, HandlerError};
use seaport::on_conn;

use super::{now, record_effect};
use crate::app::Topics;
use crate::cases::CASE_CREATED;

pub const NOTIFICATION_QUEUED: &str = "sea.notifications.queued";

pub struct Notifications {
    pub topics: Topics,
}

#[async_trait]
impl Handler for Notifications {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let consumer = ctx.consumer;
        if event.ty != CASE_CREATED {
            return Ok(()); // nothing to notify about; the inbox still records that we saw it
        }
        let data = event.data.as_ref().ok_or("case event without data")?;
        let case_id = data["id"].as_str().ok_or("case event without data.id")?;
        let recipient = data["customer_id"]
            .as_str()
            .ok_or("case event without data.customer_id")?;
        let at = now();
        let id: i64 = on_conn!(ctx.tx().await?, c => sqlx::query_scalar(
            "INSERT INTO notifications (event_id, case_id, recipient, template, created_at)
             VALUES ($1, $2, $3, 'case_created', $4) RETURNING id",
        )
        .bind(&event.id)
        .bind(case_id)
        .bind(recipient)
        .bind(&at)
        .fetch_one(c)
        .await)?;
        let queued = Event::new(
            NOTIFICATION_QUEUED,
            "/sea/notifications",
            serde_json::json!({"notification_id": id, "case_id": case_id, "recipient": recipient, "template": "case_created"}),
        )
        .with_subject(case_id);
        ctx.emit_to(&self.topics.topic(NOTIFICATION_QUEUED), queued).await?;
        record_effect(
            ctx.tx().await?,
            consumer,
            event,
            &format!("queued notification #{id} (case_created) for customer {recipient}"),
        )
        .await?;
        Ok(())
    }
}
