//! The conformance suite: the same delivery guarantees, checked on the embedded default
//! (SQLite + embedded broker) and on PostgreSQL + NATS JetStream (real servers). The definition of
//! "same semantics" is that every test here passes on both.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use seaport::Event;
use seaport::broker::{Broker, BrokerError, ConsumerConfig, OutgoingMessage, PendingPublish, PublishAck, Subscription};
use seaport::consumer::{BatchContext, ConsumerRunner, Handler, HandlerContext, HandlerError, Outcome, RunnerConfig};
use seaport::dead_letters::DeadLetterQueue;
use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::outbox::{self, Outbox};
use seaport::testing::{Fixture, Kind};
use tokio::sync::watch;

static CLOCK: AtomicI64 = AtomicI64::new(0);

/// A fixture with the tables the tests use as "domain" and "effects".
async fn setup(kind: Kind) -> Fixture {
    let f = Fixture::new(kind).await;
    seaport::on_pool!(&f.db, p => {
        sqlx::query("CREATE TABLE widgets (id TEXT PRIMARY KEY)").execute(p).await.unwrap();
        sqlx::query("CREATE TABLE effects (consumer TEXT NOT NULL, event_id TEXT NOT NULL, worker TEXT NOT NULL, at BIGINT NOT NULL)")
            .execute(p)
            .await
            .unwrap();
    });
    f
}

fn event(f: &Fixture, key: &str, n: usize) -> Event {
    Event::new(
        f.subject("widgets.made"),
        "/test",
        serde_json::json!({ "n": n, "key": key }),
    )
    .with_subject(key)
}

async fn write_events(f: &Fixture, n: usize) -> Vec<Event> {
    write_keyed(f, &["k"], n).await
}

/// `n` events per key, interleaved across keys, each in its own transaction with a domain row.
async fn write_keyed(f: &Fixture, keys: &[&str], n: usize) -> Vec<Event> {
    let outbox = Outbox::new();
    let mut events = Vec::new();
    for i in 0..n {
        for key in keys {
            let e = event(f, key, i);
            let mut tx = f.db.begin_write().await.unwrap();
            seaport::on_conn!(&mut tx, c => sqlx::query("INSERT INTO widgets (id) VALUES ($1)").bind(&e.id).execute(c).await.map(|_| ())).unwrap();
            outbox.insert(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
            events.push(e);
        }
    }
    events
}

async fn count(f: &Fixture, sql: &'static str) -> i64 {
    seaport::on_pool!(&f.db, p => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.unwrap())
}

async fn drain(f: &Fixture) {
    let mut relay = Relay::new(f.db.clone(), f.broker.clone(), RelayConfig::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        relay.run_once().await.unwrap();
        if count(f, "SELECT COUNT(*) FROM seaport_outbox").await == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "relay did not drain the outbox");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records each call as an effect row in the handler's transaction; fails while `fail_first`
/// says so for an event.
struct Recorder {
    worker: String,
    calls: Arc<AtomicUsize>,
    failures_left: Arc<Mutex<HashMap<String, usize>>>,
    /// Events whose handler panics (while failures are left) instead of returning an error.
    panics: Arc<Mutex<Vec<String>>>,
    /// Events whose handler waits for this gate to open before doing anything.
    gate: Option<(Vec<String>, Arc<tokio::sync::Semaphore>)>,
    delay: Duration,
}

impl Recorder {
    fn new(worker: &str) -> Self {
        Recorder {
            worker: worker.to_owned(),
            calls: Arc::default(),
            failures_left: Arc::default(),
            panics: Arc::default(),
            gate: None,
            delay: Duration::ZERO,
        }
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some((ids, gate)) = &self.gate
            && ids.contains(&event.id)
        {
            let _open = gate.acquire().await.unwrap();
        }
        let at = CLOCK.fetch_add(1, Ordering::SeqCst);
        let consumer = ctx.consumer;
        seaport::on_conn!(ctx.tx().await?, c => sqlx::query("INSERT INTO effects (consumer, event_id, worker, at) VALUES ($1, $2, $3, $4)")
            .bind(consumer)
            .bind(&event.id)
            .bind(&self.worker)
            .bind(at)
            .execute(c)
            .await
            .map(|_| ()))?;
        let mut f = self.failures_left.lock().unwrap();
        if let Some(n) = f.get_mut(&event.id).filter(|n| **n > 0) {
            *n -= 1;
            if self.panics.lock().unwrap().contains(&event.id) {
                drop(f);
                panic!("boom in {}", event.id);
            }
            return Err(format!("injected failure for {}", event.id).into());
        }
        Ok(())
    }
}

async fn effects(f: &Fixture, consumer: &str) -> Vec<(String, String)> {
    seaport::on_pool!(&f.db, p => sqlx::query_as("SELECT event_id, worker FROM effects WHERE consumer = $1 ORDER BY at")
        .bind(consumer)
        .fetch_all(p)
        .await
        .unwrap())
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runner(f: &Fixture, durable: &str, handler: Recorder) -> ConsumerRunner {
    let mut cfg = RunnerConfig::new(ConsumerConfig::new(durable, format!("{}.>", f.root)));
    cfg.base_backoff = Duration::from_millis(20);
    cfg.batch_size = 1;
    ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(handler))
}

/// Run each test body on both backends: `embedded::name` and `pg_jetstream::name`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Embedded).await } )*
        }
        mod pg_jetstream {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::PgJetStream).await } )*
        }
    };
}

conformance!(
    outbox_row_and_domain_row_commit_or_roll_back_together,
    outbox_refuses_invalid_events,
    relay_publishes_in_order_and_never_deletes_unconfirmed_rows,
    relay_drain_pipelines_across_batches_and_stops_at_a_refusal,
    relay_wakes_on_commit_without_waiting_for_the_poll,
    broker_dedupes_publishes_by_message_id,
    fan_out_every_durable_gets_every_message,
    consumer_group_workers_share_messages_without_overlap,
    failed_handler_is_redelivered_and_its_effects_rolled_back,
    unacknowledged_message_is_redelivered_after_ack_wait,
    duplicate_message_runs_the_handler_once,
    message_that_keeps_failing_ends_in_dead_letters,
    two_relays_and_two_workers_keep_per_key_order_and_exactly_once_effects,
    retention_deletes_old_inbox_records_and_never_an_outbox_row,
    replayed_dead_letter_reaches_its_consumer_once_and_no_one_else,
    backoff_delays_grow_and_redeliveries_wait_for_them,
    panicking_handler_is_a_failed_attempt,
    slow_handler_does_not_block_other_messages_of_the_group,
    last_attempt_that_never_settled_still_ends_in_dead_letters,
    batched_transactions_keep_single_effects_order_and_isolate_failures,
    batch_handler_writes_a_batch_at_once_and_falls_back_per_event_on_failure,
);

