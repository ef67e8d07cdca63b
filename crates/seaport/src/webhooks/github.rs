//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`, keyed with the
//! webhook secret's UTF-8 bytes. Spec:
//! <https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries>.
//!
//! GitHub signs no timestamp, so a captured delivery can be replayed for ever; the only defence
//! is deduplication on `X-GitHub-Delivery` (a GUID kept across redeliveries). That header is
//! **not** signed either: a replay under a fresh GUID gets past dedupe, so handlers should also be
//! idempotent on the content (e.g. the issue or commit it is about).

use chrono::{DateTime, Utc};
use http::HeaderMap;

use super::{Secret, Verified, VerifyError, WebhookVerifier};

/// Header names (lower case, as `HeaderMap` stores them).
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const DELIVERY_HEADER: &str = "x-github-delivery";
const SIGNATURE_DISPLAY: &str = "X-Hub-Signature-256";
const DELIVERY_DISPLAY: &str = "X-GitHub-Delivery";

/// Verifies `X-Hub-Signature-256`. GitHub holds one secret per webhook; accepting several here
/// lets the secret be changed without rejecting deliveries signed just before the change.
#[derive(Debug, Clone)]
pub struct GitHubVerifier {
    secrets: Vec<Secret>,
}

impl GitHubVerifier {
    /// The webhook secret. Empty → [`VerifyError::InvalidSecret`].
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, VerifyError> {
        Self::with_secrets([secret])
    }

    /// Any of these secrets may have signed the delivery (rotation).
    pub fn with_secrets<S: AsRef<[u8]>>(secrets: impl IntoIterator<Item = S>) -> Result<Self, VerifyError> {
        let secrets = secrets.into_iter().map(|s| Secret::new(s.as_ref()));
        Ok(Self {
            secrets: super::collect_secrets(secrets)?,
        })
    }

    /// Checks the signature over the raw `body`, then requires `X-GitHub-Delivery` as the dedupe
    /// key. `now` is unused (nothing to compare it with); it is there so that all verifiers share
    /// one shape.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], _now: DateTime<Utc>) -> Result<Verified, VerifyError> {
        let header = super::header(headers, SIGNATURE_HEADER, SIGNATURE_DISPLAY)?;
        let hex_tag = header
            .strip_prefix("sha256=")
            .ok_or(VerifyError::MalformedHeader(SIGNATURE_DISPLAY))?;
        let tag = hex::decode(hex_tag).map_err(|_| VerifyError::MalformedHeader(SIGNATURE_DISPLAY))?;
        if !super::any_matches(&self.secrets, &[body], &[tag]) {
            return Err(VerifyError::NoMatchingSignature);
        }
        Ok(Verified {
            id: delivery_id(headers)?.to_owned(),
            timestamp: None,
        })
    }

    /// [`verify`](Self::verify) as of the current time.
    pub fn verify_now(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify(headers, body, Utc::now())
    }
}

impl WebhookVerifier for GitHubVerifier {
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<Verified, VerifyError> {
        GitHubVerifier::verify(self, headers, body, now)
    }
}

/// The `X-GitHub-Delivery` GUID, GitHub's dedupe key (the same across redeliveries). Missing →
/// [`VerifyError::MissingHeader`]; empty or not ASCII → [`VerifyError::MalformedHeader`].
pub fn delivery_id(headers: &HeaderMap) -> Result<&str, VerifyError> {
    let id = super::header(headers, DELIVERY_HEADER, DELIVERY_DISPLAY)?.trim();
    if id.is_empty() {
        return Err(VerifyError::MalformedHeader(DELIVERY_DISPLAY));
    }
    Ok(id)
}

/// An `X-Hub-Signature-256` value for `body`: `sha256=<hex>`. For tests and demo senders.
pub fn sign(secret: impl AsRef<[u8]>, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(super::tag(secret.as_ref(), &[body])))
}
