//! The consumer runner: a handler is a function of (transaction, event); delivery policy lives
//! around it: inbox dedupe in the handler's transaction, ack only after commit, retry with
//! exponential backoff and jitter (nak with delay, never sleeping on the message), a handler
//! timeout, and dead letters once deliveries are exhausted.
//!
//! Several runners with the same durable name form a consumer group; runners with different
//! names each see every message (fan-out).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::watch;

use crate::broker::{Broker, BrokerError, ConsumerConfig, Delivery};
use crate::crash::crash_point;
use crate::event::Event;
use crate::inbox;
use crate::on_conn;
use crate::outbox::{Outbox, OutboxError};
use crate::store::now_ms;
use crate::store::{Db, Tx};

/// What a handler may fail with; the message is retried, then dead-lettered with this text.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The business logic of a consumer. Everything it writes through `ctx.tx` commits together with
/// the inbox record, or not at all.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError>;
}

/// What a handler gets besides the event: the transaction, and who/which attempt it is.
pub struct HandlerContext<'a> {
    /// The transaction the inbox record is in; use it with [`on_conn!`](crate::on_conn).
    pub tx: &'a mut Tx,
    pub consumer: &'a str,
    pub delivery_count: u32,
    parent: &'a Event,
    outbox: &'a Outbox,
}

impl HandlerContext<'_> {
    /// Write a follow-up event to the outbox in this transaction, carrying the consumed event's
    /// correlation id and its id as causation id.
    pub async fn emit(&mut self, event: Event) -> Result<i64, OutboxError> {
        let event = event.caused_by(self.parent);
        self.outbox.insert(&mut *self.tx, &event).await
    }

    /// Like [`emit`](Self::emit), published under `topic` instead of the event type.
    pub async fn emit_to(&mut self, topic: &str, event: Event) -> Result<i64, OutboxError> {
        let event = event.caused_by(self.parent);
        self.outbox.insert_to(&mut *self.tx, topic, &event).await
    }
}

/// Delivery policy around a handler.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    pub consumer: ConsumerConfig,
    /// Messages claimed per fetch.
    pub batch_size: usize,
    /// First retry delay; doubles per attempt, with jitter, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A handler running longer than this fails the attempt.
    pub handler_timeout: Duration,
}

impl RunnerConfig {
    pub fn new(consumer: ConsumerConfig) -> Self {
        RunnerConfig {
            consumer,
            batch_size: 16,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(10),
        }
    }

    /// Delay before delivery `attempt + 1`: exponential, half fixed and half random ("equal
    /// jitter"), so retries of many failed messages do not arrive in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max_backoff);
        let half = capped / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

/// What happened to one delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Processed,
    Duplicate,
    Retry { delay: Duration, error: String },
    DeadLettered { error: String },
}

pub struct ConsumerRunner {
    store: Db,
    broker: Arc<dyn Broker>,
    stream: String,
    config: RunnerConfig,
    handler: Arc<dyn Handler>,
    outbox: Outbox,
}

impl ConsumerRunner {
    pub fn new(
        store: impl Into<Db>,
        broker: Arc<dyn Broker>,
        stream: &str,
        config: RunnerConfig,
        handler: Arc<dyn Handler>,
    ) -> Self {
        ConsumerRunner {
            store: store.into(),
            broker,
            stream: stream.to_owned(),
            config,
            handler,
            outbox: Outbox::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.consumer.durable
    }

    /// Consume until `shutdown` turns `true`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), BrokerError> {
        let mut sub = self
            .broker
            .subscribe(&self.stream, self.config.consumer.clone())
            .await?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let batch = tokio::select! {
                b = sub.fetch(self.config.batch_size, Duration::from_secs(1)) => b,
                _ = shutdown.changed() => return Ok(()),
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(consumer = %self.name(), error = %e, "fetch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for delivery in batch {
                if let Err(e) = self.process(&delivery).await {
                    // Storage trouble: leave the message unsettled; the ack wait redelivers it.
                    tracing::warn!(consumer = %self.name(), error = %e, "processing failed");
                }
            }
        }
    }

    /// Run the policy for one delivery and settle it with the broker.
    pub async fn process(&self, delivery: &Delivery) -> Result<Outcome, BrokerError> {
        let consumer = self.config.consumer.durable.as_str();
        let msg = &delivery.message;
        let event = match Event::from_json(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                // A message that can never be decoded gains nothing from retries.
                let error = format!("undecodable event: {e}");
                self.dead_letter(delivery, &error).await?;
                delivery.ack().await?;
                return Ok(Outcome::DeadLettered { error });
            }
        };
        let span = tracing::info_span!("consume", consumer, event_id = %event.id, event_type = %event.ty,
            correlation_id = event.correlationid.as_deref().unwrap_or(""), delivery = delivery.delivery_count);
        let _enter = span.enter();

        let mut tx = self.store.begin_write().await?;
        if !inbox::record(&mut tx, consumer, &event.id, event.correlationid.as_deref()).await? {
            tx.commit().await?;
            delivery.ack().await?;
            tracing::debug!("duplicate skipped by the inbox");
            return Ok(Outcome::Duplicate);
        }
        let mut ctx = HandlerContext {
            tx: &mut tx,
            consumer,
            delivery_count: delivery.delivery_count,
            parent: &event,
            outbox: &self.outbox,
        };
        let result =
            match tokio::time::timeout(self.config.handler_timeout, self.handler.handle(&mut ctx, &event)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("handler timed out after {:?}", self.config.handler_timeout)),
            };
        match result {
            Ok(()) => {
                tx.commit().await?;
                crash_point("consumer.after_commit");
                delivery.ack().await?;
                Ok(Outcome::Processed)
            }
            Err(error) => {
                tx.rollback().await?;
                if delivery.is_last_attempt() {
                    tracing::error!(%error, "deliveries exhausted; dead-lettering");
                    self.dead_letter(delivery, &error).await?;
                    delivery.ack().await?;
                    Ok(Outcome::DeadLettered { error })
                } else {
                    let delay = self.config.backoff(delivery.delivery_count);
                    tracing::warn!(%error, ?delay, "handler failed; will retry");
                    delivery.nak(delay).await?;
                    Ok(Outcome::Retry { delay, error })
                }
            }
        }
    }

    async fn dead_letter(&self, delivery: &Delivery, error: &str) -> Result<(), sqlx::Error> {
        let m = &delivery.message;
        let headers = serde_json::to_string(&m.headers).expect("string map serialises");
        let now = now_ms();
        let mut tx = self.store.begin_write().await?;
        on_conn!(&mut tx, c => sqlx::query(
            "INSERT INTO seaport_dead_letters
                (consumer, stream, stream_seq, message_id, subject, headers, payload, delivery_count, last_error, failed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (consumer, stream, stream_seq) DO UPDATE SET
                delivery_count = excluded.delivery_count, last_error = excluded.last_error, failed_at = excluded.failed_at",
        )
        .bind(&self.config.consumer.durable)
        .bind(&m.stream)
        .bind(m.stream_seq as i64)
        .bind(&m.id)
        .bind(&m.subject)
        .bind(&headers)
        .bind(&m.payload)
        .bind(delivery.delivery_count as i64)
        .bind(error)
        .bind(now)
        .execute(c)
        .await
        .map(|_| ()))?;
        tx.commit().await
    }
}
