//! `seaport bench-backlog`: peak memory of the relay and the worker facing a large backlog.
//!
//! The claim under test: a relay or worker process needs the same memory whether 100,000 or
//! 1,000,000 events wait for it, because it only ever holds a batch. For each backlog size N:
//!
//! 1. a scratch database `seaport_benchrss_*` with the service's migrations, and an outbox
//!    pre-filled with N `sea.cases.created` events shaped exactly like those `POST /cases`
//!    writes (same envelope, subject, topic and partition);
//! 2. the real binary as `serve --role relay` (a separate process, so its RSS is its own) until
//!    the outbox is empty, sampling `/proc/<pid>/status` every 100 ms;
//! 3. the real binary as `serve --role worker` until the three fan-out consumers acknowledged
//!    all N messages, sampled the same way; then the inboxes must hold N records each and the
//!    dead letters none, so the figures are of real, successful processing.
//!
//! Peak RSS is the kernel's high-water mark (`VmHWM`), so a spike between two samples counts.
//! Each size gets its own database and private streams (`BENCHRSS*`), removed afterwards, also
//! on error; the children's stderr goes to a log file whose tail is shown when something fails.
//!
//! On a terminal the pre-fill and both drains show a progress bar ([`crate::progress`]), moved
//! per pre-fill statement and per progress poll; elsewhere a line every 10 s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::Context;
use seaport::Event;
use seaport::http::correlation::TraceParent;
use seaport::outbox::partition_of;
use seaport::store::now_ms;
use sqlx::{ConnectOptions as _, PgPool};

use crate::app::{self, Config, Topics};
use crate::cases::{CASE_CREATED, Case, SOURCE};
use crate::consumers::{ANALYTICS, AUDIT, NOTIFICATIONS};
use crate::progress;

/// The consumers that see every event (the `sea_service__context` group only sees webhooks).
const FAN_OUT: [&str; 3] = [ANALYTICS, NOTIFICATIONS, AUDIT];
/// Rows per pre-fill statement: large enough to be fast, small enough to stay a few MiB.
const PREFILL_CHUNK: usize = 5_000;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

pub struct BacklogConfig {
    pub admin_database_url: String,
    pub nats_url: String,
    pub backlogs: Vec<usize>,
    /// Fail when a drain makes no progress for this long.
    pub stall_timeout: Duration,
}

