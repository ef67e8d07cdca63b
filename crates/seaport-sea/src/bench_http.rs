//! `seaport bench-http`: what the Idempotency-Key layer costs on `POST /cases`, measured over
//! real HTTP against the same handler without it, on the embedded SQLite store and on
//! PostgreSQL (issue 8, item 4; target: layered >= 0.85x of bare requests/s).
//!
//! Per backend, one store and two servers on loopback TCP (`axum::serve`, as `seaport serve`):
//! the router exactly as the service builds it, and [`router_without_idempotency`] (same
//! handler code, no layer). Only the HTTP API runs: `POST /cases` needs no broker, so no relay,
//! consumers or NATS (the outbox simply fills). The driver is closed-loop: N keep-alive
//! connections, each sending its next request as soon as the previous answered, with a fresh
//! UUIDv7 `Idempotency-Key`. Load generator and server share the machine, as they do on a
//! developer box; the comparison holds because both variants pay for that alike. Variants run
//! alternately, round after round, and the median round of each is reported.
//!
//! On a terminal a progress bar counts the runs ([`crate::progress`]); it moves between runs
//! only, never while one is measured. Elsewhere each run's result line is the progress.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use indicatif::ProgressBar;
use seaport::http::CorrelationLayer;
use seaport::http::cursor::CursorCodec;
use seaport::outbox::Outbox;
use seaport::store::Db;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::app::{self, AppState, Config, Role};
use crate::cases::routes::router_without_idempotency;
use crate::webhooks::Webhooks;
use crate::{cpu, progress};

/// Which databases to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backends {
    Embedded,
    Postgres,
    Both,
}

impl FromStr for Backends {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(Backends::Embedded),
            "postgres" => Ok(Backends::Postgres),
            "both" => Ok(Backends::Both),
            other => Err(format!(
                "unknown backend {other:?} (expected embedded, postgres or both)"
            )),
        }
    }
}

