//! Wiring: storage, broker, relay, consumers and the HTTP API of the sea service.
//!
//! Two deployments, one code path: SQLite + the embedded broker (default), or PostgreSQL + NATS
//! JetStream (`--database-url postgres://... --nats-url nats://...`). SQLite + JetStream works
//! too. Roles let each part scale on its own: `api` (HTTP), `relay` (outbox → broker, plus
//! retention), `worker` (the consumers), `all`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use seaport::broker::embedded::EmbeddedBroker;
use seaport::broker::jetstream::JetStreamBroker;
use seaport::broker::{Broker, ConsumerConfig};
use seaport::consumer::{ConsumerRunner, Handler, RunnerConfig};
use seaport::dead_letters::DeadLetterQueue;
use seaport::http::cursor::CursorCodec;
use seaport::http::{CorrelationLayer, Problem};
use seaport::on_pool;
use seaport::outbox::Outbox;
use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::retention::RetentionConfig;
use seaport::store::Db;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::consumers::{ANALYTICS, AUDIT, Analytics, Audit, CONTEXT, NOTIFICATIONS, Notifications, ServiceContext};
use crate::crm::CrmClient;
use crate::webhooks::Webhooks;

/// The service's migrations (its own tables; Seaport's come with the library).
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
pub static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Which parts of the service this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Api,
    Relay,
    Worker,
    All,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "api" => Ok(Role::Api),
            "relay" => Ok(Role::Relay),
            "worker" => Ok(Role::Worker),
            "all" => Ok(Role::All),
            other => Err(format!("unknown role {other:?} (expected api, relay, worker or all)")),
        }
    }
}

impl Role {
    fn api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }
    fn relay(self) -> bool {
        matches!(self, Role::Relay | Role::All)
    }
    fn worker(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }
}

/// Maps the service's event types (`sea.cases.created`) to broker subjects under a root, so
/// several independent deployments (or tests) can share one NATS server.
#[derive(Clone, Debug)]
pub struct Topics {
    pub root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics { root: "sea".to_owned() }
    }
}

impl Topics {
    pub fn topic(&self, event_type: &str) -> String {
        match event_type.strip_prefix("sea.") {
            Some(rest) => format!("{}.{rest}", self.root),
            None => event_type.to_owned(),
        }
    }

    pub fn filter(&self) -> String {
        format!("{}.>", self.root)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `postgres://...`; `None` = SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// `nats://...`; `None` = the embedded broker (SQLite only).
    pub nats_url: Option<String>,
    pub role: Role,
    /// Broker stream name and subject root.
    pub stream: String,
    pub topics: Topics,
    pub idempotency_retention: Duration,
    /// Redelivery delay of a message whose consumer neither acked nor nak'ed it.
    pub ack_wait: Duration,
    /// Failed attempts before a message goes to the dead letters.
    pub max_attempts: u32,
    /// Deliveries a consumer commits in one transaction when a backlog has queued up (1: one
    /// transaction per delivery; see `seaport::consumer`, "Batched transactions").
    pub consumer_batch: usize,
    /// The CRM customers are looked up in (`None`: cases are opened `unverified`).
    pub crm_url: Option<String>,
    /// Longest wait for one CRM answer.
    pub crm_timeout: Duration,
    /// The webhook receivers and their secrets (none configured: every webhook route is 404).
    pub webhooks: Webhooks,
    pub retention: RetentionConfig,
    /// Enables replay in the admin console (`None`: the console is read-only). Redacted in
    /// `Debug`.
    pub admin_token: Option<crate::admin::AdminToken>,
}

impl Config {
    /// Defaults of the embedded deployment, with data in `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            data_dir: data_dir.into(),
            database_url: None,
            nats_url: None,
            role: Role::All,
            stream: "SEA".to_owned(),
            topics: Topics::default(),
            idempotency_retention: Duration::from_secs(24 * 3600),
            ack_wait: Duration::from_secs(30),
            max_attempts: 5,
            consumer_batch: 32,
            crm_url: None,
            crm_timeout: Duration::from_secs(2),
            webhooks: Webhooks::default(),
            retention: RetentionConfig::default(),
            admin_token: None,
        }
    }

    /// The delivery policy of the consumer `durable`: the default middleware stack, dead
    /// letters also announced on `{STREAM}_DLQ`.
    pub fn runner_config(&self, durable: &str) -> RunnerConfig {
        let mut consumer = ConsumerConfig::new(durable, self.topics.filter());
        consumer.ack_wait = self.ack_wait;
        let mut runner = RunnerConfig::new(consumer);
        runner.max_attempts = self.max_attempts;
        runner.transaction_batch = self.consumer_batch;
        runner.handler_timeout = runner.handler_timeout.min(self.ack_wait.mul_f64(0.8));
        runner.dead_letter_queue = Some(DeadLetterQueue::beside(&self.stream, &self.topics.root));
        runner
    }

    /// Refuse settings under which duplicates could slip through: inbox records must outlive
    /// every redelivery of the messages they guard.
    pub fn validate(&self) -> anyhow::Result<()> {
        let horizon = self.runner_config(ANALYTICS).redelivery_horizon();
        self.retention.check_inbox_covers(horizon)?;
        anyhow::ensure!(self.max_attempts >= 1, "--max-attempts must be at least 1");
        Ok(())
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("seaport.db")
    }

    /// Where the data is, for messages (never includes a password).
    pub fn database_label(&self) -> String {
        match &self.database_url {
            Some(url) => match url.split_once('@') {
                Some((_, host)) => format!("postgres://…@{host}"),
                None => url.clone(),
            },
            None => self.database_path().display().to_string(),
        }
    }
}

