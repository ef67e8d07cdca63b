//! Embedded storage on SQLite (WAL mode), with the change hooks that wake the relay.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqliteOperation, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

/// Seaport's own migrations, tracked in their own table so that the embedding service's
/// `sqlx::migrate!()` keeps working untouched beside them.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations/sqlite");
    m.table_name = "_seaport_migrations".into();
    m.set_ignore_missing(true);
    m
}

/// An open SQLite database with Seaport's tables, plus the signal that the outbox changed.
///
/// SQLite admits one writer at a time. Writers of this process queue on a fair (FIFO) async
/// lock before they ask SQLite for its write lock, so nobody sleeps in SQLite's busy handler and
/// nobody starves (e.g. one worker of a consumer group); other processes sharing the file still
/// wait through the busy timeout.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    outbox_commits: watch::Sender<u64>,
    writers: Arc<Mutex<()>>,
    /// Idempotency keys this process's requests hold (see `http::idempotency::open`).
    key_marks: Arc<crate::http::idempotency::KeyMarks>,
}

/// A write transaction (`BEGIN IMMEDIATE`) holding this process's writer turn until it ends.
/// Derefs to the connection, so `&mut tx` and `&mut *tx` work wherever sqlx wants a connection.
pub struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _turn: OwnedMutexGuard<()>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path` and apply Seaport's migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, sqlx::Error> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
        }
        let options = connect_options(SqliteConnectOptions::new().filename(path));
        Self::open_with(options, SqlitePoolOptions::new().max_connections(8)).await
    }

    /// Open with your own options. The connections get the hooks that let the relay wake up as
    /// soon as a transaction that wrote to the outbox commits (no polling delay).
    pub async fn open_with(
        options: SqliteConnectOptions,
        pool_options: SqlitePoolOptions,
    ) -> Result<Self, sqlx::Error> {
        let (outbox_commits, _) = watch::channel(0u64);
        let signal = outbox_commits.clone();
        let pool = pool_options
            .after_connect(move |conn, _meta| {
                let signal = signal.clone();
                Box::pin(async move {
                    let mut handle = conn.lock_handle().await?;
                    let dirty = Arc::new(AtomicBool::new(false));
                    let on_update = dirty.clone();
                    handle.set_update_hook(move |change| {
                        if change.table == crate::outbox::TABLE && matches!(change.operation, SqliteOperation::Insert) {
                            on_update.store(true, Ordering::Relaxed);
                        }
                    });
                    // The commit hook runs just *before* the commit completes; the relay reads
                    // under `BEGIN IMMEDIATE`, which waits for this writer to finish, so a wake-up
                    // never reads too early.
                    let on_commit = dirty.clone();
                    handle.set_commit_hook(move || {
                        if on_commit.swap(false, Ordering::Relaxed) {
                            signal.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        true
                    });
                    handle.set_rollback_hook(move || dirty.store(false, Ordering::Relaxed));
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        migrator()
            .run(&pool)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        Ok(SqliteStore {
            pool,
            outbox_commits,
            writers: Arc::new(Mutex::new(())),
            key_marks: Arc::default(),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A receiver that changes every time a transaction that inserted into the outbox commits.
    pub fn outbox_commits(&self) -> watch::Receiver<u64> {
        self.outbox_commits.subscribe()
    }

    /// Begin a transaction that will write. `BEGIN IMMEDIATE` takes the write lock up front, so a
    /// transaction that reads before it writes cannot fail with `SQLITE_BUSY` halfway through.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        let turn = self.writer_turn().await;
        Ok(WriteTx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            _turn: turn,
        })
    }

    /// Wait for this process's writer turn; hold it around a single autocommit write statement.
    pub async fn writer_turn(&self) -> OwnedMutexGuard<()> {
        self.writers.clone().lock_owned().await
    }

    pub(crate) fn key_marks(&self) -> &Arc<crate::http::idempotency::KeyMarks> {
        &self.key_marks
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// The settings Seaport needs: WAL (readers never block the writer), full fsync on commit
/// (an acknowledged write survives power loss), a generous busy timeout (writers queue instead of
/// failing), foreign keys on.
pub fn connect_options(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
}