/// One process draining one backlog.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Phase {
    /// From spawning the process to the last message settled (startup included).
    pub seconds: f64,
    /// Messages settled per second: outbox rows published (relay), or deliveries processed by
    /// all fan-out consumers together (worker: 3 per event).
    pub per_sec: f64,
    /// Kernel high-water mark of the process's resident set (`VmHWM`).
    pub peak_rss_mib: f64,
    /// Resident set when the backlog was drained.
    pub end_rss_mib: f64,
    pub rss_samples: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BacklogRun {
    pub backlog: usize,
    pub prefill_seconds: f64,
    pub relay: Phase,
    pub worker: Phase,
    /// Events fully processed (by every fan-out consumer) per second.
    pub worker_events_per_sec: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BacklogReport {
    pub runs: Vec<BacklogRun>,
    /// Peak RSS at the largest backlog over peak RSS at the smallest (bounded: about 1.0).
    pub relay_peak_ratio: f64,
    pub worker_peak_ratio: f64,
}

pub async fn run(config: BacklogConfig) -> anyhow::Result<BacklogReport> {
    ensure!(
        !config.backlogs.is_empty() && config.backlogs.iter().all(|n| *n > 0),
        "--backlogs needs one or more positive sizes"
    );
    let exe = std::env::current_exe().context("cannot find the seaport executable")?;
    let nats = async_nats::connect(&config.nats_url).await.with_context(|| {
        format!(
            "cannot reach NATS at {} (start it: bash scripts/services)",
            config.nats_url
        )
    })?;
    let js = async_nats::jetstream::new(nats);
    let mut runs = Vec::new();
    for &n in &config.backlogs {
        eprintln!("bench-backlog: {n} events");
        let r = run_one(&config, &js, &exe, n)
            .await
            .with_context(|| format!("backlog of {n} events"))?;
        eprintln!(
            "bench-backlog: {n} events: relay peak {:.1} MiB at {:.0}/s, worker peak {:.1} MiB at {:.0} msgs/s",
            r.relay.peak_rss_mib, r.relay.per_sec, r.worker.peak_rss_mib, r.worker.per_sec
        );
        runs.push(r);
    }
    let smallest = runs.iter().min_by_key(|r| r.backlog).expect("at least one run");
    let largest = runs.iter().max_by_key(|r| r.backlog).expect("at least one run");
    Ok(BacklogReport {
        relay_peak_ratio: largest.relay.peak_rss_mib / smallest.relay.peak_rss_mib,
        worker_peak_ratio: largest.worker.peak_rss_mib / smallest.worker.peak_rss_mib,
        runs,
    })
}

/// One backlog size in its own database and streams, torn down whatever happens.
async fn run_one(config: &BacklogConfig, js: &Context, exe: &Path, n: usize) -> anyhow::Result<BacklogRun> {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let tag = &tag[tag.len() - 10..];
    let database = crate::bench::ScratchDatabase::create(&config.admin_database_url, "seaport_benchrss", tag).await?;
    let scratch = Scratch {
        db_name: database.name.clone(),
        stream: format!("BENCHRSS{tag}"),
        root: format!("benchrss{tag}"),
        work: std::env::temp_dir().join(format!("seaport-benchrss-{tag}")),
    };
    if let Err(e) = std::fs::create_dir_all(&scratch.work) {
        database.drop().await;
        return Err(e).with_context(|| format!("cannot create {}", scratch.work.display()));
    }
    // Ctrl-C drops the measurement (killing its children) and still tears down.
    let result = tokio::select! {
        r = measure(config, js, exe, n, &database.url, &scratch) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    // Tear down: the children are gone by now (stopped, or killed when their handle dropped).
    for s in [scratch.stream.clone(), format!("{}_DLQ", scratch.stream)] {
        let _ = js.delete_stream(&s).await;
    }
    database.drop().await;
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&scratch.work);
        }
        Err(_) => eprintln!("bench-backlog: logs kept in {}", scratch.work.display()),
    }
    result
}

struct Scratch {
    db_name: String,
    stream: String,
    root: String,
    work: PathBuf,
}

async fn measure(
    config: &BacklogConfig,
    js: &Context,
    exe: &Path,
    n: usize,
    db_url: &str,
    scratch: &Scratch,
) -> anyhow::Result<BacklogRun> {
    let topics = Topics {
        root: scratch.root.clone(),
    };
    let mut service_config = Config::embedded(scratch.work.join("data"));
    service_config.database_url = Some(db_url.to_owned());
    app::open_store(&service_config).await?.close().await;
    // A pool of our own: counting a large backlog is slow by design, not worth a warning.
    let options = sqlx::postgres::PgConnectOptions::from_str(db_url)
        .context("invalid scratch database URL")?
        .disable_statement_logging();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", scratch.db_name))?;

    let started = Instant::now();
    prefill(&pool, &topics, n).await?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    eprintln!("bench-backlog:   pre-filled the outbox in {prefill_seconds:.1} s");

    let args = |role: &str| -> anyhow::Result<Vec<String>> {
        Ok(vec![
            "serve".into(),
            "--role".into(),
            role.into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--database-url".into(),
            db_url.into(),
            "--nats-url".into(),
            config.nats_url.clone(),
            "--stream".into(),
            scratch.stream.clone(),
            "--subject-root".into(),
            scratch.root.clone(),
        ])
    };

    let mut relay = Service::spawn("relay", exe, &args("relay")?, &scratch.work.join("relay.log"))?;
    let relay_phase = drain(&mut relay, n as u64, &Progress::Outbox(&pool), config.stall_timeout).await?;
    relay.stop().await?;
    let stored = js
        .get_stream(&scratch.stream)
        .await
        .context("the relay did not create its stream")?
        .info()
        .await
        .context("cannot read the stream's state")?
        .state
        .messages;
    ensure!(
        stored == n as u64,
        "the stream holds {stored} messages after the relay drained {n} events"
    );

    let mut worker = Service::spawn("worker", exe, &args("worker")?, &scratch.work.join("worker.log"))?;
    let worker_phase = drain(
        &mut worker,
        (n * FAN_OUT.len()) as u64,
        &Progress::Consumers {
            js,
            stream: &scratch.stream,
            per_consumer: n as u64,
        },
        config.stall_timeout,
    )
    .await?;
    worker.stop().await?;
    check_processed(&pool, n).await?;
    pool.close().await;

    Ok(BacklogRun {
        backlog: n,
        prefill_seconds,
        worker_events_per_sec: n as f64 / worker_phase.seconds,
        relay: relay_phase,
        worker: worker_phase,
    })
}