/// What every request handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Db,
    pub outbox: Outbox,
    pub topics: Topics,
    pub idempotency_retention: Duration,
    /// Signs and checks pagination cursors (key shared through the database).
    pub cursors: CursorCodec,
    /// The CRM behind the anti-corruption layer and its breaker; `None`: customers unverified.
    pub crm: Option<CrmClient>,
    pub webhooks: Arc<Webhooks>,
    /// The broker and stream, for the consumers' state in `/metrics` and the admin console
    /// (`None`: not shown).
    pub broker: Option<Arc<dyn Broker>>,
    pub stream: String,
}

/// Open the database (creating a SQLite file if needed), apply Seaport's and the service's
/// migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Db> {
    let target = match &config.database_url {
        Some(url) => url.clone(),
        None => config.database_path().display().to_string(),
    };
    let db = Db::open(&target)
        .await
        .with_context(|| format!("cannot open the database {}", config.database_label()))?;
    match &db {
        Db::Sqlite(s) => SQLITE_MIGRATOR.run(s.pool()).await,
        Db::Postgres(p) => POSTGRES_MIGRATOR.run(p.pool()).await,
    }
    .context("cannot apply the service's migrations")?;
    Ok(db)
}

pub fn router(state: AppState, role: Role) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/metrics", get(crate::observe::route));
    if role.api() {
        router = router
            .merge(crate::cases::routes::router(&state))
            .merge(crate::webhooks::router())
            .route("/trace/{correlation_id}", get(crate::trace::route))
            .merge(crate::admin::router());
    }
    router
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this resource",
            )
        })
        .layer(CorrelationLayer)
        .with_state(state)
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    responses(
        (status = 200, description = "The database answers", body = crate::openapi::Health),
        (status = 503, description = "The database does not answer", content_type = "application/problem+json", body = crate::openapi::Problem),
    )
)]
pub async fn healthz(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> Result<axum::Json<serde_json::Value>, Problem> {
    on_pool!(&app.store, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ())).map_err(|e| {
        tracing::error!(error = %e, "health check failed");
        Problem::new(http::StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    })?;
    let breakers: Vec<_> = app.crm.iter().map(|crm| crm.breaker()).collect();
    Ok(axum::Json(serde_json::json!({"status": "ok", "breakers": breakers})))
}

/// A running service: its address, and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Running {
    /// Stop accepting requests, let in-flight work finish, stop relay and consumers.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        while let Some(r) = self.tasks.join_next().await {
            r.context("a service task panicked")??;
        }
        Ok(())
    }

    /// Wait until a task ends on its own (an error), or `stop` resolves.
    pub async fn until(mut self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = stop => self.shutdown().await,
            Some(r) = self.tasks.join_next() => {
                let _ = self.stop.send(true);
                r.context("a service task panicked")??;
                anyhow::bail!("a service task stopped unexpectedly")
            }
        }
    }
}