async fn outbox_row_and_domain_row_commit_or_roll_back_together(kind: Kind) {
    let f = setup(kind).await;
    let outbox = Outbox::new();
    let e = event(&f, "k", 1);
    let insert_widget = "INSERT INTO widgets (id) VALUES ($1)";
    let mut tx = f.db.begin_write().await.unwrap();
    seaport::on_conn!(&mut tx, c => sqlx::query(insert_widget).bind(&e.id).execute(c).await.map(|_| ())).unwrap();
    outbox.insert(&mut tx, &e).await.unwrap();
    tx.rollback().await.unwrap();
    let counts = async || {
        (
            count(&f, "SELECT COUNT(*) FROM widgets").await,
            count(&f, "SELECT COUNT(*) FROM seaport_outbox").await,
        )
    };
    assert_eq!(counts().await, (0, 0));

    // A failure after the outbox insert (here: a duplicate domain key) takes the event with it.
    let mut tx = f.db.begin_write().await.unwrap();
    outbox.insert(&mut tx, &e).await.unwrap();
    seaport::on_conn!(&mut tx, c => sqlx::query(insert_widget).bind("x").execute(c).await.map(|_| ())).unwrap();
    let dup = seaport::on_conn!(&mut tx, c => sqlx::query(insert_widget).bind("x").execute(c).await.map(|_| ()));
    assert!(dup.is_err());
    drop(tx); // dropped without commit = rolled back
    assert_eq!(counts().await, (0, 0));

    let mut tx = f.db.begin_write().await.unwrap();
    seaport::on_conn!(&mut tx, c => sqlx::query(insert_widget).bind(&e.id).execute(c).await.map(|_| ())).unwrap();
    outbox.insert(&mut tx, &e).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(counts().await, (1, 1));
    let s = outbox::status(&f.db).await.unwrap();
    assert_eq!((s.unpublished, s.failing), (1, 0));
    assert!(s.oldest_unpublished_age_ms.is_some());
    f.cleanup().await;
}

async fn outbox_refuses_invalid_events(kind: Kind) {
    let f = setup(kind).await;
    let mut tx = f.db.begin_write().await.unwrap();
    let mut bad = event(&f, "k", 1);
    bad.source.clear();
    assert!(Outbox::new().insert(&mut tx, &bad).await.is_err());
    let e = Event::new("not a subject", "/t", serde_json::json!({}));
    assert!(Outbox::new().insert(&mut tx, &e).await.is_err());
    drop(tx);
    f.cleanup().await;
}

/// Wraps the real broker and refuses chosen messages (as a broker that lost its
/// connection half-way would), so we can see what the relay marks.
struct Refusing {
    inner: Arc<dyn Broker>,
    refuse: Mutex<HashMap<String, usize>>,
}

impl Refusing {
    /// The fixture's broker, refusing the message `id` once.
    fn once(f: &Fixture, id: &str) -> Arc<Refusing> {
        Arc::new(Refusing {
            inner: f.broker.clone(),
            refuse: Mutex::new(HashMap::from([(id.to_owned(), 1)])),
        })
    }

    fn refuses(&self, m: &OutgoingMessage) -> bool {
        let mut refuse = self.refuse.lock().unwrap();
        refuse.get_mut(&m.id).filter(|n| **n > 0).map(|n| *n -= 1).is_some()
    }
}

#[async_trait]
impl Broker for Refusing {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), BrokerError> {
        self.inner.ensure_stream(name, subjects).await
    }
    async fn publish(&self, messages: &[OutgoingMessage]) -> Vec<Result<PublishAck, BrokerError>> {
        let mut out = Vec::new();
        for m in messages {
            if self.refuses(m) {
                out.push(Err(BrokerError::Unavailable("injected".into())));
                continue;
            }
            out.extend(self.inner.publish(std::slice::from_ref(m)).await);
        }
        out
    }
    /// Pipelined like the broker it wraps (JetStream keeps the later messages in flight).
    async fn send(&self, messages: &[OutgoingMessage]) -> Vec<PendingPublish> {
        let mut out: Vec<PendingPublish> = Vec::new();
        for m in messages {
            if self.refuses(m) {
                out.push(Box::pin(std::future::ready(Err(BrokerError::Unavailable(
                    "injected".into(),
                )))));
                continue;
            }
            out.extend(self.inner.send(std::slice::from_ref(m)).await);
        }
        out
    }
    async fn subscribe(&self, stream: &str, config: ConsumerConfig) -> Result<Box<dyn Subscription>, BrokerError> {
        self.inner.subscribe(stream, config).await
    }
    async fn consumer_state(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<Option<seaport::broker::ConsumerState>, BrokerError> {
        self.inner.consumer_state(stream, durable).await
    }
}

/// The event ids still in the outbox (oldest first) and the last error recorded on `id`.
async fn outbox_and_error(f: &Fixture, id: &str) -> (Vec<String>, Option<String>) {
    seaport::on_pool!(&f.db, p => (
        sqlx::query_scalar("SELECT event_id FROM seaport_outbox ORDER BY seq").fetch_all(p).await.unwrap(),
        sqlx::query_scalar("SELECT last_error FROM seaport_outbox WHERE event_id = $1").bind(id).fetch_one(p).await.unwrap(),
    ))
}

async fn relay_publishes_in_order_and_never_deletes_unconfirmed_rows(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 30).await;
    let refused = events[7].id.clone();
    let broker = Refusing::once(&f, &refused);
    let mut relay = Relay::new(
        f.db.clone(),
        broker.clone(),
        RelayConfig {
            batch_size: 10,
            ..Default::default()
        },
    );

    let pass = relay.run_once().await.unwrap();
    assert_eq!((pass.published, pass.failed), (9, 1));
    let (unpublished, err) = outbox_and_error(&f, &refused).await;
    assert_eq!(unpublished.len(), 21);
    assert_eq!(unpublished[0], refused, "the refused row stays unpublished");
    assert!(err.unwrap().contains("injected"));

    while relay.run_once().await.unwrap().published > 0 {}
    assert_eq!(count(&f, "SELECT COUNT(*) FROM seaport_outbox").await, 0);
    // What the broker has: every event once, in commit order except the refused one (retried).
    let ids = stream_ids(&f, "order_check", 30).await;
    let mut expected: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    expected.retain(|id| *id != refused);
    let pos = ids
        .iter()
        .position(|id| *id == refused)
        .expect("the refused event was published on retry");
    let mut without = ids.clone();
    without.remove(pos);
    assert_eq!(without, expected);
    f.cleanup().await;
}

/// Reads every message of the fixture's stream (a fresh durable), in stream order.
async fn stream_ids(f: &Fixture, durable: &str, n: usize) -> Vec<String> {
    let mut sub = f
        .broker
        .subscribe(&f.stream, ConsumerConfig::new(durable, format!("{}.>", f.root)))
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.len() < n {
        let got = sub.fetch(100, Duration::from_secs(2)).await.unwrap();
        assert!(!got.is_empty(), "missing messages: got {}", ids.len());
        for d in got {
            ids.push(d.message.id.clone());
            d.ack().await.unwrap();
        }
    }
    ids
}

/// A drain keeps messages in flight across claims (PostgreSQL + JetStream) and stops at a
/// refusal: what was confirmed is deleted, the refused row and everything not sent stay, at most
/// one batch went out after the refused message, and a later drain publishes the rest in order.
async fn relay_drain_pipelines_across_batches_and_stops_at_a_refusal(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 60).await;
    let batch = 8;
    // The last row of the fourth claim: its refusal is answered while the next claim is being
    // sent, which must then stop half-way and give its unsent rows back.
    let at = 4 * batch - 1;
    let refused = events[at].id.clone();
    let broker = Refusing::once(&f, &refused);
    let mut relay = Relay::new(
        f.db.clone(),
        broker.clone(),
        RelayConfig {
            batch_size: batch,
            // No rebalance may end the first drain early on a slow machine.
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );

    let pass = relay.drain().await.unwrap();
    assert_eq!(pass.failed, 1, "{pass:?}");
    assert!(
        (at..at + batch).contains(&pass.published),
        "everything before the refused event, and at most a batch after it: {pass:?}"
    );
    let (left, err) = outbox_and_error(&f, &refused).await;
    assert_eq!(
        left.len(),
        60 - pass.published,
        "exactly the confirmed rows are deleted"
    );
    assert_eq!(left[0], refused, "the refused row stays, with everything not confirmed");
    assert!(err.unwrap().contains("injected"));
    let all: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let kept = all.iter().position(|id| *id == left[1]).unwrap();
    assert_eq!(&left[1..], &all[kept..], "what stays is the tail after the refused row");

    while relay.drain().await.unwrap().published > 0 {}
    assert_eq!(count(&f, "SELECT COUNT(*) FROM seaport_outbox").await, 0);
    let ids = stream_ids(&f, "pipeline_check", 60).await;
    let mut expected = all.clone();
    expected.retain(|id| *id != refused);
    let mut without = ids.clone();
    without.remove(ids.iter().position(|id| *id == refused).expect("published on retry"));
    assert_eq!(
        without, expected,
        "every event once, in commit order but the retried one"
    );
    f.cleanup().await;
}

