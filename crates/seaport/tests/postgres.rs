//! What only the PostgreSQL backend has to prove: a late commit is never skipped, and relay
//! partitions are shared between relays and taken over when one dies.

use std::time::Duration;

use seaport::Event;
use seaport::broker::ConsumerConfig;
use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::outbox::{Outbox, PARTITIONS};
use seaport::store::Db;
use seaport::testing::{Fixture, Kind};

/// The ids of the events in the broker's stream, in the order they were published (a new
/// consumer reads the stream from the start).
async fn published(f: &Fixture) -> Vec<String> {
    let name = format!("check_{}", uuid::Uuid::now_v7().simple());
    let mut sub = f
        .broker
        .subscribe(&f.stream, ConsumerConfig::new(&name, format!("{}.>", f.root)))
        .await
        .unwrap();
    let mut ids = Vec::new();
    loop {
        let got = sub.fetch(100, Duration::from_millis(300)).await.unwrap();
        if got.is_empty() {
            return ids;
        }
        for d in got {
            ids.push(d.message.id.clone());
            d.ack().await.unwrap();
        }
    }
}

/// Sequence 1 is assigned in a transaction that commits *after* the one holding sequence 2.
/// A relay that tracked "the last published seq" would move past 1 and lose it.
#[tokio::test]
async fn a_row_committed_out_of_sequence_order_is_not_skipped() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let outbox = Outbox::new();
    let slow_event = Event::new(f.subject("x.slow"), "/t", serde_json::json!({})).with_subject("k");
    let fast_event = Event::new(f.subject("x.fast"), "/t", serde_json::json!({})).with_subject("k");

    let mut slow = pg.begin_write().await.unwrap();
    let slow_seq = outbox.insert(&mut slow, &slow_event).await.unwrap();
    let mut fast = pg.begin_write().await.unwrap();
    let fast_seq = outbox.insert(&mut fast, &fast_event).await.unwrap();
    assert!(slow_seq < fast_seq);
    fast.commit().await.unwrap();

    let mut relay = Relay::new(f.db.clone(), f.broker.clone(), RelayConfig::default());
    relay.run_once().await.unwrap();
    assert_eq!(
        published(&f).await,
        vec![fast_event.id.clone()],
        "only the committed row is visible"
    );

    slow.commit().await.unwrap(); // the lower sequence commits last
    relay.run_once().await.unwrap();
    assert_eq!(
        published(&f).await,
        vec![fast_event.id.clone(), slow_event.id.clone()],
        "the late row is published, not skipped"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn relays_share_partitions_and_take_over_from_a_dead_one() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let config = RelayConfig {
        rebalance_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut a = Relay::new(f.another_db().await, f.broker.clone(), config.clone());
    let mut b = Relay::new(f.another_db().await, f.broker.clone(), config.clone());
    let all: Vec<i64> = (0..PARTITIONS).collect();

    a.run_once().await.unwrap();
    assert_eq!(a.owned_partitions(), all, "a lone relay owns every partition");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(120)).await;
        a.run_once().await.unwrap();
        b.run_once().await.unwrap();
        let (pa, pb) = (a.owned_partitions(), b.owned_partitions());
        assert!(
            pa.iter().all(|p| !pb.contains(p)),
            "a partition is never owned twice: {pa:?} {pb:?}"
        );
        if pa.len() == 8 && pb.len() == 8 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relays did not split the partitions: {pa:?} {pb:?}"
        );
    }

    drop(a); // the process dies: its lock connection goes away, and its locks with it
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(120)).await;
        b.run_once().await.unwrap();
        if b.owned_partitions() == all {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the survivor did not take over: {:?}",
            b.owned_partitions()
        );
    }
    f.cleanup().await;
}

