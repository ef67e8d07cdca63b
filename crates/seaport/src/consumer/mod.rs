//! The consumer runner: a handler is a function of (context, event); delivery policy is
//! [`middleware`] around it (inbox dedupe, dead letters, retry with backoff, timeout, panic
//! catching, correlation). The runner itself only fetches, dispatches and settles: it commits
//! the transaction the chain used, then acks; on failure it rolls back and naks with the delay
//! the chain chose.
//!
//! Several runners with the same durable name form a consumer group (`{service}__{context}`):
//! each message goes to one of them. Runners with different names each see every message
//! (fan-out, `{consumer}__from_{source}`); see [`crate::naming`].
//!
//! Inside one runner, messages are processed concurrently (up to `concurrency`), except that
//! events with the same CloudEvents `subject` (the ordering key the outbox partitions by) run one
//! after the other, in delivery order: a slow handler holds up its own key, not the group.
//!
//! **Batched transactions** (`transaction_batch > 1`). One transaction per delivery costs a
//! commit (a WAL flush) and its round trips per message. With batching, deliveries are spread
//! over `concurrency` partitions by ordering key; each partition takes what has queued up (up to
//! `transaction_batch` deliveries), runs the chain for each in turn inside one shared transaction,
//! commits once, and only then acks them all. The guarantees are unchanged: nothing is acked
//! before its inbox record and effects are committed, and a crash before the commit redelivers
//! the whole batch, none of it applied. The inbox pre-check is one query for the batch.
//!
//! The trade-offs: (1) if any delivery of a batch fails (error, timeout, panic, a dead letter
//! that must discard writes, a race lost on the inbox), the shared transaction is rolled back and
//! every delivery of the batch is processed again alone; the handlers of its batch-mates run a
//! second time (their database effects still happen once; calls they make outside the
//! transaction may repeat, as on any redelivery). (2) A slow handler holds up its partition
//! (about `1/concurrency` of the keys), not only its own key, and on SQLite the batch holds the
//! write lock from its first write to its commit. Under light load partitions hold one delivery
//! at a time and behave like the unbatched runner.
//!
//! Within a batch, the inbox records are written with one multi-row statement just before the
//! commit; if any of them already exists (another worker won a race), the batch rolls back and
//! goes delivery by delivery. A handler that also implements [`Handler::handle_batch`] writes its
//! effects for the batch at once too, so a batch costs a few statements instead of two per
//! message: the database's per-statement round trip, not the runner, then sets the pace. That
//! path applies the default stack's policies itself (inbox dedupe, timeout, panic catching, a
//! span), so it is used only with the default stack, and only for first deliveries that are not
//! dead-letter replays; everything else goes through the chain.

pub mod middleware;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::broker::{Broker, BrokerError, ConsumerConfig, Delivery, Message};
use crate::crash::crash_point;
use crate::dead_letters::{self, DeadLetterQueue};
use crate::event::Event;
use crate::outbox::{Outbox, OutboxError};
use crate::store::{Db, Tx};

pub use self::middleware::{Backoff, Middleware, Next};

/// What a handler may fail with; the message is retried, then dead-lettered with this text.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The business logic of a consumer. Everything it writes through `ctx.tx()` commits together
/// with the inbox record, or not at all.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError>;

    /// Whether [`handle_batch`](Self::handle_batch) is implemented. Only then, and only with
    /// the default middleware stack and `transaction_batch > 1`, does the runner use it.
    fn handles_batches(&self) -> bool {
        false
    }

    /// The effects of several deliveries at once, in one transaction: e.g. one multi-row
    /// statement instead of one statement per event, which is what lets a consumer go past the
    /// database's per-statement round-trip limit. `events` are in delivery order, never
    /// duplicates and never already in the inbox; the runner records them in the inbox and
    /// commits. If this fails (error, timeout, panic), the batch is rolled back and each event
    /// goes through [`handle`](Self::handle) alone, with retries and dead letters as usual, so
    /// both must have the same effect.
    async fn handle_batch(&self, ctx: &mut BatchContext<'_>, events: &[&Event]) -> Result<(), HandlerError> {
        let _ = (ctx, events);
        Err("handle_batch is not implemented by this handler".into())
    }
}

