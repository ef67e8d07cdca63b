//! Wiring: storage, broker, relay, consumers and the HTTP API of the sea service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use seaport::broker::embedded::EmbeddedBroker;
use seaport::broker::{Broker, ConsumerConfig};
use seaport::consumer::{ConsumerRunner, Handler, RunnerConfig};
use seaport::http::{CorrelationLayer, Problem};
use seaport::outbox::Outbox;
use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::store::sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::consumers::{ANALYTICS, AUDIT, Analytics, Audit, NOTIFICATIONS, Notifications};

/// The stream every sea event goes to.
pub const STREAM: &str = "SEA";
pub const SUBJECTS: &str = "sea.>";

/// The service's migrations (its own tables; Seaport's come with the library).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub idempotency_retention: Duration,
    /// Redelivery delay of a message whose consumer neither acked nor nak'ed it.
    pub ack_wait: Duration,
}

impl Config {
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("seaport.db")
    }
}

/// What every request handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: SqliteStore,
    pub outbox: Outbox,
    pub idempotency_retention: Duration,
}

/// Open the database (creating it), apply Seaport's and the service's migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<SqliteStore> {
    let path = config.database_path();
    let store = SqliteStore::open(&path)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    MIGRATOR
        .run(store.pool())
        .await
        .context("cannot apply the service's migrations")?;
    Ok(store)
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(crate::cases::routes::router())
        .route("/trace/{correlation_id}", get(crate::trace::route))
        .route("/healthz", get(healthz))
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

async fn healthz(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> Result<axum::Json<serde_json::Value>, Problem> {
    sqlx::query("SELECT 1").execute(app.store.pool()).await.map_err(|e| {
        tracing::error!(error = %e, "health check failed");
        Problem::new(http::StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    })?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
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

/// Start everything: HTTP API, relay, and the three fan-out consumers.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let store = open_store(&config).await?;
    let broker = Arc::new(EmbeddedBroker::new(&store));
    broker
        .ensure_stream(STREAM, &[SUBJECTS])
        .await
        .context("cannot create the SEA stream")?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let relay = Relay::new(store.clone(), broker.clone(), RelayConfig::default());
    let r = stopped.clone();
    tasks.spawn(async move {
        relay.run(r).await;
        Ok(())
    });

    let handlers: [(&str, Arc<dyn Handler>); 3] = [
        (ANALYTICS, Arc::new(Analytics)),
        (NOTIFICATIONS, Arc::new(Notifications)),
        (AUDIT, Arc::new(Audit)),
    ];
    for (name, handler) in handlers {
        let mut consumer = ConsumerConfig::new(name, SUBJECTS);
        consumer.ack_wait = config.ack_wait;
        let runner = ConsumerRunner::new(
            store.clone(),
            broker.clone(),
            STREAM,
            RunnerConfig::new(consumer),
            handler,
        );
        let r = stopped.clone();
        tasks.spawn(async move { runner.run(r).await.with_context(|| format!("consumer {name} failed")) });
    }

    let state = AppState {
        store: store.clone(),
        outbox: Outbox::new(),
        idempotency_retention: config.idempotency_retention,
    };
    let app = router(state);
    let mut r = stopped.clone();
    tasks.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = r.wait_for(|s| *s).await;
            })
            .await
            .context("HTTP server failed")
    });
    tracing::info!(%addr, db = %config.database_path().display(), "seaport serving");
    Ok(Running { addr, stop, tasks })
}
