//! The HTTP client of the CRM: correlation headers on every call, a timeout, and a circuit
//! breaker that counts transport errors, timeouts and 5xx answers (a 404 is an answer, and
//! other 4xx are our mistakes, so neither says anything about the CRM's health).

use std::time::Duration;

use seaport::breaker::{BreakerError, CircuitBreaker, Snapshot};
use seaport::http::Correlation;
use seaport::http::correlation::CorrelatedRequest;

use super::adapter::{self, TranslationError};
use super::customer::{Customer, CustomerId};

#[derive(Debug, thiserror::Error)]
pub enum CrmError {
    #[error("customer {0} does not exist in the CRM")]
    NotFound(String),
    #[error("the CRM is unavailable: {0}")]
    Unavailable(String),
    #[error("the CRM circuit breaker is open (retry after {0:?})")]
    CircuitOpen(Duration),
    #[error("the CRM refused the lookup with status {0}")]
    Refused(u16),
    #[error(transparent)]
    Translation(#[from] TranslationError),
}

/// What one HTTP exchange with the CRM gave, before translation.
enum Answer {
    Found(bytes::Bytes),
    NotFound,
    Refused(u16),
}

#[derive(Clone)]
pub struct CrmClient {
    base: reqwest::Url,
    http: reqwest::Client,
    timeout: Duration,
    breaker: CircuitBreaker,
}

impl CrmClient {
    /// A client of the CRM at `base` (e.g. `http://127.0.0.1:8090`), behind a breaker with the
    /// catalog's settings (5 failures in a row, or half of the calls of the last minute with at
    /// least 10 calls, open it; a probe after 30 s).
    pub fn new(base: &str, timeout: Duration) -> Result<Self, String> {
        let breaker = CircuitBreaker::builder("crm")
            .failure_threshold(5)
            .failure_rate(0.5, seaport::breaker::Window::Time(Duration::from_secs(60)))
            .recovery_timeout(Duration::from_secs(30))
            .build();
        Self::with_breaker(base, timeout, breaker)
    }

    pub fn with_breaker(base: &str, timeout: Duration, breaker: CircuitBreaker) -> Result<Self, String> {
        let base = reqwest::Url::parse(base).map_err(|e| format!("invalid CRM URL {base:?}: {e}"))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(format!("invalid CRM URL {base}: expected http(s)://host[:port][/path]"));
        }
        Ok(CrmClient {
            base,
            http: reqwest::Client::new(),
            timeout,
            breaker,
        })
    }

    /// The breaker's state and counts, for `/healthz`.
    pub fn breaker(&self) -> Snapshot {
        self.breaker.snapshot()
    }

    /// Look a customer up and translate the answer into the domain's terms.
    pub async fn customer(&self, id: &CustomerId, corr: &Correlation) -> Result<Customer, CrmError> {
        // Transport errors, timeouts and 5xx are `Err` (the breaker counts them); 404 and other
        // 4xx are answers.
        let answer = self.breaker.call(|| self.fetch(id, corr)).await.map_err(|e| match e {
            BreakerError::Open(open) => CrmError::CircuitOpen(open.retry_after),
            BreakerError::Inner(e) => e,
        })?;
        match answer {
            Answer::Found(body) => Ok(adapter::translate(id, &body)?),
            Answer::NotFound => Err(CrmError::NotFound(id.to_string())),
            Answer::Refused(status) => Err(CrmError::Refused(status)),
        }
    }

    async fn fetch(&self, id: &CustomerId, corr: &Correlation) -> Result<Answer, CrmError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .push("customers")
            .push(id.as_str());
        let res = self
            .http
            .get(url)
            .timeout(self.timeout)
            .header("accept", "application/json")
            .correlated(corr)
            .send()
            .await
            .map_err(|e| CrmError::Unavailable(transport_error(e)))?;
        let status = res.status();
        if status.is_server_error() {
            return Err(CrmError::Unavailable(format!("status {}", status.as_u16())));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Answer::NotFound);
        }
        if !status.is_success() {
            return Ok(Answer::Refused(status.as_u16()));
        }
        let body = res
            .bytes()
            .await
            .map_err(|e| CrmError::Unavailable(transport_error(e)))?;
        Ok(Answer::Found(body))
    }
}

fn transport_error(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        // Without the URL: it is ours, and logs of it say nothing new.
        e.without_url().to_string()
    }
}