pub struct BenchHttpConfig {
    /// PostgreSQL server to create the scratch database on.
    pub admin_database_url: String,
    pub backends: Backends,
    /// Concurrent keep-alive connections of the load generator.
    pub connections: usize,
    /// Measured duration of one run.
    pub seconds: u64,
    /// Load before each measured run, not recorded (connections, caches, pools).
    pub warmup_seconds: u64,
    pub rounds: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct HttpBenchReport {
    pub connections: usize,
    pub seconds: u64,
    pub warmup_seconds: u64,
    pub rounds: usize,
    pub backends: Vec<BackendReport>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BackendReport {
    /// `embedded` (SQLite) or `postgres`.
    pub backend: String,
    /// Median of the rounds, without the layer.
    pub bare: RunStats,
    /// Median of the rounds, with the layer (the service's router).
    pub layered: RunStats,
    /// Layered requests/s over bare requests/s (target: >= 0.85).
    pub ratio: f64,
    /// PostgreSQL only: the most the ratio could be on these cores if the layer cost the
    /// service nothing and only its statements' PostgreSQL CPU were added to the bare request's
    /// CPU: bare CPU / (bare CPU + layered PostgreSQL CPU − bare PostgreSQL CPU), per request.
    /// Meaningful when both variants keep the cores busy (`machine_busy` near 1).
    pub ratio_cpu_bound: Option<f64>,
    pub bare_rounds: Vec<RunStats>,
    pub layered_rounds: Vec<RunStats>,
}

/// One measured run (or, in [`BackendReport::bare`] / `layered`, each field's median over the
/// rounds).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunStats {
    pub requests: usize,
    pub req_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU per request over the measured window, µs, by process group (`seaport` is the
    /// service and the load generator together, `postgres` every backend). Per-process
    /// accounting on some VMs over-reports in absolute terms; compare bare with layered.
    pub cpu_us_per_request: BTreeMap<String, f64>,
    /// Share of all cores' time that was not idle over the measured window, 0 to 1.
    pub machine_busy: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bare,
    Layered,
}

pub async fn run(config: BenchHttpConfig) -> anyhow::Result<HttpBenchReport> {
    anyhow::ensure!(config.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(config.seconds > 0, "--seconds must be at least 1");
    anyhow::ensure!(config.rounds > 0, "--rounds must be at least 1");
    let (embedded, postgres) = (
        matches!(config.backends, Backends::Embedded | Backends::Both),
        matches!(config.backends, Backends::Postgres | Backends::Both),
    );
    let runs = config.rounds as u64 * 2 * (u64::from(embedded) + u64::from(postgres));
    let bar = progress::bar(runs, "bench-http runs");
    let mut backends = Vec::new();
    if embedded {
        backends.push(
            on_embedded(&config, bar.as_ref())
                .await
                .context("embedded (SQLite) run failed")?,
        );
    }
    if postgres {
        backends.push(
            on_postgres(&config, bar.as_ref())
                .await
                .context("PostgreSQL run failed")?,
        );
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(HttpBenchReport {
        connections: config.connections,
        seconds: config.seconds,
        warmup_seconds: config.warmup_seconds,
        rounds: config.rounds,
        backends,
    })
}

/// A short random tag for scratch names.
fn tag() -> String {
    let t = uuid::Uuid::now_v7().simple().to_string();
    t[t.len() - 10..].to_owned()
}

/// Removes the scratch directory of the embedded run, however the run ends.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the benchmark's scratch directory");
        }
    }
}

async fn on_embedded(config: &BenchHttpConfig, bar: Option<&ProgressBar>) -> anyhow::Result<BackendReport> {
    let dir = ScratchDir(std::env::temp_dir().join(format!("seaport-benchhttp-{}", tag())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("cannot create {}", dir.0.display()))?;
    let store = app::open_store(&Config::embedded(&dir.0)).await?;
    let result = measure(config, "embedded", &store, bar).await;
    store.close().await;
    result
}

async fn on_postgres(config: &BenchHttpConfig, bar: Option<&ProgressBar>) -> anyhow::Result<BackendReport> {
    let database =
        crate::bench::ScratchDatabase::create(&config.admin_database_url, "seaport_benchhttp", &tag()).await?;
    let result = async {
        let mut service = Config::embedded(std::env::temp_dir());
        service.database_url = Some(database.url.clone());
        let store = app::open_store(&service).await?;
        let result = measure(config, "postgres", &store, bar).await;
        store.close().await;
        result
    };
    let result = tokio::select! {
        r = result => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Dropped whatever happened above, Ctrl-C included.
    database.drop().await;
    result
}

/// A server on a free loopback port, stopped by [`Server::stop`].
struct Server {
    url: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(router: Router) -> anyhow::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen on 127.0.0.1")?;
        let addr = listener.local_addr().context("no local address")?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Ok(Server {
            url: format!("http://{addr}/cases"),
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(r) => r.context("the HTTP server panicked")?.context("the HTTP server failed"),
            Err(_) => {
                abort.abort();
                anyhow::bail!("the HTTP server did not stop within 10 s")
            }
        }
    }
}

/// Both servers on `store`, the rounds, the medians; `bar` counts the runs (on a terminal).
async fn measure(
    config: &BenchHttpConfig,
    backend: &str,
    store: &Db,
    bar: Option<&ProgressBar>,
) -> anyhow::Result<BackendReport> {
    let state = AppState {
        store: store.clone(),
        outbox: Outbox::new(),
        topics: app::Topics::default(),
        idempotency_retention: seaport::http::idempotency::DEFAULT_RETENTION,
        cursors: CursorCodec::from_db(store)
            .await
            .context("cannot load the cursor key")?,
        crm: None,
        webhooks: Arc::new(Webhooks::default()),
        broker: None,
        stream: String::new(),
    };
    // (a) The service's router, as `seaport serve --role api` builds it.
    let layered = Server::start(app::router(state.clone(), Role::Api)).await?;
    // (b) The same cases routes with the bare handler, under the same outer layer. The service's
    // other routes and fallbacks are left out: they are not on the path of `POST /cases`.
    let bare = match Server::start(
        Router::new()
            .merge(router_without_idempotency())
            .layer(CorrelationLayer)
            .with_state(state),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let _ = layered.stop().await;
            return Err(e);
        }
    };
    let outcome = async {
        let (mut bare_rounds, mut layered_rounds) = (Vec::new(), Vec::new());
        for round in 1..=config.rounds {
            for variant in [Variant::Bare, Variant::Layered] {
                let (url, rounds) = match variant {
                    Variant::Bare => (&bare.url, &mut bare_rounds),
                    Variant::Layered => (&layered.url, &mut layered_rounds),
                };
                let name = format!("{variant:?}").to_lowercase();
                if let Some(bar) = bar {
                    bar.set_message(format!("bench-http: {backend} {name} round {round}/{}", config.rounds));
                }
                let stats = drive(config, url)
                    .await
                    .with_context(|| format!("{variant:?} run {round}"))?;
                progress::line(
                    bar,
                    format!(
                        "{backend} {name:<7} round {round}/{}: {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                        config.rounds, stats.req_per_sec, stats.p50_ms, stats.p99_ms, stats.max_ms
                    ),
                );
                if let Some(bar) = bar {
                    bar.inc(1);
                }
                rounds.push(stats);
            }
        }
        let (bare_median, layered_median) = (median_stats(&bare_rounds), median_stats(&layered_rounds));
        anyhow::Ok(BackendReport {
            backend: backend.to_owned(),
            ratio: layered_median.req_per_sec / bare_median.req_per_sec,
            ratio_cpu_bound: cpu_bound(&bare_median, &layered_median),
            bare: bare_median,
            layered: layered_median,
            bare_rounds,
            layered_rounds,
        })
    }
    .await;
    let stopped = (bare.stop().await, layered.stop().await);
    let report = outcome?;
    stopped.0.context("stopping the bare server")?;
    stopped.1.context("stopping the layered server")?;
    Ok(report)
}

/// One run: `connections` closed-loop workers for the warm-up, then `seconds` measured.
/// Any non-2xx answer or transport error fails the run.
async fn drive(config: &BenchHttpConfig, url: &str) -> anyhow::Result<RunStats> {
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(config.warmup_seconds);
    let until = measure_from + Duration::from_secs(config.seconds);
    let mut workers = JoinSet::new();
    for worker in 0..config.connections {
        // One client per worker, one idle connection each: exactly `connections` sockets.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTP client")?;
        let url = url.to_owned();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut last_done = measure_from;
            let mut n = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                n += 1;
                let body = serde_json::json!({
                    "title": format!("Broken pump #{n} at site {worker}"),
                    "customer_id": format!("C-{}", (worker as u64 * 7919 + n) % 5000),
                    "description": "The pump in the basement leaks under load; water on the floor since Monday.",
                });
                let res = client
                    .post(&url)
                    .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                    .header("x-client-id", "bench-http")
                    .json(&body)
                    .send()
                    .await
                    .with_context(|| format!("POST {url} failed"))?;
                let status = res.status();
                let text = res
                    .text()
                    .await
                    .with_context(|| format!("cannot read the answer of POST {url}"))?;
                let done = Instant::now();
                anyhow::ensure!(status.is_success(), "POST {url} answered {status}: {text}");
                if sent >= measure_from {
                    latencies.push(done - sent);
                    last_done = done;
                }
            }
            anyhow::Ok((latencies, last_done))
        });
    }
    // Where the measured window's time went, read beside the workers.
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let before = cpu::Snapshot::take();
        tokio::time::sleep_until(until.into()).await;
        before.phase("post /cases", until - measure_from)
    });
    let _sampler_guard = AbortOnDrop(sampler.abort_handle());
    let mut all = Vec::new();
    let mut end = measure_from;
    while let Some(joined) = workers.join_next().await {
        // The first failure ends the run (dropping the set aborts the other workers).
        let (latencies, last_done) = joined.context("a load worker panicked")??;
        all.extend(latencies);
        end = end.max(last_done);
    }
    anyhow::ensure!(!all.is_empty(), "no request completed in the measured window");
    let window = sampler.await.context("the CPU sampler failed")?;
    let cpu_us_per_request = window
        .cpu_secs
        .iter()
        .map(|(group, secs)| (group.clone(), secs * 1e6 / all.len() as f64))
        .collect();
    all.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| ms(all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1]);
    Ok(RunStats {
        requests: all.len(),
        req_per_sec: all.len() as f64 / (end - measure_from).as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: ms(*all.last().expect("not empty")),
        cpu_us_per_request,
        machine_busy: window.machine_busy,
    })
}