/// N case events as `POST /cases` writes them, in multi-row `INSERT ... SELECT FROM UNNEST`
/// statements. The partition comes from the library's own [`partition_of`] on the subject, as
/// in [`seaport::outbox::Outbox::insert_to`].
async fn prefill(pool: &PgPool, topics: &Topics, n: usize) -> anyhow::Result<()> {
    let topic = topics.topic(CASE_CREATED);
    let bar = progress::bar(n as u64, "pre-filling the outbox");
    let mut done = 0;
    while done < n {
        let len = PREFILL_CHUNK.min(n - done);
        let mut ids = Vec::with_capacity(len);
        let mut keys = Vec::with_capacity(len);
        let mut partitions = Vec::with_capacity(len);
        let mut envelopes = Vec::with_capacity(len);
        let now = now_ms();
        let created_at = crate::consumers::now();
        for i in done..done + len {
            let event = case_event(i, &created_at)?;
            let key = event.subject.clone().expect("case events have a subject");
            partitions.push(partition_of(&key));
            envelopes.push(event.to_json());
            ids.push(event.id);
            keys.push(key);
        }
        sqlx::query(
            "INSERT INTO seaport_outbox (event_id, topic, ordering_key, partition, envelope, created_at)
             SELECT e, $2, k, p, b, $6 FROM UNNEST($1::text[], $3::text[], $4::bigint[], $5::bytea[]) AS u(e, k, p, b)",
        )
        .bind(&ids)
        .bind(&topic)
        .bind(&keys)
        .bind(&partitions)
        .bind(&envelopes)
        .bind(now)
        .execute(pool)
        .await
        .context("cannot pre-fill the outbox")?;
        done += len;
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox")
        .fetch_one(pool)
        .await?;
    ensure!(stored == n as i64, "pre-filled {stored} outbox rows instead of {n}");
    Ok(())
}

/// The `sea.cases.created` event of case number `i`: the case as the API returns it, its id as
/// subject (ordering key), a correlation id, the request as causation, a trace context.
fn case_event(i: usize, created_at: &str) -> anyhow::Result<Event> {
    let correlation_id = format!("benchrss-{i}");
    let case = Case {
        id: uuid::Uuid::now_v7().to_string(),
        title: format!("Broken pump #{i}"),
        description: Some("Leaks at the flange after the last service visit.".to_owned()),
        customer_id: format!("C-{}", i % 1000),
        status: "open".to_owned(),
        correlation_id: correlation_id.clone(),
        created_at: created_at.to_owned(),
        customer_check: "unverified".to_owned(),
        customer_name: None,
        customer_email: None,
        paid_at: None,
    };
    let mut event = Event::new(CASE_CREATED, SOURCE, serde_json::to_value(&case)?)
        .with_subject(&case.id)
        .correlated(correlation_id, Some(uuid::Uuid::now_v7().to_string()));
    event.extensions.insert(
        "traceparent".to_owned(),
        serde_json::Value::String(TraceParent::fresh().to_string()),
    );
    Ok(event)
}

/// How far a drain got.
enum Progress<'a> {
    /// Outbox rows published.
    Outbox(&'a PgPool),
    /// Messages acknowledged by the fan-out consumers together (acks follow the commit).
    Consumers {
        js: &'a Context,
        stream: &'a str,
        per_consumer: u64,
    },
}

impl Progress<'_> {
    async fn done(&self, total: u64) -> anyhow::Result<u64> {
        match self {
            &Progress::Outbox(pool) => {
                let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox")
                    .fetch_one(pool)
                    .await
                    .context("cannot count the unpublished outbox rows")?;
                Ok(total.saturating_sub(left.max(0) as u64))
            }
            Progress::Consumers {
                js,
                stream,
                per_consumer,
            } => {
                let stream = js.get_stream(stream).await.context("cannot read the stream")?;
                let mut done = 0;
                for name in FAN_OUT {
                    // Not created yet: the worker is still starting.
                    let Ok(info) = stream.consumer_info(name).await else {
                        continue;
                    };
                    let open = info.num_pending + info.num_ack_pending as u64;
                    done += per_consumer.saturating_sub(open);
                }
                Ok(done)
            }
        }
    }
}