/// What [`Handler::handle_batch`] gets besides the events.
pub struct BatchContext<'a> {
    pub consumer: &'a str,
    store: &'a Db,
    outbox: &'a Outbox,
    tx: &'a mut Option<Tx>,
    /// Each event's exported `consume` span, when tracing goes to OpenTelemetry.
    traces: HashMap<String, crate::http::correlation::TraceParent>,
}

impl BatchContext<'_> {
    /// The batch's transaction, begun on first use.
    pub async fn tx(&mut self) -> Result<&mut Tx, sqlx::Error> {
        if self.tx.is_none() {
            *self.tx = Some(self.store.begin_write().await?);
        }
        Ok(self.tx.as_mut().expect("just set"))
    }

    /// The database, for reads outside the transaction.
    pub fn store(&self) -> &Db {
        self.store
    }

    /// Write a follow-up event of `parent` (one of the batch's events) to the outbox in the
    /// batch's transaction: its correlation id, `parent` as causation, its trace continued.
    pub async fn emit(&mut self, parent: &Event, event: Event) -> Result<i64, OutboxError> {
        let mut event = event.caused_by(parent);
        if let Some(own) = self.traces.get(&parent.id) {
            event
                .extensions
                .insert("traceparent".to_owned(), serde_json::Value::String(own.to_string()));
        }
        let outbox = self.outbox;
        outbox.insert(self.tx().await?, &event).await
    }
}

/// What the chain decided about a delivery that did not fail.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The handler ran; commit its writes, then ack.
    Processed,
    /// Already processed by this consumer; ack, write nothing.
    Duplicate,
    /// A dead-letter replay addressed to another consumer; ack, write nothing.
    NotForThisConsumer,
    /// Stored as a dead letter (in the transaction); commit, then ack.
    DeadLettered(String),
}

/// What a handler (and middleware) gets besides the event.
pub struct HandlerContext<'a> {
    /// The durable name of this consumer.
    pub consumer: &'a str,
    /// The message as delivered (subject, headers, stream position).
    pub message: &'a Message,
    /// 1 on the first attempt, 2 on the first retry, ...
    pub delivery_count: u32,
    store: &'a Db,
    outbox: &'a Outbox,
    parent: &'a Event,
    tx: TxSlot<'a>,
    /// Whether the inbox already holds this message, when the runner checked for a whole batch.
    pub(crate) inbox_hint: Option<bool>,
    /// Set when a batched delivery had to discard writes it shares with its batch-mates.
    abandoned: bool,
    propagate_correlation: bool,
    /// This delivery's exported span, when tracing goes to OpenTelemetry: the parent named by
    /// the events it emits (instead of a fresh child of the consumed event's span).
    pub(crate) trace: Option<crate::http::correlation::TraceParent>,
    retry_delay: Option<Duration>,
    verdict: Verdict,
}

/// Where a delivery's writes go.
enum TxSlot<'a> {
    /// Its own transaction, begun on first use.
    Own(Option<Tx>),
    /// The transaction of its batch (see "Batched transactions" above); `used` once it wrote.
    /// Inbox records wait in `inbox` and are written for the whole batch in one statement.
    Shared {
        tx: &'a mut Option<Tx>,
        used: bool,
        inbox: &'a mut Vec<(String, Option<String>)>,
    },
}

