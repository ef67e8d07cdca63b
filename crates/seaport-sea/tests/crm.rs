//! The CRM behind the anti-corruption layer and the circuit breaker, as `POST /cases` uses it:
//! good records, bad records, a CRM that is down, correlation headers on the calls.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use common::TestService;
use seaport::testing::Kind;
use seaport_sea::crm::demo::{DemoCrmConfig, router};
use serde_json::{Value, json};

/// Serve `app` on a free port until the returned handle is dropped.
async fn serve(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
    )
}

async fn service_with_crm(crm: &str) -> TestService {
    let crm = crm.to_owned();
    TestService::start_with(Kind::Embedded, move |c| {
        c.crm_url = Some(crm);
        c.crm_timeout = Duration::from_millis(500);
    })
    .await
}

async fn open_case(s: &TestService, key: &str, customer: &str) -> (u16, Value) {
    let res = s
        .http
        .post(s.url("/cases"))
        .header("Idempotency-Key", key)
        .header("X-Correlation-Id", format!("corr-{key}"))
        .json(&json!({"title": "crm", "customer_id": customer}))
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_customer_is_verified_and_mapped_into_the_domain() {
    let (crm, _h) = serve(router(DemoCrmConfig::default())).await;
    let s = service_with_crm(&format!("http://{crm}")).await;
    let (status, case) = open_case(&s, "v-1", "C-7").await;
    assert_eq!(status, 201, "{case}");
    assert_eq!(case["customer_check"], "verified");
    assert_eq!(case["customer_name"], "Customer C-7");
    assert_eq!(case["customer_email"], "c.7@example.com");
    // The CRM's own field names never reach our API.
    for leaked in ["cust_id", "full_name", "email_address", "crm_segment"] {
        assert!(case.get(leaked).is_none(), "{leaked} leaked");
    }
    let (status, problem) = open_case(&s, "v-2", "missing-1").await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["invalid-params"][0]["name"], "customer_id");
    assert_eq!(
        s.count("SELECT COUNT(*) FROM cases").await,
        1,
        "nothing stored for an unknown customer"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_crm_data_falls_back_without_failing_the_request() {
    let (crm, _h) = serve(router(DemoCrmConfig {
        bad_data_rate: 1.0,
        ..Default::default()
    }))
    .await;
    let s = service_with_crm(&format!("http://{crm}")).await;
    for i in 0..6 {
        let (status, case) = open_case(&s, &format!("bad-{i}"), "C-8").await;
        assert_eq!(status, 201, "{case}");
        assert_eq!(case["customer_check"], "unverified", "{case}");
        assert!(case.get("customer_name").is_none());
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_down_uses_the_cached_record_or_opens_unverified() {
    let (crm, handle) = serve(router(DemoCrmConfig::default())).await;
    let s = service_with_crm(&format!("http://{crm}")).await;
    let (status, case) = open_case(&s, "d-1", "C-9").await;
    assert_eq!((status, case["customer_check"].as_str()), (201, Some("verified")));
    handle.abort(); // the CRM goes away
    let _ = handle.await;
    let (status, case) = open_case(&s, "d-2", "C-9").await;
    assert_eq!(status, 201, "{case}");
    assert_eq!(case["customer_check"], "cached");
    assert_eq!(case["customer_name"], "Customer C-9");
    let (status, case) = open_case(&s, "d-3", "C-10").await;
    assert_eq!(status, 201, "{case}");
    assert_eq!(case["customer_check"], "unverified");
    // A slow CRM is a down CRM: the timeout applies.
    let (slow, _h2) = serve(router(DemoCrmConfig {
        latency: Duration::from_secs(5),
        ..Default::default()
    }))
    .await;
    let s2 = service_with_crm(&format!("http://{slow}")).await;
    let (status, case) = open_case(&s2, "slow-1", "C-11").await;
    assert_eq!((status, case["customer_check"].as_str()), (201, Some("unverified")));
    s2.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_calls_carry_the_correlation_headers() {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let record = seen.clone();
    let stub = Router::new().route(
        "/customers/{id}",
        get(move |headers: http::HeaderMap| {
            let record = record.clone();
            async move {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                record.lock().unwrap().push((h("x-correlation-id"), h("traceparent")));
                axum::Json(json!({"cust_id": "C-1", "full_name": "A", "email_address": "a@example.com"}))
            }
        }),
    );
    let (crm, _h) = serve(stub).await;
    let s = service_with_crm(&format!("http://{crm}")).await;
    let res = s
        .http
        .post(s.url("/cases"))
        .header("Idempotency-Key", "corr-1")
        .header("X-Correlation-Id", "crm-corr-1")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .json(&json!({"title": "t", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "crm-corr-1");
    assert!(
        seen[0].1.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && !seen[0].1.contains("00f067aa0ba902b7"),
        "the trace continues with a child span: {}",
        seen[0].1
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_crm_opens_the_breaker_and_cases_still_open() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let stub = Router::new().route(
        "/customers/{id}",
        get(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { (http::StatusCode::SERVICE_UNAVAILABLE, "down") }
        }),
    );
    let (crm, _h) = serve(stub).await;
    let s = service_with_crm(&format!("http://{crm}")).await;
    for i in 0..8 {
        let (status, case) = open_case(&s, &format!("b-{i}"), "C-1").await;
        assert_eq!(
            (status, case["customer_check"].as_str()),
            (201, Some("unverified")),
            "{case}"
        );
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "after 5 failures in a row the breaker stops calling the CRM"
    );
    let health: Value = s
        .http
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "an open breaker is not an unhealthy service");
    assert_eq!(health["breakers"][0]["name"], "crm");
    assert_eq!(health["breakers"][0]["state"], "open");
    s.stop().await;
}