async fn relay_wakes_on_commit_without_waiting_for_the_poll(kind: Kind) {
    let f = setup(kind).await;
    let relay = Relay::new(
        f.db.clone(),
        f.broker.clone(),
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            // A PostgreSQL relay takes its partitions on its first pass, then only NOTIFY wakes it.
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(relay.run(stopped));
    tokio::time::sleep(Duration::from_millis(1500)).await; // idle, partitions taken, waiting
    write_events(&f, 3).await; // committed: only the relay can empty the outbox now
    wait_for("the relay to publish without a poll", async || {
        count(&f, "SELECT COUNT(*) FROM seaport_outbox").await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
    f.cleanup().await;
}

async fn broker_dedupes_publishes_by_message_id(kind: Kind) {
    let f = setup(kind).await;
    let m = OutgoingMessage {
        id: "m1".into(),
        subject: f.subject("a"),
        headers: BTreeMap::new(),
        payload: b"x".to_vec().into(),
    };
    let first = f.broker.publish(std::slice::from_ref(&m)).await.remove(0).unwrap();
    let second = f.broker.publish(std::slice::from_ref(&m)).await.remove(0).unwrap();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.seq, second.seq);
    let other = OutgoingMessage {
        subject: "elsewhere.nobody.listens".into(),
        id: "m2".into(),
        ..m
    };
    assert!(
        f.broker.publish(&[other]).await.remove(0).is_err(),
        "a subject without stream is refused"
    );
    f.cleanup().await;
}

async fn fan_out_every_durable_gets_every_message(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 20).await;
    drain(&f).await;
    let (stop, stopped) = watch::channel(false);
    let names = ["analytics__from_sea", "audit__from_sea", "notifications__from_sea"];
    let mut tasks = Vec::new();
    for name in names {
        tasks.push(tokio::spawn(runner(&f, name, Recorder::new(name)).run(stopped.clone())));
    }
    for name in names {
        wait_for(name, async || effects(&f, name).await.len() >= 20).await;
        let got: Vec<String> = effects(&f, name).await.into_iter().map(|(id, _)| id).collect();
        let want: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        assert_eq!(got, want, "{name} got every message once, in order");
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    f.cleanup().await;
}

async fn consumer_group_workers_share_messages_without_overlap(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 40).await;
    drain(&f).await;
    let (stop, stopped) = watch::channel(false);
    let mut calls = Vec::new();
    let mut tasks = Vec::new();
    for worker in ["w1", "w2"] {
        let mut h = Recorder::new(worker);
        h.delay = Duration::from_millis(10);
        calls.push(h.calls.clone());
        tasks.push(tokio::spawn(runner(&f, "sea_service__context", h).run(stopped.clone())));
    }
    wait_for("the group to process everything", async || {
        effects(&f, "sea_service__context").await.len() >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // give a wrong duplicate time to show up
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got = effects(&f, "sea_service__context").await;
    let mut ids: Vec<&String> = got.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "none lost");
    assert_eq!(got.len(), 40, "none handled by both");
    assert_eq!(
        calls.iter().map(|c| c.load(Ordering::SeqCst)).sum::<usize>(),
        40,
        "no handler ran twice"
    );
    for w in ["w1", "w2"] {
        assert!(got.iter().any(|(_, worker)| worker == w), "{w} took a share");
    }
    let all: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert!(ids.iter().all(|id| all.contains(id)));
    f.cleanup().await;
}

async fn failed_handler_is_redelivered_and_its_effects_rolled_back(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 3).await;
    drain(&f).await;
    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(events[1].id.clone(), 2);
    let calls = h.calls.clone();
    let r = runner(&f, "retrying", h);
    let mut sub = f
        .broker
        .subscribe(&f.stream, ConsumerConfig::new("retrying", format!("{}.>", f.root)))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.iter().filter(|(o, _, _)| *o == Outcome::Processed).count() < 3 {
        let batch = sub.fetch(1, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "a nak'ed message comes back");
        for d in batch {
            let o = r.process(&d).await.unwrap();
            seen.push((o, d.delivery_count, d.message.id.clone()));
        }
    }
    let for_failing: Vec<u32> = seen
        .iter()
        .filter(|(_, _, id)| *id == events[1].id)
        .map(|(_, n, _)| *n)
        .collect();
    assert_eq!(for_failing, vec![1, 2, 3], "delivery counter counts the attempts");
    let first = &seen.iter().find(|(_, _, id)| *id == events[1].id).unwrap().0;
    assert!(
        matches!(first, Outcome::Retry { error, delay } if error.contains("injected") && *delay >= Duration::from_millis(10))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // The failed attempts wrote effects that were rolled back: one effect per event.
    assert_eq!(effects(&f, "retrying").await.len(), 3);
    f.cleanup().await;
}

async fn unacknowledged_message_is_redelivered_after_ack_wait(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 1).await;
    drain(&f).await;
    let mut cfg = ConsumerConfig::new("slow", format!("{}.>", f.root));
    cfg.ack_wait = Duration::from_secs(3);
    let mut a = f.broker.subscribe(&f.stream, cfg.clone()).await.unwrap();
    let other = f.another_broker().await;
    let mut b = other.subscribe(&f.stream, cfg).await.unwrap();
    let first = a.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!((first.len(), first[0].delivery_count), (1, 1));
    assert_eq!(first[0].message.id, events[0].id);
    // While the first worker holds it, the other worker of the group does not get it...
    assert!(b.fetch(1, Duration::from_millis(300)).await.unwrap().is_empty());
    // ...but once the ack wait expires without an ack, it does.
    let again = b.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        (again[0].message.id.as_str(), again[0].delivery_count),
        (events[0].id.as_str(), 2)
    );
    again[0].ack().await.unwrap();
    assert!(
        a.fetch(1, Duration::from_millis(3500)).await.unwrap().is_empty(),
        "acked means done"
    );
    f.cleanup().await;
}