/// See [`BackendReport::ratio_cpu_bound`]; `None` without PostgreSQL readings.
fn cpu_bound(bare: &RunStats, layered: &RunStats) -> Option<f64> {
    let pg = |s: &RunStats| s.cpu_us_per_request.get("postgres").copied().unwrap_or(0.0);
    let bare_total: f64 = bare.cpu_us_per_request.values().sum();
    (pg(bare) > 0.0 && bare_total > 0.0).then(|| bare_total / (bare_total + (pg(layered) - pg(bare)).max(0.0)))
}

/// Aborts a spawned task when a run ends early (a failed request).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Each figure's median over the rounds (so one noisy round moves none of them).
fn median_stats(rounds: &[RunStats]) -> RunStats {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        let mid = v.len() / 2;
        if v.len() % 2 == 0 {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        }
    }
    let of = |f: fn(&RunStats) -> f64| median(rounds.iter().map(f).collect());
    RunStats {
        requests: of(|r| r.requests as f64).round() as usize,
        req_per_sec: of(|r| r.req_per_sec),
        p50_ms: of(|r| r.p50_ms),
        p99_ms: of(|r| r.p99_ms),
        max_ms: of(|r| r.max_ms),
        cpu_us_per_request: rounds
            .iter()
            .flat_map(|r| r.cpu_us_per_request.keys())
            .map(|group| {
                let per_round = rounds
                    .iter()
                    .map(|r| r.cpu_us_per_request.get(group).copied().unwrap_or(0.0));
                (group.clone(), median(per_round.collect()))
            })
            .collect(),
        machine_busy: of(|r| r.machine_busy),
    }
}

