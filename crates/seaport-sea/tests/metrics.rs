//! `/metrics` after a scripted scenario: the values, not just the names. One test function
//! per binary run on purpose: the `metrics` facade has one recorder per process, so counters are
//! checked as absolute values on the embedded deployment and the scrape-time gauges (which do
//! not accumulate) on PostgreSQL + JetStream too.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{TestService, wait_for};
use seaport::broker::jetstream::JetStreamBroker;
use seaport::broker::{Broker, OutgoingMessage, embedded::EmbeddedBroker};
use seaport::store::Db;
use seaport::testing::Kind;
use seaport::webhooks::stripe;
use seaport_sea::consumers::{ANALYTICS, AUDIT, CONTEXT, NOTIFICATIONS};
use seaport_sea::webhooks::Webhooks;
use serde_json::json;

const STRIPE: &str = "whsec_metrics_secret";

/// `name{labels}` → value, from the text exposition.
async fn scrape(s: &TestService) -> BTreeMap<String, f64> {
    let res = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = res.text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        panic!(
            "{series} missing from /metrics; have: {:#?}",
            m.keys().collect::<Vec<_>>()
        )
    })
}

async fn broker_of(s: &TestService) -> Arc<dyn Broker> {
    match &s.db {
        Db::Sqlite(sqlite) => Arc::new(EmbeddedBroker::new(sqlite)),
        Db::Postgres(_) => Arc::new(
            JetStreamBroker::connect(s.config.nats_url.as_deref().unwrap())
                .await
                .unwrap(),
        ),
    }
}

async fn service(kind: Kind) -> TestService {
    TestService::start_with(kind, |c| {
        c.webhooks = Webhooks::configure(&[STRIPE.to_owned()], None, &[]).unwrap();
        // Nothing listens there: the CRM call fails and the breaker counts it.
        c.crm_url = Some("http://127.0.0.1:9".to_owned());
    })
    .await
}