async fn duplicate_message_runs_the_handler_once(kind: Kind) {
    let f = setup(kind).await;
    let e = event(&f, "k", 1);
    // The same event arriving twice under two message ids (e.g. re-published by another
    // producer after the broker's dedupe window): the broker cannot tell, the inbox can.
    for msg_id in ["copy-1", "copy-2"] {
        let m = OutgoingMessage {
            id: msg_id.into(),
            subject: e.ty.clone(),
            headers: BTreeMap::new(),
            payload: e.to_json().into(),
        };
        f.broker.publish(&[m]).await.remove(0).unwrap();
    }
    let h = Recorder::new("w");
    let calls = h.calls.clone();
    let r = runner(&f, "dedupe", h);
    let mut sub = f
        .broker
        .subscribe(&f.stream, ConsumerConfig::new("dedupe", format!("{}.>", f.root)))
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    while outcomes.len() < 2 {
        for d in sub.fetch(10, Duration::from_secs(2)).await.unwrap() {
            outcomes.push(r.process(&d).await.unwrap());
        }
    }
    assert_eq!(outcomes, vec![Outcome::Processed, Outcome::Duplicate]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(effects(&f, "dedupe").await.len(), 1);
    assert!(
        sub.fetch(10, Duration::from_millis(500)).await.unwrap().is_empty(),
        "the duplicate was acked"
    );
    f.cleanup().await;
}

async fn message_that_keeps_failing_ends_in_dead_letters(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 2).await;
    drain(&f).await;
    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(events[0].id.clone(), usize::MAX);
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("poison", format!("{}.>", f.root)));
    cfg.max_attempts = 3;
    cfg.base_backoff = Duration::from_millis(10);
    cfg.dead_letter_queue = Some(DeadLetterQueue::beside(&f.stream, &f.root));
    let r = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(h));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(r.run(stopped));
    wait_for("the dead letter", async || {
        count(&f, "SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;
    wait_for("the healthy message", async || effects(&f, "poison").await.len() == 1).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let (id, n, error, consumer): (String, i64, String, String) = seaport::on_pool!(&f.db, p =>
        sqlx::query_as("SELECT message_id, delivery_count, last_error, consumer FROM seaport_dead_letters").fetch_one(p).await.unwrap());
    assert_eq!(
        (id.as_str(), n, consumer.as_str()),
        (events[0].id.as_str(), 3, "poison")
    );
    assert!(error.contains("injected failure"));
    // The dead letter is also announced on the dead-letter stream, through the outbox.
    drain(&f).await;
    let dlq = DeadLetterQueue::beside(&f.stream, &f.root);
    let mut sub = f
        .broker
        .subscribe(
            &dlq.stream,
            ConsumerConfig::new("dlq_reader", format!("{}.>", dlq.subject_prefix)),
        )
        .await
        .unwrap();
    let got = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1, "one announcement per dead letter");
    assert_eq!(got[0].message.subject, dlq.subject("poison"));
    let announced = Event::from_json(&got[0].message.payload).unwrap();
    assert_eq!(announced.ty, seaport::dead_letters::DEAD_LETTER_EVENT);
    assert_eq!(announced.causationid.as_deref(), Some(events[0].id.as_str()));
    let data = announced.data.unwrap();
    assert_eq!(data["message_id"], events[0].id.as_str());
    assert_eq!(data["delivery_count"], 3);
    assert_eq!(data["payload"]["id"], events[0].id.as_str());
    assert!(data["last_error"].as_str().unwrap().contains("injected failure"));
    f.cleanup().await;
}

/// Two relays (separate database and broker handles, as two processes) and a consumer group of
/// two workers plus a fan-out consumer: every event delivered once, per-key order kept in the
/// stream and at the single-worker consumer, effects exactly once.
async fn two_relays_and_two_workers_keep_per_key_order_and_exactly_once_effects(kind: Kind) {
    let f = setup(kind).await;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let relay = Relay::new(
            f.another_db().await,
            f.another_broker().await,
            RelayConfig {
                batch_size: 16,
                ..Default::default()
            },
        );
        let r = stopped.clone();
        tasks.push(tokio::spawn(async move {
            relay.run(r).await;
            Ok(())
        }));
    }
    for worker in ["w1", "w2"] {
        let r = runner(&f, "sea_service__context", Recorder::new(worker));
        tasks.push(tokio::spawn(r.run(stopped.clone())));
    }
    tasks.push(tokio::spawn(
        runner(&f, "audit__from_sea", Recorder::new("solo")).run(stopped.clone()),
    ));
    let keys = ["case-a", "case-b", "case-c", "case-d", "case-e"];
    // Written concurrently by two writers, while the relays run.
    let (first, second) = tokio::join!(write_keyed(&f, &keys[..3], 20), write_keyed(&f, &keys[3..], 20));
    let events: Vec<Event> = first.into_iter().chain(second).collect();
    let total = events.len();
    wait_for("all effects", async || {
        effects(&f, "sea_service__context").await.len() >= total && effects(&f, "audit__from_sea").await.len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    for t in tasks {
        let _: Result<(), BrokerError> = t.await.unwrap();
    }
    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    for consumer in ["sea_service__context", "audit__from_sea"] {
        let got = effects(&f, consumer).await;
        assert_eq!(got.len(), total, "{consumer}: exactly one effect per event");
        let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), total, "{consumer}: none lost");
    }
    // Per key, the single-worker consumer saw events in the order they were written.
    let solo = effects(&f, "audit__from_sea").await;
    for key in keys {
        let ns: Vec<u64> = solo
            .iter()
            .map(|(id, _)| by_id[id.as_str()])
            .filter(|e| e.subject.as_deref() == Some(key))
            .map(|e| e.data.as_ref().unwrap()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, (0..20).collect::<Vec<u64>>(), "order of {key}");
    }
    assert_eq!(count(&f, "SELECT COUNT(*) FROM seaport_outbox").await, 0);
    f.cleanup().await;
}

async fn retention_deletes_old_inbox_records_and_never_an_outbox_row(kind: Kind) {
    let f = setup(kind).await;
    write_events(&f, 5).await;
    drain(&f).await;
    write_events(&f, 2).await; // unpublished: never deleted, however old (published ones are gone)
    assert_eq!(count(&f, "SELECT COUNT(*) FROM seaport_outbox").await, 2);
    let mut tx = f.db.begin_write().await.unwrap();
    for (consumer, id) in [("c", "old-1"), ("c", "old-2"), ("c", "new-1")] {
        assert!(seaport::inbox::record(&mut tx, consumer, id, None).await.unwrap());
    }
    tx.commit().await.unwrap();
    seaport::on_pool!(&f.db, p => {
        sqlx::query("UPDATE seaport_outbox SET created_at = created_at - 7200000").execute(p).await.unwrap();
        sqlx::query("UPDATE seaport_inbox SET processed_at = processed_at - 7200000 WHERE message_id LIKE 'old-%'").execute(p).await.unwrap();
    });
    let config = seaport::retention::RetentionConfig {
        inbox: Duration::from_secs(3600),
        batch: 1,
        interval: Duration::from_secs(60),
    };
    let first = seaport::retention::sweep_once(&f.db, &config).await.unwrap();
    assert_eq!((first.inbox, first.skipped), (1, false), "bounded batches");
    let second = seaport::retention::sweep_once(&f.db, &config).await.unwrap();
    assert_eq!(second.inbox, 1);
    let third = seaport::retention::sweep_once(&f.db, &config).await.unwrap();
    assert_eq!(third.inbox, 0);
    assert_eq!(
        count(&f, "SELECT COUNT(*) FROM seaport_outbox").await,
        2,
        "unpublished rows stay"
    );
    assert_eq!(
        count(&f, "SELECT COUNT(*) FROM seaport_inbox").await,
        1,
        "recent inbox records stay"
    );
    f.cleanup().await;
}

