//! Webhook Receiver: verify that a delivery really comes from its sender, before anything else
//! touches it.
//!
//! A webhook endpoint is a public URL; without a signature check anyone can post a forged
//! "invoice paid". Each scheme here is an HMAC-SHA256 over the **raw body bytes** (plus, for
//! Stripe and Standard Webhooks, a signed timestamp that bounds replays):
//!
//! | scheme | headers | spec |
//! |---|---|---|
//! | [`stripe`] | `Stripe-Signature: t=…,v1=…` | [Stripe][stripe-spec] |
//! | [`github`] | `X-Hub-Signature-256: sha256=…`, `X-GitHub-Delivery` | [GitHub][github-spec] |
//! | [`standard`] | `webhook-id`, `webhook-timestamp`, `webhook-signature` | [Standard Webhooks][standard-spec] |
//!
//! [stripe-spec]: https://docs.stripe.com/webhooks/signature
//! [github-spec]: https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
//! [standard-spec]: https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
//!
//! ```
//! use seaport::webhooks::{StandardWebhooksVerifier, standard};
//!
//! let verifier = StandardWebhooksVerifier::new(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])?;
//! let body = br#"{"type":"invoice.paid"}"#;
//! let now = chrono::Utc::now();
//! let headers = standard::sign_headers("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_1", now.timestamp(), body)?;
//!
//! let verified = verifier.verify(&headers, body, now)?;
//! assert_eq!(verified.id, "msg_1"); // the dedupe key, e.g. for the inbox
//! // Only now parse `body` as JSON.
//! # Ok::<(), seaport::webhooks::VerifyError>(())
//! ```
//!
//! Rules every verifier keeps: the body is verified exactly as received (never re-serialized
//! JSON); tags are compared in constant time ([`hmac::Mac::verify_slice`]); several secrets may be
//! configured so a secret can be rotated without dropping deliveries; errors and `Debug` output
//! never contain a secret or a signature.

pub mod github;
pub mod standard;
pub mod stripe;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

pub use github::GitHubVerifier;
pub use standard::StandardWebhooksVerifier;
pub use stripe::StripeVerifier;

/// How far a signed timestamp may be from `now`, either way: 5 minutes, the default of Stripe's
/// SDKs and of the Standard Webhooks reference libraries.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a delivery was rejected. Answer all of them with a 4xx and do not process the body.
///
/// Messages name headers and numbers only: never a secret, a signature or body content, so they
/// are safe to log and to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// The header is present but cannot be parsed (not ASCII, no timestamp, bad encoding…).
    #[error("malformed {0} header")]
    MalformedHeader(&'static str),
    /// No signature of a supported version matches the body under any configured secret.
    #[error("no signature matches the payload")]
    NoMatchingSignature,
    #[error("signed timestamp is {age_secs}s old, beyond the tolerance")]
    TimestampTooOld { age_secs: u64 },
    #[error("signed timestamp is {ahead_secs}s in the future, beyond the tolerance")]
    TimestampInFuture { ahead_secs: u64 },
    /// A configured secret is empty or (Standard Webhooks) not base64.
    #[error("invalid webhook secret")]
    InvalidSecret,
    /// The signature is valid but the body lacks what the receiver needs (Stripe: the event `id`).
    #[error("malformed payload: {0}")]
    MalformedPayload(&'static str),
}

/// What a receiver needs from a verified delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// The dedupe key, stable across the sender's retries: Stripe's event `id` (from the body),
    /// GitHub's `X-GitHub-Delivery`, Standard Webhooks' `webhook-id`.
    pub id: String,
    /// When this attempt was signed (not when the event happened); `None` for GitHub, which
    /// signs no timestamp.
    pub timestamp: Option<DateTime<Utc>>,
}

/// One interface over the schemes, so a receiver can hold `Box<dyn WebhookVerifier>` per
/// provider.
pub trait WebhookVerifier: Send + Sync {
    /// Verifies `body` (the raw bytes as received) against `headers`, as of `now`.
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<Verified, VerifyError>;

    /// [`verify`](Self::verify) as of the current time.
    fn verify_now(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify(headers, body, Utc::now())
    }
}

/// Key material. `Debug` and `Display` are redacted so that a verifier can be logged or
/// `dbg!`-ed without leaking it; there is deliberately no `PartialEq` (it would not be
/// constant-time).
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// The key bytes as given (Stripe and GitHub use the secret string's UTF-8 bytes as is).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into().into_boxed_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&[u8]> for Secret {
    fn from(b: &[u8]) -> Self {
        Self::new(b)
    }
}

impl From<Vec<u8>> for Secret {
    fn from(b: Vec<u8>) -> Self {
        Self::new(b)
    }
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of the concatenation of `parts`, without building the concatenation.
fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

fn tag(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    mac(key, parts).finalize().into_bytes().to_vec()
}

/// Whether any candidate tag matches the HMAC of `parts` under any secret. Each comparison is
/// constant-time (`verify_slice`); which pair matched is not secret, so stopping early is fine.
fn any_matches(secrets: &[Secret], parts: &[&[u8]], candidates: &[Vec<u8>]) -> bool {
    secrets.iter().any(|secret| {
        let mac = mac(secret.expose(), parts);
        candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    })
}

/// Collects secrets, refusing an empty list or an empty secret (which would accept anyone who
/// knows the scheme).
fn collect_secrets(secrets: impl IntoIterator<Item = Secret>) -> Result<Vec<Secret>, VerifyError> {
    let secrets: Vec<Secret> = secrets.into_iter().collect();
    if secrets.is_empty() || secrets.iter().any(Secret::is_empty) {
        return Err(VerifyError::InvalidSecret);
    }
    Ok(secrets)
}

/// The first value of header `name` as a str; `display` is the name used in errors.
fn header<'a>(headers: &'a HeaderMap, name: &str, display: &'static str) -> Result<&'a str, VerifyError> {
    headers
        .get(name)
        .ok_or(VerifyError::MissingHeader(display))?
        .to_str()
        .map_err(|_| VerifyError::MalformedHeader(display))
}

/// Rejects a signed timestamp further than `tolerance` from `now` in either direction (exactly
/// `tolerance` is accepted, as in the reference libraries).
fn check_timestamp(signed: DateTime<Utc>, now: DateTime<Utc>, tolerance: Duration) -> Result<(), VerifyError> {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age = now.timestamp().saturating_sub(signed.timestamp());
    if age > tolerance {
        Err(VerifyError::TimestampTooOld {
            age_secs: age.unsigned_abs(),
        })
    } else if age < -tolerance {
        Err(VerifyError::TimestampInFuture {
            ahead_secs: age.unsigned_abs(),
        })
    } else {
        Ok(())
    }
}
