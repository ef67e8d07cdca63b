//! Scale-out storage on PostgreSQL, with `LISTEN/NOTIFY` to wake relays in any process.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::watch;

/// The NOTIFY channel the outbox trigger signals on every committed insert.
pub const OUTBOX_CHANNEL: &str = "seaport_outbox";

pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations/postgres");
    m.table_name = "_seaport_migrations".into();
    m.set_ignore_missing(true);
    m
}

/// An open PostgreSQL database with Seaport's tables.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    outbox_commits: watch::Sender<u64>,
}

impl PgStore {
    /// Connect (e.g. `postgres://postgres@127.0.0.1/seaport`) and apply Seaport's migrations.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.application_name("seaport"))
            .await?;
        Self::from_pool(pool).await
    }

    /// Use your own pool; runs Seaport's migrations (serialised across processes by sqlx's
    /// migration lock) and starts listening for outbox commits.
    pub async fn from_pool(pool: PgPool) -> Result<Self, sqlx::Error> {
        migrator()
            .run(&pool)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        let (outbox_commits, _) = watch::channel(0u64);
        let store = PgStore { pool, outbox_commits };
        store.spawn_listener();
        Ok(store)
    }

    /// Forward outbox NOTIFYs to the in-process signal. On a lost connection, reconnect and
    /// signal once anyway: notifications sent meanwhile may be lost, and the relay's poll
    /// fallback covers the rest.
    fn spawn_listener(&self) {
        let pool = self.pool.clone();
        let signal = self.outbox_commits.clone();
        let wake = move || signal.send_modify(|n| *n = n.wrapping_add(1));
        tokio::spawn(async move {
            while !pool.is_closed() {
                match PgListener::connect_with(&pool).await {
                    Ok(mut listener) => match listener.listen(OUTBOX_CHANNEL).await {
                        Ok(()) => {
                            wake();
                            loop {
                                match listener.try_recv().await {
                                    // `None`: the listener reconnected and may have missed some.
                                    Ok(_) => wake(),
                                    Err(_) if pool.is_closed() => return,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "outbox LISTEN connection failed; reconnecting");
                                        break;
                                    }
                                }
                                if pool.is_closed() {
                                    return;
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot LISTEN for outbox commits; retrying"),
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot LISTEN for outbox commits; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn outbox_commits(&self) -> watch::Receiver<u64> {
        self.outbox_commits.subscribe()
    }

    pub async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}
