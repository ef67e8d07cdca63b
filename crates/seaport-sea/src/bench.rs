//! `seaport bench`: system figures of the scale-out deployment, each beside the raw limit
//! measured in the same run.
//!
//! 1. Relay throughput: a pre-filled outbox of N events relayed to JetStream, against a bare
//!    async-nats loop publishing the same messages with the same pipelining (the raw limit: the
//!    mean of a run before and a run after the relay's, since the machine's speed drifts).
//! 2. Commit-to-publish latency at a steady rate from concurrent writers: from the moment the
//!    writer's `COMMIT` returned to the moment the stored message reaches a plain NATS
//!    subscriber on its subject (JetStream forwards a message to core subscribers once stored).
//!    The same on the embedded deployment (SQLite + embedded broker), up to the moment the
//!    embedded broker confirmed the message stored (its `publish` returned).
//! 3. Consumer throughput (inbox dedupe + one effect row per message, batched transactions)
//!    against a bare async-nats pull consumer acking each message.
//!
//! It runs against a fresh database `seaport_bench_*` and private streams, removed afterwards
//! (and a SQLite file in a scratch directory for the embedded run).
//!
//! On a terminal the pre-fill and each throughput phase show a progress bar (see
//! [`crate::progress`]), moved once per pipelining window or relay pass, never per message, and
//! drawn at most 20 times a second; both sides of each comparison pay the same. Elsewhere the
//! phases' result lines on stderr are the progress.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use seaport::Event;
use seaport::broker::jetstream::JetStreamBroker;
use seaport::broker::{Broker, ConsumerConfig, MSG_ID_HEADER};
use seaport::consumer::{BatchContext, ConsumerRunner, Handler, HandlerContext, HandlerError, RunnerConfig};
use seaport::outbox::Outbox;
use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::store::{Db, PgStore};
use tokio::sync::watch;

use crate::{cpu, progress};
use cpu::CpuPhase;

pub struct BenchConfig {
    pub database_admin_url: String,
    pub nats_url: String,
    pub events: usize,
    pub rate: u64,
    pub seconds: u64,
    pub writers: usize,
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    pub events: usize,
    /// The raw limit: the mean of `raw_publish_runs_per_sec`, bare publish runs before and
    /// after the relay's.
    pub raw_publish_per_sec: f64,
    pub raw_publish_runs_per_sec: [f64; 2],
    pub relay_per_sec: f64,
    pub relay_vs_raw: f64,
    /// The most the relay could reach on these cores if its process and nats-server cost what
    /// they cost in the bare loop, plus PostgreSQL's claim work as measured in the relay phase:
    /// raw-phase CPU / (raw-phase CPU + PostgreSQL's relay-phase CPU). Assumes both phases keep
    /// the cores busy (see `machine_busy` in `cpu`); with the database on its own host it does
    /// not apply.
    pub relay_cpu_bound_vs_raw: f64,
    /// The bare loop once more, beside the relay's work without the broker: a relay whose broker
    /// confirms at the relay's measured rate without sending claims a second pre-filled outbox
    /// meanwhile. What the cores leave the bare loop while the database and the relay's own
    /// code do their share; the relay matching it means its gap is the cores' sharing.
    pub raw_publish_beside_claims_per_sec: f64,
    pub relay_vs_raw_beside_claims: f64,
    /// Two relays at once, each owning half of the partitions.
    pub two_relays_per_sec: f64,
    pub two_relays_vs_raw: f64,
    pub raw_consume_per_sec: f64,
    pub consumer_per_sec: f64,
    pub consumer_vs_raw: f64,
    /// The per-event handler with unconfirmed acks (`JetStreamBroker::confirm_acks(false)`).
    pub consumer_unconfirmed_per_sec: f64,
    pub consumer_unconfirmed_vs_raw: f64,
    /// The same with a handler that writes a batch's effects in one statement.
    pub consumer_batch_per_sec: f64,
    pub consumer_batch_vs_raw: f64,
    pub latency_rate_per_sec: u64,
    pub latency_samples: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub embedded_latency_samples: usize,
    pub embedded_latency_p50_ms: f64,
    pub embedded_latency_p99_ms: f64,
    pub embedded_latency_max_ms: f64,
    /// Where the time went: CPU seconds per process group in each throughput phase.
    pub cpu: Vec<CpuPhase>,
}