impl HandlerContext<'_> {
    /// The transaction of this delivery, begun on first use: a handler that only calls out (or
    /// sleeps) holds no write lock meanwhile. The inbox record joins it after the handler.
    /// (With batched transactions it is the batch's transaction.)
    pub async fn tx(&mut self) -> Result<&mut Tx, sqlx::Error> {
        let store = self.store;
        let slot = match &mut self.tx {
            TxSlot::Own(slot) => slot,
            TxSlot::Shared { tx, used, .. } => {
                *used = true;
                &mut **tx
            }
        };
        if slot.is_none() {
            *slot = Some(store.begin_write().await?);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    /// In a batched transaction, queue this delivery's inbox record for the batch's one
    /// multi-row insert before its commit (returns `false` outside a batch: record it now).
    pub(crate) fn defer_inbox_record(&mut self, message_id: &str, correlation_id: Option<&str>) -> bool {
        match &mut self.tx {
            TxSlot::Shared { inbox, .. } => {
                inbox.push((message_id.to_owned(), correlation_id.map(str::to_owned)));
                true
            }
            TxSlot::Own(_) => false,
        }
    }

    /// The database, for reads outside the transaction.
    pub fn store(&self) -> &Db {
        self.store
    }

    /// Roll back what this delivery wrote so far; a later `tx()` starts afresh. In a batch whose
    /// transaction this delivery already wrote to, this fails, and the runner processes every
    /// delivery of the batch again, alone.
    pub async fn discard_writes(&mut self) -> Result<(), sqlx::Error> {
        match &mut self.tx {
            TxSlot::Own(slot) => match slot.take() {
                Some(tx) => tx.rollback().await,
                None => Ok(()),
            },
            TxSlot::Shared { used: false, .. } => Ok(()),
            TxSlot::Shared { used: true, .. } => {
                self.abandoned = true;
                Err(sqlx::Error::Protocol(
                    "a batched delivery cannot discard its writes alone; the batch is retried delivery by delivery"
                        .into(),
                ))
            }
        }
    }

    /// Write a follow-up event to the outbox in this delivery's transaction; with the
    /// [`Correlation`](middleware::Correlation) middleware (in the default stack) it carries the
    /// consumed event's correlation id, its id as causation id, and a child traceparent.
    pub async fn emit(&mut self, event: Event) -> Result<i64, OutboxError> {
        let event = self.stamp(event);
        let outbox = self.outbox;
        outbox.insert(self.tx().await?, &event).await
    }

    /// Like [`emit`](Self::emit), published under `topic` instead of the event type.
    pub async fn emit_to(&mut self, topic: &str, event: Event) -> Result<i64, OutboxError> {
        let event = self.stamp(event);
        let outbox = self.outbox;
        outbox.insert_to(self.tx().await?, topic, &event).await
    }

    fn stamp(&self, event: Event) -> Event {
        if self.propagate_correlation {
            let mut event = event.caused_by(self.parent);
            if let Some(own) = &self.trace {
                event
                    .extensions
                    .insert("traceparent".to_owned(), serde_json::Value::String(own.to_string()));
            }
            event
        } else {
            event
        }
    }

    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    pub fn set_verdict(&mut self, verdict: Verdict) {
        self.verdict = verdict;
    }

    /// On failure, ask the broker to redeliver after `delay` (default: at once).
    pub fn retry_after(&mut self, delay: Duration) {
        self.retry_delay = Some(delay);
    }
}

/// The runner's settings and the default middleware stack they configure.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Durable name, subject filter and ack wait. (`max_deliver` is not used: the runner
    /// subscribes with unlimited deliveries and enforces `max_attempts` itself.)
    pub consumer: ConsumerConfig,
    /// Messages claimed per fetch.
    pub batch_size: usize,
    /// Messages processed at once by this runner (different ordering keys only).
    pub concurrency: usize,
    /// Failed attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// Delay after the first failure; doubles per attempt, with jitter, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// An attempt running longer than this fails.
    pub handler_timeout: Duration,
    /// Deliveries committed together in one transaction; 1 (the default) is one transaction per
    /// delivery. See "Batched transactions" in the module docs for what larger values trade.
    pub transaction_batch: usize,
    /// Where dead letters are also announced as events (besides the table), if anywhere.
    pub dead_letter_queue: Option<DeadLetterQueue>,
}

