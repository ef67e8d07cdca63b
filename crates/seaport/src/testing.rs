//! Fixtures for conformance tests: a fresh database and a private stream per test, on the
//! embedded default or on real PostgreSQL + NATS JetStream. Enabled by the `testing` feature.
//!
//! The servers are found at `SEAPORT_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `SEAPORT_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`). A missing server is a test failure with a message saying how to
//! start it (`bash scripts/services`), never a silent skip.

use std::sync::Arc;

use crate::broker::Broker;
use crate::broker::embedded::EmbeddedBroker;
use crate::broker::jetstream::JetStreamBroker;
use crate::store::{Db, PgStore, SqliteStore};

/// Which deployment a conformance test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// SQLite + the embedded broker.
    Embedded,
    /// PostgreSQL + NATS JetStream (real servers).
    PgJetStream,
}

pub fn database_admin_url() -> String {
    std::env::var("SEAPORT_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("SEAPORT_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A database of its own plus a private stream (`stream`, subjects `<root>.>`).
pub struct Fixture {
    pub kind: Kind,
    pub db: Db,
    pub broker: Arc<dyn Broker>,
    pub stream: String,
    pub root: String,
    /// For PostgreSQL: the URL of this test's database (to open more connections or processes).
    pub database_url: Option<String>,
    /// For the embedded backend: the directory holding `seaport.db`.
    pub dir: Option<tempfile::TempDir>,
}

/// Create a fresh PostgreSQL database named `seaport_t_<random>`; returns its URL.
pub async fn fresh_pg_database() -> String {
    let admin = database_admin_url();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at {admin}: {e}\nStart it with `bash scripts/services`.")
        });
    let name = format!("seaport_t_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or(admin.clone());
    format!("{base}/{name}")
}

impl Fixture {
    pub async fn new(kind: Kind) -> Fixture {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let tag = &tag[tag.len() - 12..];
        let (stream, root) = (format!("T{tag}"), format!("t{tag}"));
        match kind {
            Kind::Embedded => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = SqliteStore::open(dir.path().join("seaport.db"))
                    .await
                    .expect("open SQLite");
                let broker = EmbeddedBroker::new(&store);
                broker
                    .ensure_stream(&stream, &[&format!("{root}.>")])
                    .await
                    .expect("stream");
                Fixture {
                    kind,
                    db: store.into(),
                    broker: Arc::new(broker),
                    stream,
                    root,
                    database_url: None,
                    dir: Some(dir),
                }
            }
            Kind::PgJetStream => {
                let url = fresh_pg_database().await;
                let store = PgStore::connect(&url).await.expect("open PostgreSQL test database");
                let nats = nats_url();
                let broker = JetStreamBroker::connect(&nats).await.unwrap_or_else(|e| {
                    panic!("NATS JetStream is not reachable at {nats}: {e}\nStart it with `bash scripts/services`.")
                });
                broker
                    .ensure_stream(&stream, &[&format!("{root}.>")])
                    .await
                    .expect("stream");
                Fixture {
                    kind,
                    db: store.into(),
                    broker: Arc::new(broker),
                    stream,
                    root,
                    database_url: Some(url),
                    dir: None,
                }
            }
        }
    }

    /// A subject of this fixture's stream.
    pub fn subject(&self, leaf: &str) -> String {
        format!("{}.{leaf}", self.root)
    }

    /// A second, independent broker client (as another process would have).
    pub async fn another_broker(&self) -> Arc<dyn Broker> {
        match &self.db {
            Db::Sqlite(s) => Arc::new(EmbeddedBroker::new(s)),
            Db::Postgres(_) => Arc::new(JetStreamBroker::connect(&nats_url()).await.expect("NATS")),
        }
    }

    /// A second, independent database handle (as another process would have).
    pub async fn another_db(&self) -> Db {
        match &self.db {
            Db::Sqlite(s) => Db::Sqlite(s.clone()),
            Db::Postgres(_) => PgStore::connect(self.database_url.as_ref().expect("url"))
                .await
                .expect("PostgreSQL")
                .into(),
        }
    }

    /// Delete the stream (JetStream) and the database (PostgreSQL).
    pub async fn cleanup(self) {
        if self.kind == Kind::PgJetStream {
            self.db.close().await;
            remove_pg_and_stream(self.database_url.as_deref(), &self.stream).await;
        }
    }
}

/// Best-effort removal of a test database made by [`fresh_pg_database`] and of a stream.
pub async fn remove_pg_and_stream(database_url: Option<&str>, stream: &str) {
    if let Ok(b) = JetStreamBroker::connect(&nats_url()).await {
        let _ = b.context().delete_stream(stream).await;
        let _ = b.context().delete_stream(format!("{stream}_DLQ")).await;
    }
    if let Some(url) = database_url {
        let name = url.rsplit('/').next().unwrap_or_default().to_owned();
        if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&database_admin_url()).await {
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
        }
    }
}
