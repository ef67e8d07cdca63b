//! Webhook receivers (the catalog's Webhook Receiver): `POST /webhooks/stripe`,
//! `POST /webhooks/github` and `POST /webhooks/{source}` (Standard Webhooks). Each one:
//!
//! 1. verifies the signature over the raw body, before reading anything else from it
//!    (constant-time, timestamp tolerance, several secrets during rotation);
//! 2. in one transaction, records the delivery id (Stripe event id, `X-GitHub-Delivery`,
//!    `webhook-id`) and writes a `sea.webhooks.received` event to the outbox; a redelivery
//!    finds the record and stores nothing new;
//! 3. answers `200 {"received": true}` at once. The work happens later, in the
//!    `sea_service__context` consumer group.
//!
//! A bad signature, a stale or future timestamp or a malformed payload is `400` problem+json and
//! stores nothing; a route whose secret is not configured is `404`. Secrets never appear in
//! logs, errors or traces (their types redact themselves).

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::routing::post;
use chrono::Utc;
use http::{HeaderMap, StatusCode};
use seaport::Event;
use seaport::http::{Correlation, Problem};
use seaport::on_conn;
use seaport::webhooks::{GitHubVerifier, StandardWebhooksVerifier, StripeVerifier, VerifyError};
use serde_json::{Value, json};

use crate::app::AppState;
use crate::consumers::context::WEBHOOK_RECEIVED;
use crate::consumers::now;

/// The configured receivers; a `None` / absent source answers 404.
#[derive(Clone, Debug, Default)]
pub struct Webhooks {
    pub stripe: Option<StripeVerifier>,
    pub github: Option<GitHubVerifier>,
    /// Standard Webhooks sources by name (`/webhooks/{name}`).
    pub sources: BTreeMap<String, StandardWebhooksVerifier>,
}

impl Webhooks {
    /// Build from the flag values; errors name the flag, never the secret.
    pub fn configure(stripe: &[String], github: Option<&str>, sources: &[String]) -> anyhow::Result<Webhooks> {
        let mut hooks = Webhooks::default();
        let stripe: Vec<&str> = stripe.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
        if !stripe.is_empty() {
            hooks.stripe =
                Some(StripeVerifier::new(&stripe).map_err(|e| anyhow::anyhow!("--stripe-webhook-secret: {e}"))?);
        }
        if let Some(secret) = github.map(str::trim).filter(|s| !s.is_empty()) {
            hooks.github =
                Some(GitHubVerifier::new(secret).map_err(|e| anyhow::anyhow!("--github-webhook-secret: {e}"))?);
        }
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, entry) in sources.iter().enumerate() {
            let Some((name, secret)) = entry.trim().split_once('=') else {
                anyhow::bail!("--webhook-source entry {}: expected NAME=SECRET", i + 1);
            };
            anyhow::ensure!(
                valid_source_name(name),
                "--webhook-source entry {}: {name:?} is not a valid source name (1-64 of a-z 0-9 _ -, not stripe or github)",
                i + 1
            );
            by_name.entry(name.to_owned()).or_default().push(secret.to_owned());
        }
        for (name, secrets) in by_name {
            let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let verifier =
                StandardWebhooksVerifier::new(&secrets).map_err(|e| anyhow::anyhow!("--webhook-source {name}: {e}"))?;
            hooks.sources.insert(name, verifier);
        }
        Ok(hooks)
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/stripe", post(stripe))
        .route("/webhooks/github", post(github))
        .route("/webhooks/{source}", post(standard))
}

/// Is `name` usable as a Standard Webhooks source (`/webhooks/{name}`)?
pub fn valid_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name != "stripe"
        && name != "github"
}

/// What a verified delivery contributes to the `sea.webhooks.received` event.
struct Received {
    source: String,
    delivery_id: String,
    event_type: String,
    /// The ordering key (e.g. the Stripe object the event is about).
    subject: String,
    payload: Value,
}

/// Count the signature check by result, and turn a rejection into a 400.
fn checked<T>(source: &str, result: Result<T, VerifyError>) -> Result<T, Problem> {
    let label = match &result {
        Ok(_) => "ok",
        Err(VerifyError::MissingHeader(_)) => "missing_header",
        Err(VerifyError::MalformedHeader(_)) => "malformed_header",
        Err(VerifyError::NoMatchingSignature) => "bad_signature",
        Err(VerifyError::TimestampTooOld { .. } | VerifyError::TimestampInFuture { .. }) => "stale_timestamp",
        Err(_) => "error",
    };
    seaport::telemetry::webhook_verification(source, label);
    result.map_err(rejected)
}