/// A relay taking partitions over waits for the claims in flight (they may be a previous owner's)
/// only so long (5 s, the lock connection's `lock_timeout`): then it gives the partitions back,
/// and takes them at a later rebalance, once those claims have ended.
#[tokio::test]
async fn a_takeover_that_waits_too_long_gives_the_partition_back() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    // A claim in flight (of a previous owner), holding the fence as claims do.
    let mut in_flight = pg.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
        .bind(seaport::outbox::relay::LOCK_NAMESPACE)
        .bind(seaport::outbox::relay::FENCE_KEY)
        .execute(&mut *in_flight)
        .await
        .unwrap();
    let mut relay = Relay::new(
        f.another_db().await,
        f.broker.clone(),
        RelayConfig {
            rebalance_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    relay.run_once().await.unwrap();
    assert_eq!(
        relay.owned_partitions(),
        Vec::<i64>::new(),
        "no partition while the claim went on"
    );
    let locked: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid AND objid = 0 AND objsubid = 2
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(seaport::outbox::relay::LOCK_NAMESPACE as i64)
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(locked, 0, "the advisory locks were given back");
    in_flight.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    relay.run_once().await.unwrap();
    assert_eq!(relay.owned_partitions(), (0..PARTITIONS).collect::<Vec<_>>());
    f.cleanup().await;
}

/// While a relay waits at the fence to take partitions over, claims do not queue behind it: they
/// come back empty, and the drain ends. (A drain's claims in flight commit only as the drain goes
/// on, so a claim waiting behind the takeover, which waits for them, would stall both until the
/// takeover gave up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_do_not_queue_behind_a_takeover() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    // The relay owns every partition before the takeover starts waiting.
    let mut relay = Relay::new(
        f.another_db().await,
        f.broker.clone(),
        RelayConfig {
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    relay.run_once().await.unwrap();
    assert_eq!(relay.owned_partitions().len() as i64, PARTITIONS);
    let outbox = Outbox::new();
    let mut tx = pg.begin_write().await.unwrap();
    for key in ["a", "b"] {
        let e = Event::new(f.subject("x.made"), "/t", serde_json::json!({})).with_subject(key);
        outbox.insert(&mut tx, &e).await.unwrap();
    }
    tx.commit().await.unwrap();
    // A claim in flight holds the fence; a takeover waits for it.
    let (ns, fence) = (
        seaport::outbox::relay::LOCK_NAMESPACE,
        seaport::outbox::relay::FENCE_KEY,
    );
    let mut in_flight = pg.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
        .bind(ns)
        .bind(fence)
        .execute(&mut *in_flight)
        .await
        .unwrap();
    let taker = pg.pool().clone();
    let takeover = tokio::spawn(async move {
        let mut tx = taker.begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(ns)
            .bind(fence)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    let waiting = async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid AND objid = $2 AND NOT granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(ns as i64)
        .bind(fence as i64)
        .fetch_one(pg.pool())
        .await
        .unwrap()
            == 1
    };
    while !waiting().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pass = tokio::time::timeout(Duration::from_secs(20), relay.drain())
        .await
        .expect("the drain queued behind the takeover")
        .unwrap();
    assert_eq!(pass.published, 0, "nothing is claimed while a takeover waits");
    in_flight.rollback().await.unwrap();
    takeover.await.unwrap();
    assert_eq!(
        relay.drain().await.unwrap().published,
        2,
        "and everything once it passed"
    );
    f.cleanup().await;
}

/// Only one instance sweeps at a time: while another holds the sweeper lock, a round is skipped.
#[tokio::test]
async fn one_retention_sweeper_at_a_time() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let mut holder = pg.begin_write().await.unwrap();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 1000)")
        .bind(seaport::outbox::relay::LOCK_NAMESPACE)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(got);
    let other = f.another_db().await;
    let swept = seaport::retention::sweep_once(&other, &Default::default())
        .await
        .unwrap();
    assert!(swept.skipped);
    holder.rollback().await.unwrap();
    let swept = seaport::retention::sweep_once(&other, &Default::default())
        .await
        .unwrap();
    assert!(!swept.skipped);
    other.close().await;
    f.cleanup().await;
}

/// Third-party clients read what the relay put on JetStream: nats-py pulls from the stream and
/// the CloudEvents Python SDK parses each message, correlation and causation ids included.
/// The Python side is `tests/interop/read_cloudevents.py`; `scripts/test` prepares its virtual
/// environment and sets `SEAPORT_INTEROP_PYTHON`.
#[tokio::test]
async fn cloudevents_sdk_and_nats_py_read_the_relayed_events() {
    let python = std::env::var("SEAPORT_INTEROP_PYTHON").unwrap_or_else(|_| {
        panic!("SEAPORT_INTEROP_PYTHON is not set: run the suite with `bash scripts/test` (it installs nats-py and cloudevents)")
    });
    let f = Fixture::new(Kind::PgJetStream).await;
    let parent = Event::new(
        f.subject("cases.created"),
        "/sea/cases",
        serde_json::json!({"id": "c-1", "title": "é ✓"}),
    )
    .with_subject("c-1")
    .correlated("corr-interop", Some("req-1".into()));
    let child = Event::new(
        f.subject("notifications.queued"),
        "/sea/notifications",
        serde_json::json!({"n": 1}),
    )
    .with_subject("c-1")
    .caused_by(&parent);
    let mut tx = f.db.begin_write().await.unwrap();
    for e in [&parent, &child] {
        Outbox::new().insert(&mut tx, e).await.unwrap();
    }
    tx.commit().await.unwrap();
    Relay::new(f.db.clone(), f.broker.clone(), RelayConfig::default())
        .run_once()
        .await
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/read_cloudevents.py");
    let out = tokio::process::Command::new(&python)
        .args([
            script,
            &seaport::testing::nats_url(),
            &f.stream,
            &format!("{}.>", f.root),
            "2",
        ])
        .output()
        .await
        .expect("run the interop script");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python reader failed: {stderr}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["id"], parent.id.as_str());
    assert_eq!(events[0]["msg_id"], parent.id.as_str());
    assert_eq!(events[0]["specversion"], "1.0");
    assert_eq!(events[0]["correlationid"], "corr-interop");
    assert_eq!(events[0]["causationid"], "req-1");
    assert_eq!(events[0]["data"]["title"], "é ✓");
    assert_eq!(events[1]["correlationid"], "corr-interop");
    assert_eq!(events[1]["causationid"], parent.id.as_str());
    f.cleanup().await;
}