/// Sample the process's memory every 100 ms until `progress` reaches `total`. Progress is
/// polled at most every 100 ms and with at most 10 % of the time spent on it, so counting a
/// large backlog does not load the database the process is draining.
async fn drain(
    svc: &mut Service,
    total: u64,
    progress: &Progress<'_>,
    stall_timeout: Duration,
) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut samples, mut peak_kib, mut last_rss_kib) = (0usize, 0u64, 0u64);
    let (mut last_done, mut last_change, mut next_poll) = (0u64, Instant::now(), Instant::now());
    let mut next_report = Instant::now() + Duration::from_secs(10);
    let mut last_error: Option<anyhow::Error> = None;
    let bar = progress::bar(total, format!("{} draining", svc.name));
    let seconds = loop {
        tick.tick().await;
        if let Some(status) = svc.exited()? {
            bail!(
                "the {} process exited early ({status}); its log ends:\n{}",
                svc.name,
                svc.tail()
            );
        }
        if let Some(m) = Memory::read(svc.pid()) {
            samples += 1;
            peak_kib = peak_kib.max(m.hwm_kib).max(m.rss_kib);
            last_rss_kib = m.rss_kib;
        }
        if Instant::now() < next_poll {
            continue;
        }
        let polled = Instant::now();
        let done = match progress.done(total).await {
            Ok(d) => d,
            Err(e) => {
                last_error = Some(e);
                last_done
            }
        };
        let cost = polled.elapsed();
        next_poll = Instant::now() + (cost * 10).max(SAMPLE_EVERY);
        if done >= total {
            break started.elapsed().as_secs_f64();
        }
        if let Some(bar) = &bar {
            bar.set_message(format!(
                "{} (RSS {:.1} MiB, peak {:.1} MiB)",
                svc.name,
                mib(last_rss_kib),
                mib(peak_kib)
            ));
            bar.set_position(done);
        }
        if done > last_done {
            (last_done, last_change) = (done, Instant::now());
        } else if last_change.elapsed() > stall_timeout {
            let why = last_error.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
            bail!(
                "the {} made no progress for {} s: {done} of {total} done{why}; its log ends:\n{}",
                svc.name,
                stall_timeout.as_secs(),
                svc.tail()
            );
        }
        if bar.is_none() && Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            eprintln!(
                "bench-backlog:   {} {done}/{total} ({:.0}/s), RSS {:.1} MiB, peak {:.1} MiB",
                svc.name,
                done as f64 / started.elapsed().as_secs_f64(),
                mib(last_rss_kib),
                mib(peak_kib)
            );
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // The high-water mark once more, now that the whole backlog went through.
    if let Some(m) = Memory::read(svc.pid()) {
        samples += 1;
        peak_kib = peak_kib.max(m.hwm_kib);
        last_rss_kib = m.rss_kib;
    }
    ensure!(samples > 0, "could not read /proc/{}/status", svc.pid());
    Ok(Phase {
        seconds,
        per_sec: total as f64 / seconds,
        peak_rss_mib: mib(peak_kib),
        end_rss_mib: mib(last_rss_kib),
        rss_samples: samples,
    })
}

