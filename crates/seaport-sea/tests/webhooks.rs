//! The webhook receivers of the service: signature first, then one transaction (dedupe record +
//! `sea.webhooks.received` in the outbox), `200 {"received": true}`; processing later in the
//! `sea_service__context` group. Signed by Seaport's own signers and by the providers' SDKs
//! (stripe-python, standardwebhooks), run through the interop Python of `scripts/test`.

mod common;

use std::time::Duration;

use common::{TestService, wait_for};
use reqwest::header::HeaderMap;
use seaport::testing::Kind;
use seaport::webhooks::{github, standard, stripe};
use seaport_sea::webhooks::Webhooks;
use serde_json::{Value, json};

const STRIPE_OLD: &str = "whsec_old_stripe_secret";
const STRIPE_NEW: &str = "whsec_new_stripe_secret";
const GITHUB: &str = "It's a Secret to Everybody";
const PARTNER: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn service(kind: Kind) -> TestService {
    TestService::start_with(kind, |c| {
        c.webhooks = Webhooks::configure(
            &[STRIPE_OLD.to_owned(), STRIPE_NEW.to_owned()],
            Some(GITHUB),
            &[format!("partner={PARTNER}")],
        )
        .unwrap();
    })
    .await
}

async fn post(s: &TestService, path: &str, headers: HeaderMap, body: &[u8]) -> (u16, String, Value) {
    let res = s
        .http
        .post(s.url(path))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, res.json().await.unwrap_or(Value::Null))
}

fn one(name: &str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        value.parse().unwrap(),
    );
    h
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn stripe_event(id: &str, case_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "object": "event", "type": "payment_intent.succeeded",
        "data": {"object": {"id": format!("pi_{id}"), "object": "payment_intent", "metadata": {"case_id": case_id}}}
    }))
    .unwrap()
}

async fn stored(s: &TestService) -> (i64, i64) {
    (
        s.count("SELECT COUNT(*) FROM webhook_deliveries").await,
        s.published("sea.webhooks.received").await.len() as i64,
    )
}

