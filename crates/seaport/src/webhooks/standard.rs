//! Standard Webhooks (symmetric, `v1`): headers `webhook-id`, `webhook-timestamp` (unix secs) and
//! `webhook-signature`, a space-separated list of `v1,<base64 HMAC-SHA256>` of
//! `"{id}.{timestamp}.{raw body}"`. The key is the base64 part of the `whsec_…` secret, decoded.
//!
//! Spec: <https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>.
//! The id and the timestamp are signed, so unlike GitHub's delivery id the dedupe key cannot be
//! swapped by a replayer, and the timestamp bounds replays. Other versions (`v1a`, asymmetric
//! ed25519) are ignored. Svix sends the same scheme under `svix-*` names; those are accepted
//! when the `webhook-*` header is absent.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderValue};

use super::{DEFAULT_TOLERANCE, Secret, Verified, VerifyError, WebhookVerifier};

/// Header names (lower case, as `HeaderMap` stores them).
pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";
const SVIX_ID_HEADER: &str = "svix-id";
const SVIX_TIMESTAMP_HEADER: &str = "svix-timestamp";
const SVIX_SIGNATURE_HEADER: &str = "svix-signature";

const SECRET_PREFIX: &str = "whsec_";

/// Verifies Standard Webhooks signatures under any of the configured secrets (rotation).
#[derive(Debug, Clone)]
pub struct StandardWebhooksVerifier {
    keys: Vec<Secret>,
    tolerance: Duration,
}

impl StandardWebhooksVerifier {
    /// The `whsec_<base64>` secrets (prefix optional, as in the reference libraries); a delivery
    /// signed with any of them is accepted (rotation). Tolerance defaults to 5 minutes. Empty list,
    /// not base64 or empty key → [`VerifyError::InvalidSecret`].
    pub fn new<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) -> Result<Self, VerifyError> {
        let keys = secrets
            .into_iter()
            .map(|s| decode_secret(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            keys: super::collect_secrets(keys)?,
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// How far `webhook-timestamp` may be from now, either way (default 5 minutes).
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Checks the signature over id, timestamp and the raw `body`, then the timestamp. The
    /// verified `webhook-id` is the dedupe key.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<Verified, VerifyError> {
        let id = header(headers, ID_HEADER, SVIX_ID_HEADER)?;
        let raw_timestamp = header(headers, TIMESTAMP_HEADER, SVIX_TIMESTAMP_HEADER)?;
        let signatures = header(headers, SIGNATURE_HEADER, SVIX_SIGNATURE_HEADER)?;
        if id.is_empty() {
            return Err(VerifyError::MalformedHeader(ID_HEADER));
        }
        let malformed_timestamp = VerifyError::MalformedHeader(TIMESTAMP_HEADER);
        let seconds = raw_timestamp
            .trim()
            .parse::<i64>()
            .map_err(|_| malformed_timestamp.clone())?;
        let timestamp = DateTime::from_timestamp(seconds, 0).ok_or(malformed_timestamp)?;

        // Undecodable entries cannot match; they are dropped like other versions.
        let candidates: Vec<Vec<u8>> = signatures
            .split(' ')
            .filter_map(|entry| entry.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .filter_map(|(_, signature)| BASE64.decode(signature).ok())
            .collect();
        let seconds = seconds.to_string();
        if !super::any_matches(
            &self.keys,
            &[id.as_bytes(), b".", seconds.as_bytes(), b".", body],
            &candidates,
        ) {
            return Err(VerifyError::NoMatchingSignature);
        }
        super::check_timestamp(timestamp, now, self.tolerance)?;
        Ok(Verified {
            id: id.to_owned(),
            timestamp: Some(timestamp),
        })
    }

    /// [`verify`](Self::verify) as of the current time.
    pub fn verify_now(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify(headers, body, Utc::now())
    }
}

impl WebhookVerifier for StandardWebhooksVerifier {
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<Verified, VerifyError> {
        StandardWebhooksVerifier::verify(self, headers, body, now)
    }
}

/// One `webhook-signature` entry, `v1,<base64>`, for `body` sent as message `msg_id` at unix
/// time `timestamp`. For tests and demo senders; a sender rotating keys joins several with ' '.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, VerifyError> {
    let key = decode_secret(secret)?;
    let timestamp = timestamp.to_string();
    let tag = super::tag(
        key.expose(),
        &[msg_id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    );
    Ok(format!("v1,{}", BASE64.encode(tag)))
}

/// The three headers of a signed delivery. `msg_id` must be a valid header value (else
/// [`VerifyError::MalformedHeader`]).
pub fn sign_headers(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<HeaderMap, VerifyError> {
    let signature = sign(secret, msg_id, timestamp, body)?;
    let mut headers = HeaderMap::new();
    let id = HeaderValue::from_str(msg_id).map_err(|_| VerifyError::MalformedHeader(ID_HEADER))?;
    headers.insert(ID_HEADER, id);
    headers.insert(TIMESTAMP_HEADER, HeaderValue::from(timestamp));
    headers.insert(
        SIGNATURE_HEADER,
        HeaderValue::from_str(&signature).expect("base64 is a valid header value"),
    );
    Ok(headers)
}

/// `whsec_<base64>` (prefix optional) → key bytes.
fn decode_secret(secret: &str) -> Result<Secret, VerifyError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = BASE64.decode(encoded).map_err(|_| VerifyError::InvalidSecret)?;
    if key.is_empty() {
        return Err(VerifyError::InvalidSecret);
    }
    Ok(Secret::new(key))
}

/// `name`, or its Svix alias when `name` is absent; errors name the `webhook-*` header.
fn header<'a>(headers: &'a HeaderMap, name: &'static str, alias: &str) -> Result<&'a str, VerifyError> {
    let present = if headers.contains_key(name) || !headers.contains_key(alias) {
        name
    } else {
        alias
    };
    super::header(headers, present, name)
}
