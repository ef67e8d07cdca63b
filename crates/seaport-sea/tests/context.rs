//! The sea_service__context consumer group: webhooks the service received (as the receivers
//! write them to the outbox) are processed once, by one worker of the group.

mod common;

use common::{TestService, wait_for};
use seaport::Event;
use serde_json::{Value, json};

async fn receive_webhook(s: &TestService, source: &str, event_type: &str, payload: Value) -> Event {
    let event = Event::new(
        "sea.webhooks.received",
        format!("/webhooks/{source}"),
        json!({"source": source, "event_type": event_type, "payload": payload}),
    )
    .with_subject(format!("{source}:{}", uuid::Uuid::now_v7()));
    let mut tx = s.db.begin_write().await.unwrap();
    seaport::outbox::Outbox::new()
        .insert_to(&mut tx, &s.topic("sea.webhooks.received"), &event)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    event
}

async fn a_payment_webhook_marks_its_case_paid_once(kind: seaport::testing::Kind) {
    let s = TestService::start_on(kind).await;
    let case: Value = s
        .http
        .post(s.url("/cases"))
        .header("Idempotency-Key", "pay-1")
        .json(&json!({"title": "to be paid", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let case_id = case["id"].as_str().unwrap().to_owned();
    assert!(case.get("paid_at").is_none(), "unpaid cases carry no paid_at");
    let paid = receive_webhook(
        &s,
        "stripe",
        "payment_intent.succeeded",
        json!({"object": {"id": "pi_1", "object": "payment_intent", "metadata": {"case_id": case_id}}}),
    )
    .await;
    let other = receive_webhook(&s, "github", "push", json!({"ref": "refs/heads/main"})).await;
    let unknown = receive_webhook(
        &s,
        "stripe",
        "charge.succeeded",
        json!({"object": {"id": "ch_1", "metadata": {"case_id": "no-such-case"}}}),
    )
    .await;
    wait_for("the case to be paid", async || {
        let c: Value = s
            .http
            .get(s.url(&format!("/cases/{case_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        c["paid_at"].is_string()
    })
    .await;
    wait_for("the other webhook", async || {
        s.count_for(
            "SELECT COUNT(*) FROM consumer_effects WHERE consumer = 'sea_service__context' AND event_id = $1",
            &other.id,
        )
        .await
            == 1
    })
    .await;
    let effect: String = seaport::on_pool!(&s.db, p => sqlx::query_scalar(
        "SELECT effect FROM consumer_effects WHERE consumer = 'sea_service__context' AND event_id = $1")
        .bind(&paid.id).fetch_one(p).await.unwrap());
    assert_eq!(
        effect,
        format!("marked case {case_id} paid (stripe payment_intent.succeeded)")
    );
    // The payment is announced to the fan-out consumers, in the webhook's causal chain.
    wait_for("the audit of the payment", async || {
        s.count_for(
            "SELECT COUNT(*) FROM audit_log WHERE event_type = 'sea.cases.paid' AND causation_id = $1",
            &paid.id,
        )
        .await
            == 1
    })
    .await;
    // A payment for a case that does not exist is not dropped: it ends in the dead letters.
    wait_for("the dead letter", async || {
        s.count_for(
            "SELECT COUNT(*) FROM seaport_dead_letters WHERE consumer = 'sea_service__context' AND message_id = $1",
            &unknown.id,
        )
        .await
            == 1
    })
    .await;
    // The group consumes only webhooks, so other events never reach it; each webhook once.
    assert_eq!(
        s.count("SELECT COUNT(*) FROM seaport_inbox WHERE consumer = 'sea_service__context'")
            .await,
        2
    );
    assert_eq!(
        s.count("SELECT COUNT(*) FROM consumer_effects WHERE consumer = 'sea_service__context'")
            .await,
        2
    );
    s.stop().await;
}

on_both_backends!(a_payment_webhook_marks_its_case_paid_once);
