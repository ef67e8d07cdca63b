//! Stripe: `Stripe-Signature: t=<unix secs>,v1=<hex>[,v1=<hex>…]`, where each `v1` is the hex
//! HMAC-SHA256 of `"{t}.{raw body}"` keyed with the endpoint secret. The whole `whsec_…` string
//! is the key, as UTF-8 bytes (not base64-decoded): that is what Stripe's SDKs do
//! (`stripe-python` `WebhookSignature._compute_signature`, `stripe-node` `computeHMACSignature`).
//!
//! Spec: <https://docs.stripe.com/webhooks/signature>. Stripe sends several `v1` while an
//! endpoint secret is being rolled; other schemes (`v0`, test-mode) are ignored.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http::HeaderMap;

use super::{DEFAULT_TOLERANCE, Secret, Verified, VerifyError, WebhookVerifier};

/// The header name (lower case, as `HeaderMap` stores it).
pub const SIGNATURE_HEADER: &str = "stripe-signature";
const DISPLAY: &str = "Stripe-Signature";

/// Verifies `Stripe-Signature`. Several secrets are accepted so the endpoint secret can be
/// rotated on our side without dropping deliveries.
#[derive(Debug, Clone)]
pub struct StripeVerifier {
    secrets: Vec<Secret>,
    tolerance: Duration,
}

impl StripeVerifier {
    /// The endpoint secrets (`whsec_…`, used as is); a delivery signed with any of them is
    /// accepted, so a secret can be rolled without downtime. Tolerance defaults to 5 minutes.
    /// Empty list or empty secret → [`VerifyError::InvalidSecret`].
    pub fn new<S: AsRef<[u8]>>(secrets: impl IntoIterator<Item = S>) -> Result<Self, VerifyError> {
        let secrets = secrets.into_iter().map(|s| Secret::new(s.as_ref()));
        Ok(Self {
            secrets: super::collect_secrets(secrets)?,
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// How far `t` may be from now. Stripe's SDKs bound only the age; this also rejects a `t`
    /// more than `tolerance` in the future, which no honest clock produces.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Checks the signature over the raw `body`, then the timestamp, then reads the event `id`
    /// from the (now trusted) JSON body as the dedupe key.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<Verified, VerifyError> {
        let header = super::header(headers, SIGNATURE_HEADER, DISPLAY)?;
        let parsed = parse(header)?;
        let t = parsed.t.to_string();
        if !super::any_matches(&self.secrets, &[t.as_bytes(), b".", body], &parsed.v1) {
            return Err(VerifyError::NoMatchingSignature);
        }
        super::check_timestamp(parsed.timestamp, now, self.tolerance)?;
        Ok(Verified {
            id: event_id(body)?,
            timestamp: Some(parsed.timestamp),
        })
    }

    /// [`verify`](Self::verify) as of the current time.
    pub fn verify_now(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify(headers, body, Utc::now())
    }
}

impl WebhookVerifier for StripeVerifier {
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<Verified, VerifyError> {
        StripeVerifier::verify(self, headers, body, now)
    }
}

/// A `Stripe-Signature` value for `body` signed at unix time `t`, as Stripe's
/// `generateTestHeaderString` builds it: `t=<t>,v1=<hex>`. For tests and demo senders.
pub fn sign(secret: impl AsRef<[u8]>, t: i64, body: &[u8]) -> String {
    let t = t.to_string();
    let tag = super::tag(secret.as_ref(), &[t.as_bytes(), b".", body]);
    format!("t={t},v1={}", hex::encode(tag))
}

struct Parsed {
    t: i64,
    timestamp: DateTime<Utc>,
    /// Decoded `v1` tags; entries that are not hex cannot match and are dropped.
    v1: Vec<Vec<u8>>,
}

/// `key=value` pairs separated by commas, in any order. Exactly one `t`; any number of `v1`;
/// unknown keys ignored. No `v1` at all is [`VerifyError::NoMatchingSignature`].
fn parse(header: &str) -> Result<Parsed, VerifyError> {
    let malformed = VerifyError::MalformedHeader(DISPLAY);
    let mut t = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" if t.is_some() => return Err(malformed),
            "t" => t = Some(value.parse::<i64>().map_err(|_| malformed.clone())?),
            "v1" => v1.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let t = t.ok_or(malformed.clone())?;
    let timestamp = DateTime::from_timestamp(t, 0).ok_or(malformed)?;
    if v1.is_empty() {
        return Err(VerifyError::NoMatchingSignature);
    }
    Ok(Parsed { t, timestamp, v1 })
}

/// The event id (`evt_…`), which Stripe keeps across retries of one event: the dedupe key.
fn event_id(body: &[u8]) -> Result<String, VerifyError> {
    #[derive(serde::Deserialize)]
    struct Event {
        id: String,
    }
    // Only an object: the derived `Deserialize` would also read `["evt_1"]` as a sequence.
    if !body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{')
    {
        return Err(VerifyError::MalformedPayload("not a JSON object with a string `id`"));
    }
    serde_json::from_slice::<Event>(body)
        .map(|event| event.id)
        .map_err(|_| VerifyError::MalformedPayload("not a JSON object with a string `id`"))
}