async fn replayed_dead_letter_reaches_its_consumer_once_and_no_one_else(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 1).await;
    drain(&f).await;
    let poison = Recorder::new("p");
    poison.failures_left.lock().unwrap().insert(events[0].id.clone(), 2);
    let failures = poison.failures_left.clone();
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("fragile", format!("{}.>", f.root)));
    cfg.max_attempts = 2;
    cfg.base_backoff = Duration::from_millis(10);
    let (stop, stopped) = watch::channel(false);
    let fragile = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(poison));
    let tasks = vec![
        tokio::spawn(fragile.run(stopped.clone())),
        tokio::spawn(runner(&f, "bystander", Recorder::new("b")).run(stopped.clone())),
    ];
    wait_for("the dead letter", async || {
        count(&f, "SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;
    wait_for("the bystander", async || effects(&f, "bystander").await.len() == 1).await;
    assert_eq!(effects(&f, "fragile").await.len(), 0);
    let dl = &seaport::dead_letters::list(&f.db).await.unwrap()[0];
    assert_eq!(
        (
            dl.consumer.as_str(),
            dl.message_id.as_str(),
            dl.delivery_count,
            dl.replays
        ),
        ("fragile", events[0].id.as_str(), 2, 0)
    );
    assert!(dl.last_error.contains("injected failure"));
    let (_, headers, payload) = seaport::dead_letters::get(&f.db, dl.id).await.unwrap().unwrap();
    assert_eq!(
        Event::from_json(&payload).unwrap().id,
        events[0].id,
        "the payload is kept"
    );
    assert!(headers.contains_key("Nats-Msg-Id"));

    // The cause is fixed; the operator replays.
    assert_eq!(failures.lock().unwrap()[&events[0].id], 0);
    seaport::dead_letters::replay(&f.db, f.broker.as_ref(), dl.id)
        .await
        .unwrap();
    wait_for("the replayed message", async || effects(&f, "fragile").await.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(effects(&f, "fragile").await.len(), 1, "processed once");
    assert_eq!(
        effects(&f, "bystander").await.len(),
        1,
        "the bystander's inbox dropped the replay"
    );
    assert_eq!(seaport::dead_letters::list(&f.db).await.unwrap()[0].replays, 1);
    assert!(matches!(
        seaport::dead_letters::replay(&f.db, f.broker.as_ref(), 999_999).await,
        Err(seaport::dead_letters::ReplayError::NotFound(_))
    ));
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    f.cleanup().await;
}

async fn backoff_delays_grow_and_redeliveries_wait_for_them(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 1).await;
    drain(&f).await;
    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(events[0].id.clone(), 4);
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("backoff", format!("{}.>", f.root)));
    cfg.base_backoff = Duration::from_millis(100);
    cfg.max_backoff = Duration::from_secs(10);
    cfg.max_attempts = 10;
    let r = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(h));
    let mut sub = r.subscribe().await.unwrap();
    let mut delays = Vec::new();
    let mut arrivals = Vec::new();
    loop {
        let batch = sub.fetch(1, Duration::from_secs(10)).await.unwrap();
        assert_eq!(batch.len(), 1, "the nak'ed message comes back");
        arrivals.push(tokio::time::Instant::now());
        match r.process(&batch[0]).await.unwrap() {
            Outcome::Retry { delay, .. } => delays.push(delay),
            Outcome::Processed => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delays.len(), 4);
    for pair in delays.windows(2) {
        assert!(pair[1] >= pair[0], "delays never shrink: {delays:?}");
    }
    // Equal jitter: attempt n waits between base·2^(n-1)/2 and base·2^(n-1).
    for (n, d) in delays.iter().enumerate() {
        let cap = Duration::from_millis(100) * (1 << n);
        assert!(*d >= cap / 2 && *d <= cap, "attempt {}: {d:?}", n + 1);
    }
    assert!(delays[3] > delays[0] * 3, "{delays:?}");
    // The broker held each redelivery back for (at least) the chosen delay.
    for (i, d) in delays.iter().enumerate() {
        let gap = arrivals[i + 1] - arrivals[i];
        assert!(
            gap + Duration::from_millis(5) >= *d,
            "redelivery {} after {gap:?}, delay {d:?}",
            i + 2
        );
    }
    assert_eq!(effects(&f, "backoff").await.len(), 1);
    f.cleanup().await;
}

async fn panicking_handler_is_a_failed_attempt(kind: Kind) {
    let f = setup(kind).await;
    let events = write_keyed(&f, &["a", "b"], 1).await;
    drain(&f).await;
    let h = Recorder::new("w");
    // The first event panics once, then succeeds; the second panics on every attempt.
    h.failures_left.lock().unwrap().insert(events[0].id.clone(), 1);
    h.failures_left.lock().unwrap().insert(events[1].id.clone(), usize::MAX);
    h.panics
        .lock()
        .unwrap()
        .extend([events[0].id.clone(), events[1].id.clone()]);
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("panicky", format!("{}.>", f.root)));
    cfg.base_backoff = Duration::from_millis(10);
    cfg.max_attempts = 3;
    let r = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(h));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(r.run(stopped));
    wait_for("the dead letter", async || {
        count(&f, "SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;
    wait_for("the recovered event", async || effects(&f, "panicky").await.len() == 1).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        effects(&f, "panicky").await[0].0,
        events[0].id,
        "the effect of the panicking attempt was rolled back"
    );
    let dl = &seaport::dead_letters::list(&f.db).await.unwrap()[0];
    assert_eq!((dl.message_id.as_str(), dl.delivery_count), (events[1].id.as_str(), 3));
    assert!(dl.last_error.contains("handler panicked: boom in"), "{}", dl.last_error);
    f.cleanup().await;
}

/// Two messages' handlers block until the test opens their gate (as many as there are workers,
/// so a worker that processed one message at a time would be stuck on each); the other messages
/// of the group must all be processed meanwhile. If a slow handler held up its worker's other
/// messages, the gate would never open and the test would time out.
async fn slow_handler_does_not_block_other_messages_of_the_group(kind: Kind) {
    let f = setup(kind).await;
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let events = write_keyed(&f, &keys, 2).await;
    drain(&f).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let slow: Vec<String> = vec![events[0].id.clone(), events[1].id.clone()];
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for worker in ["w1", "w2"] {
        let mut h = Recorder::new(worker);
        h.gate = Some((slow.clone(), gate.clone()));
        let mut cfg = RunnerConfig::new(ConsumerConfig::new("sea_service__context", format!("{}.>", f.root)));
        cfg.batch_size = 4;
        let r = ConsumerRunner::new(
            f.another_db().await,
            f.another_broker().await,
            &f.stream,
            cfg,
            Arc::new(h),
        );
        tasks.push(tokio::spawn(r.run(stopped.clone())));
    }
    let slow_keys = ["k0", "k1"];
    let others: Vec<&str> = events
        .iter()
        .filter(|e| !slow_keys.contains(&e.subject.as_deref().unwrap()))
        .map(|e| e.id.as_str())
        .collect();
    wait_for("every other key's messages while two handlers are stuck", async || {
        let done = effects(&f, "sea_service__context").await;
        others.iter().all(|id| done.iter().any(|(e, _)| e == id))
    })
    .await;
    let done = effects(&f, "sea_service__context").await;
    assert_eq!(
        done.len(),
        others.len(),
        "the slow keys are still running, and their next messages wait behind them"
    );
    gate.add_permits(100);
    wait_for("the slow keys", async || {
        effects(&f, "sea_service__context").await.len() == events.len()
    })
    .await;
    let done = effects(&f, "sea_service__context").await;
    for (i, key) in slow_keys.iter().enumerate() {
        let order: Vec<&str> = done
            .iter()
            .filter(|(e, _)| *e == events[i].id || *e == events[keys.len() + i].id)
            .map(|(e, _)| e.as_str())
            .collect();
        assert_eq!(
            order,
            vec![events[i].id.as_str(), events[keys.len() + i].id.as_str()],
            "order of {key}"
        );
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    f.cleanup().await;
}

/// The worker holding the last attempt dies (here: takes it and never settles it). The broker
/// must hand it out once more and the runner must dead-letter it without running the handler.
async fn last_attempt_that_never_settled_still_ends_in_dead_letters(kind: Kind) {
    let f = setup(kind).await;
    let events = write_events(&f, 1).await;
    drain(&f).await;
    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(events[0].id.clone(), 1);
    let calls = h.calls.clone();
    let mut consumer = ConsumerConfig::new("mortal", format!("{}.>", f.root));
    consumer.ack_wait = Duration::from_secs(2);
    let mut cfg = RunnerConfig::new(consumer);
    cfg.max_attempts = 2;
    cfg.base_backoff = Duration::from_millis(10);
    cfg.dead_letter_queue = Some(DeadLetterQueue::beside(&f.stream, &f.root));
    let r = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(h));
    let mut sub = r.subscribe().await.unwrap();
    let first = sub.fetch(1, Duration::from_secs(5)).await.unwrap();
    assert!(matches!(r.process(&first[0]).await.unwrap(), Outcome::Retry { .. }));
    let last = sub.fetch(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(last[0].delivery_count, 2);
    drop(last); // the worker died holding its last attempt
    let again = sub.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(again.len(), 1, "a delivery beyond the attempts is still handed out");
    assert_eq!(again[0].delivery_count, 3);
    let outcome = r.process(&again[0]).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::DeadLettered { error } if error.contains("never settled")),
        "{outcome:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler did not run a third time");
    let dl = &seaport::dead_letters::list(&f.db).await.unwrap()[0];
    assert_eq!((dl.message_id.as_str(), dl.delivery_count), (events[0].id.as_str(), 3));
    assert!(
        sub.fetch(1, Duration::from_secs(3)).await.unwrap().is_empty(),
        "settled once dead-lettered"
    );
    // Processing the same delivery again (a worker that died after storing, before acking) keeps
    // one dead letter.
    r.process(&again[0]).await.unwrap();
    assert_eq!(count(&f, "SELECT COUNT(*) FROM seaport_dead_letters").await, 1);
    assert_eq!(
        count(
            &f,
            "SELECT COUNT(*) FROM seaport_outbox WHERE topic LIKE '%_dlq.mortal'"
        )
        .await,
        1,
        "announced once"
    );
    assert_eq!(effects(&f, "mortal").await.len(), 0);
    f.cleanup().await;
}

