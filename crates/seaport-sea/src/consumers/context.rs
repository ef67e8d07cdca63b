//! sea_service__context: the consumer *group* doing the service's own integration work, run by
//! every worker instance under the same durable name (`{service}__{context}`), so N workers share
//! the load instead of each doing it all.
//!
//! Its work is the webhooks the service received (`sea.webhooks.received`, written to the outbox
//! by the receivers in the same transaction as their dedupe record): a confirmed payment that
//! names a case (`metadata.case_id`) marks the case paid and announces `sea.cases.paid`; every
//! other webhook is recorded as seen. A payment for an unknown case fails (and after its attempts
//! ends in the dead letters, where an operator can look at it) rather than vanishing.

use async_trait::async_trait;
use seaport::Event;
use seaport::consumer::{Handler, HandlerContext, HandlerError};

use super::{now, record_effect};
use crate::app::Topics;
use crate::cases::{CASE_PAID, repo};

pub const WEBHOOK_RECEIVED: &str = "sea.webhooks.received";

/// Stripe event types that confirm a payment.
const STRIPE_PAID: [&str; 4] = [
    "payment_intent.succeeded",
    "checkout.session.completed",
    "charge.succeeded",
    "invoice.paid",
];

pub struct ServiceContext {
    pub topics: Topics,
}

impl ServiceContext {
    /// The subjects this group consumes.
    pub fn filter(topics: &Topics) -> String {
        format!("{}.>", topics.topic("sea.webhooks"))
    }
}

#[async_trait]
impl Handler for ServiceContext {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let consumer = ctx.consumer;
        if event.ty != WEBHOOK_RECEIVED {
            return Ok(());
        }
        let data = event.data.as_ref().ok_or("webhook event without data")?;
        let source = data["source"].as_str().ok_or("webhook event without data.source")?;
        let kind = data["event_type"]
            .as_str()
            .ok_or("webhook event without data.event_type")?;
        let case_id = data["payload"]["object"]["metadata"]["case_id"].as_str();
        let effect = match (source, case_id) {
            ("stripe", Some(case_id)) if STRIPE_PAID.contains(&kind) => {
                let at = now();
                if !repo::mark_paid(ctx.tx().await?, case_id, &at).await? {
                    return Err(format!("stripe {kind} names case {case_id}, which does not exist").into());
                }
                let paid = Event::new(
                    CASE_PAID,
                    "/sea/context",
                    serde_json::json!({"id": case_id, "source": source, "provider_event": kind, "paid_at": at}),
                )
                .with_subject(case_id);
                ctx.emit_to(&self.topics.topic(CASE_PAID), paid).await?;
                format!("marked case {case_id} paid ({source} {kind})")
            }
            _ => format!("received {source} {kind}: nothing to do"),
        };
        record_effect(ctx.tx().await?, consumer, event, &effect).await?;
        Ok(())
    }
}
