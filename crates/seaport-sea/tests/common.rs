//! Shared helpers of the service tests: a service on a random port (embedded, or PostgreSQL +
//! NATS JetStream with a private database and stream), an HTTP client, waiting.

#![allow(dead_code)]

use std::time::Duration;

use seaport::store::Db;
use seaport::testing::Kind;
use seaport_sea::app::{self, Config, Running, Topics};

pub struct TestService {
    pub running: Option<Running>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub config: Config,
    pub db: Db,
}

impl TestService {
    pub async fn start() -> Self {
        Self::start_on(Kind::Embedded).await
    }

    pub async fn start_on(kind: Kind) -> Self {
        Self::start_with(kind, |_| {}).await
    }

    /// Start with settings changed by `configure` (after the test defaults are applied).
    pub async fn start_with(kind: Kind, configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::embedded(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        if kind == Kind::PgJetStream {
            let tag = uuid::Uuid::now_v7().simple().to_string();
            let tag = &tag[tag.len() - 12..];
            config.database_url = Some(seaport::testing::fresh_pg_database().await);
            config.nats_url = Some(seaport::testing::nats_url());
            config.stream = format!("S{tag}");
            config.topics = Topics {
                root: format!("s{tag}"),
            };
        }
        configure(&mut config);
        let running = app::start(config.clone()).await.unwrap();
        let base = format!("http://{}", running.addr);
        let db = app::open_store(&config).await.unwrap();
        TestService {
            running: Some(running),
            base,
            dir,
            http: reqwest::Client::new(),
            config,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        seaport::on_pool!(&self.db, p => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.unwrap())
    }

    pub async fn count_for(&self, sql: &'static str, arg: &str) -> i64 {
        seaport::on_pool!(&self.db, p => sqlx::query_scalar::<_, i64>(sql).bind(arg).fetch_one(p).await.unwrap())
    }

    pub async fn bytes(&self, sql: &'static str) -> Vec<u8> {
        seaport::on_pool!(&self.db, p => sqlx::query_scalar::<_, Vec<u8>>(sql).fetch_one(p).await.unwrap())
    }

    /// The event type as a broker subject of this service.
    pub fn topic(&self, event_type: &str) -> String {
        self.config.topics.topic(event_type)
    }

    /// The envelopes of the events of `event_type`, in publish order, once none is left in the
    /// outbox: the relay deletes a row when the broker confirmed it, so they are read from the
    /// broker (the embedded broker's table, or the JetStream stream).
    pub async fn published(&self, event_type: &str) -> Vec<serde_json::Value> {
        let topic = self.topic(event_type);
        wait_for("the events to be published", async || {
            self.count_for("SELECT COUNT(*) FROM seaport_outbox WHERE topic = $1", &topic)
                .await
                == 0
        })
        .await;
        let payloads: Vec<Vec<u8>> = match &self.config.nats_url {
            None => seaport::on_pool!(&self.db, p => sqlx::query_scalar(
                "SELECT payload FROM seaport_broker_messages WHERE subject = $1 ORDER BY seq",
            )
            .bind(&topic)
            .fetch_all(p)
            .await
            .unwrap()),
            Some(url) => {
                let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
                let mut stream = js.get_stream(&self.config.stream).await.unwrap();
                let last = stream.info().await.unwrap().state.last_sequence;
                let mut out = Vec::new();
                for seq in 1..=last {
                    if let Ok(m) = stream.get_raw_message(seq).await
                        && m.subject.as_str() == topic
                    {
                        out.push(m.payload.to_vec());
                    }
                }
                out
            }
        };
        payloads
            .iter()
            .map(|p| serde_json::from_slice(p).expect("a CloudEvents JSON envelope"))
            .collect()
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
        self.db.close().await;
        if self.config.database_url.is_some() {
            seaport::testing::remove_pg_and_stream(self.config.database_url.as_deref(), &self.config.stream).await;
        }
    }
}

pub async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The three fan-out consumers of the sea service.
pub const FAN_OUT: [&str; 3] = ["analytics__from_sea", "audit__from_sea", "notifications__from_sea"];

/// Run each test body on both deployments: `embedded::name` and `pg_jetstream::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(seaport::testing::Kind::Embedded).await } )*
        }
        mod pg_jetstream {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(seaport::testing::Kind::PgJetStream).await } )*
        }
    };
}
