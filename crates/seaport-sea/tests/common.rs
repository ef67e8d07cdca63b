//! Shared helpers of the service tests: a service on a random port, an HTTP client, waiting.

#![allow(dead_code)]

use std::time::Duration;

use seaport_sea::app::{self, Config, Running};

pub struct TestService {
    pub running: Option<Running>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl TestService {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::embedded(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        let running = app::start(config).await.unwrap();
        let base = format!("http://{}", running.addr);
        TestService {
            running: Some(running),
            base,
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn db(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!("sqlite://{}", self.dir.path().join("seaport.db").display()))
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.running.take().unwrap().shutdown().await.unwrap();
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