fn rejected(e: VerifyError) -> Problem {
    tracing::warn!(error = %e, "webhook rejected");
    Problem::new(StatusCode::BAD_REQUEST, format!("webhook rejected: {e}"))
}

fn malformed(what: &str) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, format!("malformed webhook payload: {what}"))
}

fn not_configured(source: &str) -> Problem {
    Problem::not_found(format!("no webhook receiver for {source:?} is configured"))
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Problem> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(malformed("expected a JSON object")),
        Err(_) => Err(malformed("not JSON")),
    }
}

fn text(map: &serde_json::Map<String, Value>, field: &'static str) -> Result<String, Problem> {
    match map.get(field) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control) => Ok(s.clone()),
        _ => Err(malformed(&format!("{field} must be a non-empty string"))),
    }
}

#[utoipa::path(post, path = "/webhooks/stripe", tag = "webhooks",
    request_body(content = Object, content_type = "application/json", description = "A Stripe event, verbatim"),
    params(("Stripe-Signature" = String, Header, description = "`t=<unix time>,v1=<hex HMAC-SHA256 of \"{t}.{body}\">` (several `v1` while rotating)")),
    responses(
        (status = 200, description = "Accepted (or a redelivery of an accepted delivery: nothing new stored)", body = crate::openapi::Received),
        (status = 400, description = "Bad or missing signature, stale or future timestamp, or malformed payload; nothing stored", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 404, description = "No secret configured for this receiver", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 413, description = "Body over 2 MiB", content_type = "application/problem+json", body = crate::openapi::Problem),
    ))]
/// Stripe: `Stripe-Signature`, event id as the dedupe key, `data` as the payload (the catalog's
/// `WebhookReceived(source, event_type, payload=event["data"])`).
pub async fn stripe(
    State(app): State<AppState>,
    corr: Correlation,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Problem> {
    let body = body?;
    let verifier = app.webhooks.stripe.as_ref().ok_or_else(|| not_configured("stripe"))?;
    checked("stripe", verifier.verify(&headers, &body, Utc::now()))?;
    let event = json_object(&body)?;
    let id = text(&event, "id")?;
    let event_type = text(&event, "type")?;
    let data = match event.get("data") {
        Some(d @ Value::Object(_)) => d.clone(),
        _ => return Err(malformed("data must be an object")),
    };
    let subject = data["object"]["id"].as_str().unwrap_or(&id).to_owned();
    accept(
        &app,
        &corr,
        Received {
            source: "stripe".into(),
            delivery_id: id,
            event_type,
            subject,
            payload: data,
        },
    )
    .await
}

#[utoipa::path(post, path = "/webhooks/github", tag = "webhooks",
    request_body(content = Object, content_type = "application/json", description = "A GitHub webhook payload, verbatim"),
    params(
        ("X-Hub-Signature-256" = String, Header, description = "`sha256=<hex HMAC-SHA256 of the body>`"),
        ("X-GitHub-Delivery" = String, Header, description = "Delivery id (the dedupe key)"),
        ("X-GitHub-Event" = String, Header, description = "Event name"),
    ),
    responses(
        (status = 200, description = "Accepted (or a redelivery of an accepted delivery: nothing new stored)", body = crate::openapi::Received),
        (status = 400, description = "Bad or missing signature, stale or future timestamp, or malformed payload; nothing stored", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 404, description = "No secret configured for this receiver", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 413, description = "Body over 2 MiB", content_type = "application/problem+json", body = crate::openapi::Problem),
    ))]
/// GitHub: `X-Hub-Signature-256`, `X-GitHub-Delivery` as the dedupe key, `X-GitHub-Event` (and
/// the payload's `action`, if any) as the event type.
pub async fn github(
    State(app): State<AppState>,
    corr: Correlation,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Problem> {
    let body = body?;
    let verifier = app.webhooks.github.as_ref().ok_or_else(|| not_configured("github"))?;
    let verified = checked("github", verifier.verify(&headers, &body, Utc::now()))?;
    let payload = Value::Object(json_object(&body)?);
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 100)
        .ok_or_else(|| malformed("X-GitHub-Event header missing"))?;
    let event_type = match payload["action"].as_str() {
        Some(action) => format!("{event}.{action}"),
        None => event.to_owned(),
    };
    let delivery_id = verified.id;
    accept(
        &app,
        &corr,
        Received {
            source: "github".into(),
            subject: delivery_id.clone(),
            delivery_id,
            event_type,
            payload,
        },
    )
    .await
}

