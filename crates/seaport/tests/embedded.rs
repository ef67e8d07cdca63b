//! The delivery guarantees on the embedded default (SQLite + embedded broker).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use seaport::Event;
use seaport::broker::embedded::EmbeddedBroker;
use seaport::broker::{Broker, BrokerError, ConsumerConfig, OutgoingMessage, PublishAck, Subscription};
use seaport::consumer::{ConsumerRunner, Handler, HandlerContext, HandlerError, Outcome, RunnerConfig};
use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::outbox::{self, Outbox};
use seaport::store::sqlite::SqliteStore;
use tokio::sync::watch;

struct Db {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

async fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    sqlx::query("CREATE TABLE widgets (id TEXT PRIMARY KEY)")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("CREATE TABLE effects (consumer TEXT NOT NULL, event_id TEXT NOT NULL, worker TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    Db { store, _dir: dir }
}

fn event(n: usize) -> Event {
    Event::new("sea.widgets.made", "/test", serde_json::json!({ "n": n })).with_subject(format!("w{n}"))
}

async fn broker(store: &SqliteStore) -> Arc<EmbeddedBroker> {
    let b = EmbeddedBroker::new(store);
    b.ensure_stream("SEA", &["sea.>"]).await.unwrap();
    Arc::new(b)
}

async fn write_events(store: &SqliteStore, n: usize) -> Vec<Event> {
    let outbox = Outbox::new();
    let mut events = Vec::new();
    for i in 0..n {
        let e = event(i);
        let mut tx = store.begin_write().await.unwrap();
        sqlx::query("INSERT INTO widgets (id) VALUES ($1)")
            .bind(&e.id)
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox.insert(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        events.push(e);
    }
    events
}

/// Records each call as an effect row in the handler's transaction; fails while `fail_first`
/// says so for an event.
struct Recorder {
    worker: String,
    calls: Arc<AtomicUsize>,
    failures_left: Arc<Mutex<HashMap<String, usize>>>,
    delay: Duration,
}

impl Recorder {
    fn new(worker: &str) -> Self {
        Recorder {
            worker: worker.to_owned(),
            calls: Arc::default(),
            failures_left: Arc::default(),
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
        seaport::on_conn!(&mut *ctx.tx, c => sqlx::query("INSERT INTO effects (consumer, event_id, worker) VALUES ($1, $2, $3)")
            .bind(ctx.consumer)
            .bind(&event.id)
            .bind(&self.worker)
            .execute(c)
            .await
            .map(|_| ()))?;
        let mut f = self.failures_left.lock().unwrap();
        if let Some(n) = f.get_mut(&event.id).filter(|n| **n > 0) {
            *n -= 1;
            return Err(format!("injected failure for {}", event.id).into());
        }
        Ok(())
    }
}

async fn effects(store: &SqliteStore, consumer: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT event_id, worker FROM effects WHERE consumer = $1 ORDER BY rowid")
        .bind(consumer)
        .fetch_all(store.pool())
        .await
        .unwrap()
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runner(store: &SqliteStore, broker: Arc<EmbeddedBroker>, durable: &str, handler: Recorder) -> ConsumerRunner {
    let mut cfg = RunnerConfig::new(ConsumerConfig::new(durable, "sea.>"));
    cfg.base_backoff = Duration::from_millis(20);
    cfg.batch_size = 1;
    ConsumerRunner::new(store.clone(), broker, "SEA", cfg, Arc::new(handler))
}

#[tokio::test]
async fn outbox_row_and_domain_row_commit_or_roll_back_together() {
    let db = db().await;
    let outbox = Outbox::new();
    let e = event(1);
    let mut tx = db.store.begin_write().await.unwrap();
    sqlx::query("INSERT INTO widgets (id) VALUES ($1)")
        .bind(&e.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox.insert(&mut tx, &e).await.unwrap();
    tx.rollback().await.unwrap();
    let count = |table: &'static str| {
        let pool = db.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!((count("widgets").await, count("seaport_outbox").await), (0, 0));

    // A failure after the outbox insert (here: a duplicate domain key) takes the event with it.
    let mut tx = db.store.begin_write().await.unwrap();
    outbox.insert(&mut tx, &e).await.unwrap();
    sqlx::query("INSERT INTO widgets (id) VALUES ('x')")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(
        sqlx::query("INSERT INTO widgets (id) VALUES ('x')")
            .execute(&mut *tx)
            .await
            .is_err()
    );
    drop(tx); // dropped without commit = rolled back
    assert_eq!((count("widgets").await, count("seaport_outbox").await), (0, 0));

    let mut tx = db.store.begin_write().await.unwrap();
    sqlx::query("INSERT INTO widgets (id) VALUES ($1)")
        .bind(&e.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox.insert(&mut tx, &e).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((count("widgets").await, count("seaport_outbox").await), (1, 1));
    let s = outbox::status(&db.store.clone().into()).await.unwrap();
    assert_eq!((s.unpublished, s.published), (1, 0));
    assert!(s.oldest_unpublished_age_ms.is_some());
}

#[tokio::test]
async fn outbox_refuses_invalid_events() {
    let db = db().await;
    let mut tx = db.store.begin_write().await.unwrap();
    let mut bad = event(1);
    bad.source.clear();
    assert!(Outbox::new().insert(&mut tx, &bad).await.is_err());
    let e = Event::new("not a subject", "/t", serde_json::json!({}));
    assert!(Outbox::new().insert(&mut tx, &e).await.is_err());
}

/// Wraps the real embedded broker and refuses chosen messages (as a broker that lost its
/// connection half-way would), so we can see what the relay marks.
struct Refusing {
    inner: Arc<EmbeddedBroker>,
    refuse: Mutex<HashMap<String, usize>>,
}

#[async_trait]
impl Broker for Refusing {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), BrokerError> {
        self.inner.ensure_stream(name, subjects).await
    }
    async fn publish(&self, messages: &[OutgoingMessage]) -> Vec<Result<PublishAck, BrokerError>> {
        let mut out = Vec::new();
        for m in messages {
            let refused = {
                let mut refuse = self.refuse.lock().unwrap();
                refuse.get_mut(&m.id).filter(|n| **n > 0).map(|n| *n -= 1).is_some()
            };
            if refused {
                out.push(Err(BrokerError::Unavailable("injected".into())));
                continue;
            }
            out.extend(self.inner.publish(std::slice::from_ref(m)).await);
        }
        out
    }
    async fn subscribe(&self, stream: &str, config: ConsumerConfig) -> Result<Box<dyn Subscription>, BrokerError> {
        self.inner.subscribe(stream, config).await
    }
}

#[tokio::test]
async fn relay_publishes_in_commit_order_and_never_marks_unconfirmed_rows() {
    let db = db().await;
    let inner = broker(&db.store).await;
    let events = write_events(&db.store, 30).await;
    let refused = events[7].id.clone();
    let broker = Arc::new(Refusing {
        inner: inner.clone(),
        refuse: Mutex::new(HashMap::from([(refused.clone(), 1)])),
    });
    let mut relay = Relay::new(
        db.store.clone(),
        broker.clone(),
        RelayConfig {
            batch_size: 10,
            ..Default::default()
        },
    );

    let pass = relay.run_once().await.unwrap();
    assert_eq!((pass.published, pass.failed), (9, 1));
    let unpublished: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM seaport_outbox WHERE published_at IS NULL ORDER BY seq")
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    assert_eq!(unpublished.len(), 21);
    assert_eq!(unpublished[0], refused, "the refused row stays unpublished");
    let err: Option<String> = sqlx::query_scalar("SELECT last_error FROM seaport_outbox WHERE event_id = $1")
        .bind(&refused)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert!(err.unwrap().contains("injected"));
    // Every row marked published is really in the broker's log.
    let in_log: Vec<String> = sqlx::query_scalar("SELECT msg_id FROM seaport_broker_messages ORDER BY seq")
        .fetch_all(db.store.pool())
        .await
        .unwrap();
    let marked: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM seaport_outbox WHERE published_at IS NOT NULL ORDER BY seq")
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    assert_eq!(in_log, marked);

    while relay.run_once().await.unwrap().published > 0 {}
    let mut sub = inner
        .subscribe("SEA", ConsumerConfig::new("order_check", "sea.>"))
        .await
        .unwrap();
    let got = sub.fetch(100, Duration::from_millis(100)).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|d| d.message.id.as_str()).collect();
    let mut expected: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    // Commit order, except the refused row which went out on the retry.
    expected.retain(|id| *id != refused);
    let pos = ids.iter().position(|id| *id == refused).unwrap();
    let mut without = ids.clone();
    without.remove(pos);
    assert_eq!(without, expected);
    assert_eq!(ids.len(), 30);
}

#[tokio::test]
async fn relay_wakes_on_commit_without_waiting_for_the_poll() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let mut relay = Relay::new(
        db.store.clone(),
        broker.clone(),
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(relay.run(stopped));
    tokio::time::sleep(Duration::from_millis(100)).await; // the relay is now idle, waiting
    let events = write_events(&db.store, 3).await;
    let pool = db.store.pool().clone();
    wait_for("the relay to publish without a poll", async || {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox WHERE published_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
        n == events.len() as i64
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn broker_dedupes_publishes_by_message_id() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let m = OutgoingMessage {
        id: "m1".into(),
        subject: "sea.a".into(),
        headers: BTreeMap::new(),
        payload: b"x".to_vec(),
    };
    let first = broker.publish(&[m.clone()]).await.remove(0).unwrap();
    let second = broker.publish(&[m.clone()]).await.remove(0).unwrap();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.seq, second.seq);
    let other = OutgoingMessage {
        subject: "elsewhere.a".into(),
        id: "m2".into(),
        ..m
    };
    assert!(matches!(
        broker.publish(&[other]).await.remove(0),
        Err(BrokerError::NoStream(_))
    ));
}

#[tokio::test]
async fn fan_out_every_durable_gets_every_message() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let events = write_events(&db.store, 20).await;
    let mut relay = Relay::new(db.store.clone(), broker.clone(), RelayConfig::default());
    while relay.run_once().await.unwrap().published > 0 {}

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for name in ["analytics__from_sea", "audit__from_sea", "notifications__from_sea"] {
        tasks.push(tokio::spawn(
            runner(&db.store, broker.clone(), name, Recorder::new(name)).run(stopped.clone()),
        ));
    }
    for name in ["analytics__from_sea", "audit__from_sea", "notifications__from_sea"] {
        let store = db.store.clone();
        wait_for(name, async || effects(&store, name).await.len() >= 20).await;
        let got: Vec<String> = effects(&db.store, name).await.into_iter().map(|(id, _)| id).collect();
        let want: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        assert_eq!(got, want, "{name} got every message once, in order");
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn consumer_group_workers_share_messages_without_overlap() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let events = write_events(&db.store, 40).await;
    let mut relay = Relay::new(db.store.clone(), broker.clone(), RelayConfig::default());
    while relay.run_once().await.unwrap().published > 0 {}

    let (stop, stopped) = watch::channel(false);
    let mut calls = Vec::new();
    let mut tasks = Vec::new();
    for worker in ["w1", "w2"] {
        let mut h = Recorder::new(worker);
        h.delay = Duration::from_millis(10);
        calls.push(h.calls.clone());
        tasks.push(tokio::spawn(
            runner(&db.store, broker.clone(), "sea_service__context", h).run(stopped.clone()),
        ));
    }
    let store = db.store.clone();
    wait_for("the group to process everything", async || {
        effects(&store, "sea_service__context").await.len() >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // give a wrong duplicate time to show up
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got = effects(&db.store, "sea_service__context").await;
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
}

#[tokio::test]
async fn failed_handler_is_redelivered_and_its_effects_rolled_back() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let events = write_events(&db.store, 3).await;
    Relay::new(db.store.clone(), broker.clone(), RelayConfig::default())
        .run_once()
        .await
        .unwrap();

    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(events[1].id.clone(), 2);
    let calls = h.calls.clone();
    let r = runner(&db.store, broker.clone(), "retrying", h);
    let mut sub = broker
        .subscribe("SEA", ConsumerConfig::new("retrying", "sea.>"))
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
    assert!(
        matches!(&seen.iter().find(|(_, _, id)| *id == events[1].id).unwrap().0, Outcome::Retry { error, .. } if error.contains("injected"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // The failed attempts wrote effects that were rolled back: one effect per event.
    assert_eq!(effects(&db.store, "retrying").await.len(), 3);
}

#[tokio::test]
async fn unacknowledged_message_is_redelivered_after_ack_wait() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let events = write_events(&db.store, 1).await;
    Relay::new(db.store.clone(), broker.clone(), RelayConfig::default())
        .run_once()
        .await
        .unwrap();
    let mut cfg = ConsumerConfig::new("slow", "sea.>");
    cfg.ack_wait = Duration::from_millis(300);
    let mut a = broker.subscribe("SEA", cfg.clone()).await.unwrap();
    let mut b = broker.subscribe("SEA", cfg).await.unwrap();
    let first = a.fetch(1, Duration::from_secs(1)).await.unwrap();
    assert_eq!((first.len(), first[0].delivery_count), (1, 1));
    assert_eq!(first[0].message.id, events[0].id);
    // While the first worker holds it, the other worker of the group does not get it...
    assert!(b.fetch(1, Duration::from_millis(100)).await.unwrap().is_empty());
    // ...but once the ack wait expires without an ack, it does.
    let again = b.fetch(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (again[0].message.id.as_str(), again[0].delivery_count),
        (events[0].id.as_str(), 2)
    );
    again[0].ack().await.unwrap();
    assert!(
        a.fetch(1, Duration::from_millis(500)).await.unwrap().is_empty(),
        "acked means done"
    );
}

#[tokio::test]
async fn duplicate_message_runs_the_handler_once() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let e = event(1);
    // The same event arriving twice under two message ids (e.g. re-published by another
    // producer after its broker dedupe window): the broker cannot tell, the inbox can.
    for msg_id in ["copy-1", "copy-2"] {
        let m = OutgoingMessage {
            id: msg_id.into(),
            subject: e.ty.clone(),
            headers: BTreeMap::new(),
            payload: e.to_json(),
        };
        broker.publish(&[m]).await.remove(0).unwrap();
    }
    let h = Recorder::new("w");
    let calls = h.calls.clone();
    let r = runner(&db.store, broker.clone(), "dedupe", h);
    let mut sub = broker
        .subscribe("SEA", ConsumerConfig::new("dedupe", "sea.>"))
        .await
        .unwrap();
    let batch = sub.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(batch.len(), 2);
    let outcomes: Vec<Outcome> = {
        let mut v = Vec::new();
        for d in &batch {
            v.push(r.process(d).await.unwrap());
        }
        v
    };
    assert_eq!(outcomes, vec![Outcome::Processed, Outcome::Duplicate]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(effects(&db.store, "dedupe").await.len(), 1);
    assert!(
        sub.fetch(10, Duration::from_millis(100)).await.unwrap().is_empty(),
        "the duplicate was acked"
    );
}

#[tokio::test]
async fn message_that_keeps_failing_ends_in_dead_letters() {
    let db = db().await;
    let broker = broker(&db.store).await;
    let events = write_events(&db.store, 2).await;
    Relay::new(db.store.clone(), broker.clone(), RelayConfig::default())
        .run_once()
        .await
        .unwrap();
    let h = Recorder::new("w");
    h.failures_left.lock().unwrap().insert(events[0].id.clone(), usize::MAX);
    let mut cfg = RunnerConfig::new(ConsumerConfig {
        max_deliver: 3,
        ..ConsumerConfig::new("poison", "sea.>")
    });
    cfg.base_backoff = Duration::from_millis(10);
    let r = ConsumerRunner::new(db.store.clone(), broker.clone(), "SEA", cfg, Arc::new(h));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(r.run(stopped));
    let pool = db.store.pool().clone();
    wait_for("the dead letter", async || {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM seaport_dead_letters")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    let store = db.store.clone();
    wait_for("the healthy message", async || {
        effects(&store, "poison").await.len() == 1
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let (id, count, error, consumer): (String, i64, String, String) =
        sqlx::query_as("SELECT message_id, delivery_count, last_error, consumer FROM seaport_dead_letters")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (id.as_str(), count, consumer.as_str()),
        (events[0].id.as_str(), 3, "poison")
    );
    assert!(error.contains("injected failure"));
    let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_broker_pending")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(pending, 0, "the dead-lettered message was settled");
}
