//! `seaport demo-crm`: a small stand-in for the external CRM, speaking its model
//! (`cust_id`, `full_name`, `email_address`), for demos and tests. Flags inject latency, outages
//! (503) and malformed records, so the breaker, the fallbacks and the anti-corruption layer can
//! be watched at work.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng;

#[derive(Clone, Debug, Default)]
pub struct DemoCrmConfig {
    /// Added to every answer.
    pub latency: Duration,
    /// Share of requests answered `503` (0.0-1.0).
    pub failure_rate: f64,
    /// Share of answers with a malformed record (bad email, missing name, wrong id).
    pub bad_data_rate: f64,
}

pub fn router(config: DemoCrmConfig) -> Router {
    Router::new()
        .route("/customers/{id}", get(customer))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(config)
}

/// Customers exist unless their id starts with `missing` or `unknown`; names and emails are
/// derived from the id.
async fn customer(State(config): State<DemoCrmConfig>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    tracing::info!(%id, correlation_id = %header("x-correlation-id"), traceparent = %header("traceparent"), "CRM lookup");
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    let (fail, bad, which) = {
        let mut rng = rand::thread_rng();
        (
            rng.gen_bool(config.failure_rate.clamp(0.0, 1.0)),
            rng.gen_bool(config.bad_data_rate.clamp(0.0, 1.0)),
            rng.gen_range(0..3),
        )
    };
    if fail {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/problem+json"), ("retry-after", "5")],
            r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"injected outage"}"#,
        )
            .into_response();
    }
    if id.starts_with("missing") || id.starts_with("unknown") {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such customer"})),
        )
            .into_response();
    }
    let slug: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '.'
            }
        })
        .collect::<String>()
        .split('.')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    let mut record = serde_json::json!({
        "cust_id": id,
        "full_name": format!("Customer {id}"),
        "email_address": format!("{}@example.com", if slug.is_empty() { "customer" } else { &slug }),
        "crm_segment": "demo",
    });
    if bad {
        match which {
            0 => record["email_address"] = "not-an-email".into(),
            1 => {
                record.as_object_mut().expect("object").remove("full_name");
            }
            _ => record["cust_id"] = "someone-else".into(),
        }
    }
    Json(record).into_response()
}
