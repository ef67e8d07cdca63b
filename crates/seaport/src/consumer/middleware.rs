//! Delivery policy as middleware, Watermill-style: each piece wraps "the rest of the chain"
//! ([`Next`]) and the handler sits at the end. The runner's default stack, outermost first:
//!
//! | middleware | why |
//! |---|---|
//! | [`Correlation`] | events the handler emits carry the consumed event's correlation id (its id as causation id), and logs carry the ids |
//! | [`InboxDedupe`] | a message already processed (redelivery, re-publish, replay to a bystander) is acked without running the handler; the record commits with the handler's writes |
//! | [`DeadLetter`] | the last failed attempt (or a delivery beyond it: the worker of the last attempt died) goes to the dead letters instead of being retried |
//! | [`Retry`] | a failure is nak'ed with an exponential, jittered delay: the broker redelivers later, no one sleeps holding the message |
//! | [`Timeout`] | an attempt running too long fails (before the broker's ack wait hands the message to another worker) |
//! | [`CatchPanic`] | a panicking handler is a failed attempt, not a dead worker |
//!
//! Write your own by implementing [`Middleware`]; order matters as in any onion.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use rand::Rng;
use tracing::Instrument;

use super::{Handler, HandlerContext, HandlerError, Verdict};
use crate::Event;
use crate::dead_letters::{self, DeadLetterQueue};
use crate::inbox;

/// One layer of delivery policy around a handler.
#[async_trait]
pub trait Middleware: Send + Sync + 'static {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError>;
}

/// The rest of the chain: the remaining middleware, then the handler.
pub struct Next<'a> {
    rest: &'a [Arc<dyn Middleware>],
    handler: &'a dyn Handler,
}

impl<'a> Next<'a> {
    pub(crate) fn new(rest: &'a [Arc<dyn Middleware>], handler: &'a dyn Handler) -> Self {
        Next { rest, handler }
    }

    pub async fn run(self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        match self.rest.split_first() {
            Some((first, rest)) => first.handle(ctx, event, Next::new(rest, self.handler)).await,
            None => self.handler.handle(ctx, event).await,
        }
    }
}

/// Correlation propagation: turns on `ctx.emit` stamping (correlation id, causation id, child
/// traceparent) and runs the rest inside a span carrying the ids.
pub struct Correlation;

#[async_trait]
impl Middleware for Correlation {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError> {
        ctx.propagate_correlation = true;
        let (span, own) = consume_span(ctx.consumer, event, ctx.delivery_count, None);
        ctx.trace = own;
        next.run(ctx, event).instrument(span).await
    }
}

/// The `consume` span of one delivery. The trace continues here: the event's `traceparent` (set
/// from the HTTP request, or from the event that caused it) names the trace and the span this
/// one descends from. When spans are exported to OpenTelemetry, also returns this span's own
/// context: the parent the events emitted while handling it must name.
pub(crate) fn consume_span(
    consumer: &str,
    event: &Event,
    delivery: u32,
    batch: Option<usize>,
) -> (tracing::Span, Option<crate::http::correlation::TraceParent>) {
    let trace = event
        .extensions
        .get("traceparent")
        .and_then(|v| v.as_str())
        .and_then(crate::http::correlation::TraceParent::parse);
    let span = tracing::info_span!("consume",
        consumer = %consumer,
        event_id = %event.id,
        event_type = %event.ty,
        correlation_id = event.correlationid.as_deref().unwrap_or(&event.id),
        trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
        parent_span_id = trace.as_ref().map(|t| t.span_id.as_str()),
        delivery,
        batch);
    let own = crate::http::correlation::adopt_span(&span, trace.as_ref());
    if let Some(own) = &own
        && trace.as_ref().map(|t| &t.trace_id) != Some(&own.trace_id)
    {
        span.record("trace_id", own.trace_id.as_str());
    }
    (span, own)
}

/// Inbox + Idempotency: skip what this consumer already processed; otherwise record it in the
/// handler's transaction, so the record and the effects commit together. The check before the
/// handler is a plain read (no write lock held while the handler works); the insert after it is
/// what guarantees a single effect when two workers race on the same message: the second one's
/// insert conflicts and its transaction rolls back.
pub struct InboxDedupe;