pub fn print(report: &HttpBenchReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).context("cannot serialise the report")?
        );
        return Ok(());
    }
    println!(
        "POST /cases, {} connections, {} s per run after {} s warm-up, median of {} round(s); ratio = layered/bare req/s (target >= 0.85)",
        report.connections, report.seconds, report.warmup_seconds, report.rounds
    );
    println!(
        "{:<9} {:<8} {:>9} {:>8} {:>8} {:>8} {:>6}",
        "backend", "variant", "req/s", "p50 ms", "p99 ms", "max ms", "ratio"
    );
    for b in &report.backends {
        for (variant, s, ratio) in [
            ("bare", &b.bare, String::new()),
            ("layered", &b.layered, format!("{:.2}x", b.ratio)),
        ] {
            println!(
                "{:<9} {:<8} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>6}",
                b.backend, variant, s.req_per_sec, s.p50_ms, s.p99_ms, s.max_ms, ratio
            );
        }
    }
    println!("CPU per request (µs, medians; seaport = service + load generator) and how busy the cores were");
    for b in &report.backends {
        for (variant, s) in [("bare", &b.bare), ("layered", &b.layered)] {
            let parts: Vec<String> = s
                .cpu_us_per_request
                .iter()
                .map(|(group, us)| format!("{group} {us:.0}"))
                .collect();
            println!(
                "{:<9} {:<8} cores {:>3.0}% busy: {}",
                b.backend,
                variant,
                100.0 * s.machine_busy,
                parts.join(", ")
            );
        }
        if let Some(bound) = b.ratio_cpu_bound {
            println!(
                "{:<9} bound on these cores if the layer cost the service nothing: {bound:.2}x (bare CPU + the layer's PostgreSQL CPU)",
                b.backend
            );
        }
    }
    Ok(())
}