/// A notification can be lost (listener reconnecting, NOTIFY dropped): the poll fallback still
/// publishes the row. Simulated by disabling the NOTIFY trigger on this test's database.
#[tokio::test]
async fn poll_fallback_publishes_when_notifications_are_lost() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    sqlx::query("ALTER TABLE seaport_outbox DISABLE TRIGGER seaport_outbox_notify")
        .execute(pg.pool())
        .await
        .unwrap();
    let relay = Relay::new(
        f.db.clone(),
        f.broker.clone(),
        RelayConfig {
            poll_interval: Duration::from_millis(200),
            ..Default::default()
        },
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(relay.run(stopped));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = Event::new(f.subject("x.quiet"), "/t", serde_json::json!({})).with_subject("k");
    let mut tx = pg.begin_write().await.unwrap();
    Outbox::new().insert(&mut tx, &e).await.unwrap();
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while published(&f).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll fallback did not publish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    f.cleanup().await;
}

/// One or more statements (simple protocol) on `conn`.
async fn run(conn: &mut sqlx::PgConnection, sql: impl Into<String>) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.into()))
        .execute(conn)
        .await
        .unwrap();
}

/// The plan of a prepared statement is cached per connection, and PostgreSQL switches to a
/// generic plan after five executions. Planned while a table is empty, the obvious SQL becomes a
/// scan of the whole table (a hash join for the inbox check, a sort of every unpublished row for
/// the relay's claim): each call costs more as the table grows. The first version of the inbox
/// check took 4.5 ms per batch in the benchmark that way. These are the hot statements' own
/// texts, prepared on empty tables, then explained once the tables hold rows.
#[tokio::test]
async fn hot_statements_keep_index_plans_when_first_planned_on_empty_tables() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let mut conn = pg.pool().acquire().await.unwrap();
    let plan = |rows: Vec<String>| rows.join("\n");

    // The consumer's inbox check for a batch, with the generic plan forced.
    run(
        &mut conn,
        format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE among(text, text[]) AS {}",
            seaport::inbox::PROCESSED_AMONG_SQL
        ),
    )
    .await;
    // Executed (so planned and cached) on the empty table; no ANALYZE after the inserts: it
    // would invalidate the cached plan, which autovacuum does only every so often.
    run(&mut conn, "EXECUTE among('c', '{m1}')").await;
    run(
        &mut conn,
        "INSERT INTO seaport_inbox (consumer, message_id, processed_at)
         SELECT 'c', 'm' || g, g FROM generate_series(1, 20000) g",
    )
    .await;
    let among: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE among('c', '{m1,m2,x}')")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let among = plan(among);
    assert!(
        among.contains("Index") && !among.contains("Seq Scan") && !among.contains("Hash"),
        "the inbox check must be one index lookup per id:\n{among}"
    );
    run(&mut conn, "RESET plan_cache_mode").await;

    // The relay's claim, in a transaction begun as the relay begins it, run on an empty outbox
    // more than five times (what a relay does while idle), then with a backlog.
    run(
        &mut conn,
        format!(
            "PREPARE claim(bigint[], bigint, bigint, text) AS {}",
            seaport::outbox::relay::CLAIM_SQL
        ),
    )
    .await;
    // From the middle of the backlog, as a drain's claims start above its horizon.
    let explain_claim = || sqlx::query_scalar::<_, String>("EXPLAIN EXECUTE claim('{0,1,2,3}', 256, 10000, 'relay')");
    for _ in 0..8 {
        run(&mut conn, seaport::outbox::relay::CLAIM_BEGIN).await;
        run(
            &mut conn,
            "EXECUTE claim('{0,1,2,3}', 256, -9223372036854775808, 'relay'); ROLLBACK",
        )
        .await;
    }
    run(
        &mut conn,
        "INSERT INTO seaport_outbox (event_id, topic, partition, envelope, created_at)
         SELECT 'e' || g, 't', g % 16, '\\x00', g FROM generate_series(1, 20000) g",
    )
    .await;
    run(&mut conn, seaport::outbox::relay::CLAIM_BEGIN).await;
    let claim = plan(explain_claim().fetch_all(&mut *conn).await.unwrap());
    run(&mut conn, "ROLLBACK").await;
    assert!(
        claim.contains("seaport_outbox_pkey")
            && claim.contains("Index Cond: (seq > $3)")
            && !claim.contains("Sort")
            && !claim.contains("Seq Scan"),
        "the claim must walk the primary key in seq order from its horizon and stop at the limit:\n{claim}"
    );
    run(&mut conn, "DEALLOCATE ALL").await;
    drop(conn);
    f.cleanup().await;
}

