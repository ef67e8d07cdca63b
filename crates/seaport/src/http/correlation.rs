//! Correlation Tracking: every request gets a correlation id (the caller's `X-Correlation-Id` if
//! it is well-formed, a fresh UUIDv7 otherwise), a request id, and a W3C trace context (the
//! caller's `traceparent` continued with a new span id, or a fresh trace). All are echoed on the
//! response and available to handlers, which stamp them on every event they write
//! ([`Correlation::stamp`]) and pass them on to downstream calls ([`CorrelatedRequest`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};
use uuid::Uuid;

pub const CORRELATION_ID: &str = "x-correlation-id";
pub const CAUSATION_ID: &str = "x-causation-id";
pub const REQUEST_ID: &str = "x-request-id";
pub const TRACEPARENT: &str = "traceparent";

/// A W3C Trace Context `traceparent` (version 00): trace id, the id of the current span, flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub flags: u8,
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    loop {
        rand::thread_rng().fill_bytes(&mut b);
        if b.iter().any(|x| *x != 0) {
            return hex::encode(&b);
        }
    }
}

impl TraceParent {
    /// Parse per W3C Trace Context: lowercase hex, non-zero ids, version `ff` invalid, version
    /// `00` exactly 55 characters, later versions read by their version-00 prefix.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim_matches([' ', '\t']);
        let lower_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if v.len() < 55 || !v.is_ascii() {
            return None;
        }
        let (version, trace_id, span_id, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
        let dashes = [2, 35, 52].iter().all(|&i| v.as_bytes()[i] == b'-');
        if !dashes
            || !lower_hex(version)
            || version == "ff"
            || !lower_hex(trace_id)
            || !lower_hex(span_id)
            || !lower_hex(flags)
        {
            return None;
        }
        if (version == "00" && v.len() != 55) || (version != "00" && v.len() > 55 && v.as_bytes()[55] != b'-') {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A new trace (sampled).
    pub fn fresh() -> TraceParent {
        TraceParent {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            flags: 1,
        }
    }

    /// The same trace, a new span (ours, or a downstream call's).
    pub fn child(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id.clone(),
            span_id: random_hex(8),
            flags: self.flags,
        }
    }
}

/// With the `otel` feature and a `tracing-opentelemetry` layer installed, make `span` the
/// OpenTelemetry span of `parent`'s trace (a child of `parent`'s span) and return the span's own
/// context: that is what must be handed on (response header, event extension) so downstream
/// spans hang under an exported span. `None` without the feature or the layer: the caller keeps
/// its own ids.
pub fn adopt_span(span: &tracing::Span, parent: Option<&TraceParent>) -> Option<TraceParent> {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if let Some(p) = parent {
            let remote = SpanContext::new(
                TraceId::from_hex(&p.trace_id).ok()?,
                SpanId::from_hex(&p.span_id).ok()?,
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            );
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
                .ok()?;
        }
        let cx = span.context();
        let own = cx.span().span_context().clone();
        own.is_valid().then(|| TraceParent {
            trace_id: own.trace_id().to_string(),
            span_id: own.span_id().to_string(),
            flags: own.trace_flags().to_u8(),
        })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = (span, parent);
        None
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

/// The correlation context of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Correlation {
    /// Shared by everything the original request caused, across services.
    pub correlation_id: String,
    /// This request's own id: the causation id of the events it writes.
    pub request_id: String,
    /// What caused this request upstream (the caller's `X-Causation-Id`), if it said.
    pub caused_by: Option<String>,
    /// The trace context of this request's span.
    pub trace: TraceParent,
}

impl Correlation {
    /// Read the context from request headers. Invalid values are ignored, never echoed.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let read = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| valid_id(v))
                .map(str::to_owned)
        };
        Correlation {
            correlation_id: read(CORRELATION_ID).unwrap_or_else(new_id),
            request_id: read(REQUEST_ID).unwrap_or_else(new_id),
            caused_by: read(CAUSATION_ID),
            trace: headers
                .get(TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(TraceParent::parse)
                .map(|t| t.child())
                .unwrap_or_else(TraceParent::fresh),
        }
    }

    /// The context of a consumed event, for the calls and events its handler makes: same
    /// correlation id, the event as cause, its trace continued.
    pub fn from_event(event: &crate::Event) -> Self {
        let trace = event
            .extensions
            .get(TRACEPARENT)
            .and_then(|v| v.as_str())
            .and_then(TraceParent::parse)
            .map(|t| t.child())
            .unwrap_or_else(TraceParent::fresh);
        Correlation {
            correlation_id: event.correlationid.clone().unwrap_or_else(|| event.id.clone()),
            request_id: event.id.clone(),
            caused_by: event.causationid.clone(),
            trace,
        }
    }