/// Latency percentiles, in milliseconds.
struct Percentiles {
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

type Stamps = Arc<Mutex<HashMap<String, Instant>>>;

/// From commit to arrival, for every event that arrived; fails if some never did.
fn percentiles(committed: &Stamps, arrived: &Stamps, total: usize) -> anyhow::Result<Percentiles> {
    let (committed, arrived) = (
        committed.lock().expect("not poisoned"),
        arrived.lock().expect("not poisoned"),
    );
    anyhow::ensure!(
        arrived.len() >= total,
        "only {} of {total} events arrived",
        arrived.len()
    );
    let mut lat: Vec<f64> = committed
        .iter()
        .filter_map(|(id, c)| {
            arrived
                .get(id)
                .map(|r| r.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(!lat.is_empty(), "no latency samples");
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok(Percentiles {
        samples: lat.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        max: *lat.last().expect("non-empty"),
    })
}

/// `writers` tasks writing one event per transaction to the outbox, together `rate` per second
/// for `seconds`; each commit time is stamped in `committed`. Returns the number written.
async fn steady_writers(db: &Db, topic: &str, config: &BenchConfig, committed: &Stamps) -> anyhow::Result<usize> {
    let per_writer = Duration::from_secs_f64(config.writers as f64 / config.rate as f64);
    let total = (config.rate * config.seconds) as usize;
    let mut writers = Vec::new();
    for w in 0..config.writers {
        let (db, committed, topic) = (db.clone(), committed.clone(), topic.to_owned());
        let count = total / config.writers + usize::from(w < total % config.writers);
        writers.push(tokio::spawn(async move {
            let outbox = Outbox::new();
            let mut tick = tokio::time::interval(per_writer);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..count {
                tick.tick().await;
                let e = Event::new("sea.bench.latency", "/bench", serde_json::json!({"w": w, "i": i}))
                    .with_subject(format!("w{w}"));
                let mut tx = db.begin_write().await?;
                outbox.insert_to(&mut tx, &topic, &e).await?;
                tx.commit().await?;
                committed.lock().expect("not poisoned").insert(e.id, Instant::now());
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    Ok(total)
}

/// A broker that stamps the moment each message was confirmed stored.
struct StampConfirmed {
    inner: Arc<dyn Broker>,
    confirmed: Stamps,
}

#[async_trait::async_trait]
impl Broker for StampConfirmed {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), seaport::broker::BrokerError> {
        self.inner.ensure_stream(name, subjects).await
    }

    async fn publish(
        &self,
        messages: &[seaport::broker::OutgoingMessage],
    ) -> Vec<Result<seaport::broker::PublishAck, seaport::broker::BrokerError>> {
        let results = self.inner.publish(messages).await;
        let now = Instant::now();
        let mut confirmed = self.confirmed.lock().expect("not poisoned");
        for (m, r) in messages.iter().zip(&results) {
            if r.is_ok() {
                confirmed.entry(m.id.clone()).or_insert(now);
            }
        }
        results
    }

    /// The relay's path: each confirmation is stamped when it arrives.
    async fn send(&self, messages: &[seaport::broker::OutgoingMessage]) -> Vec<seaport::broker::PendingPublish> {
        let pending = self.inner.send(messages).await;
        messages
            .iter()
            .zip(pending)
            .map(|(m, p)| {
                let (id, confirmed) = (m.id.clone(), self.confirmed.clone());
                Box::pin(async move {
                    let result = p.await;
                    if result.is_ok() {
                        let now = Instant::now();
                        confirmed.lock().expect("not poisoned").entry(id).or_insert(now);
                    }
                    result
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

/// Commit-to-publish latency on the embedded deployment: SQLite + the embedded broker, relay
/// woken by the commit hook, in a scratch directory.
async fn embedded_latency(config: &BenchConfig) -> anyhow::Result<Percentiles> {
    let dir = std::env::temp_dir().join(format!("seaport-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let outcome = async {
        let db = Db::open(&dir.join("bench.db").display().to_string()).await?;
        let Db::Sqlite(sqlite) = &db else {
            anyhow::bail!("a file path opens SQLite")
        };
        let embedded: Arc<dyn Broker> = Arc::new(seaport::broker::embedded::EmbeddedBroker::new(sqlite));
        embedded.ensure_stream("LAT", &["lat.>"]).await?;
        let confirmed: Stamps = Arc::default();
        let broker = Arc::new(StampConfirmed {
            inner: embedded,
            confirmed: confirmed.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let relay_task = tokio::spawn(Relay::new(db.clone(), broker, RelayConfig::default()).run(stopped));
        let committed: Stamps = Arc::default();
        let total = steady_writers(&db, "lat.bench.latency", config, &committed).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while confirmed.lock().expect("not poisoned").len() < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        let _ = relay_task.await;
        db.close().await;
        percentiles(&committed, &confirmed, total)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// Two relays drain a pre-filled outbox of `like.len()` fresh events at once, once each owns
/// half of the partitions; returns events per second.
async fn two_relays(
    db: &Db,
    broker: &Arc<JetStreamBroker>,
    outbox: &Outbox,
    topic: &str,
    like: &[Event],
) -> anyhow::Result<f64> {
    // The default rebalance interval (1 s): a drain ends when a rebalance is due, so a shorter
    // one would restart the pipeline more often than a deployment does.
    let config = RelayConfig {
        batch_size: WINDOW,
        ..Default::default()
    };
    let mut relays = [
        Relay::new(db.clone(), broker.clone(), config.clone()),
        Relay::new(db.clone(), broker.clone(), config),
    ];
    // Partitions settle (the outbox has nothing unpublished yet): 8 each, after a few rebalances.
    let settle_by = Instant::now() + Duration::from_secs(30);
    while relays.iter().any(|r| r.owned_partitions().len() != 8) {
        anyhow::ensure!(
            Instant::now() < settle_by,
            "the two relays did not share the partitions"
        );
        for r in &mut relays {
            r.run_once().await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    prefill(db, outbox, topic, &with_fresh_ids(like)).await?;
    let total = like.len();
    let started = Instant::now();
    let [mut a, mut b] = relays;
    // Each drains until both together published everything. (A drain ends when a rebalance is
    // due; with both relays alive each keeps its 8 partitions.)
    let done = std::sync::atomic::AtomicUsize::new(0);
    let drain = async |r: &mut Relay| -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        while done.load(Ordering::Relaxed) < total {
            let pass = r.drain().await?;
            anyhow::ensure!(pass.failed == 0, "the broker refused events during the benchmark");
            done.fetch_add(pass.published, Ordering::Relaxed);
            if pass.published == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(())
    };
    let (ra, rb) = tokio::join!(drain(&mut a), drain(&mut b));
    ra?;
    rb?;
    let published = done.into_inner();
    let rate = total as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(published >= total, "two relays published {published} of {total}");
    Ok(rate)
}

/// The trivial transactional effect of the consumer benchmark: a row per event in `table`.
struct Effect {
    table: &'static str,
    /// Whether it writes a batch's rows in one statement (`handle_batch`).
    batch_handler: bool,
}

#[async_trait::async_trait]
impl Handler for Effect {
    async fn handle(&self, ctx: &mut HandlerContext<'_>, event: &Event) -> Result<(), HandlerError> {
        let sql = match self.table {
            "bench_effects_batch" => "INSERT INTO bench_effects_batch (event_id) VALUES ($1)",
            "bench_effects_unconfirmed" => "INSERT INTO bench_effects_unconfirmed (event_id) VALUES ($1)",
            _ => "INSERT INTO bench_effects (event_id) VALUES ($1)",
        };
        seaport::on_conn!(ctx.tx().await?, c => sqlx::query(sql)
            .bind(&event.id)
            .execute(c)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    fn handles_batches(&self) -> bool {
        self.batch_handler
    }

    async fn handle_batch(&self, ctx: &mut BatchContext<'_>, events: &[&Event]) -> Result<(), HandlerError> {
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let sql = match self.table {
            "bench_effects_batch" => "INSERT INTO bench_effects_batch (event_id) SELECT * FROM UNNEST($1::text[])",
            "bench_effects_unconfirmed" => {
                "INSERT INTO bench_effects_unconfirmed (event_id) SELECT * FROM UNNEST($1::text[])"
            }
            _ => "INSERT INTO bench_effects (event_id) SELECT * FROM UNNEST($1::text[])",
        };
        match ctx.tx().await? {
            seaport::store::Tx::Postgres(tx) => {
                sqlx::query(sql).bind(ids).execute(&mut **tx).await?;
            }
            seaport::store::Tx::Sqlite(_) => return Err("the benchmark's batch effect is PostgreSQL SQL".into()),
        }
        Ok(())
    }
}

/// One consumer-runner phase: a fresh durable consumer drains the relay's stream (`total`
/// messages) into an effects table; returns messages per second.
#[allow(clippy::too_many_arguments)]
async fn consumer_phase(
    db: &Db,
    store: &PgStore,
    broker: &Arc<JetStreamBroker>,
    relay_stream: &str,
    relay_root: &str,
    total: usize,
    batch_handler: bool,
    confirm_acks: bool,
    cpu: &mut Vec<CpuPhase>,
) -> anyhow::Result<f64> {
    let (durable, table, phase, create, count): (_, _, _, &'static str, &'static str) =
        match (batch_handler, confirm_acks) {
            (true, _) => (
                "bench_consumer_batch",
                "bench_effects_batch",
                "consumer (batch)",
                "CREATE TABLE bench_effects_batch (event_id TEXT PRIMARY KEY)",
                "SELECT COUNT(*) FROM bench_effects_batch",
            ),
            (false, true) => (
                "bench_consumer",
                "bench_effects",
                "consumer runner",
                "CREATE TABLE bench_effects (event_id TEXT PRIMARY KEY)",
                "SELECT COUNT(*) FROM bench_effects",
            ),
            (false, false) => (
                "bench_consumer_unconfirmed",
                "bench_effects_unconfirmed",
                "consumer (unconfirmed acks)",
                "CREATE TABLE bench_effects_unconfirmed (event_id TEXT PRIMARY KEY)",
                "SELECT COUNT(*) FROM bench_effects_unconfirmed",
            ),
        };
    let broker = &Arc::new(JetStreamBroker::clone(broker).confirm_acks(confirm_acks));
    sqlx::query(create).execute(store.pool()).await?;
    let mut runner_config = RunnerConfig::new(ConsumerConfig::new(durable, format!("{relay_root}.>")));
    runner_config.batch_size = WINDOW;
    runner_config.concurrency = 8;
    runner_config.transaction_batch = 128;
    let runner = ConsumerRunner::new(
        db.clone(),
        broker.clone(),
        relay_stream,
        runner_config,
        Arc::new(Effect { table, batch_handler }),
    );
    let (stop_consumer, consumer_stopped) = watch::channel(false);
    let bar = progress::bar(total as u64, "consumer runner draining the stream");
    let started = Instant::now();
    let cpu_before = cpu::Snapshot::take();
    let consumer_task = tokio::spawn(runner.run(consumer_stopped));
    // Done when JetStream has every message acked (a cheap server call; counting the effects
    // table every few ms would cost the database more than the consumer does).
    loop {
        let state = broker.consumer_state(relay_stream, durable).await?;
        if state.as_ref().is_some_and(|s| s.pending == 0 && s.ack_pending == 0) {
            break;
        }
        if let (Some(bar), Some(s)) = (&bar, &state) {
            bar.set_position((total as u64).saturating_sub(s.pending + s.ack_pending));
        }
        anyhow::ensure!(!consumer_task.is_finished(), "the consumer stopped early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    cpu.push(cpu_before.phase(phase, started.elapsed()));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let _ = stop_consumer.send(true);
    let _ = consumer_task.await;
    let done: i64 = sqlx::query_scalar(count).fetch_one(store.pool()).await?;
    anyhow::ensure!(done as usize == total, "{done} effects for {total} events");
    Ok(rate)
}

/// A scratch PostgreSQL database for one benchmark run, on the server of `admin_url`; `drop` it
/// when done (FORCE ends connections a failed run may have left open).
pub struct ScratchDatabase {
    admin: sqlx::PgConnection,
    pub name: String,
    /// URL of the scratch database (same server and credentials as `admin_url`).
    pub url: String,
}

impl ScratchDatabase {
    /// Create `{prefix}_{tag}`; `prefix` is a fixed identifier, `tag` lowercase hex.
    pub async fn create(admin_url: &str, prefix: &'static str, tag: &str) -> anyhow::Result<Self> {
        use sqlx::ConnectOptions as _;
        let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(admin_url)
            .context("invalid admin database URL")?
            .disable_statement_logging(); // DROP DATABASE is slow, and expected to be
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .with_context(|| format!("cannot reach PostgreSQL at {admin_url} (start it: bash scripts/services)"))?;
        let name = format!("{prefix}_{tag}");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create the scratch database {name}"))?;
        let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin_url);
        let url = format!("{base}/{name}");
        Ok(ScratchDatabase { admin, name, url })
    }

    pub async fn drop(mut self) {
        let name = self.name;
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut self.admin)
        .await
        {
            eprintln!("cannot drop the scratch database {name}: {e}");
        }
    }
}

/// The pipelining window of both the raw loop and the relay (its batch size, the relay's
/// default), and the consumers' fetch size.
const WINDOW: usize = 1024;

pub async fn run(config: BenchConfig) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        config.events > 0 && config.rate > 0 && config.seconds > 0 && config.writers > 0,
        "sizes must be positive"
    );
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let tag = tag[tag.len() - 10..].to_owned();
    let scratch = ScratchDatabase::create(&config.database_admin_url, "seaport_bench", &tag).await?;
    // Ctrl-C drops the measurement and still tears down the database and the streams.
    let result = tokio::select! {
        r = measure(&config, &scratch.url, &tag) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Ok(client) = async_nats::connect(&config.nats_url).await {
        let js = jetstream::new(client);
        for s in streams(&tag) {
            let _ = js.delete_stream(&s).await;
        }
    }
    scratch.drop().await;
    result
}

/// The benchmark's private streams: raw publish (before and after the relay), relay, latency.
fn streams(tag: &str) -> [String; 4] {
    [
        format!("RAW{tag}"),
        format!("RAWB{tag}"),
        format!("BENCH{tag}"),
        format!("LAT{tag}"),
    ]
}

async fn measure(config: &BenchConfig, db_url: &str, tag: &str) -> anyhow::Result<BenchReport> {
    let store = PgStore::connect(db_url).await?;
    let db: Db = store.clone().into();
    let broker = Arc::new(JetStreamBroker::connect(&config.nats_url).await?);
    let js = broker.context().clone();
    let [raw_stream, rawb_stream, relay_stream, lat_stream] = streams(tag);
    let (raw_root, rawb_root, relay_root, lat_root) = (
        format!("raw{tag}"),
        format!("rawb{tag}"),
        format!("bench{tag}"),
        format!("lat{tag}"),
    );
    for (s, r) in [
        (&raw_stream, &raw_root),
        (&rawb_stream, &rawb_root),
        (&relay_stream, &relay_root),
        (&lat_stream, &lat_root),
    ] {
        broker.ensure_stream(s, &[&format!("{r}.>")]).await?;
    }
    let outcome = async {
        let events: Vec<Event> = (0..config.events)
            .map(|i| {
                Event::new(
                    "sea.bench.happened",
                    "/bench",
                    serde_json::json!({"n": i, "pad": "x".repeat(160)}),
                )
                .with_subject(format!("key-{}", i % 64))
            })
            .collect();

        // 1a. The raw limit: bare async-nats, pipelined, same payloads and headers. Measured
        // again after the relay (1c) to a second stream, and the mean of both is the limit: this
        // machine's speed drifts within a run, and the relay sits between the two.
        let total = events.len() as u64;
        let started = Instant::now();
        let cpu_before = cpu::Snapshot::take();
        let raw_before = raw_publish(&js, &format!("{raw_root}.bench.happened"), &events).await?;
        eprintln!("raw JetStream publish: {raw_before:.0}/s");
        let mut cpu = vec![cpu_before.phase("raw publish", started.elapsed())];

        // 1b. The relay, from a pre-filled outbox.
        let outbox = Outbox::new();
        prefill(&db, &outbox, &format!("{relay_root}.bench.happened"), &events).await?;
        let mut relay = Relay::new(
            db.clone(),
            broker.clone(),
            RelayConfig {
                batch_size: WINDOW,
                ..Default::default()
            },
        );
        let bar = progress::bar(total, "relay draining the outbox");
        let started = Instant::now();
        let cpu_before = cpu::Snapshot::take();
        let mut published = 0;
        while published < events.len() {
            let pass = relay.drain().await?;
            anyhow::ensure!(pass.failed == 0, "the broker refused events during the benchmark");
            if pass.published == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await; // partitions being taken
            }
            published += pass.published;
            if let Some(bar) = &bar {
                bar.set_position(published as u64);
            }
        }
        let relay_rate = events.len() as f64 / started.elapsed().as_secs_f64();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        cpu.push(cpu_before.phase("relay", started.elapsed()));
        drop(relay);
        let raw_after = raw_publish(&js, &format!("{rawb_root}.bench.happened"), &events).await?;
        let raw_rate = (raw_before + raw_after) / 2.0;
        eprintln!("raw JetStream publish, again: {raw_after:.0}/s (mean of both {raw_rate:.0}/s)");
        eprintln!("relay: {relay_rate:.0}/s ({:.2}x raw)", relay_rate / raw_rate);

        // 1d. The bare loop beside the relay's work without the broker (see
        // `BenchReport::raw_publish_beside_claims_per_sec`). Fresh ids: the stream would drop
        // the earlier ones as duplicates, which costs it less than storing them.
        let fresh = with_fresh_ids(&events);
        prefill(&db, &outbox, &format!("{relay_root}.paced.happened"), &fresh).await?;
        let mut paced = Relay::new(
            db.clone(),
            Arc::new(Paced::new(relay_rate)),
            RelayConfig {
                batch_size: WINDOW,
                ..Default::default()
            },
        );
        let started = Instant::now();
        let cpu_before = cpu::Snapshot::take();
        let expected = fresh.len();
        let claims = tokio::spawn(async move {
            let mut published = 0;
            while published < expected {
                let pass = paced.drain().await?;
                if pass.published == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                published += pass.published;
            }
            anyhow::Ok(())
        });
        let beside = raw_publish(&js, &format!("{rawb_root}.beside.happened"), &fresh).await;
        cpu.push(cpu_before.phase("raw publish beside claims", started.elapsed()));
        claims.await??;
        let beside = beside?;
        eprintln!(
            "raw JetStream publish beside the relay's claims: {beside:.0}/s (relay {:.2}x of it)",
            relay_rate / beside
        );

        // 1c. Two relays (the scale-out deployment's many instances), eight partitions each:
        // their claims run on two connections at once. Fresh events (the outbox keeps the
        // published ones), to a subject of the raw stream, which no consumer reads.
        let relay2_rate = two_relays(&db, &broker, &outbox, &format!("{raw_root}.relay2.happened"), &events).await?;
        eprintln!("two relays: {relay2_rate:.0}/s ({:.2}x raw)", relay2_rate / raw_rate);

        // 3a. The raw consume limit: a bare async-nats pull consumer, ack per message.
        let raw_consumer: jetstream::consumer::PullConsumer = js
            .get_stream(&relay_stream)
            .await?
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("raw_consume".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        let bar = progress::bar(total, "raw JetStream consume+ack");
        let started = Instant::now();
        let cpu_before = cpu::Snapshot::take();
        let mut consumed = 0;
        let mut messages = raw_consumer.messages().await?;
        while consumed < events.len() {
            if consumed % WINDOW == 0 {
                if let Some(bar) = &bar {
                    bar.set_position(consumed as u64);
                }
            }
            let m = messages
                .next()
                .await
                .context("the raw consumer ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            consumed += 1;
        }
        drop(messages);
        let raw_consume_rate = events.len() as f64 / started.elapsed().as_secs_f64();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        eprintln!("raw JetStream consume+ack: {raw_consume_rate:.0}/s");
        cpu.push(cpu_before.phase("raw consume+ack", started.elapsed()));

        // 3b. The consumer runner: inbox dedupe + one effect row per message, batched
        // transactions; first with a per-event handler, then with one that writes a batch's
        // effects in one statement (`Handler::handle_batch`). Each drains the whole stream.
        let consume_rate = consumer_phase(
            &db,
            &store,
            &broker,
            &relay_stream,
            &relay_root,
            events.len(),
            false,
            true,
            &mut cpu,
        )
        .await?;
        eprintln!(
            "consumer runner, per-event handler: {consume_rate:.0}/s ({:.2}x raw)",
            consume_rate / raw_consume_rate
        );
        // The same with acks that do not wait for the server's confirmation.
        let consume_unconfirmed_rate = consumer_phase(
            &db,
            &store,
            &broker,
            &relay_stream,
            &relay_root,
            events.len(),
            false,
            false,
            &mut cpu,
        )
        .await?;
        eprintln!(
            "consumer runner, per-event handler, unconfirmed acks: {consume_unconfirmed_rate:.0}/s ({:.2}x raw)",
            consume_unconfirmed_rate / raw_consume_rate
        );
        let consume_batch_rate = consumer_phase(
            &db,
            &store,
            &broker,
            &relay_stream,
            &relay_root,
            events.len(),
            true,
            true,
            &mut cpu,
        )
        .await?;
        eprintln!(
            "consumer runner, batch handler: {consume_batch_rate:.0}/s ({:.2}x raw)",
            consume_batch_rate / raw_consume_rate
        );

        // 2. Commit-to-publish latency at a steady rate.
        let received: Stamps = Arc::default();
        let committed: Stamps = Arc::default();
        let mut sub = broker.client().subscribe(format!("{lat_root}.>")).await?;
        let rx = received.clone();
        let listener = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let now = Instant::now();
                if let Some(id) = m.headers.as_ref().and_then(|h| h.get(MSG_ID_HEADER)) {
                    rx.lock().expect("not poisoned").insert(id.as_str().to_owned(), now);
                }
            }
        });
        let (stop, stopped) = watch::channel(false);
        let relay = Relay::new(
            db.clone(),
            broker.clone(),
            RelayConfig {
                batch_size: WINDOW,
                ..Default::default()
            },
        );
        let relay_task = tokio::spawn(relay.run(stopped));
        tokio::time::sleep(Duration::from_millis(1500)).await; // partitions taken, relay idle
        let (started, cpu_before) = (Instant::now(), cpu::Snapshot::take());
        let total = steady_writers(&db, &format!("{lat_root}.bench.latency"), config, &committed).await?;
        cpu.push(cpu_before.phase("steady writers + relay", started.elapsed()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while received.lock().expect("not poisoned").len() < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        let _ = relay_task.await;
        listener.abort();
        let pg = percentiles(&committed, &received, total)?;
        eprintln!(
            "commit-to-publish (PostgreSQL + JetStream): p50 {:.2} ms, p99 {:.2} ms",
            pg.p50, pg.p99
        );
        let embedded = embedded_latency(config).await?;
        Ok(BenchReport {
            events: events.len(),
            raw_publish_per_sec: raw_rate,
            raw_publish_runs_per_sec: [raw_before, raw_after],
            relay_per_sec: relay_rate,
            relay_vs_raw: relay_rate / raw_rate,
            relay_cpu_bound_vs_raw: relay_cpu_bound(&cpu),
            raw_publish_beside_claims_per_sec: beside,
            relay_vs_raw_beside_claims: relay_rate / beside,
            two_relays_per_sec: relay2_rate,
            two_relays_vs_raw: relay2_rate / raw_rate,
            raw_consume_per_sec: raw_consume_rate,
            consumer_per_sec: consume_rate,
            consumer_vs_raw: consume_rate / raw_consume_rate,
            consumer_unconfirmed_per_sec: consume_unconfirmed_rate,
            consumer_unconfirmed_vs_raw: consume_unconfirmed_rate / raw_consume_rate,
            consumer_batch_per_sec: consume_batch_rate,
            consumer_batch_vs_raw: consume_batch_rate / raw_consume_rate,
            latency_rate_per_sec: config.rate,
            latency_samples: pg.samples,
            latency_p50_ms: pg.p50,
            latency_p99_ms: pg.p99,
            latency_max_ms: pg.max,
            embedded_latency_samples: embedded.samples,
            embedded_latency_p50_ms: embedded.p50,
            embedded_latency_p99_ms: embedded.p99,
            embedded_latency_max_ms: embedded.max,
            cpu,
        })
    }
    .await;
    store.close().await;
    outcome
}

/// Copies of `events` under new ids: a stream drops a known id as a duplicate, which costs it
/// less than storing a new message.
fn with_fresh_ids(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .map(|e| Event {
            id: uuid::Uuid::now_v7().to_string(),
            ..e.clone()
        })
        .collect()
}

/// Commit `events` to the outbox under `topic`, a thousand per transaction.
async fn prefill(db: &Db, outbox: &Outbox, topic: &str, events: &[Event]) -> anyhow::Result<()> {
    let bar = progress::bar(events.len() as u64, "pre-filling the outbox");
    let started = Instant::now();
    for chunk in events.chunks(1000) {
        let mut tx = db.begin_write().await?;
        for e in chunk {
            outbox.insert_to(&mut tx, topic, e).await?;
        }
        tx.commit().await?;
        if let Some(bar) = &bar {
            bar.inc(chunk.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "pre-filled the outbox with {} events in {:.1} s",
        events.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A broker that sends nothing and confirms each message at a fixed rate, as JetStream
/// confirmed the relay's: a relay on it does the relay's database and own work at the relay's
/// pace, without the broker's.
struct Paced {
    every: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl Paced {
    fn new(per_sec: f64) -> Self {
        Paced {
            every: Duration::from_secs_f64(1.0 / per_sec.max(1.0)),
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }
}

#[async_trait::async_trait]
impl Broker for Paced {
    async fn ensure_stream(&self, _: &str, _: &[&str]) -> Result<(), seaport::broker::BrokerError> {
        Ok(())
    }

    async fn publish(
        &self,
        messages: &[seaport::broker::OutgoingMessage],
    ) -> Vec<Result<seaport::broker::PublishAck, seaport::broker::BrokerError>> {
        let mut results = Vec::with_capacity(messages.len());
        for p in self.send(messages).await {
            results.push(p.await);
        }
        results
    }

    async fn send(&self, messages: &[seaport::broker::OutgoingMessage]) -> Vec<seaport::broker::PendingPublish> {
        let mut next = self.next.lock().expect("not poisoned");
        messages
            .iter()
            .map(|_| {
                *next = (*next).max(tokio::time::Instant::now()) + self.every;
                let at = *next;
                Box::pin(async move {
                    // Most are due by the time they are awaited: no timer for those.
                    if tokio::time::Instant::now() < at {
                        tokio::time::sleep_until(at).await;
                    }
                    Ok(seaport::broker::PublishAck {
                        stream: "paced".to_owned(),
                        seq: 0,
                        duplicate: false,
                    })
                }) as seaport::broker::PendingPublish
            })
            .collect()
    }

    async fn subscribe(
        &self,
        _: &str,
        _: ConsumerConfig,
    ) -> Result<Box<dyn seaport::broker::Subscription>, seaport::broker::BrokerError> {
        Err(seaport::broker::BrokerError::Unavailable(
            "the paced broker only confirms".into(),
        ))
    }

    async fn consumer_state(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Option<seaport::broker::ConsumerState>, seaport::broker::BrokerError> {
        Ok(None)
    }
}

/// The raw limit: a bare async-nats loop publishing `events` to `subject`, `WINDOW` in flight
/// (a sliding window), with the relay's headers. Events per second.
async fn raw_publish(js: &jetstream::Context, subject: &str, events: &[Event]) -> anyhow::Result<f64> {
    let bar = progress::bar(events.len() as u64, "raw JetStream publish");
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    for (i, e) in events.iter().enumerate() {
        if i % WINDOW == 0
            && let Some(bar) = &bar
        {
            bar.set_position(i as u64);
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID_HEADER, e.id.as_str());
        headers.insert("content-type", seaport::event::CLOUDEVENTS_JSON);
        let msg = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(e.to_json()))
            .headers(headers);
        in_flight.push_back(js.send_publish(subject.to_owned(), msg).await?);
        if in_flight.len() >= WINDOW {
            in_flight.pop_front().expect("non-empty").await?;
        }
    }
    for ack in in_flight {
        ack.await?;
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(rate)
}

/// See [`BenchReport::relay_cpu_bound_vs_raw`]; 0 when a phase's reading is missing.
fn relay_cpu_bound(cpu: &[cpu::CpuPhase]) -> f64 {
    let phase = |name: &str| cpu.iter().find(|p| p.phase == name);
    match (phase("raw publish"), phase("relay")) {
        (Some(raw), Some(relay)) if raw.total() > 0.0 => raw.total() / (raw.total() + relay.of("postgres")),
        _ => 0.0,
    }
}

pub fn print(report: &BenchReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(report).expect("report serialises"));
        return;
    }
    println!("PostgreSQL + NATS JetStream, {} events", report.events);
    println!(
        "  raw pipelined JetStream publish : {:>10.0} events/s  (mean of {:.0} before and {:.0} after the relay)",
        report.raw_publish_per_sec, report.raw_publish_runs_per_sec[0], report.raw_publish_runs_per_sec[1]
    );
    println!(
        "  outbox relay (pre-filled)       : {:>10.0} events/s  ({:.2}x raw)",
        report.relay_per_sec, report.relay_vs_raw
    );
    if report.relay_cpu_bound_vs_raw > 0.0 {
        println!(
            "    bound on these cores          : {:>10.2}x raw  (bare loop's CPU + PostgreSQL's claims; relay at {:.0}% of it)",
            report.relay_cpu_bound_vs_raw,
            100.0 * report.relay_vs_raw / report.relay_cpu_bound_vs_raw
        );
    }
    println!(
        "    raw publish beside its claims : {:>10.0} events/s  (the relay at {:.2}x of it: the bare loop while the relay's \
         database and own work run at the relay's rate, without the broker)",
        report.raw_publish_beside_claims_per_sec, report.relay_vs_raw_beside_claims
    );
    println!(
        "  two relays, 8 partitions each   : {:>10.0} events/s  ({:.2}x raw)",
        report.two_relays_per_sec, report.two_relays_vs_raw
    );
    println!(
        "  raw JetStream consume + ack     : {:>10.0} msgs/s",
        report.raw_consume_per_sec
    );
    println!(
        "  consumer runner (inbox+effect)  : {:>10.0} msgs/s  ({:.2}x raw)",
        report.consumer_per_sec, report.consumer_vs_raw
    );
    println!(
        "  same, unconfirmed acks          : {:>10.0} msgs/s  ({:.2}x raw)",
        report.consumer_unconfirmed_per_sec, report.consumer_unconfirmed_vs_raw
    );
    println!(
        "  same, batch handler             : {:>10.0} msgs/s  ({:.2}x raw)",
        report.consumer_batch_per_sec, report.consumer_batch_vs_raw
    );
    println!(
        "  commit-to-publish at {}/s        : p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        report.latency_rate_per_sec,
        report.latency_p50_ms,
        report.latency_p99_ms,
        report.latency_max_ms,
        report.latency_samples
    );
    println!("Where the time went (CPU seconds by process during each phase, and how busy the machine's cores were)");
    for p in &report.cpu {
        let parts: Vec<String> = p.cpu_secs.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        println!(
            "  {:<27} wall {:>6.2} s, cores {:>3.0}% busy: {}",
            p.phase,
            p.wall_secs,
            100.0 * p.machine_busy,
            parts.join(", ")
        );
    }
    println!("Embedded (SQLite + embedded broker)");
    println!(
        "  commit-to-publish at {}/s        : p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        report.latency_rate_per_sec,
        report.embedded_latency_p50_ms,
        report.embedded_latency_p99_ms,
        report.embedded_latency_max_ms,
        report.embedded_latency_samples
    );
}

/// Circuit breaker overhead per call in the closed state, beside the same call without it
/// (same run, same future): nanoseconds per call, median of `rounds` rounds of `calls` calls.
pub async fn breaker_overhead(calls: u32, rounds: usize) -> (f64, f64) {
    use seaport::breaker::CircuitBreaker;
    let breaker = CircuitBreaker::builder("bench").build();
    async fn op(i: u32) -> Result<u32, ()> {
        Ok(std::hint::black_box(i))
    }
    let mut bare = Vec::new();
    let mut guarded = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..calls {
            std::hint::black_box(op(i).await.ok());
        }
        bare.push(t.elapsed().as_nanos() as f64 / calls as f64);
        let t = Instant::now();
        for i in 0..calls {
            std::hint::black_box(breaker.call(|| op(i)).await.ok());
        }
        guarded.push(t.elapsed().as_nanos() as f64 / calls as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    (median(&mut bare), median(&mut guarded))
}
