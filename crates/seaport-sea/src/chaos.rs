//! `seaport chaos`: the fault-injection harness. It runs the service as separate OS processes,
//! drives idempotent `POST /cases` with client retries, `kill -9`s random processes (and the NATS
//! server) meanwhile, restarts them, and then checks the history:
//!
//! - every request acknowledged to the client has exactly one case, and no key made two;
//! - every case has exactly one `sea.cases.created` event, and exactly one `sea.notifications.queued`
//!   event (emitted by a consumer), in the broker's stream (by id);
//! - every fan-out consumer recorded each event's effect exactly once;
//! - nothing is left unpublished in the outbox; the dead letters are empty.
//!
//! Distributed mode: 2 api, 2 relay and 2 worker processes on a scratch PostgreSQL database and a
//! private `nats-server -js` (its own port and store, so killing it harms no one else). Embedded
//! mode: the single process on SQLite, killed and restarted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rand::Rng;
use seaport::on_pool;
use seaport::store::Db;
use tokio::sync::Mutex;

use crate::consumers::{ANALYTICS, AUDIT, NOTIFICATIONS};

#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// `None`: embedded mode. Otherwise the PostgreSQL server to make a scratch database on.
    pub postgres_admin_url: Option<String>,
    pub nats_server: String,
    pub requests: usize,
    pub concurrency: usize,
    /// Requests per second offered (all clients together), so the load overlaps the kills.
    pub rate: f64,
    /// Pause between two kills.
    pub kill_every: Duration,
    /// Give up waiting for the system to settle after this long.
    pub settle_timeout: Duration,
}

/// One process of the deployment, restartable with the same arguments.
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    http: Option<String>,
    log: PathBuf,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("SEAPORT_LOG", "warn")
            .env_remove("SEAPORT_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL on Unix: no destructors, no flush
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The outcome, printed as one line.
#[derive(Debug, Default)]
pub struct Summary {
    pub mode: &'static str,
    pub requests: usize,
    pub acknowledged: usize,
    pub lost: usize,
    pub duplicate_cases: i64,
    pub duplicate_events: usize,
    pub missing_events: usize,
    pub duplicated_effects: i64,
    pub missing_effects: i64,
    pub unpublished: i64,
    pub dead_letters: i64,
    pub kills: u64,
    pub nats_restarts: u64,
    /// Times the relays' lock connections were ended under them (distributed mode): the relays
    /// keep their claims in flight but lose their partitions, which others then take over.
    pub lock_cuts: u64,
    pub client_retries: u64,
    pub seconds: f64,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.acknowledged == self.requests
            && self.lost == 0
            && self.duplicate_cases == 0
            && self.duplicate_events == 0
            && self.missing_events == 0
            && self.duplicated_effects == 0
            && self.missing_effects == 0
            && self.unpublished == 0
            && self.dead_letters == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chaos {}: requests={} acknowledged={} lost={} duplicate_cases={} duplicate_events={} missing_events={} \
             duplicated_effects={} missing_effects={} unpublished={} dead_letters={} kills={} nats_restarts={} \
             lock_cuts={} client_retries={} seconds={:.1} => {}",
            self.mode,
            self.requests,
            self.acknowledged,
            self.lost,
            self.duplicate_cases,
            self.duplicate_events,
            self.missing_events,
            self.duplicated_effects,
            self.missing_effects,
            self.unpublished,
            self.dead_letters,
            self.kills,
            self.nats_restarts,
            self.lock_cuts,
            self.client_retries,
            self.seconds,
            if self.ok() { "OK" } else { "VIOLATION" }
        )
    }
}