#[utoipa::path(post, path = "/webhooks/{source}", tag = "webhooks",
    request_body(content = Object, content_type = "application/json", description = "A Standard Webhooks payload (`type`, `timestamp`, `data`), verbatim"),
    params(
        ("source" = String, Path, description = "A configured Standard Webhooks source (`--webhook-source NAME=whsec_...`)"),
        ("webhook-id" = String, Header, description = "Message id (the dedupe key)"),
        ("webhook-timestamp" = String, Header, description = "Unix time of the signature"),
        ("webhook-signature" = String, Header, description = "Space-separated `v1,<base64 HMAC-SHA256 of \"{id}.{timestamp}.{body}\">`"),
    ),
    responses(
        (status = 200, description = "Accepted (or a redelivery of an accepted delivery: nothing new stored)", body = crate::openapi::Received),
        (status = 400, description = "Bad or missing signature, stale or future timestamp, or malformed payload; nothing stored", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 404, description = "No secret configured for this receiver", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 413, description = "Body over 2 MiB", content_type = "application/problem+json", body = crate::openapi::Problem),
    ))]
/// Standard Webhooks: `webhook-id` / `webhook-timestamp` / `webhook-signature`; the payload's
/// `type` and `data` (the spec's recommended shape), else the whole body with type `unknown`.
pub async fn standard(
    State(app): State<AppState>,
    corr: Correlation,
    source: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Problem> {
    let body = body?;
    let Path(source) = source?;
    let verifier = app
        .webhooks
        .sources
        .get(&source)
        .ok_or_else(|| not_configured(&source))?;
    let verified = checked(&source, verifier.verify(&headers, &body, Utc::now()))?;
    let body = json_object(&body)?;
    let event_type = body
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 255)
        .unwrap_or("unknown")
        .to_owned();
    let payload = match body.get("data") {
        Some(data) => data.clone(),
        None => Value::Object(body),
    };
    let delivery_id = verified.id;
    accept(
        &app,
        &corr,
        Received {
            source,
            subject: delivery_id.clone(),
            delivery_id,
            event_type,
            payload,
        },
    )
    .await
}

/// Record the delivery and its event in one transaction; a known delivery id stores nothing.
async fn accept(app: &AppState, corr: &Correlation, r: Received) -> Result<Json<Value>, Problem> {
    for (what, value) in [
        ("delivery id", &r.delivery_id),
        ("event type", &r.event_type),
        ("object id", &r.subject),
    ] {
        if value.chars().any(char::is_control) || value.len() > 255 {
            return Err(malformed(&format!(
                "{what} must be at most 255 characters without control characters"
            )));
        }
    }
    let event = corr.stamp(
        Event::new(
            WEBHOOK_RECEIVED,
            format!("/webhooks/{}", r.source),
            json!({
                "source": r.source,
                "delivery_id": r.delivery_id,
                "event_type": r.event_type,
                "payload": r.payload,
            }),
        )
        .with_subject(format!("{}:{}", r.source, r.subject)),
    );
    let mut tx = app.store.begin_write().await?;
    let fresh = on_conn!(&mut tx, c => sqlx::query(
        "INSERT INTO webhook_deliveries (source, delivery_id, event_id, received_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (source, delivery_id) DO NOTHING",
    )
    .bind(&r.source)
    .bind(&r.delivery_id)
    .bind(&event.id)
    .bind(now())
    .execute(c)
    .await?
    .rows_affected())
        == 1;
    if fresh {
        let written = app
            .outbox
            .insert_to(&mut tx, &app.topics.topic(WEBHOOK_RECEIVED), &event)
            .await;
        if let Err(e) = written {
            // Ended now: the provider's retry must not wait on this delivery's row.
            let _ = tx.rollback().await;
            return Err(e.into());
        }
        tx.commit().await?;
        tracing::info!(source = %r.source, delivery = %r.delivery_id, event_type = %r.event_type, "webhook received");
    } else {
        tx.rollback().await?;
        tracing::info!(source = %r.source, delivery = %r.delivery_id, "webhook redelivery ignored");
    }
    Ok(Json(json!({"received": true})))
}
