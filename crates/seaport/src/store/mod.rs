//! The SQL behind every pattern.
//!
//! Two backends: `sqlite` (the embedded default: one file holds the service's tables, the outbox,
//! the inbox and the embedded broker's log) and `postgres` (scale-out). Seaport's queries are
//! written once, with `$1, $2, ...` placeholders in order of first use, which both sqlx drivers
//! accept; [`Db`] and [`Tx`] carry either backend, and [`on_conn!`](crate::on_conn) runs one
//! body of code against whichever connection a transaction holds.

pub mod postgres;
pub mod sqlite;

use tokio::sync::watch;

pub use self::postgres::PgStore;
pub use self::sqlite::{SqliteStore, WriteTx};

/// Milliseconds since the Unix epoch: the one clock format the SQL tables use.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A database of either backend.
#[derive(Clone)]
pub enum Db {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// A write transaction of either backend.
pub enum Tx {
    Sqlite(WriteTx),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Which backend a [`Db`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Db {
    /// Open by URL: `postgres://...` / `postgresql://...` for PostgreSQL, anything else is a
    /// SQLite file path (or `sqlite://path`).
    pub async fn open(url_or_path: &str) -> Result<Db, sqlx::Error> {
        if url_or_path.starts_with("postgres://") || url_or_path.starts_with("postgresql://") {
            Ok(Db::Postgres(PgStore::connect(url_or_path).await?))
        } else {
            let path = url_or_path.strip_prefix("sqlite://").unwrap_or(url_or_path);
            Ok(Db::Sqlite(SqliteStore::open(path).await?))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(s) => Tx::Sqlite(s.begin_write().await?),
            Db::Postgres(p) => Tx::Postgres(p.begin_write().await?),
        })
    }

    /// Changes every time a transaction that inserted into the outbox commits.
    pub fn outbox_commits(&self) -> watch::Receiver<u64> {
        match self {
            Db::Sqlite(s) => s.outbox_commits(),
            Db::Postgres(p) => p.outbox_commits(),
        }
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(s) => s.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

impl From<SqliteStore> for Db {
    fn from(s: SqliteStore) -> Self {
        Db::Sqlite(s)
    }
}

impl From<PgStore> for Db {
    fn from(p: PgStore) -> Self {
        Db::Postgres(p)
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }
}

/// A borrowed connection of either backend: what every query function of the library takes.
/// Made from `&mut` of a [`Tx`], a [`WriteTx`], an sqlx `Transaction` or a connection, so a
/// caller can pass its own transaction: `outbox.insert(&mut tx, &event)`.
pub enum Conn<'c> {
    Sqlite(&'c mut sqlx::SqliteConnection),
    Postgres(&'c mut sqlx::PgConnection),
}

impl<'c> From<&'c mut sqlx::SqliteConnection> for Conn<'c> {
    fn from(c: &'c mut sqlx::SqliteConnection) -> Self {
        Conn::Sqlite(c)
    }
}

impl<'c> From<&'c mut sqlx::PgConnection> for Conn<'c> {
    fn from(c: &'c mut sqlx::PgConnection) -> Self {
        Conn::Postgres(c)
    }
}

impl<'c> From<&'c mut WriteTx> for Conn<'c> {
    fn from(t: &'c mut WriteTx) -> Self {
        Conn::Sqlite(&mut **t)
    }
}

impl<'c, 't> From<&'c mut sqlx::Transaction<'t, sqlx::Sqlite>> for Conn<'c> {
    fn from(t: &'c mut sqlx::Transaction<'t, sqlx::Sqlite>) -> Self {
        Conn::Sqlite(&mut **t)
    }
}

impl<'c, 't> From<&'c mut sqlx::Transaction<'t, sqlx::Postgres>> for Conn<'c> {
    fn from(t: &'c mut sqlx::Transaction<'t, sqlx::Postgres>) -> Self {
        Conn::Postgres(&mut **t)
    }
}

impl<'c> From<&'c mut Tx> for Conn<'c> {
    fn from(t: &'c mut Tx) -> Self {
        match t {
            Tx::Sqlite(t) => Conn::Sqlite(&mut **t),
            Tx::Postgres(t) => Conn::Postgres(&mut **t),
        }
    }
}

impl<'c> From<&'c mut sqlx::pool::PoolConnection<sqlx::Sqlite>> for Conn<'c> {
    fn from(c: &'c mut sqlx::pool::PoolConnection<sqlx::Sqlite>) -> Self {
        Conn::Sqlite(&mut **c)
    }
}

impl<'c> From<&'c mut sqlx::pool::PoolConnection<sqlx::Postgres>> for Conn<'c> {
    fn from(c: &'c mut sqlx::pool::PoolConnection<sqlx::Postgres>) -> Self {
        Conn::Postgres(&mut **c)
    }
}

/// Run `$body` with `$c` bound to the concrete connection (`&mut SqliteConnection` or
/// `&mut PgConnection`) behind anything convertible to a [`Conn`](crate::store::Conn) (e.g.
/// `&mut tx`). The body is compiled once per backend, so plain sqlx code works in it.
///
/// ```ignore
/// let n: i64 = on_conn!(&mut tx, c => sqlx::query_scalar("SELECT COUNT(*) FROM cases").fetch_one(c).await)?;
/// ```
#[macro_export]
macro_rules! on_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match ::std::convert::Into::<$crate::store::Conn<'_>>::into($conn) {
            $crate::store::Conn::Sqlite($c) => $body,
            $crate::store::Conn::Postgres($c) => $body,
        }
    };
}

/// Run `$body` with `$p` bound to the concrete pool (`&SqlitePool` or `&PgPool`) of a
/// [`Db`](crate::store::Db).
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite(s) => {
                let $p: &::sqlx::SqlitePool = s.pool();
                $body
            }
            $crate::store::Db::Postgres(s) => {
                let $p: &::sqlx::PgPool = s.pool();
                $body
            }
        }
    };
}