/// The scenario: a case (created, replayed, key reused), a CRM failure, a good and a forged
/// webhook, and a message no consumer can decode (dead-lettered by each consumer it reaches).
async fn scenario(s: &TestService) {
    let post = |key: &'static str, title: &'static str| {
        s.http
            .post(s.url("/cases"))
            .header("Idempotency-Key", key)
            .json(&json!({"title": title, "customer_id": "C-1"}))
            .send()
    };
    assert_eq!(post("m-1", "metrics").await.unwrap().status(), 201);
    let replay = post("m-1", "metrics").await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(post("m-1", "another body").await.unwrap().status(), 422);

    let body = serde_json::to_vec(&json!({"id": "evt_m", "object": "event", "type": "customer.created",
        "data": {"object": {"id": "cus_1", "object": "customer"}}}))
    .unwrap();
    let t = chrono::Utc::now().timestamp();
    for (sig, status) in [
        (stripe::sign(STRIPE, t, &body), 200),
        (stripe::sign("whsec_forged", t, &body), 400),
    ] {
        let res = s
            .http
            .post(s.url("/webhooks/stripe"))
            .header("stripe-signature", sig)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status);
    }

    let poison = OutgoingMessage {
        id: "not-an-event".into(),
        subject: s.topic("sea.webhooks.received"),
        headers: BTreeMap::new(),
        payload: b"{ this is not a CloudEvent".to_vec().into(),
    };
    broker_of(s).await.publish(&[poison]).await.remove(0).unwrap();

    wait_for("every consumer to settle everything", async || {
        s.count("SELECT COUNT(*) FROM seaport_dead_letters").await == 4
            && s.count("SELECT COUNT(*) FROM seaport_outbox").await == 0
            && s.count_for("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = $1", AUDIT)
                .await
                == 3
            && s.count_for("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = $1", ANALYTICS)
                .await
                == 3
            && s.count_for("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = $1", NOTIFICATIONS)
                .await
                == 3
            && s.count_for("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = $1", CONTEXT)
                .await
                == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_values_of_a_scripted_scenario() {
    // Embedded: counters and gauges, absolute values.
    let s = service(Kind::Embedded).await;
    scenario(&s).await;
    // Acks and the last gauges settle just after the effects commit.
    let mut m = scrape(&s).await;
    for _ in 0..100 {
        if CONSUMERS_IDLE
            .iter()
            .all(|c| m.get(&format!("seaport_consumer_ack_pending{{consumer=\"{c}\"}}")) == Some(&0.0))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = scrape(&s).await;
    }
    // Everything was published (the relay deleted each row once the broker confirmed it): case
    // created, notification queued (by the notifications consumer), webhook received, and 4
    // dead-letter announcements.
    assert_eq!(s.count("SELECT COUNT(*) FROM seaport_outbox").await, 0);
    assert_eq!(get(&m, "seaport_outbox_published_total"), 7.0);
    assert_eq!(get(&m, "seaport_outbox_backlog"), 0.0);
    assert_eq!(get(&m, "seaport_outbox_lag_seconds"), 0.0);
    for c in [ANALYTICS, NOTIFICATIONS, AUDIT] {
        assert_eq!(
            get(
                &m,
                &format!("seaport_consumer_messages_total{{consumer=\"{c}\",outcome=\"processed\"}}")
            ),
            3.0,
            "{c}"
        );
        assert_eq!(
            get(
                &m,
                &format!("seaport_consumer_messages_total{{consumer=\"{c}\",outcome=\"dead_lettered\"}}")
            ),
            1.0,
            "{c}"
        );
        assert_eq!(
            get(
                &m,
                &format!("seaport_consumer_handler_duration_seconds_count{{consumer=\"{c}\"}}")
            ),
            4.0,
            "{c}"
        );
        assert!(
            get(
                &m,
                &format!("seaport_consumer_handler_duration_seconds_sum{{consumer=\"{c}\"}}")
            ) > 0.0
        );
    }
    for c in [ANALYTICS, NOTIFICATIONS, AUDIT, CONTEXT] {
        assert_eq!(
            get(&m, &format!("seaport_consumer_dead_lettered_total{{consumer=\"{c}\"}}")),
            1.0,
            "{c}"
        );
        assert_eq!(
            get(&m, &format!("seaport_dead_letters{{consumer=\"{c}\"}}")),
            1.0,
            "{c}"
        );
        assert_eq!(
            get(&m, &format!("seaport_consumer_pending{{consumer=\"{c}\"}}")),
            0.0,
            "{c}"
        );
        assert_eq!(
            get(&m, &format!("seaport_consumer_ack_pending{{consumer=\"{c}\"}}")),
            0.0,
            "{c}"
        );
    }
    assert_eq!(get(&m, "seaport_idempotency_replays_total"), 1.0);
    assert_eq!(get(&m, "seaport_idempotency_conflicts_total{reason=\"reused\"}"), 1.0);
    assert_eq!(
        get(
            &m,
            "seaport_webhook_verifications_total{source=\"stripe\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "seaport_webhook_verifications_total{source=\"stripe\",result=\"bad_signature\"}"
        ),
        1.0
    );
    assert_eq!(
        get(&m, "seaport_circuit_breaker_state{name=\"crm\"}"),
        0.0,
        "one failure leaves it closed"
    );
    assert_eq!(
        get(
            &m,
            "seaport_circuit_breaker_calls_total{name=\"crm\",outcome=\"failure\"}"
        ),
        1.0
    );
    s.stop().await;

    // PostgreSQL + JetStream: the gauges read from the database and JetStream at scrape time.
    let s = service(Kind::PgJetStream).await;
    scenario(&s).await;
    let mut m = scrape(&s).await;
    for _ in 0..100 {
        if CONSUMERS_IDLE
            .iter()
            .all(|c| m.get(&format!("seaport_consumer_ack_pending{{consumer=\"{c}\"}}")) == Some(&0.0))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = scrape(&s).await;
    }
    assert_eq!(get(&m, "seaport_outbox_backlog"), 0.0);
    for c in [ANALYTICS, NOTIFICATIONS, AUDIT, CONTEXT] {
        assert_eq!(
            get(&m, &format!("seaport_dead_letters{{consumer=\"{c}\"}}")),
            1.0,
            "{c}"
        );
        assert_eq!(
            get(&m, &format!("seaport_consumer_pending{{consumer=\"{c}\"}}")),
            0.0,
            "{c}"
        );
        assert_eq!(
            get(&m, &format!("seaport_consumer_ack_pending{{consumer=\"{c}\"}}")),
            0.0,
            "{c}"
        );
    }
    s.stop().await;
}

const CONSUMERS_IDLE: [&str; 4] = [ANALYTICS, NOTIFICATIONS, AUDIT, CONTEXT];
