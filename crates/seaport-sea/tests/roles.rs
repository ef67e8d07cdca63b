//! Scale-out: separate api, relay and worker instances on one PostgreSQL database and one
//! JetStream stream, several of each, behave as one service.

mod common;

use std::time::Duration;

use common::{FAN_OUT, TestService, wait_for};
use seaport::testing::Kind;
use seaport_sea::app::{self, Role};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_relay_and_worker_roles_scale_separately() {
    // The fixture service is an api-only instance; more instances join its database and stream.
    let mut api1 = TestService::start_on(Kind::PgJetStream).await;
    let base_config = api1.config.clone();
    api1.running.take().unwrap().shutdown().await.unwrap();
    let with_role = |role: Role| {
        let mut c = base_config.clone();
        c.role = role;
        c
    };
    let api_a = app::start(with_role(Role::Api)).await.unwrap();
    let api_b = app::start(with_role(Role::Api)).await.unwrap();
    let http = reqwest::Client::new();
    let post = async |addr: std::net::SocketAddr, key: &str, corr: &str| {
        http.post(format!("http://{addr}/cases"))
            .header("Idempotency-Key", key)
            .header("X-Correlation-Id", corr)
            .json(&json!({"title": "scale", "customer_id": "C-9"}))
            .send()
            .await
            .unwrap()
    };
    // Two api instances, one key: one case (the client retried against the other instance).
    let first = post(api_a.addr, "scale-1", "scale-corr").await;
    assert_eq!(first.status(), 201);
    let retry = post(api_b.addr, "scale-1", "scale-corr").await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    for i in 0..10 {
        let addr = if i % 2 == 0 { api_a.addr } else { api_b.addr };
        assert_eq!(post(addr, &format!("k{i}"), &format!("corr-{i}")).await.status(), 201);
    }
    // Without relays nothing is published, and nothing is lost either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api1.count("SELECT COUNT(*) FROM seaport_outbox").await, 11);
    assert_eq!(api1.count("SELECT COUNT(*) FROM consumer_effects").await, 0);
    // The api role serves only health on relay/worker instances, cases on api instances.
    let worker_probe = app::start(with_role(Role::Worker)).await.unwrap();
    let res = http
        .get(format!("http://{}/cases", worker_probe.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(
        http.get(format!("http://{}/healthz", worker_probe.addr))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let relays = [
        app::start(with_role(Role::Relay)).await.unwrap(),
        app::start(with_role(Role::Relay)).await.unwrap(),
    ];
    let worker2 = app::start(with_role(Role::Worker)).await.unwrap();
    // 11 cases, each a created event and a notification event, each seen by 3 consumers.
    wait_for("all effects", async || {
        api1.count("SELECT COUNT(*) FROM seaport_inbox").await == 11 * 2 * 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for consumer in FAN_OUT {
        let n = api1
            .count_for("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = $1", consumer)
            .await;
        assert_eq!(n, 22, "{consumer} processed every event");
    }
    let dup_effects =
        api1.count("SELECT COUNT(*) FROM (SELECT consumer, event_id FROM consumer_effects GROUP BY consumer, event_id HAVING COUNT(*) > 1) d").await;
    assert_eq!(dup_effects, 0, "no effect recorded twice");
    assert_eq!(api1.count("SELECT COUNT(*) FROM seaport_outbox").await, 0);
    assert_eq!(api1.count("SELECT COUNT(*) FROM cases").await, 11);
    let trace: Value = http
        .get(format!("http://{}/trace/scale-corr", api_a.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(trace["events"][0]["consumers"].as_array().unwrap().len(), 3);

    // The sea_service__context group, run by both worker instances: each webhook once.
    let mut webhooks = Vec::new();
    for i in 0..10 {
        let e = seaport::Event::new(
            "sea.webhooks.received",
            "/webhooks/github",
            json!({"source": "github", "event_type": "push", "payload": {"n": i}}),
        )
        .with_subject(format!("github:{i}"));
        let mut tx = api1.db.begin_write().await.unwrap();
        seaport::outbox::Outbox::new()
            .insert_to(&mut tx, &api1.topic("sea.webhooks.received"), &e)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        webhooks.push(e);
    }
    wait_for("the group to process the webhooks", async || {
        api1.count("SELECT COUNT(*) FROM consumer_effects WHERE consumer = 'sea_service__context'")
            .await
            == 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api1.count("SELECT COUNT(DISTINCT event_id) FROM consumer_effects WHERE consumer = 'sea_service__context'")
            .await,
        10,
        "each webhook processed once by the group"
    );

    for r in [api_a, api_b, worker_probe, worker2] {
        r.shutdown().await.unwrap();
    }
    for r in relays {
        r.shutdown().await.unwrap();
    }
    api1.stop().await;
}

/// SQLite + NATS JetStream is a valid combination too (one machine, real broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_jetstream_works_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let tag = &tag[tag.len() - 12..];
    let mut config = app::Config::embedded(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.nats_url = Some(seaport::testing::nats_url());
    config.stream = format!("Q{tag}");
    config.topics = app::Topics {
        root: format!("q{tag}"),
    };
    let running = app::start(config.clone()).await.unwrap();
    let http = reqwest::Client::new();
    let res = http
        .post(format!("http://{}/cases", running.addr))
        .header("Idempotency-Key", "sj-1")
        .header("X-Correlation-Id", "sqlite-js")
        .json(&json!({"title": "t", "customer_id": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    wait_for("the trace on SQLite + JetStream", async || {
        let r = http
            .get(format!("http://{}/trace/sqlite-js", running.addr))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            return false;
        }
        let t: Value = r.json().await.unwrap();
        t["events"]
            .as_array()
            .is_some_and(|e| e.len() == 2 && e.iter().all(|e| e["consumers"].as_array().unwrap().len() == 3))
    })
    .await;
    running.shutdown().await.unwrap();
    let client = async_nats::connect(seaport::testing::nats_url()).await.unwrap();
    let _ = async_nats::jetstream::new(client).delete_stream(&config.stream).await;
}

/// PostgreSQL without a NATS URL is refused with a message that says what to do.
#[tokio::test]
async fn postgres_without_nats_is_refused_clearly() {
    let mut config = app::Config::embedded(tempfile::tempdir().unwrap().path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = Some(seaport::testing::fresh_pg_database().await);
    let err = app::start(config).await.err().expect("refused");
    assert!(format!("{err:#}").contains("--nats-url"), "{err:#}");
}