/// Configuration only: no backend involved.
#[test]
fn inbox_retention_shorter_than_the_redelivery_horizon_is_refused() {
    let mut consumer = ConsumerConfig::new("c", "x.>");
    consumer.ack_wait = Duration::from_secs(60);
    let mut cfg = RunnerConfig::new(consumer);
    cfg.max_attempts = 4;
    cfg.max_backoff = Duration::from_secs(30);
    // Each of 4 attempts (+ the one that finds the last unsettled) may take the ack wait plus
    // the longest backoff.
    assert_eq!(cfg.redelivery_horizon(), Duration::from_secs(5 * 90));
    let mut retention = seaport::retention::RetentionConfig {
        inbox: Duration::from_secs(300),
        ..Default::default()
    };
    let err = retention.check_inbox_covers(cfg.redelivery_horizon()).unwrap_err();
    assert!(err.to_string().contains("shorter than the redelivery horizon"), "{err}");
    retention.inbox = Duration::from_secs(3600);
    retention.check_inbox_covers(cfg.redelivery_horizon()).unwrap();
}

/// Batched transactions (`transaction_batch > 1`): a backlog is processed in shared
/// transactions, yet every event has exactly one effect, per-key order holds, messages already in
/// the inbox are skipped, a message that fails twice is retried alone and a poison message is
/// dead-lettered without taking its batch-mates' effects with it.
async fn batched_transactions_keep_single_effects_order_and_isolate_failures(kind: Kind) {
    let f = setup(kind).await;
    let keys = ["a", "b", "c", "d", "e", "f"];
    let events = write_keyed(&f, &keys, 15).await;
    drain(&f).await;
    let of_key = |k: &str| {
        events
            .iter()
            .filter(|e| e.subject.as_deref() == Some(k))
            .collect::<Vec<_>>()
    };
    // Already processed (say, before a restart): the batch's inbox check must skip them.
    let skipped: Vec<String> = of_key("e")[..3].iter().map(|e| e.id.clone()).collect();
    let mut tx = f.db.begin_write().await.unwrap();
    for id in &skipped {
        seaport::inbox::record(&mut tx, "batched", id, None).await.unwrap();
    }
    tx.commit().await.unwrap();
    // Key "f" holds the failures: one event fails twice then succeeds, one always fails.
    let (flaky, poison) = (of_key("f")[4].id.clone(), of_key("f")[9].id.clone());
    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(flaky.clone(), 2);
    h.failures_left.lock().unwrap().insert(poison.clone(), usize::MAX);
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("batched", format!("{}.>", f.root)));
    cfg.base_backoff = Duration::from_millis(20);
    cfg.max_attempts = 3;
    cfg.batch_size = 64;
    cfg.concurrency = 2;
    cfg.transaction_batch = 16;
    let r = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(h));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(r.run(stopped));
    let expected = events.len() - skipped.len() - 1;
    wait_for("the effects and the dead letter", async || {
        effects(&f, "batched").await.len() >= expected
            && count(&f, "SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let got = effects(&f, "batched").await;
    let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(before, ids.len(), "an event had two effects");
    assert_eq!(ids.len(), expected, "one effect per processed event");
    assert!(ids.contains(&flaky.as_str()), "the flaky event succeeded on a retry");
    assert!(
        !ids.contains(&poison.as_str()),
        "the poison event's writes were rolled back"
    );
    for id in &skipped {
        assert!(!ids.contains(&id.as_str()), "an event already in the inbox ran again");
    }
    let dead: String = seaport::on_pool!(&f.db, p => sqlx::query_scalar("SELECT message_id FROM seaport_dead_letters").fetch_one(p).await.unwrap());
    assert_eq!(dead, poison);
    // Keys without failures kept their order (a retried message gives up its place, as without
    // batching).
    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    for key in ["a", "b", "c", "d", "e"] {
        let ns: Vec<u64> = got
            .iter()
            .map(|(id, _)| by_id[id.as_str()])
            .filter(|e| e.subject.as_deref() == Some(key))
            .map(|e| e.data.as_ref().unwrap()["n"].as_u64().unwrap())
            .collect();
        let first = if key == "e" { 3 } else { 0 };
        assert_eq!(ns, (first..15).collect::<Vec<u64>>(), "order of {key}");
    }
    // The backlog really was committed in shared transactions (PostgreSQL shows each row's
    // inserting transaction).
    if let seaport::store::Db::Postgres(p) = &f.db {
        let transactions: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT xmin::text) FROM effects")
            .fetch_one(p.pool())
            .await
            .unwrap();
        // How many share a transaction depends on timing (what had queued up); some must.
        assert!(
            (transactions as usize) < expected,
            "{expected} effects in {transactions} transactions: not batched"
        );
    }
    f.cleanup().await;
}

/// A handler with [`Handler::handle_batch`]: all effects of a batch in one multi-row insert.
/// A batch holding `poison` fails as a whole (and the poison event fails alone too).
struct BatchRecorder {
    poison: String,
    /// Sizes of the batches `handle_batch` was called with (successful or not).
    batches: Arc<Mutex<Vec<usize>>>,
    /// Events `handle` was called with (the per-event fallback).
    alone: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Handler for BatchRecorder {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        self.alone.lock().unwrap().push(event.id.clone());
        if event.id == self.poison {
            return Err("poison".into());
        }
        let (consumer, at) = (ctx.consumer, CLOCK.fetch_add(1, Ordering::SeqCst));
        seaport::on_conn!(ctx.tx().await?, c => sqlx::query("INSERT INTO effects (consumer, event_id, worker, at) VALUES ($1, $2, 'alone', $3)")
            .bind(consumer).bind(&event.id).bind(at).execute(c).await.map(|_| ()))?;
        Ok(())
    }

    fn handles_batches(&self) -> bool {
        true
    }

    async fn handle_batch(&self, ctx: &mut BatchContext<'_>, events: &[&Event]) -> Result<(), HandlerError> {
        self.batches.lock().unwrap().push(events.len());
        // One statement for the batch (JSON array of [event id, clock]; portable to both databases).
        let rows: Vec<(String, i64)> = events
            .iter()
            .map(|e| (e.id.clone(), CLOCK.fetch_add(1, Ordering::SeqCst)))
            .collect();
        let consumer = ctx.consumer.to_owned();
        let rows = serde_json::to_string(&rows).unwrap();
        let sql = match ctx.store() {
            seaport::store::Db::Postgres(_) => {
                "INSERT INTO effects (consumer, event_id, worker, at)
                 SELECT $1, r->>0, 'batch', (r->>1)::bigint FROM jsonb_array_elements($2::jsonb) AS r"
            }
            seaport::store::Db::Sqlite(_) => {
                "INSERT INTO effects (consumer, event_id, worker, at)
                 SELECT $1, json_extract(value, '$[0]'), 'batch', json_extract(value, '$[1]') FROM json_each($2)"
            }
        };
        seaport::on_conn!(ctx.tx().await?, c => sqlx::query(sql).bind(&consumer).bind(&rows).execute(c).await.map(|_| ()))?;
        if events.iter().any(|e| e.id == self.poison) {
            return Err("poison in the batch".into());
        }
        Ok(())
    }
}

/// [`Handler::handle_batch`]: a backlog is written a batch at a time, every event has exactly one
/// effect and one inbox record, events already in the inbox are skipped, per-key order holds, and
/// a batch that fails is rolled back and goes event by event, where the failing event is retried
/// and dead-lettered without taking its batch-mates' effects with it.
async fn batch_handler_writes_a_batch_at_once_and_falls_back_per_event_on_failure(kind: Kind) {
    let f = setup(kind).await;
    let keys = ["a", "b", "c", "d"];
    let events = write_keyed(&f, &keys, 25).await;
    drain(&f).await;
    let of_key = |k: &str| {
        events
            .iter()
            .filter(|e| e.subject.as_deref() == Some(k))
            .collect::<Vec<_>>()
    };
    let skipped: Vec<String> = of_key("c")[..5].iter().map(|e| e.id.clone()).collect();
    let mut tx = f.db.begin_write().await.unwrap();
    for id in &skipped {
        seaport::inbox::record(&mut tx, "batcher", id, None).await.unwrap();
    }
    tx.commit().await.unwrap();
    let poison = of_key("d")[12].id.clone();
    let h = BatchRecorder {
        poison: poison.clone(),
        batches: Arc::default(),
        alone: Arc::default(),
    };
    let (batches, alone) = (h.batches.clone(), h.alone.clone());
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("batcher", format!("{}.>", f.root)));
    cfg.base_backoff = Duration::from_millis(20);
    cfg.max_attempts = 2;
    cfg.batch_size = 100;
    cfg.concurrency = 2;
    cfg.transaction_batch = 32;
    let r = ConsumerRunner::new(f.db.clone(), f.broker.clone(), &f.stream, cfg, Arc::new(h));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(r.run(stopped));
    let expected = events.len() - skipped.len() - 1;
    wait_for("the effects and the dead letter", async || {
        effects(&f, "batcher").await.len() >= expected
            && count(&f, "SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let got = effects(&f, "batcher").await;
    let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(before, ids.len(), "an event had two effects");
    assert_eq!(ids.len(), expected, "one effect per processed event");
    assert!(
        !ids.contains(&poison.as_str()),
        "the failed batch's writes were rolled back"
    );
    for id in &skipped {
        assert!(!ids.contains(&id.as_str()), "an event already in the inbox ran again");
    }
    assert!(
        got.iter().any(|(_, worker)| worker == "batch"),
        "no effect was written by handle_batch"
    );
    assert!(
        batches.lock().unwrap().iter().any(|n| *n > 1),
        "handle_batch never got more than one event: {:?}",
        batches.lock().unwrap()
    );
    assert!(
        alone.lock().unwrap().contains(&poison),
        "the failed batch went event by event"
    );
    let dead: String = seaport::on_pool!(&f.db, p => sqlx::query_scalar("SELECT message_id FROM seaport_dead_letters").fetch_one(p).await.unwrap());
    assert_eq!(dead, poison);
    // Every processed event is in the inbox (written for the batch in one statement).
    let recorded = count(&f, "SELECT COUNT(*) FROM seaport_inbox WHERE consumer = 'batcher'").await;
    assert_eq!(recorded as usize, expected + skipped.len());
    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    for key in ["a", "b", "c"] {
        let ns: Vec<u64> = got
            .iter()
            .map(|(id, _)| by_id[id.as_str()])
            .filter(|e| e.subject.as_deref() == Some(key))
            .map(|e| e.data.as_ref().unwrap()["n"].as_u64().unwrap())
            .collect();
        let first = if key == "c" { 5 } else { 0 };
        assert_eq!(ns, (first..25).collect::<Vec<u64>>(), "order of {key}");
    }
    f.cleanup().await;
}

/// `JetStreamBroker::confirm_acks(false)`: acks no longer wait for the server's confirmation,
/// and still every message ends settled on the server, with one effect each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_acks_settle_every_message_once() {
    let f = setup(Kind::PgJetStream).await;
    let broker = Arc::new(
        seaport::broker::jetstream::JetStreamBroker::connect(&seaport::testing::nats_url())
            .await
            .unwrap()
            .confirm_acks(false),
    );
    let events: Vec<Event> = (0..40).map(|n| event(&f, &format!("k{n}"), n)).collect();
    let messages: Vec<OutgoingMessage> = events
        .iter()
        .map(|e| OutgoingMessage {
            id: e.id.clone(),
            subject: e.ty.clone(),
            headers: BTreeMap::new(),
            payload: e.to_json().into(),
        })
        .collect();
    for published in broker.publish(&messages).await {
        published.unwrap();
    }
    let mut cfg = RunnerConfig::new(ConsumerConfig::new("unconfirmed", format!("{}.>", f.root)));
    cfg.batch_size = 8;
    let runner = ConsumerRunner::new(
        f.db.clone(),
        broker.clone(),
        &f.stream,
        cfg,
        Arc::new(Recorder::new("w")),
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runner.run(stopped));
    wait_for("every message settled on the server", async || {
        broker
            .consumer_state(&f.stream, "unconfirmed")
            .await
            .unwrap()
            .is_some_and(|s| s.pending == 0 && s.ack_pending == 0)
    })
    .await;
    let mut done: Vec<String> = effects(&f, "unconfirmed").await.into_iter().map(|(id, _)| id).collect();
    done.sort();
    let mut want: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    want.sort();
    assert_eq!(done, want, "one effect per message");
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    f.cleanup().await;
}

/// The fixture's broker, stopping the relay at message `at` until told to go on.
struct Gated {
    inner: Arc<dyn Broker>,
    at: String,
    reached: tokio::sync::Notify,
    go: tokio::sync::Semaphore,
}

#[async_trait]
impl Broker for Gated {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), BrokerError> {
        self.inner.ensure_stream(name, subjects).await
    }
    async fn publish(&self, messages: &[OutgoingMessage]) -> Vec<Result<PublishAck, BrokerError>> {
        let mut out = Vec::new();
        for pending in self.send(messages).await {
            out.push(pending.await);
        }
        out
    }
    async fn send(&self, messages: &[OutgoingMessage]) -> Vec<PendingPublish> {
        let mut out: Vec<PendingPublish> = Vec::new();
        for m in messages {
            if m.id == self.at {
                self.reached.notify_one();
                let _go = self.go.acquire().await.unwrap();
            }
            out.extend(self.inner.send(std::slice::from_ref(m)).await);
        }
        out
    }
    async fn subscribe(&self, stream: &str, config: ConsumerConfig) -> Result<Box<dyn Subscription>, BrokerError> {
        self.inner.subscribe(stream, config).await
    }
    async fn consumer_state(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<Option<seaport::broker::ConsumerState>, BrokerError> {
        self.inner.consumer_state(stream, durable).await
    }
}

/// The relay's claim horizon (PostgreSQL) never passes a row that can still commit. A writer
/// takes the lowest seq and commits only after a drain has claimed far beyond it, then its key
/// gets a second event: the first must still go out first, within the same drain. A drain that
/// simply started each claim above the previous one would publish the second first (checked
/// by mutation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_commits_behind_the_relay_still_goes_out_before_its_key_goes_on() {
    let f = setup(Kind::PgJetStream).await;
    let outbox = Outbox::new();
    let first = event(&f, "late", 0);
    let mut late = f.db.begin_write().await.unwrap();
    outbox.insert(&mut late, &first).await.unwrap();
    let others = write_keyed(&f, &["a", "b", "c", "d"], 50).await;
    // A dozen claims are made and the relay waits at the gate, past the late row's seq.
    late_commit_during_a_drain(&f, late, &first, &others[120].id, 10, others.len() + 2).await;
    f.cleanup().await;
}

/// Drain with the relay stopped at message `gate_at`, and meanwhile commit `late` (which wrote
/// `first`) and give `first`'s key its next event. Checks that the drain itself published the
/// late row, before that next event, and each of the `total` events once.
async fn late_commit_during_a_drain(
    f: &Fixture,
    late: seaport::store::Tx,
    first: &Event,
    gate_at: &str,
    batch_size: usize,
    total: usize,
) {
    let broker = Arc::new(Gated {
        inner: f.broker.clone(),
        at: gate_at.to_owned(),
        reached: tokio::sync::Notify::new(),
        go: tokio::sync::Semaphore::new(0),
    });
    let mut relay = Relay::new(
        f.db.clone(),
        broker.clone(),
        RelayConfig {
            batch_size,
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let drain = tokio::spawn(async move {
        let pass = relay.drain().await.unwrap();
        (relay, pass)
    });
    broker.reached.notified().await;
    late.commit().await.unwrap();
    let second = event(f, first.subject.as_deref().unwrap(), 1);
    let mut tx = f.db.begin_write().await.unwrap();
    Outbox::new().insert(&mut tx, &second).await.unwrap();
    tx.commit().await.unwrap();
    broker.go.add_permits(1);
    let (mut relay, pass) = drain.await.unwrap();
    assert_eq!(pass.failed, 0);
    assert_eq!(
        count(f, "SELECT COUNT(*) FROM seaport_outbox").await,
        0,
        "the drain published the late row too (published {})",
        pass.published
    );
    while relay.drain().await.unwrap().published > 0 {}
    let ids = stream_ids(f, "horizon_check", total).await;
    let at = |id: &str| ids.iter().position(|i| i == id).expect("published");
    assert!(
        at(&first.id) < at(&second.id),
        "the late row went out after its key's next event"
    );
    let mut once = ids.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), total, "every event once");
}

/// The horizon also waits for a writer that PostgreSQL's snapshot counts as not yet started
/// (its transaction id at or above the snapshot's `xmax`, so not listed as running) although it
/// already holds a seq. Writer B takes its id after A, inserts the lowest seq, and is still open
/// when A commits and the relay's first claims look; then B commits and its key gets a second
/// event. A horizon that trusted the snapshot's running list alone would pass B's row (checked
/// by mutation; other activity on the server can only make this test cover less).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_postgresql_counts_as_not_yet_started_still_holds_the_horizon() {
    let f = setup(Kind::PgJetStream).await;
    let outbox = Outbox::new();
    let take_xid = async |tx: &mut seaport::store::Tx| {
        seaport::on_conn!(tx, c => sqlx::query("SELECT pg_current_xact_id()").execute(c).await.map(|_| ())).unwrap();
    };
    let mut a = f.db.begin_write().await.unwrap();
    take_xid(&mut a).await;
    let mut b = f.db.begin_write().await.unwrap();
    take_xid(&mut b).await;
    let first = event(&f, "late", 0);
    outbox.insert(&mut b, &first).await.unwrap();
    // A writes the rows the drain starts with. Written by any transaction that took its id after
    // B, they would lift the snapshots' `xmax` over B, which would then be listed as running.
    let gate_at = event(&f, "a", 0);
    outbox.insert(&mut a, &gate_at).await.unwrap();
    let others: Vec<Event> = (1..6).map(|n| event(&f, "o", n)).collect();
    for e in &others {
        outbox.insert(&mut a, e).await.unwrap();
    }
    a.commit().await.unwrap();
    // One row per claim, so that the drain makes more claims while it waits at the gate.
    late_commit_during_a_drain(&f, b, &first, &gate_at.id, 1, others.len() + 3).await;
    f.cleanup().await;
}