impl RunnerConfig {
    pub fn new(consumer: ConsumerConfig) -> Self {
        RunnerConfig {
            consumer,
            batch_size: 16,
            concurrency: 16,
            max_attempts: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(10),
            transaction_batch: 1,
            dead_letter_queue: None,
        }
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: self.base_backoff,
            max: self.max_backoff,
        }
    }

    /// How long after its first delivery a message can still arrive as a redelivery: every
    /// attempt may use up the ack wait (a dead worker) plus the backoff before the next one.
    /// Inbox records must be kept longer than this (see [`crate::retention`]).
    pub fn redelivery_horizon(&self) -> Duration {
        let per_attempt = self.consumer.ack_wait.max(self.handler_timeout) + self.max_backoff;
        per_attempt * (self.max_attempts + 1)
    }

    /// The default stack, outermost first (see [`middleware`]).
    pub fn middleware(&self) -> Vec<Arc<dyn Middleware>> {
        vec![
            Arc::new(middleware::Correlation),
            Arc::new(middleware::InboxDedupe),
            Arc::new(middleware::DeadLetter {
                max_attempts: self.max_attempts,
                queue: self.dead_letter_queue.clone(),
            }),
            Arc::new(middleware::Retry(self.backoff())),
            Arc::new(middleware::Timeout(self.handler_timeout)),
            Arc::new(middleware::CatchPanic),
        ]
    }
}

/// What happened to one delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Processed,
    Duplicate,
    NotForThisConsumer,
    Retry { delay: Duration, error: String },
    DeadLettered { error: String },
}

/// A delivery waiting behind another of its ordering key, holding its concurrency slot.
type Waiting = (Delivery, Result<Event, String>, OwnedSemaphorePermit);

pub struct ConsumerRunner {
    inner: Arc<Inner>,
}

struct Inner {
    store: Db,
    broker: Arc<dyn Broker>,
    stream: String,
    config: RunnerConfig,
    handler: Arc<dyn Handler>,
    middleware: Vec<Arc<dyn Middleware>>,
    /// Batches may bypass the chain only when it is the default one (its policies are what
    /// the batch path applies itself); a custom stack always runs per delivery.
    default_stack: bool,
    outbox: Outbox,
    /// Ordering keys in flight, each with the deliveries waiting behind it.
    lanes: Mutex<HashMap<String, VecDeque<Waiting>>>,
}

impl ConsumerRunner {
    /// A runner with the default middleware stack of `config`.
    pub fn new(
        store: impl Into<Db>,
        broker: Arc<dyn Broker>,
        stream: &str,
        config: RunnerConfig,
        handler: Arc<dyn Handler>,
    ) -> Self {
        let middleware = config.middleware();
        let mut runner = Self::with_middleware(store, broker, stream, config, middleware, handler);
        Arc::get_mut(&mut runner.inner).expect("not shared yet").default_stack = true;
        runner
    }