/// After the worker: every fan-out consumer's inbox holds every event, nothing dead-lettered.
async fn check_processed(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    for name in FAN_OUT {
        let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = $1")
            .bind(name)
            .fetch_one(pool)
            .await?;
        ensure!(seen == n as i64, "{name} processed {seen} of {n} events");
    }
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_dead_letters")
        .fetch_one(pool)
        .await?;
    ensure!(dead == 0, "{dead} messages ended in the dead letters");
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Resident set of a process now (`VmRSS`) and at its highest so far (`VmHWM`), in KiB.
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn read(pid: u32) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `seaport serve` child process; killed if dropped while still running (error paths).
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Service {
    fn spawn(name: &'static str, exe: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .env("SEAPORT_LOG", "warn")
            .env_remove("SEAPORT_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start the {name} ({})", exe.display()))?;
        Ok(Service {
            name,
            child,
            log: log.to_owned(),
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let status = self.child.try_wait().context("cannot check the child process")?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    /// SIGTERM (the service's clean shutdown), then SIGKILL after 15 s.
    async fn stop(mut self) -> anyhow::Result<()> {
        if self.exited()?.is_some() {
            return Ok(());
        }
        // No signal crate in the tree: kill(1) sends SIGTERM as well.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.exited()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("bench-backlog: the {} ignored SIGTERM for 15 s; killing it", self.name);
        self.child.kill().context("cannot kill the child process")?;
        self.child.wait().context("cannot reap the child process")?;
        self.reaped = true;
        Ok(())
    }

    /// The last lines the process wrote to stderr.
    fn tail(&self) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                if tail.is_empty() { "(empty)".to_owned() } else { tail }
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn print(report: &BacklogReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("Peak RSS of `seaport serve` draining a pre-filled backlog (PostgreSQL + NATS JetStream)");
    println!(
        "{:>10}  {:>10}  {:>15}  {:>13}  {:>16}  {:>15}  {:>13}",
        "backlog", "prefill s", "relay peak MiB", "relay ev/s", "worker peak MiB", "worker msgs/s", "worker ev/s"
    );
    for r in &report.runs {
        println!(
            "{:>10}  {:>10.1}  {:>15.1}  {:>13.0}  {:>16.1}  {:>15.0}  {:>13.0}",
            r.backlog,
            r.prefill_seconds,
            r.relay.peak_rss_mib,
            r.relay.per_sec,
            r.worker.peak_rss_mib,
            r.worker.per_sec,
            r.worker_events_per_sec
        );
    }
    let smallest = report.runs.iter().map(|r| r.backlog).min().unwrap_or(0);
    let largest = report.runs.iter().map(|r| r.backlog).max().unwrap_or(0);
    println!(
        "peak RSS at {largest} vs {smallest} events: relay {:.2}x, worker {:.2}x (bounded: ~1.0x; growing with the backlog: ~{:.0}x)",
        report.relay_peak_ratio,
        report.worker_peak_ratio,
        largest as f64 / smallest.max(1) as f64
    );
    println!(
        "(worker msgs/s counts deliveries to the {n} fan-out consumers, {n} per event)",
        n = FAN_OUT.len()
    );
    Ok(())
}
