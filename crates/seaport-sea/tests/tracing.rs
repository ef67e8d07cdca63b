//! One trace across the whole path: the caller's W3C `traceparent` → the HTTP request's span →
//! the event (CloudEvents `traceparent` extension, in the outbox) → the broker message's
//! `traceparent` header → each consumer's `consume` span → the follow-up event a consumer emits
//! and its consumers' spans. The spans are captured by a `tracing` layer installed for this test
//! binary (one test per binary: the subscriber is process-wide).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{TestService, wait_for};
use seaport::testing::Kind;
use seaport_sea::consumers::{ANALYTICS, AUDIT, NOTIFICATIONS};
use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Spans seen: name and fields.
type Seen = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

struct Capture(Seen);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _id: &tracing::span::Id, _ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

fn spans(seen: &Seen, name: &str, trace_id: &str) -> Vec<BTreeMap<String, String>> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, f)| n == name && f.get("trace_id").map(String::as_str) == Some(trace_id))
        .map(|(_, f)| f.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_from_the_http_request_to_every_consumer_span() {
    let seen: Seen = Arc::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture(seen.clone()))).unwrap();

    for kind in [Kind::Embedded, Kind::PgJetStream] {
        let s = TestService::start_on(kind).await;
        let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
        let caller = format!("00-{trace_id}-00f067aa0ba902b7-01");
        let res = s
            .http
            .post(s.url("/cases"))
            .header("Idempotency-Key", format!("trace-{trace_id}"))
            .header("traceparent", &caller)
            .json(&json!({"title": "traced", "customer_id": "C-1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        // The response continues the caller's trace with the request's own span.
        let answered = res.headers()["traceparent"].to_str().unwrap().to_owned();
        assert!(answered.starts_with(&format!("00-{trace_id}-")), "{answered}");
        assert_ne!(answered, caller, "the request's span is a new span of the same trace");
        let case: Value = res.json().await.unwrap();

        // HTTP request span.
        assert_eq!(
            spans(&seen, "request", &trace_id).len(),
            1,
            "{kind:?}: the request span"
        );

        // The event as published carries the trace context in its extension.
        let event: Value = s.published("sea.cases.created").await.remove(0);
        assert_eq!(event["subject"], case["id"]);
        let tp = event["traceparent"].as_str().unwrap().to_owned();
        assert!(tp.starts_with(&format!("00-{trace_id}-")), "{tp}");

        // Every fan-out consumer's span, for the event and for the follow-up the notifications
        // consumer emitted (same trace, a child span of the consumed event's).
        wait_for("the consumers' spans", async || {
            [ANALYTICS, NOTIFICATIONS, AUDIT].iter().all(|c| {
                spans(&seen, "consume", &trace_id)
                    .iter()
                    .filter(|f| f.get("consumer").map(String::as_str) == Some(c))
                    .count()
                    >= 2
            })
        })
        .await;
        let consumed = spans(&seen, "consume", &trace_id);
        let event_id = event["id"].as_str().unwrap();
        let of_event: Vec<_> = consumed
            .iter()
            .filter(|f| f.get("event_id").map(String::as_str) == Some(event_id))
            .collect();
        assert_eq!(of_event.len(), 3, "{kind:?}: one span per fan-out consumer");
        for f in &of_event {
            assert_eq!(f["parent_span_id"], tp[36..52], "the span descends from the event's");
            assert_eq!(f["correlation_id"], event["correlationid"].as_str().unwrap());
        }
        let follow_up: Vec<_> = consumed
            .iter()
            .filter(|f| f.get("event_type").map(String::as_str) == Some("sea.notifications.queued"))
            .collect();
        assert_eq!(follow_up.len(), 3, "{kind:?}: the follow-up event stays in the trace");

        // The broker message carries the same trace context as a header.
        let header = match &s.db {
            seaport::store::Db::Sqlite(sqlite) => {
                let headers: String =
                    sqlx::query_scalar("SELECT headers FROM seaport_broker_messages WHERE msg_id = $1")
                        .bind(event_id)
                        .fetch_one(sqlite.pool())
                        .await
                        .unwrap();
                serde_json::from_str::<Value>(&headers).unwrap()["traceparent"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
            seaport::store::Db::Postgres(_) => {
                let client = async_nats::connect(seaport::testing::nats_url()).await.unwrap();
                let js = async_nats::jetstream::new(client);
                let stream = js.get_stream(&s.config.stream).await.unwrap();
                let raw = stream
                    .get_last_raw_message_by_subject(&s.topic("sea.cases.created"))
                    .await
                    .unwrap();
                let m = async_nats::jetstream::message::StreamMessage::try_from(raw).unwrap();
                m.headers.get("traceparent").unwrap().as_str().to_owned()
            }
        };
        assert_eq!(header, tp, "{kind:?}: message header = event extension");
        s.stop().await;
    }
}
