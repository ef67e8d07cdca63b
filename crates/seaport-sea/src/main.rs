//! `seaport`: the reference service and its operator commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use seaport_sea::app::{self, Config, Role};
use seaport_sea::progress;

/// mimalloc instead of glibc malloc: the relay, the consumers and the HTTP layers allocate per
/// message and per request from many threads, where glibc's arenas cost a third of the relay
/// process's CPU (profile in BENCHMARKS.md). A choice of this binary, not of the library.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "seaport",
    version,
    about = "Seaport: the sea cases service and its operator commands"
)]
struct Cli {
    /// Where the embedded database lives (`<dir>/seaport.db`).
    #[arg(long, global = true, env = "SEAPORT_DATA_DIR", default_value = "./seaport-data")]
    data_dir: PathBuf,
    /// PostgreSQL instead of SQLite, e.g. postgres://postgres@127.0.0.1/seaport.
    #[arg(long, global = true, env = "SEAPORT_DATABASE_URL")]
    database_url: Option<String>,
    /// Export trace spans to this OpenTelemetry collector (OTLP/HTTP, spans to `<url>/v1/traces`),
    /// e.g. http://127.0.0.1:4318. Off unless given; needs a build with `--features otlp`.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: HTTP API, outbox relay and the fan-out consumers.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "SEAPORT_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// How long stored idempotent responses are kept, in hours.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
        idempotency_retention_hours: u64,
        /// NATS JetStream instead of the embedded broker, e.g. nats://127.0.0.1:4222.
        #[arg(long, env = "SEAPORT_NATS_URL")]
        nats_url: Option<String>,
        /// Which parts to run: api, relay, worker or all.
        #[arg(long, env = "SEAPORT_ROLE", default_value = "all")]
        role: Role,
        /// Broker stream of the service's events.
        #[arg(long, default_value = "SEA")]
        stream: String,
        /// Subject root of the service's events (`<root>.cases.created`, consumers on `<root>.>`).
        #[arg(long, default_value = "sea")]
        subject_root: String,
        /// Inbox records are deleted after this many hours (must exceed any redelivery horizon).
        #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=87600))]
        inbox_retention_hours: u64,
        /// Accepted and ignored, so that older command lines still start: the relay deletes each
        /// outbox row once the broker confirmed it, so there are no published rows to keep.
        #[arg(long, hide = true)]
        outbox_retention_hours: Option<u64>,
        /// How long a consumer may hold a message unacknowledged before it is delivered again
        /// (e.g. after the process died mid-handler).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        ack_wait_secs: u64,
        /// Failed attempts before a message goes to the dead letters (`seaport dlq list`).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        max_attempts: u32,
        /// Deliveries a consumer commits in one transaction when a backlog has queued up
        /// (1 = a transaction per delivery). A failure in a batch reprocesses its deliveries one
        /// by one.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1000))]
        consumer_batch: u64,
        /// The CRM customers are looked up in (behind a circuit breaker; cached or `unverified`
        /// fallback), e.g. http://127.0.0.1:8090 from `seaport demo-crm`.
        #[arg(long, env = "SEAPORT_CRM_URL")]
        crm_url: Option<String>,
        /// Longest wait for one CRM answer, in milliseconds.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60000))]
        crm_timeout_ms: u64,
        /// Stripe endpoint secrets (`whsec_...`), comma-separated while rotating; enables
        /// `POST /webhooks/stripe`. Prefer the environment: flags show in `ps`.
        #[arg(
            long,
            env = "SEAPORT_STRIPE_WEBHOOK_SECRET",
            value_delimiter = ',',
            hide_env_values = true
        )]
        stripe_webhook_secret: Vec<String>,
        /// GitHub webhook secret; enables `POST /webhooks/github`.
        #[arg(long, env = "SEAPORT_GITHUB_WEBHOOK_SECRET", hide_env_values = true)]
        github_webhook_secret: Option<String>,
        /// A Standard Webhooks source, `NAME=whsec_...` (repeatable; in the environment
        /// comma-separated); enables `POST /webhooks/NAME`. Give a name twice to rotate secrets.
        #[arg(
            long = "webhook-source",
            env = "SEAPORT_WEBHOOK_SOURCES",
            value_delimiter = ',',
            hide_env_values = true
        )]
        webhook_sources: Vec<String>,
        /// Enables replay in the admin console (`/admin`, read-only without it); at least 16
        /// characters. Prefer the environment: flags show in `ps`.
        #[arg(long, env = "SEAPORT_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Fault injection: run the service as separate processes, load it with idempotent
    /// requests, kill -9 processes (and NATS) meanwhile, then check the history for lost
    /// acknowledgements and duplicate effects. Exits non-zero on any violation.
    Chaos {
        /// Run the embedded default (one process on SQLite) instead of the distributed setup.
        #[arg(long)]
        embedded: bool,
        /// PostgreSQL server to make a scratch database on (distributed setup).
        #[arg(
            long,
            env = "SEAPORT_TEST_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        postgres: String,
        /// The nats-server binary (a private server is started on a free port).
        #[arg(long, default_value = "nats-server")]
        nats_server: String,
        #[arg(long, default_value_t = 300)]
        requests: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Requests per second offered, so the load overlaps the kills.
        #[arg(long, default_value_t = 25.0)]
        rate: f64,
        /// Milliseconds between two kills.
        #[arg(long, default_value_t = 1500)]
        kill_every_ms: u64,
        /// Seconds to wait for the system to settle after the load.
        #[arg(long, default_value_t = 90)]
        settle_secs: u64,
    },
    /// Run a small stand-in CRM (the external model: cust_id, full_name, email_address) for
    /// demos and tests, with injectable latency, outages and malformed records.
    DemoCrm {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of requests answered 503, 0.0-1.0.
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        failure_rate: f64,
        /// Share of answers with a malformed record, 0.0-1.0.
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        bad_data_rate: f64,
    },
    /// Inspect the outbox.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Retention: delete published outbox rows, old inbox records and expired idempotency keys.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Measure relay throughput and commit-to-publish latency on PostgreSQL + JetStream, beside
    /// the raw JetStream publish rate of the same run.
    Bench {
        /// PostgreSQL server to create a scratch database on.
        #[arg(
            long,
            env = "SEAPORT_BENCH_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        admin_database_url: String,
        #[arg(long, env = "SEAPORT_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Events in the pre-filled outbox (throughput).
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        /// Steady write rate for the latency run, events per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Duration of the latency run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent writers in the latency run.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long)]
        json: bool,
    },
    /// Measure POST /cases requests/s and latency (p50, p99) over real HTTP with the
    /// Idempotency-Key layer vs the same handler without it, on SQLite and PostgreSQL.
    BenchHttp {
        /// PostgreSQL server to create a scratch database on.
        #[arg(
            long,
            env = "SEAPORT_BENCH_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        admin_database_url: String,
        /// Which databases: embedded (SQLite), postgres or both.
        #[arg(long, default_value = "both")]
        backend: seaport_sea::bench_http::Backends,
        /// Concurrent keep-alive connections, each sending requests back-to-back.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
        connections: u64,
        /// Measured duration of each run.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
        /// Unrecorded load before each measured run.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=600))]
        warmup_seconds: u64,
        /// Rounds of (bare, layered) runs; the median round of each is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Print the report (every round included) as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure the peak RSS of a relay and a worker process (`serve --role ...`) draining a
    /// pre-filled backlog at several sizes, on PostgreSQL + JetStream: it must not grow with the
    /// backlog.
    BenchBacklog {
        /// PostgreSQL server to create the scratch databases on.
        #[arg(
            long,
            env = "SEAPORT_BENCH_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        admin_database_url: String,
        #[arg(long, env = "SEAPORT_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Backlog sizes (events in the pre-filled outbox), comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 1_000_000])]
        backlogs: Vec<usize>,
        /// Fail when a drain makes no progress for this many seconds.
        #[arg(long, default_value_t = 60)]
        stall_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: messages a consumer could not process within its deliveries.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Print the causal tree of events and effects of one correlation id.
    Trace {
        correlation_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// All dead letters, oldest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with its headers and payload.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their consumer (other consumers' inboxes drop the copy).
    Replay {
        /// The dead letter to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Replay every dead letter not replayed yet.
        #[arg(long)]
        all: bool,
        /// The deployment's NATS JetStream (omit on the embedded broker).
        #[arg(long, env = "SEAPORT_NATS_URL")]
        nats_url: Option<String>,
        #[arg(long, default_value = "SEA")]
        stream: String,
        #[arg(long, default_value = "sea")]
        subject_root: String,
        /// Print `{"replayed": [ids]}` instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Backlog (unpublished and failing rows) and the age of the oldest unpublished event.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Sweep now, as `seaport serve` does every minute, round after round until a round deletes
    /// nothing: inbox records older than their retention, idempotency keys past their expiry
    /// (outbox rows need no sweep: the relay deletes each one once the broker confirmed it). Each batch is its own short transaction; safe beside a running
    /// service (one sweeper at a time on PostgreSQL).
    Sweep {
        /// Inbox records older than this many hours are deleted. Keep the service's value: it
        /// must exceed the redelivery horizon, or a late duplicate would run its handler again.
        #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=87600))]
        inbox_retention_hours: u64,
        /// Accepted and ignored (see `serve`).
        #[arg(long, hide = true)]
        outbox_retention_hours: Option<u64>,
        /// Rows of each kind deleted per transaction.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        batch: u64,
        /// Print one JSON object: `{"inbox_records", "idempotency_keys", "rounds", "skipped"}`.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    // An endpoint only inherited from the environment does not stop a build without OTLP.
    let endpoint_from_env = matches.value_source("otlp_endpoint") == Some(clap::parser::ValueSource::EnvVariable);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let telemetry = match seaport_sea::logging::init(cli.otlp_endpoint.as_deref(), endpoint_from_env) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("seaport: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seaport: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seaport: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            idempotency_retention_hours,
            ack_wait_secs,
            max_attempts,
            consumer_batch,
            crm_url,
            crm_timeout_ms,
            stripe_webhook_secret,
            github_webhook_secret,
            webhook_sources,
            admin_token,
            nats_url,
            role,
            stream,
            subject_root,
            inbox_retention_hours,
            outbox_retention_hours,
        } => {
            warn_outbox_retention(outbox_retention_hours);
            anyhow::ensure!(
                seaport::broker::valid_durable(&stream),
                "--stream {stream:?} is not a valid stream name"
            );
            anyhow::ensure!(
                seaport::broker::valid_subject(&subject_root),
                "--subject-root {subject_root:?} is not a valid subject"
            );
            let mut config = Config::embedded(cli.data_dir);
            config.listen = listen;
            config.database_url = cli.database_url;
            config.nats_url = nats_url;
            config.role = role;
            config.stream = stream;
            config.topics = app::Topics { root: subject_root };
            config.idempotency_retention = Duration::from_secs(idempotency_retention_hours * 3600);
            config.ack_wait = Duration::from_secs(ack_wait_secs);
            config.max_attempts = max_attempts;
            config.consumer_batch = consumer_batch as usize;
            config.crm_url = crm_url;
            config.crm_timeout = Duration::from_millis(crm_timeout_ms);
            config.webhooks = seaport_sea::webhooks::Webhooks::configure(
                &stripe_webhook_secret,
                github_webhook_secret.as_deref(),
                &webhook_sources,
            )?;
            config.admin_token = seaport_sea::admin::AdminToken::configure(admin_token.as_deref())?;
            config.retention.inbox = Duration::from_secs(inbox_retention_hours * 3600);
            let running = app::start(config).await?;
            println!("seaport listening on http://{}", running.addr);
            running.until(shutdown_signal()).await
        }
        Command::Chaos {
            embedded,
            postgres,
            nats_server,
            requests,
            concurrency,
            rate,
            kill_every_ms,
            settle_secs,
        } => {
            let summary = seaport_sea::chaos::run(seaport_sea::chaos::ChaosConfig {
                postgres_admin_url: (!embedded).then_some(postgres),
                nats_server,
                requests,
                concurrency,
                rate,
                kill_every: Duration::from_millis(kill_every_ms),
                settle_timeout: Duration::from_secs(settle_secs),
            })
            .await?;
            println!("{summary}");
            seaport_sea::chaos::verdict(&summary)
        }
        Command::DemoCrm {
            listen,
            latency_ms,
            failure_rate,
            bad_data_rate,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let config = seaport_sea::crm::demo::DemoCrmConfig {
                latency: Duration::from_millis(latency_ms),
                failure_rate,
                bad_data_rate,
            };
            println!("demo CRM listening on http://{}", listener.local_addr()?);
            axum::serve(listener, seaport_sea::crm::demo::router(config))
                .with_graceful_shutdown(shutdown_signal())
                .await?;
            Ok(())
        }
        Command::Outbox {
            command: OutboxCommand::Status { json },
        } => {
            let store = open_existing(&cli.data_dir, cli.database_url).await?;
            let s = seaport::outbox::status(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("unpublished: {}", s.unpublished);
                println!("failing:     {}", s.failing);
                match s.oldest_unpublished_age_ms {
                    Some(ms) => println!("oldest unpublished: {:.3} s ago", ms as f64 / 1000.0),
                    None => println!("oldest unpublished: none (relay is caught up)"),
                }
            }
            Ok(())
        }
        Command::Retention {
            command:
                RetentionCommand::Sweep {
                    inbox_retention_hours,
                    outbox_retention_hours,
                    batch,
                    json,
                },
        } => {
            warn_outbox_retention(outbox_retention_hours);
            let store = open_existing(&cli.data_dir, cli.database_url).await?;
            let config = seaport::retention::RetentionConfig {
                inbox: Duration::from_secs(inbox_retention_hours * 3600),
                batch: batch as i64,
                ..Default::default()
            };
            let totals = retention_sweep(&store, &config, json).await;
            store.close().await;
            let totals = totals?;
            if json {
                println!("{}", serde_json::to_string(&totals)?);
            } else {
                println!(
                    "deleted {} inbox records and {} expired idempotency keys in {} round{}",
                    totals.inbox,
                    totals.idempotency_keys,
                    totals.rounds,
                    if totals.rounds == 1 { "" } else { "s" }
                );
                if totals.skipped {
                    println!(
                        "skipped: another instance is sweeping (it holds the sweeper lock); the rest is left to it"
                    );
                }
            }
            Ok(())
        }
        Command::Bench {
            admin_database_url,
            nats_url,
            events,
            rate,
            seconds,
            writers,
            json,
        } => {
            let (bare, guarded) = seaport_sea::bench::breaker_overhead(200_000, 7).await;
            eprintln!(
                "circuit breaker (closed): {guarded:.0} ns/call vs {bare:.0} ns bare: {:.0} ns overhead",
                guarded - bare
            );
            let report = seaport_sea::bench::run(seaport_sea::bench::BenchConfig {
                database_admin_url: admin_database_url,
                nats_url,
                events,
                rate,
                seconds,
                writers,
                json,
            })
            .await?;
            seaport_sea::bench::print(&report, json);
            Ok(())
        }
        Command::BenchBacklog {
            admin_database_url,
            nats_url,
            backlogs,
            stall_secs,
            json,
        } => {
            let report = seaport_sea::bench_backlog::run(seaport_sea::bench_backlog::BacklogConfig {
                admin_database_url,
                nats_url,
                backlogs,
                stall_timeout: Duration::from_secs(stall_secs),
            })
            .await?;
            seaport_sea::bench_backlog::print(&report, json)
        }
        Command::BenchHttp {
            admin_database_url,
            backend,
            connections,
            seconds,
            warmup_seconds,
            rounds,
            json,
        } => {
            let report = seaport_sea::bench_http::run(seaport_sea::bench_http::BenchHttpConfig {
                admin_database_url,
                backends: backend,
                connections: connections as usize,
                seconds,
                warmup_seconds,
                rounds: rounds as usize,
            })
            .await?;
            seaport_sea::bench_http::print(&report, json)
        }
        Command::Dlq { command } => {
            let store = open_existing(&cli.data_dir, cli.database_url.clone()).await?;
            match command {
                DlqCommand::List { json } => {
                    let all = seaport::dead_letters::list(&store).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else if all.is_empty() {
                        println!("no dead letters");
                    } else {
                        for d in all {
                            let replayed = if d.replays > 0 {
                                format!(", replayed {}x", d.replays)
                            } else {
                                String::new()
                            };
                            println!(
                                "#{} {} {} (message {}, {} deliveries{replayed}): {}",
                                d.id, d.consumer, d.subject, d.message_id, d.delivery_count, d.last_error
                            );
                        }
                    }
                }
                DlqCommand::Show { id, json } => {
                    let (d, headers, payload) = seaport::dead_letters::get(&store, id)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("no dead letter with id {id}"))?;
                    let payload_text = String::from_utf8_lossy(&payload).into_owned();
                    if json {
                        let payload: serde_json::Value =
                            serde_json::from_slice(&payload).unwrap_or(serde_json::Value::String(payload_text));
                        println!(
                            "{}",
                            serde_json::to_string_pretty(
                                &serde_json::json!({"dead_letter": d, "headers": headers, "payload": payload})
                            )?
                        );
                    } else {
                        println!(
                            "dead letter #{}\nconsumer:   {}\nstream:     {} (seq {})\nsubject:    {}\nmessage id: {}\ndeliveries: {}\nlast error: {}\nreplays:    {}",
                            d.id,
                            d.consumer,
                            d.stream,
                            d.stream_seq,
                            d.subject,
                            d.message_id,
                            d.delivery_count,
                            d.last_error,
                            d.replays
                        );
                        for (k, v) in headers {
                            println!("header {k}: {v}");
                        }
                        println!("payload: {payload_text}");
                    }
                }
                DlqCommand::Replay {
                    id,
                    all,
                    nats_url,
                    stream,
                    subject_root,
                    json,
                } => {
                    let mut config = Config::embedded(&cli.data_dir);
                    config.database_url = cli.database_url;
                    config.nats_url = nats_url;
                    config.stream = stream;
                    config.topics = app::Topics { root: subject_root };
                    let broker = app::connect_broker(&config, &store).await?;
                    let ids: Vec<i64> = match id {
                        Some(id) => vec![id],
                        None if all => seaport::dead_letters::list(&store)
                            .await?
                            .into_iter()
                            .filter(|d| d.replays == 0)
                            .map(|d| d.id)
                            .collect(),
                        None => anyhow::bail!("give a dead letter id or --all"),
                    };
                    // A bar on a terminal for long replays; plain lines (or JSON) otherwise.
                    let bar = progress::bar(ids.len() as u64, "replaying dead letters");
                    let mut replayed = Vec::with_capacity(ids.len());
                    for id in &ids {
                        seaport::dead_letters::replay(&store, broker.as_ref(), *id)
                            .await
                            .with_context(|| {
                                format!("replay of dead letter #{id} failed (replayed before it: {replayed:?})")
                            })?;
                        replayed.push(*id);
                        match &bar {
                            Some(bar) => bar.inc(1),
                            None if !json => println!("replayed dead letter #{id}"),
                            None => {}
                        }
                    }
                    if let Some(bar) = bar {
                        bar.finish_with_message(format!("replayed {} dead letters", replayed.len()));
                    }
                    if json {
                        println!("{}", serde_json::json!({ "replayed": replayed }));
                    } else if ids.is_empty() {
                        println!("nothing to replay");
                    }
                }
            }
            Ok(())
        }
        Command::Trace { correlation_id, json } => {
            anyhow::ensure!(
                seaport::http::correlation::valid_id(&correlation_id),
                "{correlation_id:?} is not a valid correlation id"
            );
            let store = open_existing(&cli.data_dir, cli.database_url).await?;
            let trace = seaport_sea::trace::load(&store, &correlation_id).await?;
            anyhow::ensure!(
                !trace.events.is_empty(),
                "no events recorded for correlation id {correlation_id}"
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&trace)?);
            } else {
                println!("correlation {}", trace.correlation_id);
                for e in &trace.events {
                    let pad = "  ".repeat(e.depth + 1);
                    println!(
                        "{pad}{} {} (subject {}, caused by {})",
                        e.ty,
                        e.id,
                        e.subject.as_deref().unwrap_or("-"),
                        e.causation_id.as_deref().unwrap_or("-")
                    );
                    for c in &e.consumers {
                        println!(
                            "{pad}  ├ {} at {}: {}",
                            c.consumer,
                            c.processed_at,
                            if c.effects.is_empty() {
                                "no effect".to_owned()
                            } else {
                                c.effects.join("; ")
                            }
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

/// What `seaport retention sweep` deleted over all its rounds (its `--json` output).
#[derive(Debug, Default, serde::Serialize)]
struct SweepTotals {
    #[serde(rename = "inbox_records")]
    inbox: u64,
    idempotency_keys: u64,
    /// `sweep_once` calls, the last one included (it found nothing, or was skipped).
    rounds: u64,
    /// A round found another instance sweeping (PostgreSQL): stopped there, not an error.
    skipped: bool,
}

/// `sweep_once` until a round deletes nothing (or another instance holds the sweeper lock).
/// A bar sized by what is eligible on a terminal; else one stderr line per round that deleted
/// something (none with `--json`).
async fn retention_sweep(
    store: &seaport::store::Db,
    config: &seaport::retention::RetentionConfig,
    json: bool,
) -> anyhow::Result<SweepTotals> {
    let bar = if progress::on_terminal() {
        // Counting a large table takes a moment too.
        let counting = progress::spinner("counting the rows to delete");
        let eligible = seaport::retention::eligible(store, config).await;
        if let Some(spinner) = counting {
            spinner.finish_and_clear();
        }
        let eligible = eligible.context("cannot count the rows to delete")?;
        progress::bar(eligible.total(), "sweeping")
    } else {
        None
    };
    let mut totals = SweepTotals::default();
    loop {
        let swept = seaport::retention::sweep_once(store, config)
            .await
            .with_context(|| format!("retention sweep round {} failed", totals.rounds + 1))?;
        totals.rounds += 1;
        totals.inbox += swept.inbox;
        totals.idempotency_keys += swept.idempotency_keys;
        let deleted = swept.inbox + swept.idempotency_keys;
        match &bar {
            Some(bar) => {
                // Rows may become eligible while the sweep runs: grow the bar rather than overflow.
                let done = totals.inbox + totals.idempotency_keys;
                if done > bar.length().unwrap_or(0) {
                    bar.set_length(done);
                }
                bar.set_message(format!(
                    "sweeping (inbox {}, keys {})",
                    totals.inbox, totals.idempotency_keys
                ));
                bar.set_position(done);
            }
            None if !json && deleted > 0 => eprintln!(
                "round {}: deleted {} inbox records, {} idempotency keys",
                totals.rounds, swept.inbox, swept.idempotency_keys
            ),
            None => {}
        }
        if swept.skipped {
            totals.skipped = true;
            break;
        }
        if deleted == 0 {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(totals)
}

/// Operator commands read an existing database; they never create an empty one by mistake.
async fn open_existing(data_dir: &std::path::Path, database_url: Option<String>) -> anyhow::Result<seaport::store::Db> {
    let mut config = Config::embedded(data_dir);
    if database_url.is_none() {
        let path = config.database_path();
        anyhow::ensure!(
            path.exists(),
            "no database at {} (start `seaport serve` first, or pass --data-dir)",
            path.display()
        );
    }
    config.database_url = database_url;
    app::open_store(&config).await
}

/// `--outbox-retention-hours` was given: say that it no longer does anything.
fn warn_outbox_retention(given: Option<u64>) {
    if given.is_some() {
        eprintln!(
            "seaport: warning: --outbox-retention-hours is ignored: the relay deletes each outbox row once the broker confirmed it"
        );
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0.0 and 1.0")),
    }
}