/// A relay whose lock connection dies while its claims are still in flight (the server ended
/// it, a network fault) no longer owns its partitions, but it does not know it yet. A relay
/// taking them over must still not publish the key's later events before those claims: it waits
/// for them to end, and the old owner takes no more. Without the fence (taken by every claim's
/// `BEGIN`) the second relay publishes the key's next events while the first is still holding
/// its first one (checked by mutation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_taking_over_from_a_lost_owner_waits_for_its_claims_in_flight() {
    let f = setup(Kind::PgJetStream).await;
    let before = write_keyed(&f, &["k"], 3).await;
    let broker = Arc::new(Gated {
        inner: f.broker.clone(),
        at: before[0].id.clone(),
        reached: tokio::sync::Notify::new(),
        go: tokio::sync::Semaphore::new(0),
    });
    // One row per claim: the first is held at the gate while the next is claimed.
    let mut old = Relay::new(
        f.db.clone(),
        broker.clone(),
        RelayConfig {
            batch_size: 1,
            rebalance_interval: Duration::from_millis(500),
            ..Default::default()
        },
    );
    let old_drain = tokio::spawn(async move { old.drain().await.unwrap() });
    broker.reached.notified().await;

    // Its lock connection dies; its advisory locks go with it.
    seaport::on_pool!(&f.db, p => sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'seaport-relay' AND datname = current_database()",
    )
    .execute(p)
    .await
    .map(|_| ())
    .unwrap());
    wait_for("the lock connection to end", async || {
        count(
            &f,
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'seaport-relay' AND datname = current_database()",
        )
        .await
            == 0
    })
    .await;
    let after = write_keyed(&f, &["k"], 2).await;

    let mut new = Relay::new(
        f.another_db().await,
        f.broker.clone(),
        RelayConfig {
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let new_drain = tokio::spawn(async move {
        let pass = new.drain().await.unwrap();
        (new, pass)
    });
    // Time for the new relay to publish, were nothing stopping it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.go.add_permits(1);
    let old_pass = old_drain.await.unwrap();
    let (mut new, _) = new_drain.await.unwrap();
    assert!(
        old_pass.published >= 1,
        "the old owner's claims in flight were published"
    );
    assert_eq!(
        new.owned_partitions().len() as i64,
        outbox::PARTITIONS,
        "the new relay took every partition"
    );
    while new.drain().await.unwrap().published > 0 {}
    assert_eq!(count(&f, "SELECT COUNT(*) FROM seaport_outbox").await, 0);

    let want: Vec<String> = before.iter().chain(&after).map(|e| e.id.clone()).collect();
    let ids = stream_ids(&f, "takeover_check", want.len()).await;
    assert_eq!(ids, want, "the key's events went out in order, each once");
    f.cleanup().await;
}