/// The broker of this deployment.
pub async fn connect_broker(config: &Config, db: &Db) -> anyhow::Result<Arc<dyn Broker>> {
    let broker: Arc<dyn Broker> = match (&config.nats_url, db) {
        (Some(url), _) => Arc::new(
            JetStreamBroker::connect(url)
                .await
                .with_context(|| format!("cannot use NATS at {url}"))?,
        ),
        (None, Db::Sqlite(s)) => Arc::new(EmbeddedBroker::new(s)),
        (None, Db::Postgres(_)) => anyhow::bail!(
            "PostgreSQL needs a real broker: pass --nats-url nats://... (the embedded broker lives in the SQLite file)"
        ),
    };
    broker
        .ensure_stream(&config.stream, &[&config.topics.filter()])
        .await
        .with_context(|| format!("cannot create the {} stream", config.stream))?;
    Ok(broker)
}

/// Start the parts of the service that `config.role` names.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    config.validate()?;
    // Before anything counts: the recorder must exist when the first metric is recorded.
    crate::observe::prometheus();
    let store = open_store(&config).await?;
    let broker = connect_broker(&config, &store).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();

    if config.role.relay() {
        let relay = Relay::new(store.clone(), broker.clone(), RelayConfig::default());
        let r = stopped.clone();
        tasks.spawn(async move {
            relay.run(r).await;
            Ok(())
        });
        let (db, retention, r) = (store.clone(), config.retention.clone(), stopped.clone());
        tasks.spawn(async move {
            seaport::retention::run(db, retention, r).await;
            Ok(())
        });
    }

    if config.role.worker() {
        let all = config.topics.filter();
        let handlers: [(&str, String, Arc<dyn Handler>); 4] = [
            (ANALYTICS, all.clone(), Arc::new(Analytics)),
            (
                NOTIFICATIONS,
                all.clone(),
                Arc::new(Notifications {
                    topics: config.topics.clone(),
                }),
            ),
            (AUDIT, all, Arc::new(Audit)),
            (
                CONTEXT,
                ServiceContext::filter(&config.topics),
                Arc::new(ServiceContext {
                    topics: config.topics.clone(),
                }),
            ),
        ];
        for (name, filter, handler) in handlers {
            let mut runner_config = config.runner_config(name);
            runner_config.consumer.filter_subject = filter;
            let runner = ConsumerRunner::new(store.clone(), broker.clone(), &config.stream, runner_config, handler);
            let r = stopped.clone();
            tasks.spawn(async move { runner.run(r).await.with_context(|| format!("consumer {name} failed")) });
        }
    }

    let state = AppState {
        store: store.clone(),
        outbox: Outbox::new(),
        topics: config.topics.clone(),
        idempotency_retention: config.idempotency_retention,
        cursors: CursorCodec::from_db(&store)
            .await
            .context("cannot load the cursor key")?,
        crm: config
            .crm_url
            .as_deref()
            .map(|url| CrmClient::new(url, config.crm_timeout))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        webhooks: Arc::new(config.webhooks.clone()),
        broker: Some(broker.clone()),
        stream: config.stream.clone(),
    };
    let mut app = router(state, config.role);
    // The admin console allows replay only with a token in the request's extensions.
    if let Some(token) = &config.admin_token {
        app = app.layer(axum::Extension(token.clone()));
    }
    let mut r = stopped.clone();
    tasks.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = r.wait_for(|s| *s).await;
            })
            .await
            .context("HTTP server failed")
    });
    tracing::info!(%addr, role = ?config.role, db = %config.database_label(), broker = config.nats_url.as_deref().unwrap_or("embedded"), "seaport serving");
    Ok(Running { addr, stop, tasks })
}