/// Wraps the broker and holds back every confirmation until the gate opens: a broker that
/// stores messages but answers slowly.
struct Gated {
    inner: std::sync::Arc<dyn seaport::broker::Broker>,
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl seaport::broker::Broker for Gated {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), seaport::broker::BrokerError> {
        self.inner.ensure_stream(name, subjects).await
    }
    async fn publish(
        &self,
        messages: &[seaport::broker::OutgoingMessage],
    ) -> Vec<Result<seaport::broker::PublishAck, seaport::broker::BrokerError>> {
        let mut results = Vec::new();
        for p in self.send(messages).await {
            results.push(p.await);
        }
        results
    }
    async fn send(&self, messages: &[seaport::broker::OutgoingMessage]) -> Vec<seaport::broker::PendingPublish> {
        let pending = self.inner.send(messages).await;
        pending
            .into_iter()
            .map(|p| {
                let mut open = self.open.clone();
                Box::pin(async move {
                    let _ = open.wait_for(|o| *o).await;
                    p.await
                }) as seaport::broker::PendingPublish
            })
            .collect()
    }
    async fn subscribe(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<Box<dyn seaport::broker::Subscription>, seaport::broker::BrokerError> {
        self.inner.subscribe(stream, config).await
    }
    async fn consumer_state(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<Option<seaport::broker::ConsumerState>, seaport::broker::BrokerError> {
        self.inner.consumer_state(stream, durable).await
    }
}

/// While the broker is slow to confirm and events trickle in, a drain keeps claiming small
/// batches; each claim holds a pooled connection until its messages are answered. The drain
/// must hold only a few claims open (two in flight, one waiting to be sent, one being made),
/// not one per batch until the pool runs dry. Everything is published once the broker answers.
#[tokio::test]
async fn a_slow_broker_does_not_make_a_drain_hold_claims_open_without_bound() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let (gate, open) = tokio::sync::watch::channel(false);
    let mut relay = Relay::new(
        f.another_db().await,
        std::sync::Arc::new(Gated {
            inner: f.broker.clone(),
            open,
        }),
        RelayConfig {
            batch_size: 64,
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    relay.drain().await.unwrap(); // takes the partitions
    // Four writers, faster together than the drain's claims, so claims keep finding a few rows.
    let mut writers = Vec::new();
    for w in 0..4 {
        let db = f.another_db().await;
        let subject = f.subject("x.trickle");
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..100 {
                let e = Event::new(subject.clone(), "/t", serde_json::json!({ "w": w, "n": i }))
                    .with_subject(format!("k{w}"));
                let mut tx = db.begin_write().await.unwrap();
                Outbox::new().insert(&mut tx, &e).await.unwrap();
                tx.commit().await.unwrap();
                ids.push(e.id);
            }
            ids
        }));
    }
    let draining = tokio::spawn(async move {
        let pass = relay.drain().await;
        (relay, pass)
    });
    let mut most = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        let open_claims: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'idle in transaction'
               AND query LIKE '%FOR UPDATE SKIP LOCKED%'",
        )
        .fetch_one(pg.pool())
        .await
        .unwrap();
        most = most.max(open_claims);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    assert!(most <= 4, "the drain held {most} claims open at once");
    gate.send(true).unwrap();
    let (mut relay, pass) = draining.await.unwrap();
    pass.unwrap();
    while relay.drain().await.unwrap().published > 0 {}
    let mut got = published(&f).await;
    got.sort();
    got.dedup();
    let mut want = written;
    want.sort();
    assert_eq!(got, want, "every event published once the broker answers");
    f.cleanup().await;
}