pub async fn run(config: ChaosConfig) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("cannot find the seaport executable")?;
    let work = tempfile_dir()?;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let tag = &tag[tag.len() - 10..];
    let (stream, root) = (format!("CHAOS{tag}"), format!("chaos{tag}"));

    let mut nats: Option<Proc> = None;
    let mut database_url = None;
    let mut procs: Vec<Proc> = Vec::new();
    let common = |extra: &[String]| -> Vec<String> {
        let mut a = vec![
            "serve".to_owned(),
            "--stream".into(),
            stream.clone(),
            "--subject-root".into(),
            root.clone(),
            "--ack-wait-secs".into(),
            "2".into(),
            "--inbox-retention-hours".into(),
            "1".into(),
        ];
        a.extend_from_slice(extra);
        a
    };
    let mode = if let Some(admin) = &config.postgres_admin_url {
        let url = create_database(admin, tag).await?;
        database_url = Some(url.clone());
        let nats_port = free_port()?;
        let mut n = Proc {
            name: "nats-server".into(),
            program: PathBuf::from(&config.nats_server),
            args: vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                nats_port.to_string(),
                "-sd".into(),
                work.join("nats").display().to_string(),
            ],
            child: None,
            http: None,
            log: work.join("nats.log"),
        };
        n.start().with_context(|| {
            format!(
                "cannot run {} (install it with `bash scripts/services`)",
                config.nats_server
            )
        })?;
        nats = Some(n);
        wait_for_port(nats_port)
            .await
            .context("the private nats-server did not start")?;
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        for (role, count) in [("relay", 2), ("worker", 2), ("api", 2)] {
            for i in 0..count {
                let port = free_port()?;
                procs.push(Proc {
                    name: format!("{role}-{i}"),
                    program: exe.clone(),
                    args: common(&[
                        "--role".into(),
                        role.into(),
                        "--listen".into(),
                        format!("127.0.0.1:{port}"),
                        "--database-url".into(),
                        url.clone(),
                        "--nats-url".into(),
                        nats_url.clone(),
                    ]),
                    child: None,
                    http: Some(format!("http://127.0.0.1:{port}")),
                    log: work.join(format!("{role}-{i}.log")),
                });
            }
        }
        "distributed"
    } else {
        let port = free_port()?;
        procs.push(Proc {
            name: "all".into(),
            program: exe.clone(),
            args: common(&[
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                work.join("data").display().to_string(),
            ]),
            child: None,
            http: Some(format!("http://127.0.0.1:{port}")),
            log: work.join("all.log"),
        });
        "embedded"
    };
    // Start one at a time: the first applies the migrations.
    for p in &mut procs {
        p.start()?;
        wait_healthy(p.http.as_deref().expect("every process listens"))
            .await
            .with_context(|| format!("{} did not become healthy; see {}", p.name, p.log.display()))?;
    }
    let api_bases: Vec<String> = procs
        .iter()
        .filter(|p| p.name.starts_with("api") || p.name == "all")
        .filter_map(|p| p.http.clone())
        .collect();

    let procs = Arc::new(Mutex::new(procs));
    let nats = Arc::new(Mutex::new(nats));
    let kills = Arc::new(AtomicU64::new(0));
    let nats_restarts = Arc::new(AtomicU64::new(0));
    let lock_cuts = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    // Distributed mode: a connection to end the relays' lock connections with.
    let cutter = match &database_url {
        Some(url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .context("cannot connect to the chaos database")?,
        ),
        None => None,
    };
    let (stop_chaos, chaos_stopped) = tokio::sync::watch::channel(false);

    // The chaos: kill -9 a random process every `kill_every`, restart it after a moment; once,
    // half-way, the NATS server too. Distributed, one round in four instead ends the relays'
    // lock connections (not the relays): their claims in flight go on while others take their
    // partitions over, the case the handover fencing is for.
    let chaos = {
        let (procs, nats, kills, nats_restarts) = (procs.clone(), nats.clone(), kills.clone(), nats_restarts.clone());
        let lock_cuts = lock_cuts.clone();
        let every = config.kill_every;
        let mut stopped = chaos_stopped.clone();
        tokio::spawn(async move {
            let mut round = 0u32;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => return,
                }
                round += 1;
                if round == 3 {
                    let mut guard = nats.lock().await;
                    if let Some(n) = guard.as_mut() {
                        n.kill9();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if n.start().is_ok() {
                            nats_restarts.fetch_add(1, Ordering::SeqCst);
                        }
                        continue;
                    }
                }
                if round % 4 == 1
                    && let Some(cutter) = &cutter
                {
                    let cut = sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = $1 AND datname = current_database()",
                    )
                    .bind(seaport::outbox::relay::RELAY_APPLICATION)
                    .execute(cutter)
                    .await;
                    match cut {
                        Ok(_) => {
                            lock_cuts.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => eprintln!("chaos: cannot end the relays' lock connections: {e}"),
                    }
                    continue;
                }
                let mut ps = procs.lock().await;
                let i = rand::thread_rng().gen_range(0..ps.len());
                ps[i].kill9();
                kills.fetch_add(1, Ordering::SeqCst);
                drop(ps);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut ps = procs.lock().await;
                if let Err(e) = ps[i].start() {
                    eprintln!("chaos: cannot restart {}: {e:#}", ps[i].name);
                }
            }
        })
    };

    // The load: every request retried with its key until acknowledged (or the deadline).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()?;
    let acknowledged: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(120) + config.kill_every * 10;
    let mut clients = Vec::new();
    for _ in 0..config.concurrency.max(1) {
        let (http, acked, next, retries, bases) = (
            http.clone(),
            acknowledged.clone(),
            next.clone(),
            retries.clone(),
            api_bases.clone(),
        );
        let total = config.requests as u64;
        let pace = Duration::from_secs_f64(config.concurrency.max(1) as f64 / config.rate.max(0.1));
        clients.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(pace).await;
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return;
                }
                let key = format!("chaos-{n}");
                let mut attempt = 0usize;
                while Instant::now() < deadline {
                    let base = &bases[(n as usize + attempt) % bases.len()];
                    attempt += 1;
                    let res = http
                        .post(format!("{base}/cases"))
                        .header("Idempotency-Key", &key)
                        .header("X-Correlation-Id", &key)
                        .json(&serde_json::json!({"title": key, "customer_id": format!("C-{}", n % 17)}))
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status() == 201 => {
                            if let Ok(v) = r.json::<serde_json::Value>().await
                                && let Some(id) = v["id"].as_str()
                            {
                                acked.lock().await.insert(key.clone(), id.to_owned());
                                break;
                            }
                        }
                        _ => {}
                    }
                    retries.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for c in clients {
        c.await?;
    }
    let _ = stop_chaos.send(true);
    chaos.await?;

    // Bring everything back and let the system settle.
    {
        let mut n = nats.lock().await;
        if let Some(n) = n.as_mut()
            && !n.alive()
        {
            n.start()?;
        }
        let mut ps = procs.lock().await;
        for p in ps.iter_mut() {
            if !p.alive() {
                p.start()?;
            }
        }
    }
    let db = match &database_url {
        Some(url) => Db::open(url).await?,
        None => Db::open(&work.join("data").join("seaport.db").display().to_string()).await?,
    };
    let settle_deadline = Instant::now() + config.settle_timeout;
    let stream_history = async || -> anyhow::Result<StreamHistory> {
        let nats_url = nats.lock().await.as_ref().map(Proc::nats_url);
        match nats_url {
            Some(url) => stream_history_jetstream(&url, &stream).await,
            None => stream_history_embedded(&db).await,
        }
    };
    loop {
        // The broker's stream is the record of every published event (the relay deletes outbox
        // rows once published): read it only once the outbox is empty.
        if unpublished(&db).await? == 0 && missing_effects(&db, &stream_history().await?).await? == 0 {
            break;
        }
        if Instant::now() > settle_deadline {
            break; // reported as violations below
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // late duplicates would show now

    let acknowledged = acknowledged.lock().await.clone();
    let mut summary = Summary {
        mode,
        requests: config.requests,
        acknowledged: acknowledged.len(),
        kills: kills.load(Ordering::SeqCst),
        nats_restarts: nats_restarts.load(Ordering::SeqCst),
        lock_cuts: lock_cuts.load(Ordering::SeqCst),
        client_retries: retries.load(Ordering::SeqCst),
        ..Default::default()
    };
    let cases: Vec<(String, String)> =
        on_pool!(&db, p => sqlx::query_as("SELECT id, title FROM cases").fetch_all(p).await)?;
    let by_id: HashMap<&str, &str> = cases.iter().map(|(id, t)| (id.as_str(), t.as_str())).collect();
    summary.lost = acknowledged
        .iter()
        .filter(|(key, id)| by_id.get(id.as_str()) != Some(&key.as_str()))
        .count();
    summary.duplicate_cases = on_pool!(&db, p => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM (SELECT title FROM cases GROUP BY title HAVING COUNT(*) > 1) d").fetch_one(p).await)?;
    let history = stream_history().await?;
    let published = &history.case_events;
    let notified = &history.notification_events;
    summary.duplicate_events = published.values().chain(notified.values()).filter(|n| **n > 1).count();
    summary.missing_events = cases
        .iter()
        .map(|(id, _)| usize::from(!published.contains_key(id)) + usize::from(!notified.contains_key(id)))
        .sum();
    summary.duplicated_effects = on_pool!(&db, p => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM (SELECT consumer, event_id FROM consumer_effects GROUP BY consumer, event_id HAVING COUNT(*) > 1) d")
        .fetch_one(p).await)?;
    summary.missing_effects = missing_effects(&db, &history).await?;
    summary.unpublished = unpublished(&db).await?;
    summary.dead_letters = on_pool!(&db, p => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM seaport_dead_letters").fetch_one(p).await)?;
    summary.seconds = started.elapsed().as_secs_f64();

    // Tear down.
    for p in procs.lock().await.iter_mut() {
        p.kill9();
    }
    if let Some(n) = nats.lock().await.as_mut() {
        n.kill9();
    }
    db.close().await;
    if let (Some(admin), Some(_)) = (&config.postgres_admin_url, &database_url) {
        drop_database(admin, tag).await;
    }
    if summary.ok() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("chaos: logs kept in {}", work.display());
    }
    Ok(summary)
}

impl Proc {
    fn nats_url(&self) -> String {
        let port = self
            .args
            .iter()
            .position(|a| a == "-p")
            .and_then(|i| self.args.get(i + 1))
            .cloned()
            .unwrap_or_default();
        format!("nats://127.0.0.1:{port}")
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("seaport-chaos-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on port {port}")
}

async fn wait_healthy(base: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{base}/healthz never answered 200")
}

fn scratch_name(tag: &str) -> String {
    format!("seaport_chaos_{tag}")
}

async fn create_database(admin: &str, tag: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .with_context(|| format!("PostgreSQL is not reachable at {admin} (start it with `bash scripts/services`)"))?;
    let name = scratch_name(tag);
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    Ok(format!("{base}/{name}"))
}

async fn drop_database(admin: &str, tag: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin).await {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", scratch_name(tag));
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
    }
}

async fn unpublished(db: &Db) -> anyhow::Result<i64> {
    Ok(
        on_pool!(db, p => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM seaport_outbox")
        .fetch_one(p).await)?,
    )
}

/// Published events times fan-out consumers, minus those each consumer's inbox says it
/// processed (not every event has an effect: notifications ignores all but new cases).
async fn missing_effects(db: &Db, history: &StreamHistory) -> anyhow::Result<i64> {
    let mut missing = 0;
    for consumer in [ANALYTICS, NOTIFICATIONS, AUDIT] {
        let processed: HashSet<String> = on_pool!(db, p => sqlx::query_scalar(
            "SELECT message_id FROM seaport_inbox WHERE consumer = $1",
        )
        .bind(consumer)
        .fetch_all(p)
        .await)?
        .into_iter()
        .collect();
        missing += history.event_ids.iter().filter(|id| !processed.contains(*id)).count() as i64;
    }
    Ok(missing)
}

/// What the broker's stream holds.
#[derive(Default)]
struct StreamHistory {
    /// Every event id, once (the broker drops a republished copy by its message id).
    event_ids: HashSet<String>,
    /// Case id → how many `sea.cases.created` events for it.
    case_events: BTreeMap<String, usize>,
    /// Case id → how many `sea.notifications.queued` events for it (the notifications consumer
    /// emits one per new case): an event lost between the outbox and the broker shows here too.
    notification_events: BTreeMap<String, usize>,
}

impl StreamHistory {
    fn add(&mut self, payload: &[u8]) {
        let Ok(e) = seaport::Event::from_json(payload) else {
            return;
        };
        if e.ty == crate::cases::CASE_CREATED
            && let Some(id) = e.data.as_ref().and_then(|d| d["id"].as_str())
        {
            *self.case_events.entry(id.to_owned()).or_default() += 1;
        }
        if e.ty == crate::consumers::notifications::NOTIFICATION_QUEUED
            && let Some(id) = e.data.as_ref().and_then(|d| d["case_id"].as_str())
        {
            *self.notification_events.entry(id.to_owned()).or_default() += 1;
        }
        self.event_ids.insert(e.id);
    }
}

async fn stream_history_jetstream(nats_url: &str, stream: &str) -> anyhow::Result<StreamHistory> {
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await?;
    let last = s.info().await?.state.last_sequence;
    let mut out = StreamHistory::default();
    for seq in 1..=last {
        let m = s
            .get_raw_message(seq)
            .await
            .with_context(|| format!("cannot read message {seq} of stream {stream}"))?;
        out.add(&m.payload);
    }
    Ok(out)
}

async fn stream_history_embedded(db: &Db) -> anyhow::Result<StreamHistory> {
    let payloads: Vec<Vec<u8>> =
        on_pool!(db, p => sqlx::query_scalar("SELECT payload FROM seaport_broker_messages").fetch_all(p).await)?;
    let mut out = StreamHistory::default();
    for payload in payloads {
        out.add(&payload);
    }
    Ok(out)
}

/// Fail with the summary line if the history shows a violation.
pub fn verdict(summary: &Summary) -> anyhow::Result<()> {
    ensure!(summary.ok(), "{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn any_violation_fails_the_verdict() {
        let clean = Summary {
            requests: 3,
            acknowledged: 3,
            ..Default::default()
        };
        assert!(clean.ok() && super::verdict(&clean).is_ok());
        let broken: [fn(&mut Summary); 9] = [
            |s| s.acknowledged = 2,
            |s| s.lost = 1,
            |s| s.duplicate_cases = 1,
            |s| s.duplicate_events = 1,
            |s| s.missing_events = 1,
            |s| s.duplicated_effects = 1,
            |s| s.missing_effects = 1,
            |s| s.unpublished = 1,
            |s| s.dead_letters = 1,
        ];
        for (i, breakage) in broken.iter().enumerate() {
            let mut s = Summary {
                requests: 3,
                acknowledged: 3,
                ..Default::default()
            };
            breakage(&mut s);
            let err = super::verdict(&s).unwrap_err().to_string();
            assert!(err.ends_with("VIOLATION"), "case {i}: {err}");
        }
    }
}