async fn a_stripe_payment_is_received_once_and_marks_its_case_paid(kind: Kind) {
    let s = service(kind).await;
    let case: Value = s
        .http
        .post(s.url("/cases"))
        .header("Idempotency-Key", "wh-1")
        .json(&json!({"title": "pay me", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let case_id = case["id"].as_str().unwrap().to_owned();
    let body = stripe_event("evt_1", &case_id);
    // Signed with the old secret during rotation: still accepted.
    let sig = stripe::sign(STRIPE_OLD, now(), &body);
    let (status, _, answer) = post(&s, "/webhooks/stripe", one("stripe-signature", &sig), &body).await;
    assert_eq!((status, answer), (200, json!({"received": true})));
    // Stripe retries the same event (new signature, same id): stored once.
    let sig = stripe::sign(STRIPE_NEW, now(), &body);
    let (status, _, answer) = post(&s, "/webhooks/stripe", one("stripe-signature", &sig), &body).await;
    assert_eq!((status, answer), (200, json!({"received": true})));
    assert_eq!(stored(&s).await, (1, 1), "a redelivery stores nothing new");
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
    let event: Value = s.published("sea.webhooks.received").await.remove(0);
    assert_eq!(event["type"], "sea.webhooks.received");
    assert_eq!(event["data"]["source"], "stripe");
    assert_eq!(event["data"]["delivery_id"], "evt_1");
    assert_eq!(event["data"]["event_type"], "payment_intent.succeeded");
    assert_eq!(
        event["data"]["payload"]["object"]["metadata"]["case_id"],
        case_id.as_str()
    );
    s.stop().await;
}

async fn bad_deliveries_are_rejected_and_store_nothing(kind: Kind) {
    let s = service(kind).await;
    let body = stripe_event("evt_bad", "case-x");
    let t = now();
    let mut cases: Vec<(&str, &str, HeaderMap, Vec<u8>)> = vec![
        (
            "stripe: tampered body",
            "/webhooks/stripe",
            one("stripe-signature", &stripe::sign(STRIPE_NEW, t, &body)),
            {
                let mut b = body.clone();
                b[10] ^= 1;
                b
            },
        ),
        (
            "stripe: wrong secret",
            "/webhooks/stripe",
            one("stripe-signature", &stripe::sign("whsec_wrong", t, &body)),
            body.clone(),
        ),
        (
            "stripe: stale",
            "/webhooks/stripe",
            one("stripe-signature", &stripe::sign(STRIPE_NEW, t - 301, &body)),
            body.clone(),
        ),
        (
            "stripe: future",
            "/webhooks/stripe",
            // Well past the 300 s tolerance: `t` was read before the request, and the server's
            // clock may have moved on by then (the exact boundary is the library's tests', on a
            // fixed clock).
            one("stripe-signature", &stripe::sign(STRIPE_NEW, t + 360, &body)),
            body.clone(),
        ),
        (
            "stripe: missing header",
            "/webhooks/stripe",
            HeaderMap::new(),
            body.clone(),
        ),
        (
            "stripe: malformed header",
            "/webhooks/stripe",
            one("stripe-signature", "v1=abc"),
            body.clone(),
        ),
        (
            "stripe: signed but not an event",
            "/webhooks/stripe",
            one("stripe-signature", &stripe::sign(STRIPE_NEW, t, b"[1,2]")),
            b"[1,2]".to_vec(),
        ),
    ];
    let gh_body = br#"{"action":"opened","number":1}"#.to_vec();
    let mut gh = one("x-hub-signature-256", &github::sign(GITHUB, &gh_body));
    gh.insert("x-github-event", "issues".parse().unwrap());
    let mut gh_no_delivery = gh.clone();
    gh_no_delivery.remove("x-github-delivery");
    gh.insert("x-github-delivery", "d-1".parse().unwrap());
    let mut gh_wrong = gh.clone();
    gh_wrong.insert("x-hub-signature-256", github::sign("other", &gh_body).parse().unwrap());
    cases.push(("github: wrong secret", "/webhooks/github", gh_wrong, gh_body.clone()));
    cases.push((
        "github: no delivery id",
        "/webhooks/github",
        gh_no_delivery,
        gh_body.clone(),
    ));
    let mut tampered = gh_body.clone();
    tampered[3] ^= 1;
    cases.push(("github: tampered", "/webhooks/github", gh.clone(), tampered));
    let sw_body = br#"{"type":"invoice.paid","data":{"n":1}}"#.to_vec();
    cases.push((
        "standard: stale",
        "/webhooks/partner",
        standard::sign_headers(PARTNER, "msg_1", t - 301, &sw_body).unwrap(),
        sw_body.clone(),
    ));
    cases.push((
        "standard: future",
        "/webhooks/partner",
        standard::sign_headers(PARTNER, "msg_1", t + 360, &sw_body).unwrap(), // see "stripe: future"
        sw_body.clone(),
    ));
    cases.push((
        "standard: wrong secret",
        "/webhooks/partner",
        standard::sign_headers("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "msg_1", t, &sw_body).unwrap(),
        sw_body.clone(),
    ));
    let mut no_id = standard::sign_headers(PARTNER, "msg_1", t, &sw_body).unwrap();
    no_id.remove("webhook-id");
    cases.push((
        "standard: missing webhook-id",
        "/webhooks/partner",
        no_id,
        sw_body.clone(),
    ));
    cases.push((
        "standard: signed but not JSON",
        "/webhooks/partner",
        standard::sign_headers(PARTNER, "msg_2", t, b"not json").unwrap(),
        b"not json".to_vec(),
    ));
    for (what, path, headers, body) in cases {
        let (status, ct, problem) = post(&s, path, headers, &body).await;
        assert_eq!(status, 400, "{what}: {problem}");
        assert_eq!(ct, "application/problem+json", "{what}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        for secret in [STRIPE_OLD, STRIPE_NEW, GITHUB, PARTNER] {
            assert!(!detail.contains(secret), "{what}: the secret leaked");
        }
    }
    assert_eq!(stored(&s).await, (0, 0), "nothing stored for a rejected delivery");
    // The good GitHub and Standard Webhooks deliveries pass, once each.
    for _ in 0..2 {
        assert_eq!(post(&s, "/webhooks/github", gh.clone(), &gh_body).await.0, 200);
        let h = standard::sign_headers(PARTNER, "msg_ok", now(), &sw_body).unwrap();
        assert_eq!(post(&s, "/webhooks/partner", h, &sw_body).await.0, 200);
    }
    assert_eq!(stored(&s).await, (2, 2));
    s.stop().await;
}

on_both_backends!(
    a_stripe_payment_is_received_once_and_marks_its_case_paid,
    bad_deliveries_are_rejected_and_store_nothing,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfigured_receivers_answer_404() {
    let s = TestService::start().await;
    for path in ["/webhooks/stripe", "/webhooks/github", "/webhooks/partner"] {
        let (status, ct, _) = post(&s, path, HeaderMap::new(), b"{}").await;
        assert_eq!((status, ct.as_str()), (404, "application/problem+json"), "{path}");
    }
    s.stop().await;
}

/// Deliveries signed by the providers' own SDKs are accepted, and Seaport's Stripe signer is
/// accepted by stripe-python's verifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_signed_by_the_provider_sdks_are_accepted() {
    let python = std::env::var("SEAPORT_INTEROP_PYTHON").unwrap_or_else(|_| {
        panic!("SEAPORT_INTEROP_PYTHON is not set: run the suite with `bash scripts/test` (it installs stripe and standardwebhooks)")
    });
    let s = service(Kind::Embedded).await;
    let ours = stripe::sign(STRIPE_NEW, now(), &stripe_event("evt_ours", "c"));
    let script = r#"
import json, sys, time, urllib.request, datetime
import stripe
from standardwebhooks.webhooks import Webhook
base, stripe_secret, partner_secret, ours_header, ours_body = sys.argv[1:6]
def post(path, headers, body):
    req = urllib.request.Request(base + path, data=body.encode(), headers=dict(headers, **{"content-type": "application/json"}), method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
body = json.dumps({"id": "evt_sdk", "object": "event", "type": "invoice.paid", "data": {"object": {"id": "in_1"}}})
header = stripe.WebhookSignature.generate_signature_header(body, stripe_secret)
print("stripe", *post("/webhooks/stripe", {"Stripe-Signature": header}, body))
wh = Webhook(partner_secret)
now = datetime.datetime.now(tz=datetime.timezone.utc)
body = json.dumps({"type": "order.created", "timestamp": now.isoformat(), "data": {"id": 7}})
sig = wh.sign("msg_sdk", now, body)
print("standard", *post("/webhooks/partner", {"webhook-id": "msg_sdk", "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": sig}, body))
event = stripe.Webhook.construct_event(ours_body, ours_header, stripe_secret)
print("construct_event", event["id"])
"#;
    let base = s.base.clone();
    let body = String::from_utf8(stripe_event("evt_ours", "c")).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", script, &base, STRIPE_NEW, PARTNER, &ours, &body])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("stripe 200 {'received': True}"), "{stdout}");
    assert!(stdout.contains("standard 200 {'received': True}"), "{stdout}");
    assert!(stdout.contains("construct_event evt_ours"), "{stdout}");
    assert_eq!(stored(&s).await, (2, 2));
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.stop().await;
}