/// Commits `n` events, `keys` ordering keys round robin; returns their seqs, lowest first.
async fn write_spread(f: &Fixture, n: usize, keys: usize) -> Vec<i64> {
    let mut tx = f.db.begin_write().await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..n {
        let e =
            Event::new(f.subject("x.kept"), "/t", serde_json::json!({ "n": i })).with_subject(format!("k{}", i % keys));
        seqs.push(Outbox::new().insert(&mut tx, &e).await.unwrap());
    }
    tx.commit().await.unwrap();
    seqs
}

async fn outbox_rows(f: &Fixture) -> i64 {
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox")
        .fetch_one(pg.pool())
        .await
        .unwrap()
}

/// After a clean drain the next one starts at its horizon instead of walking the deleted rows
/// again, for at most the poll interval. A row that reappears below the horizon without the
/// relay seeing it (here put back with its old seq, as a claim's asynchronously committed delete
/// lost in a database crash would) goes out once that has passed. Fails if the horizon is not
/// kept (the row goes out at once), or kept longer (it never does).
#[tokio::test]
async fn a_clean_drain_keeps_its_horizon_for_at_most_the_poll_interval() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let poll = Duration::from_secs(2);
    let mut relay = Relay::new(
        f.another_db().await,
        f.broker.clone(),
        RelayConfig {
            poll_interval: poll,
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let seqs = write_spread(&f, 5, 5).await;
    sqlx::query("CREATE TABLE lost_delete AS SELECT * FROM seaport_outbox WHERE seq = $1")
        .bind(seqs[0])
        .execute(pg.pool())
        .await
        .unwrap();
    assert_eq!(relay.drain().await.unwrap().published, 5);
    // Transactions of other tests on the server hold a horizon back until a claim sees them
    // ended (transaction ids are the server's, not the database's): drain one more event at a
    // time until it has moved past the rows, freshly kept.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let expires = loop {
        match relay.kept_horizon() {
            Some((horizon, age)) if horizon >= seqs[4] && age < poll / 2 => {
                break std::time::Instant::now() + (poll - age);
            }
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no clean drain kept a horizon past {seqs:?}: {:?}",
            relay.kept_horizon()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        write_spread(&f, 1, 1).await;
        assert_eq!(relay.drain().await.unwrap().failed, 0);
    };

    sqlx::query("INSERT INTO seaport_outbox SELECT * FROM lost_delete")
        .execute(pg.pool())
        .await
        .unwrap();
    assert_eq!(relay.drain().await.unwrap().published, 0);
    assert!(
        std::time::Instant::now() < expires,
        "the machine was too slow for this test's timing"
    );
    assert_eq!(outbox_rows(&f).await, 1, "the next drain started at the kept horizon");

    tokio::time::sleep(expires.saturating_duration_since(std::time::Instant::now()) + Duration::from_millis(50)).await;
    assert_eq!(relay.drain().await.unwrap().published, 1);
    assert_eq!(
        outbox_rows(&f).await,
        0,
        "the row below the horizon went out after the poll interval"
    );
    f.cleanup().await;
}

/// Refuses the message with one event id; everything else goes through.
struct Refusing {
    inner: std::sync::Arc<dyn seaport::broker::Broker>,
    id: std::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl seaport::broker::Broker for Refusing {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), seaport::broker::BrokerError> {
        self.inner.ensure_stream(name, subjects).await
    }
    async fn publish(
        &self,
        messages: &[seaport::broker::OutgoingMessage],
    ) -> Vec<Result<seaport::broker::PublishAck, seaport::broker::BrokerError>> {
        let mut results = Vec::new();
        for p in self.send(messages).await {
            results.push(p.await);
        }
        results
    }
    async fn send(&self, messages: &[seaport::broker::OutgoingMessage]) -> Vec<seaport::broker::PendingPublish> {
        let refused = self.id.lock().unwrap().clone();
        let mut out = Vec::new();
        for m in messages {
            if refused.as_deref() == Some(m.id.as_str()) {
                out.push(Box::pin(async {
                    Err(seaport::broker::BrokerError::Unavailable("refused by the test".into()))
                }) as seaport::broker::PendingPublish);
            } else {
                out.extend(self.inner.send(std::slice::from_ref(m)).await);
            }
        }
        out
    }
    async fn subscribe(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<Box<dyn seaport::broker::Subscription>, seaport::broker::BrokerError> {
        self.inner.subscribe(stream, config).await
    }
    async fn consumer_state(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<Option<seaport::broker::ConsumerState>, seaport::broker::BrokerError> {
        self.inner.consumer_state(stream, durable).await
    }
}

/// A drain whose claim rolled back (a refused message) keeps no horizon: the refused row, below
/// the horizon its claim proved, goes out on the very next drain, not after the poll interval
/// (an hour here). Fails if the horizon were kept after a refusal.
#[tokio::test]
async fn a_drain_that_gave_rows_back_keeps_no_horizon() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let broker = std::sync::Arc::new(Refusing {
        inner: f.broker.clone(),
        id: std::sync::Mutex::new(None),
    });
    let mut relay = Relay::new(
        f.another_db().await,
        broker.clone(),
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            rebalance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let seqs = write_spread(&f, 4, 4).await;
    let refused: String = sqlx::query_scalar("SELECT event_id FROM seaport_outbox WHERE seq = $1")
        .bind(seqs[0])
        .fetch_one(pg.pool())
        .await
        .unwrap();
    *broker.id.lock().unwrap() = Some(refused);
    let pass = relay.drain().await.unwrap();
    assert_eq!(pass.failed, 1);
    assert_eq!(relay.kept_horizon(), None, "no horizon is kept after rows came back");
    *broker.id.lock().unwrap() = None;
    while relay.drain().await.unwrap().published > 0 {}
    assert_eq!(outbox_rows(&f).await, 0, "the refused row went out on the next drain");
    f.cleanup().await;
}

/// A relay that takes partitions over starts its next drain from the beginning: the dead relay's
/// unpublished rows may lie below the horizon the survivor kept for its own partitions. The poll
/// interval is an hour, so only the change of partitions can make them go out.
#[tokio::test]
async fn a_relay_that_takes_partitions_over_drops_its_kept_horizon() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let config = RelayConfig {
        poll_interval: Duration::from_secs(3600),
        rebalance_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut a = Relay::new(f.another_db().await, f.broker.clone(), config.clone());
    let mut b = Relay::new(f.another_db().await, f.broker.clone(), config.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(120)).await;
        a.drain().await.unwrap();
        b.drain().await.unwrap();
        if a.owned_partitions().len() == 8 && b.owned_partitions().len() == 8 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relays did not split the partitions"
        );
    }
    // Other tests' transactions on the server can hold a's horizon back (see above): write and
    // drain until a clean drain of a keeps one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let horizon = loop {
        write_spread(&f, 64, 64).await;
        a.drain().await.unwrap();
        if let Some((horizon, _)) = a.kept_horizon() {
            break horizon;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clean drain of a kept a horizon"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(a.owned_partitions().len(), 8, "the partitions did not move meanwhile");
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let below: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox WHERE seq < $1")
        .bind(horizon)
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert!(below > 0, "some of b's rows lie below a's horizon (the test's premise)");

    drop(b); // dies without publishing its rows
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while outbox_rows(&f).await > 0 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        a.drain().await.unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the survivor did not publish the dead relay's rows (owns {:?})",
            a.owned_partitions()
        );
    }
    f.cleanup().await;
}
