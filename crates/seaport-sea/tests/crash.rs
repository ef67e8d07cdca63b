//! Kill the real `seaport` process at the worst moments and check that, after a restart, every
//! committed case's event reaches each fan-out consumer's effects exactly once.
//!
//! The process aborts itself (SIGABRT: no destructors, no flush, like `kill -9`) at a named
//! crash point (`SEAPORT_CRASH_AT`), so the moment is exact rather than a lucky timing.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::FAN_OUT;
use serde_json::{Value, json};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn(dir: &Path, crash_at: Option<&str>) -> Proc {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seaport"));
    // A short ack wait so that the delivery the dead process held comes back quickly.
    cmd.args([
        "serve",
        "--ack-wait-secs",
        "2",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(dir)
    .env("SEAPORT_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    match crash_at {
        Some(point) => cmd.env("SEAPORT_CRASH_AT", point),
        None => cmd.env_remove("SEAPORT_CRASH_AT"),
    };
    let mut proc = Proc {
        child: cmd.spawn().expect("start seaport"),
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{}/healthz", proc.base)).send().await
            && r.status() == 200
        {
            return proc;
        }
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("seaport exited before serving: {status}");
        }
        assert!(Instant::now() < deadline, "seaport did not become healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(proc: &mut Proc) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not reach its crash point");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn db(dir: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("seaport.db").display()))
        .await
        .unwrap()
}

async fn effects_of(pool: &sqlx::SqlitePool, event_id: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT consumer, COUNT(*) FROM consumer_effects WHERE event_id = $1 GROUP BY consumer ORDER BY consumer",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Create a case, let the process die at `point`, restart it, and check exactly-once effects.
async fn survive(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn(dir.path(), Some(point)).await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/cases", first.base))
        .header("X-Idempotency-Key", "crash-1")
        .header("X-Correlation-Id", format!("crash-{point}"))
        .json(&json!({"title": "crash", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "the case was acknowledged before the crash");
    let case: Value = res.json().await.unwrap();
    let status = wait_exit(&mut first).await;
    assert!(!status.success(), "aborted at {point}: {status}");
    drop(first);

    let pool = db(dir.path()).await;
    let event_id: String = sqlx::query_scalar(
        "SELECT event_id FROM seaport_outbox WHERE topic = 'sea.cases.created' AND ordering_key = $1",
    )
    .bind(case["id"].as_str().unwrap())
    .fetch_one(&pool)
    .await
    .expect("the acknowledged case's event is in the outbox");

    // The crash really happened at the worst moment for this point.
    let in_broker: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_broker_messages WHERE msg_id = $1")
        .bind(&event_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let marked: Option<i64> = sqlx::query_scalar("SELECT published_at FROM seaport_outbox WHERE event_id = $1")
        .bind(&event_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let in_inbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_inbox WHERE message_id = $1")
        .bind(&event_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    match point {
        "relay.before_publish" => assert_eq!((in_broker, marked.is_some(), in_inbox), (0, false, 0)),
        "relay.after_publish" => assert_eq!((in_broker, marked.is_some(), in_inbox), (1, false, 0)),
        "consumer.after_commit" => assert_eq!((in_broker, marked.is_some(), in_inbox), (1, true, 1)),
        other => panic!("unknown point {other}"),
    }

    let second = spawn(dir.path(), None).await;
    let want: Vec<(String, i64)> = FAN_OUT.iter().map(|c| (c.to_string(), 1)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while effects_of(&pool, &event_id).await != want {
        assert!(
            Instant::now() < deadline,
            "after restart: effects {:?}",
            effects_of(&pool, &event_id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let any wrong redelivery arrive, then look again: still exactly once each, and settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        effects_of(&pool, &event_id).await,
        want,
        "exactly one effect per consumer"
    );
    let copies: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_broker_messages WHERE msg_id = $1")
        .bind(&event_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(copies, 1, "the broker kept one copy of the event");
    let unpublished: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox WHERE published_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unpublished, 0);
    let cases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(cases, 1);
    // A client retry after the crash replays; it does not create a second case.
    let retry = http
        .post(format!("{}/cases", second.base))
        .header("X-Idempotency-Key", "crash-1")
        .json(&json!({"title": "crash", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], case["id"]);
}

#[tokio::test]
async fn crash_between_commit_and_publish() {
    survive("relay.before_publish").await;
}

#[tokio::test]
async fn crash_after_publish_before_marking_published() {
    survive("relay.after_publish").await;
}

#[tokio::test]
async fn crash_after_consumer_commit_before_ack() {
    survive("consumer.after_commit").await;
}
