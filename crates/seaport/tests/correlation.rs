//! Correlation flows request → event → downstream call, against a real HTTP peer on loopback.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use http::HeaderMap;
use seaport::Event;
use seaport::http::correlation::{CorrelatedRequest, TraceParent};
use seaport::http::{Correlation, CorrelationLayer, Problem};
use seaport::outbox::Outbox;
use seaport::testing::{Fixture, Kind};

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

async fn peer(State(seen): State<Seen>, headers: HeaderMap) -> &'static str {
    seen.lock().unwrap().push(headers);
    "ok"
}

#[derive(Clone)]
struct AppState {
    f: Arc<Fixture>,
    peer: String,
}

/// A handler that writes an event and calls a downstream service, as the catalog shows.
async fn handle(State(s): State<AppState>, corr: Correlation) -> Result<String, Problem> {
    let event = corr.stamp(Event::new(s.f.subject("things.done"), "/t", serde_json::json!({})).with_subject("t-1"));
    let mut tx = s.f.db.begin_write().await?;
    Outbox::new().insert(&mut tx, &event).await?;
    tx.commit().await?;
    reqwest::Client::new()
        .post(&s.peer)
        .correlated(&corr)
        .send()
        .await
        .map_err(Problem::internal)?;
    Ok(event.id)
}

#[tokio::test]
async fn correlation_flows_from_request_to_event_to_downstream_call() {
    let seen: Seen = Arc::default();
    let peer_app = Router::new().route("/downstream", post(peer)).with_state(seen.clone());
    let peer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_url = format!("http://{}/downstream", peer_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(peer_listener, peer_app).await.unwrap() });

    let f = Arc::new(Fixture::new(Kind::Embedded).await);
    let app = Router::new()
        .route("/do", get(handle))
        .layer(CorrelationLayer)
        .with_state(AppState {
            f: f.clone(),
            peer: peer_url,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let incoming_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = reqwest::Client::new()
        .get(format!("{base}/do"))
        .header("X-Correlation-Id", "corr-flow-1")
        .header("traceparent", incoming_trace)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-correlation-id"], "corr-flow-1");
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let our_span = TraceParent::parse(res.headers()["traceparent"].to_str().unwrap()).unwrap();
    assert_eq!(
        our_span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the caller's trace continues"
    );
    assert_ne!(our_span.span_id, "00f067aa0ba902b7", "in a span of our own");
    let event_id = res.text().await.unwrap();

    // The event carries correlation, causation (this request) and the trace.
    let envelope: Vec<u8> = seaport::on_pool!(&f.db, p => sqlx::query_scalar("SELECT envelope FROM seaport_outbox WHERE event_id = $1")
        .bind(&event_id)
        .fetch_one(p)
        .await
        .unwrap());
    let event = Event::from_json(&envelope).unwrap();
    assert_eq!(event.correlationid.as_deref(), Some("corr-flow-1"));
    assert_eq!(event.causationid.as_deref(), Some(request_id.as_str()));
    assert_eq!(event.extensions["traceparent"], our_span.to_string());

    // The downstream call carried them too.
    let headers = seen.lock().unwrap().pop().expect("the peer was called");
    assert_eq!(headers["x-correlation-id"], "corr-flow-1");
    assert_eq!(headers["x-causation-id"], request_id.as_str());
    let downstream = TraceParent::parse(headers["traceparent"].to_str().unwrap()).unwrap();
    assert_eq!(downstream.trace_id, our_span.trace_id);

    // A consumer of the event continues the same conversation.
    let from_event = Correlation::from_event(&event);
    assert_eq!(from_event.correlation_id, "corr-flow-1");
    assert_eq!(from_event.request_id, event.id);
    assert_eq!(from_event.trace.trace_id, our_span.trace_id);
    let follow_up = Event::new("x.y", "/t", serde_json::json!({})).caused_by(&event);
    assert_eq!(
        TraceParent::parse(follow_up.extensions["traceparent"].as_str().unwrap())
            .unwrap()
            .trace_id,
        our_span.trace_id
    );

    // Invalid incoming values are replaced, never echoed.
    let res = reqwest::Client::new()
        .get(format!("{base}/do"))
        .header("X-Correlation-Id", "bad id\\r")
        .header("traceparent", "00-zz-nope-01")
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-correlation-id"], "bad id\\r");
    assert_ne!(
        TraceParent::parse(res.headers()["traceparent"].to_str().unwrap())
            .unwrap()
            .trace_id,
        our_span.trace_id
    );
}