    /// A runner with your own middleware stack (outermost first). Without
    /// [`InboxDedupe`](middleware::InboxDedupe) a redelivery runs the handler again; without
    /// [`DeadLetter`](middleware::DeadLetter) a poison message is retried forever.
    pub fn with_middleware(
        store: impl Into<Db>,
        broker: Arc<dyn Broker>,
        stream: &str,
        config: RunnerConfig,
        middleware: Vec<Arc<dyn Middleware>>,
        handler: Arc<dyn Handler>,
    ) -> Self {
        ConsumerRunner {
            inner: Arc::new(Inner {
                store: store.into(),
                broker,
                stream: stream.to_owned(),
                config,
                handler,
                middleware,
                default_stack: false,
                outbox: Outbox::new(),
                lanes: Mutex::default(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.config.consumer.durable
    }

    /// The subscription this runner uses: its consumer config with unlimited broker deliveries.
    pub async fn subscribe(&self) -> Result<Box<dyn crate::broker::Subscription>, BrokerError> {
        let mut consumer = self.inner.config.consumer.clone();
        consumer.max_deliver = u32::MAX;
        if let Some(q) = &self.inner.config.dead_letter_queue {
            self.inner
                .broker
                .ensure_stream(&q.stream, &[&format!("{}.>", q.subject_prefix)])
                .await?;
        }
        self.inner.broker.subscribe(&self.inner.stream, consumer).await
    }

    /// Consume until `shutdown` turns `true`; then stop fetching and let the deliveries in hand
    /// finish (anything unsettled is redelivered after its ack wait).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), BrokerError> {
        let inner = self.inner.clone();
        if inner.config.handler_timeout >= inner.config.consumer.ack_wait {
            tracing::warn!(consumer = %self.name(), timeout = ?inner.config.handler_timeout, ack_wait = ?inner.config.consumer.ack_wait,
                "handler timeout is not below the ack wait: a slow attempt may be redelivered to another worker while it runs");
        }
        let mut sub = self.subscribe().await?;
        let slots = Arc::new(Semaphore::new(
            inner.config.concurrency.max(1) * inner.config.transaction_batch.max(1),
        ));
        let mut tasks = JoinSet::new();
        // Batched transactions: one queue per partition, each drained by its own task.
        let partitions: Vec<mpsc::UnboundedSender<Waiting>> = if inner.config.transaction_batch > 1 {
            (0..inner.config.concurrency.max(1))
                .map(|_| {
                    let (send, receive) = mpsc::unbounded_channel();
                    tasks.spawn(inner.clone().partition(receive));
                    send
                })
                .collect()
        } else {
            Vec::new()
        };
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Wait for a free slot, then claim as many messages as there are free slots.
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.changed() => break,
            };
            let mut permits = vec![first];
            while permits.len() < inner.config.batch_size.max(1) {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let batch = tokio::select! {
                b = sub.fetch(permits.len(), Duration::from_secs(1)) => b,
                _ = shutdown.changed() => break,
            };
            while tasks.try_join_next().is_some() {}
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(consumer = %self.name(), error = %e, "fetch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for delivery in batch {
                let permit = permits.pop().expect("fetched no more than the free slots");
                if partitions.is_empty() {
                    Inner::dispatch(&inner, delivery, permit, &mut tasks);
                } else {
                    let event = decode(&delivery.message);
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    ordering_key(&delivery, &event).hash(&mut hasher);
                    let queue = &partitions[(hasher.finish() % partitions.len() as u64) as usize];
                    // The partition tasks live until their sender is dropped below.
                    let _ = queue.send((delivery, event, permit));
                }
            }
        }
        drop(partitions);
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Run the chain for one delivery and settle it with the broker.
    pub async fn process(&self, delivery: &Delivery) -> Result<Outcome, BrokerError> {
        let event = decode(&delivery.message);
        self.inner.process(delivery, event).await
    }
}

fn decode(message: &Message) -> Result<Event, String> {
    Event::from_json(&message.payload).map_err(|e| format!("undecodable event: {e}"))
}

/// The ordering key: the event's `subject` (what the outbox partitions by), else its id.
fn ordering_key(delivery: &Delivery, event: &Result<Event, String>) -> String {
    match event {
        Ok(e) => e.subject.clone().unwrap_or_else(|| e.id.clone()),
        Err(_) => delivery.message.id.clone(),
    }
}

impl Inner {
    /// Start `delivery` now, or queue it behind the delivery of the same ordering key in flight.
    fn dispatch(self: &Arc<Self>, delivery: Delivery, permit: OwnedSemaphorePermit, tasks: &mut JoinSet<()>) {
        let event = decode(&delivery.message);
        let key = ordering_key(&delivery, &event);
        {
            let mut lanes = self.lanes.lock().expect("lanes lock");
            if let Some(queue) = lanes.get_mut(&key) {
                queue.push_back((delivery, event, permit));
                return;
            }
            lanes.insert(key.clone(), VecDeque::new());
        }
        let me = self.clone();
        tasks.spawn(async move {
            let mut next = Some((delivery, event, permit));
            while let Some((delivery, event, permit)) = next {
                if let Err(e) = me.process(&delivery, event).await {
                    // Storage or broker trouble: leave it unsettled; the ack wait redelivers it.
                    tracing::warn!(consumer = %me.config.consumer.durable, error = %e, "processing failed");
                }
                drop(permit);
                let mut lanes = me.lanes.lock().expect("lanes lock");
                next = lanes.get_mut(&key).and_then(|q| q.pop_front());
                if next.is_none() {
                    lanes.remove(&key);
                }
            }
        });
    }

    async fn process(&self, delivery: &Delivery, event: Result<Event, String>) -> Result<Outcome, BrokerError> {
        let started = std::time::Instant::now();
        let outcome = self.process_alone(delivery, event).await?;
        crate::telemetry::delivery(
            &self.config.consumer.durable,
            &outcome,
            delivery.delivery_count,
            started.elapsed(),
        );
        Ok(outcome)
    }

    async fn process_alone(&self, delivery: &Delivery, event: Result<Event, String>) -> Result<Outcome, BrokerError> {
        let consumer = self.config.consumer.durable.as_str();
        let event = match event {
            Ok(e) => e,
            Err(error) => {
                // A message that can never be decoded gains nothing from retries.
                let mut tx = self.store.begin_write().await?;
                dead_letters::record(
                    &mut tx,
                    consumer,
                    &delivery.message,
                    delivery.delivery_count,
                    &error,
                    self.config.dead_letter_queue.as_ref(),
                    None,
                )
                .await
                .map_err(|e| BrokerError::Unavailable(format!("cannot store the dead letter: {e}")))?;
                tx.commit().await?;
                delivery.ack().await?;
                return Ok(Outcome::DeadLettered { error });
            }
        };
        let mut ctx = HandlerContext {
            consumer,
            message: &delivery.message,
            delivery_count: delivery.delivery_count,
            store: &self.store,
            outbox: &self.outbox,
            parent: &event,
            tx: TxSlot::Own(None),
            inbox_hint: None,
            abandoned: false,
            propagate_correlation: false,
            trace: None,
            retry_delay: None,
            verdict: Verdict::Processed,
        };
        let result = Next::new(&self.middleware, &*self.handler).run(&mut ctx, &event).await;
        let tx = match &mut ctx.tx {
            TxSlot::Own(slot) => slot.take(),
            TxSlot::Shared { .. } => unreachable!("a single delivery has its own transaction"),
        };
        let (verdict, retry_delay) = (ctx.verdict.clone(), ctx.retry_delay);
        match result {
            Ok(()) => {
                match verdict {
                    Verdict::Processed | Verdict::DeadLettered(_) => {
                        if let Some(tx) = tx {
                            crash_point("consumer.before_commit");
                            tx.commit().await?;
                        }
                        crash_point("consumer.after_commit");
                    }
                    Verdict::Duplicate | Verdict::NotForThisConsumer => {
                        if let Some(tx) = tx {
                            tx.rollback().await?;
                        }
                    }
                }
                delivery.ack().await?;
                Ok(match verdict {
                    Verdict::Processed => Outcome::Processed,
                    Verdict::Duplicate => Outcome::Duplicate,
                    Verdict::NotForThisConsumer => Outcome::NotForThisConsumer,
                    Verdict::DeadLettered(error) => Outcome::DeadLettered { error },
                })
            }
            Err(error) => {
                if let Some(tx) = tx {
                    tx.rollback().await?;
                }
                let delay = retry_delay.unwrap_or(Duration::ZERO);
                delivery.nak(delay).await?;
                Ok(Outcome::Retry {
                    delay,
                    error: error.to_string(),
                })
            }
        }
    }
}

impl Inner {
    /// One partition of a batched runner: take what has queued up, process it as one batch.
    async fn partition(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<Waiting>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.config.transaction_batch {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.process_batch(batch).await;
        }
    }

    /// Run the chain for each delivery in one shared transaction, commit, then ack them all; on
    /// any failure roll back and process each delivery alone (see the module docs).
    async fn process_batch(&self, batch: Vec<Waiting>) {
        let consumer = self.config.consumer.durable.as_str();
        let together = batch.len() > 1 && batch.iter().all(|(_, e, _)| e.is_ok());
        let settled = if together {
            match self.try_together(&batch).await {
                Ok(Some(verdicts)) => Some(verdicts),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(consumer, error = %e, "batch failed; processing its deliveries one by one");
                    None
                }
            }
        } else {
            None
        };
        match settled {
            Some(verdicts) => {
                // All acks in flight at once (each is confirmed by the broker).
                let acks = futures_util::future::join_all(batch.iter().map(|(d, _, _)| d.ack())).await;
                for (((delivery, _, permit), (verdict, took)), acked) in batch.into_iter().zip(verdicts).zip(acks) {
                    if let Err(e) = acked {
                        // Committed but not acked: the redelivery is skipped by the inbox.
                        tracing::warn!(consumer, error = %e, "ack failed after commit");
                    }
                    drop(permit);
                    let outcome = match verdict {
                        Verdict::Processed => Outcome::Processed,
                        Verdict::Duplicate => Outcome::Duplicate,
                        Verdict::NotForThisConsumer => Outcome::NotForThisConsumer,
                        Verdict::DeadLettered(error) => Outcome::DeadLettered { error },
                    };
                    crate::telemetry::delivery(consumer, &outcome, delivery.delivery_count, took);
                }
            }
            None => {
                for (delivery, event, permit) in batch {
                    if let Err(e) = self.process(&delivery, event).await {
                        tracing::warn!(consumer, error = %e, "processing failed");
                    }
                    drop(permit);
                }
            }
        }
    }

    /// The shared-transaction attempt: `Ok(Some(verdicts))` if committed, `Ok(None)` if some
    /// delivery needs to be processed alone (nothing was committed).
    async fn try_together(&self, batch: &[Waiting]) -> Result<Option<Vec<(Verdict, Duration)>>, sqlx::Error> {
        let consumer = self.config.consumer.durable.as_str();
        let ids: Vec<String> = batch
            .iter()
            .filter_map(|(_, e, _)| e.as_ref().ok().map(|e| e.id.clone()))
            .collect();
        let done: HashSet<String> = crate::inbox::processed_among(&self.store, consumer, &ids).await?;
        // First deliveries only, no dead-letter replays: those need the chain's policies.
        let plain = batch
            .iter()
            .all(|(d, _, _)| d.delivery_count == 1 && !d.message.headers.contains_key(dead_letters::REPLAY_FOR_HEADER));
        if plain && self.default_stack && self.handler.handles_batches() {
            return self.try_batch_handler(batch, &done).await;
        }
        let mut shared: Option<Tx> = None;
        let mut inbox: Vec<(String, Option<String>)> = Vec::with_capacity(batch.len());
        let mut verdicts = Vec::with_capacity(batch.len());
        for (delivery, event, _) in batch {
            let Ok(event) = event else {
                if let Some(tx) = shared.take() {
                    tx.rollback().await?;
                }
                return Ok(None);
            };
            let mut ctx = HandlerContext {
                consumer,
                message: &delivery.message,
                delivery_count: delivery.delivery_count,
                store: &self.store,
                outbox: &self.outbox,
                parent: event,
                tx: TxSlot::Shared {
                    tx: &mut shared,
                    used: false,
                    inbox: &mut inbox,
                },
                inbox_hint: Some(done.contains(&event.id)),
                abandoned: false,
                propagate_correlation: false,
                trace: None,
                retry_delay: None,
                verdict: Verdict::Processed,
            };
            let started = std::time::Instant::now();
            let result = Next::new(&self.middleware, &*self.handler).run(&mut ctx, event).await;
            let took = started.elapsed();
            let used = matches!(ctx.tx, TxSlot::Shared { used: true, .. });
            let (verdict, abandoned) = (ctx.verdict.clone(), ctx.abandoned);
            drop(ctx);
            let keeps = match &verdict {
                Verdict::Processed | Verdict::DeadLettered(_) => true,
                // Acked without effect: fine only if it wrote nothing into the shared transaction.
                Verdict::Duplicate | Verdict::NotForThisConsumer => !used,
            };
            if result.is_err() || abandoned || !keeps {
                if let Some(tx) = shared.take() {
                    tx.rollback().await?;
                }
                return Ok(None);
            }
            verdicts.push((verdict, took));
        }
        if !inbox.is_empty() && !self.record_inbox(&mut shared, &inbox).await? {
            return Ok(None);
        }
        if let Some(tx) = shared {
            crash_point("consumer.before_commit");
            tx.commit().await?;
            crash_point("consumer.after_commit");
        }
        Ok(Some(verdicts))
    }

    /// The inbox records of a batch, one statement, before its commit. `false` if one of them
    /// was already there (processed meanwhile by another worker): the batch was rolled back.
    async fn record_inbox(
        &self,
        shared: &mut Option<Tx>,
        records: &[(String, Option<String>)],
    ) -> Result<bool, sqlx::Error> {
        let consumer = self.config.consumer.durable.as_str();
        if shared.is_none() {
            *shared = Some(self.store.begin_write().await?);
        }
        let tx = shared.as_mut().expect("just set");
        let fresh = match crate::inbox::record_many(&mut *tx, consumer, records).await {
            Ok(fresh) => fresh,
            Err(e) => {
                // Ended now: dropped, the batch's rows and locks would stay until the connection
                // goes back to the pool, and its deliveries, retried alone at once, would wait.
                if let Some(tx) = shared.take() {
                    let _ = tx.rollback().await;
                }
                return Err(e);
            }
        };
        if fresh != records.len() as u64 {
            tracing::debug!(
                consumer,
                "another worker processed part of the batch first; rolling back"
            );
            if let Some(tx) = shared.take() {
                tx.rollback().await?;
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// [`Handler::handle_batch`] for the events not yet in the inbox, under the default stack's
    /// policies: a span with the ids, timeout, panic catching, the inbox records in one
    /// statement. Any failure: `Ok(None)`, rolled back, and the batch goes delivery by delivery
    /// (where retries and dead letters apply).
    async fn try_batch_handler(
        &self,
        batch: &[Waiting],
        done: &HashSet<String>,
    ) -> Result<Option<Vec<(Verdict, Duration)>>, sqlx::Error> {
        use futures_util::FutureExt;
        let consumer = self.config.consumer.durable.as_str();
        let mut fresh: Vec<&Event> = Vec::with_capacity(batch.len());
        let mut seen: HashSet<&str> = HashSet::with_capacity(batch.len());
        let mut verdicts = Vec::with_capacity(batch.len());
        for (_, event, _) in batch {
            let Ok(event) = event else { return Ok(None) };
            let new = !done.contains(&event.id) && seen.insert(event.id.as_str());
            if new {
                fresh.push(event);
            }
            verdicts.push(if new { Verdict::Processed } else { Verdict::Duplicate });
        }
        let started = std::time::Instant::now();
        // Each event keeps its own `consume` span (its trace goes on), open for the whole batch.
        let mut traces = HashMap::new();
        let _spans: Vec<tracing::Span> = batch
            .iter()
            .filter_map(|(_, e, _)| e.as_ref().ok())
            .map(|e| {
                let (span, own) = middleware::consume_span(consumer, e, 1, Some(batch.len()));
                if let Some(own) = own {
                    traces.insert(e.id.clone(), own);
                }
                span
            })
            .collect();
        let mut shared: Option<Tx> = None;
        if !fresh.is_empty() {
            let span = tracing::info_span!("consume_batch", consumer, events = fresh.len(),
                first_event_id = %fresh[0].id, last_event_id = %fresh[fresh.len() - 1].id);
            let mut ctx = BatchContext {
                consumer,
                store: &self.store,
                outbox: &self.outbox,
                tx: &mut shared,
                traces,
            };
            let run = tokio::time::timeout(
                self.config.handler_timeout,
                std::panic::AssertUnwindSafe(self.handler.handle_batch(&mut ctx, &fresh)).catch_unwind(),
            );
            let failure = match tracing::Instrument::instrument(run, span).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(e))) => Some(e.to_string()),
                Ok(Err(_)) => Some("handler panicked".to_owned()),
                Err(_) => Some(format!("handler timed out after {:?}", self.config.handler_timeout)),
            };
            if let Some(error) = failure {
                tracing::warn!(consumer, %error, events = fresh.len(), "batch handler failed; processing the batch delivery by delivery");
                if let Some(tx) = shared.take() {
                    tx.rollback().await?;
                }
                return Ok(None);
            }
            let records: Vec<(String, Option<String>)> =
                fresh.iter().map(|e| (e.id.clone(), e.correlationid.clone())).collect();
            if !self.record_inbox(&mut shared, &records).await? {
                return Ok(None);
            }
        }
        if let Some(tx) = shared {
            crash_point("consumer.before_commit");
            tx.commit().await?;
            crash_point("consumer.after_commit");
        }
        let took = started.elapsed();
        Ok(Some(verdicts.into_iter().map(|v| (v, took)).collect()))
    }
}