#[async_trait]
impl Middleware for InboxDedupe {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError> {
        let seen = match ctx.inbox_hint {
            Some(seen) => seen, // checked for the whole batch by the runner
            None => inbox::contains_in(ctx.store, ctx.consumer, &event.id).await?,
        };
        if seen {
            tracing::debug!("duplicate skipped by the inbox");
            ctx.verdict = Verdict::Duplicate;
            return Ok(());
        }
        next.run(ctx, event).await?;
        if ctx.verdict == Verdict::Processed && !ctx.defer_inbox_record(&event.id, event.correlationid.as_deref()) {
            let consumer = ctx.consumer;
            let fresh = inbox::record(ctx.tx().await?, consumer, &event.id, event.correlationid.as_deref()).await?;
            if !fresh {
                tracing::debug!("another worker processed it first; rolling back");
                ctx.verdict = Verdict::Duplicate;
            }
        }
        Ok(())
    }
}

/// Max deliveries → dead letter. The failed attempt's writes are discarded and the dead letter
/// (plus its announcement on the dead-letter stream, through the outbox) is written in their
/// place, so the message is acked only once it is safely stored.
///
/// The runner subscribes with unlimited broker deliveries, so a message whose last attempt never
/// settled (the worker died, or hung past the ack wait) comes back once more and is dead-lettered
/// here without running the handler: nothing is dropped silently.
///
/// Replays from the dead letters are addressed to the consumer that failed (header
/// [`dead_letters::REPLAY_FOR_HEADER`]); every other consumer of the subject acks them unprocessed.
pub struct DeadLetter {
    pub max_attempts: u32,
    pub queue: Option<DeadLetterQueue>,
}

#[async_trait]
impl Middleware for DeadLetter {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError> {
        if let Some(target) = ctx.message.headers.get(dead_letters::REPLAY_FOR_HEADER)
            && target != ctx.consumer
        {
            ctx.verdict = Verdict::NotForThisConsumer;
            return Ok(());
        }
        if ctx.delivery_count > self.max_attempts {
            let error = format!(
                "delivery {} of {} was never settled (the worker stopped or the attempt outlived the ack wait)",
                ctx.delivery_count - 1,
                self.max_attempts
            );
            return self.store(ctx, event, error).await;
        }
        match next.run(ctx, event).await {
            Err(e) if ctx.delivery_count >= self.max_attempts => {
                tracing::error!(error = %e, "deliveries exhausted; dead-lettering");
                ctx.discard_writes().await?;
                self.store(ctx, event, e.to_string()).await
            }
            other => other,
        }
    }
}

impl DeadLetter {
    async fn store(&self, ctx: &mut HandlerContext<'_>, event: &Event, error: String) -> Result<(), HandlerError> {
        let (consumer, message, count) = (ctx.consumer, ctx.message, ctx.delivery_count);
        dead_letters::record(
            ctx.tx().await?,
            consumer,
            message,
            count,
            &error,
            self.queue.as_ref(),
            Some(event),
        )
        .await?;
        ctx.verdict = Verdict::DeadLettered(error);
        Ok(())
    }
}

/// Exponential backoff with "equal jitter": half of the delay fixed, half random, so the retries
/// of many messages that failed together do not come back in lockstep.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Delay after the first failed attempt; doubles per attempt.
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay after failed attempt number `attempt` (1-based). Never shorter than the previous
    /// attempt's delay could have been: `delay(n+1) >= delay(n)` always holds.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

/// Retry: a failed attempt is nak'ed with [`Backoff`] delay; the broker redelivers it later.
pub struct Retry(pub Backoff);

#[async_trait]
impl Middleware for Retry {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError> {
        let result = next.run(ctx, event).await;
        if let Err(e) = &result {
            let delay = self.0.delay(ctx.delivery_count);
            tracing::warn!(error = %e, ?delay, "attempt failed; will retry");
            ctx.retry_delay = Some(delay);
        }
        result
    }
}

/// An attempt running longer than this fails. Keep it below the broker's ack wait, or the
/// message is handed to another worker while this one still works on it.
pub struct Timeout(pub Duration);

#[async_trait]
impl Middleware for Timeout {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError> {
        match tokio::time::timeout(self.0, next.run(ctx, event)).await {
            Ok(r) => r,
            Err(_) => Err(format!("handler timed out after {:?}", self.0).into()),
        }
    }
}

/// A panic in the handler becomes a failed attempt (retried, then dead-lettered with the panic
/// message) instead of killing the worker task.
pub struct CatchPanic;

#[async_trait]
impl Middleware for CatchPanic {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event, next: Next<'_>) -> Result<(), HandlerError> {
        match AssertUnwindSafe(next.run(ctx, event)).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                Err(format!("handler panicked: {msg}").into())
            }
        }
    }
}
