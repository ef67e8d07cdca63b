//! OTLP export (`--features otlp`, `--otlp-endpoint`): the `seaport` binary sends its spans to
//! a collector over OTLP/HTTP protobuf, and they form one tree: the caller's span → the HTTP
//! request → each consumer of the event it wrote → the consumer of the event a consumer emitted.
//! The collector here is a stand-in that decodes what arrives with the OpenTelemetry project's
//! own protobuf types (`opentelemetry-proto`), so the wire format is checked, not assumed.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use seaport_sea::consumers::{ANALYTICS, AUDIT, NOTIFICATIONS};

#[derive(Clone, Debug)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    service: String,
    attributes: Vec<(String, String)>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Received = Arc<Mutex<Vec<Span>>>;

async fn collector() -> (String, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: http::HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for s in scope.spans {
                            let attributes = s
                                .attributes
                                .iter()
                                .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    AnyValue::StringValue(v) => Some((kv.key.clone(), v.clone())),
                                    AnyValue::IntValue(v) => Some((kv.key.clone(), v.to_string())),
                                    _ => None,
                                })
                                .collect();
                            sink.lock().unwrap().push(Span {
                                name: s.name,
                                trace_id: to_hex(&s.trace_id),
                                span_id: to_hex(&s.span_id),
                                parent: to_hex(&s.parent_span_id),
                                service: service.clone(),
                                attributes,
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_as_one_tree() {
    let (collector_url, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _service = Service(
        Command::new(env!("CARGO_BIN_EXE_seaport"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir.path())
            .args(["--otlp-endpoint", &collector_url])
            .env("SEAPORT_LOG", "warn")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_SERVICE_NAME")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the service did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let caller_span = "00f067aa0ba902b7";
    let res = http
        .post(format!("{base}/cases"))
        .header("Idempotency-Key", "otlp-1")
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"title": "exported", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let answered = res.headers()["traceparent"].to_str().unwrap().to_owned();

    // Wait for: the request span, one consume span per consumer of case.created, and the
    // audit consumer's span of the notification the notifications consumer emitted. Named, not
    // counted: other consumers' spans of the notification (the notifications consumer reads it
    // too) may arrive first.
    let find = |spans: &[Span], consumer: &str, parent: &str| {
        spans
            .iter()
            .find(|s| s.name == "consume" && s.attr("consumer") == Some(consumer) && s.parent == parent)
            .cloned()
    };
    let complete = |spans: &[Span]| {
        let Some(request) = spans.iter().find(|s| s.name == "request") else {
            return false;
        };
        let under_request = |c: &str| find(spans, c, &request.span_id);
        under_request(ANALYTICS).is_some()
            && under_request(AUDIT).is_some()
            && under_request(NOTIFICATIONS).is_some_and(|n| find(spans, AUDIT, &n.span_id).is_some())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<Span> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        if complete(&spans) {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace_id} did not all reach the collector; got {spans:#?} (all: {:#?})",
            received.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let request = spans.iter().find(|s| s.name == "request").unwrap();
    assert_eq!(request.service, "seaport");
    assert_eq!(
        request.parent, caller_span,
        "the request span is a child of the caller's span"
    );
    assert_eq!(request.attr("path"), Some("/cases"));
    assert_eq!(
        answered,
        format!("00-{trace_id}-{}-01", request.span_id),
        "the response's traceparent names the exported request span"
    );
    let consume_of = |consumer: &str, parent: &str| {
        find(&spans, consumer, parent)
            .unwrap_or_else(|| panic!("no consume span of {consumer} under span {parent}: {spans:#?}"))
    };
    // case.created: each consumer's span hangs under the request span.
    consume_of(ANALYTICS, &request.span_id);
    consume_of(AUDIT, &request.span_id);
    let notifications = consume_of(NOTIFICATIONS, &request.span_id);
    // notification.queued, emitted by the notifications consumer: audited under its span.
    let audit_of_notification = consume_of(AUDIT, &notifications.span_id);
    assert_ne!(audit_of_notification.span_id, notifications.span_id);
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), spans.len(), "every exported span has its own id");
}