    /// Stamp an event written while handling this request: correlation id, this request as its
    /// causation, and the trace context (CloudEvents distributed-tracing extension `traceparent`).
    pub fn stamp(&self, event: crate::Event) -> crate::Event {
        let mut event = event.correlated(&self.correlation_id, Some(self.request_id.clone()));
        event.extensions.insert(
            TRACEPARENT.to_owned(),
            serde_json::Value::String(self.trace.to_string()),
        );
        event
    }

    /// Headers for an outgoing call made while handling this request (the catalog's "pass to
    /// all downstream calls"): correlation id, this request as causation, a child span.
    pub fn outgoing_headers(&self) -> [(&'static str, String); 3] {
        [
            (CORRELATION_ID, self.correlation_id.clone()),
            (CAUSATION_ID, self.request_id.clone()),
            (TRACEPARENT, self.trace.child().to_string()),
        ]
    }
}

/// Adds the correlation headers to an outgoing reqwest call.
pub trait CorrelatedRequest {
    fn correlated(self, correlation: &Correlation) -> Self;
}

impl CorrelatedRequest for reqwest::RequestBuilder {
    fn correlated(self, correlation: &Correlation) -> Self {
        correlation
            .outgoing_headers()
            .into_iter()
            .fold(self, |r, (name, value)| r.header(name, value))
    }
}

fn new_id() -> String {
    Uuid::now_v7().to_string()
}

/// An id we accept from outside: 1 to 128 characters of `A-Z a-z 0-9 - _ . : @ / + =`.
/// Enough for UUIDs, ULIDs, W3C trace ids and most vendor formats; nothing that could break a
/// log line or a header.
pub fn valid_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@' | b'/' | b'+' | b'='))
}

/// Tower layer that attaches a [`Correlation`] to each request and echoes its ids.
#[derive(Clone, Copy, Debug, Default)]
pub struct CorrelationLayer;

impl<S> Layer<S> for CorrelationLayer {
    type Service = CorrelationService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CorrelationService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CorrelationService<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for CorrelationService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut corr = Correlation::from_headers(req.headers());
        let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(),
            correlation_id = %corr.correlation_id, request_id = %corr.request_id, trace_id = %corr.trace.trace_id);
        // Exporting to OpenTelemetry: the request's span id is the exported span's id.
        let caller = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        if let Some(own) = adopt_span(&span, caller.as_ref()) {
            if own.trace_id != corr.trace.trace_id {
                span.record("trace_id", own.trace_id.as_str());
            }
            corr.trace = own;
        }
        req.extensions_mut().insert(corr.clone());
        let fut = {
            let _g = span.enter();
            self.inner.call(req)
        };
        Box::pin(async move {
            let mut res = fut.await?;
            let h = res.headers_mut();
            // Both ids passed `valid_id` or are UUIDs, so they are valid header values.
            if let Ok(v) = HeaderValue::from_str(&corr.correlation_id) {
                h.insert(CORRELATION_ID, v);
            }
            if let Ok(v) = HeaderValue::from_str(&corr.request_id) {
                h.insert(REQUEST_ID, v);
            }
            if let Ok(v) = HeaderValue::from_str(&corr.trace.to_string()) {
                h.insert(TRACEPARENT, v);
            }
            Ok(res)
        })
    }
}

/// Extract the request's [`Correlation`] (a fresh one if the layer is not installed).
impl<S: Send + Sync> FromRequestParts<S> for Correlation {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(match parts.extensions.get::<Correlation>() {
            Some(c) => c.clone(),
            None => Correlation::from_headers(&parts.headers),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_follows_w3c() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(ok).unwrap();
        assert_eq!(
            (t.trace_id.as_str(), t.span_id.as_str(), t.flags),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
        );
        assert_eq!(t.to_string(), ok);
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
        // A later version with more fields is read by its prefix.
        assert!(TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever").is_some());
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // invalid version
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", // v00 too long
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // misplaced dash
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",  // short
            "",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn keeps_valid_ids_and_replaces_invalid_ones() {
        let mut h = HeaderMap::new();
        h.insert(CORRELATION_ID, HeaderValue::from_static("abc-123"));
        h.insert(CAUSATION_ID, HeaderValue::from_static("evt-9"));
        let c = Correlation::from_headers(&h);
        assert_eq!(c.correlation_id, "abc-123");
        assert_eq!(c.caused_by.as_deref(), Some("evt-9"));

        for bad in ["", "has space", "semi;colon", "<script>", &"x".repeat(129)] {
            let mut h = HeaderMap::new();
            h.insert(CORRELATION_ID, HeaderValue::from_str(bad).unwrap());
            let c = Correlation::from_headers(&h);
            assert_ne!(c.correlation_id, bad);
            assert!(Uuid::parse_str(&c.correlation_id).is_ok());
        }
        let mut h = HeaderMap::new();
        h.insert(CORRELATION_ID, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert!(Uuid::parse_str(&Correlation::from_headers(&h).correlation_id).is_ok());
    }
}
