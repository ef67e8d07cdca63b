//! Correlation Tracking: every request gets a correlation id (the caller's `X-Correlation-Id` if
//! it is well-formed, a fresh UUIDv7 otherwise) and a request id; both are echoed on the response
//! and available to handlers, which stamp them on every event they write.

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

/// The correlation context of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Correlation {
    /// Shared by everything the original request caused, across services.
    pub correlation_id: String,
    /// This request's own id: the causation id of the events it writes.
    pub request_id: String,
    /// What caused this request upstream (the caller's `X-Causation-Id`), if it said.
    pub caused_by: Option<String>,
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
        }
    }

    /// Headers for an outgoing call made while handling this request.
    pub fn outgoing_headers(&self) -> [(&'static str, String); 2] {
        [
            (CORRELATION_ID, self.correlation_id.clone()),
            (CAUSATION_ID, self.request_id.clone()),
        ]
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
        let corr = Correlation::from_headers(req.headers());
        let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(),
            correlation_id = %corr.correlation_id, request_id = %corr.request_id);
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
