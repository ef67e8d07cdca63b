//! Idempotency-Key: a client names a mutation with a key; a repeat of the same request with the
//! same key returns the stored response instead of doing the work again.
//!
//! The stored response is written in the *same* transaction as the handler's own writes: there is
//! no moment at which the effect exists without the key, or the key without the effect. Keys are
//! scoped to the caller, so one caller can never be served another's response.
//!
//! Header: the IETF `Idempotency-Key` (an RFC 8941 sf-string, `"..."`; the bare form used by
//! Stripe is accepted too) or the catalog's `X-Idempotency-Key`.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::problem::Problem;
use crate::on_conn;
use crate::store::{Conn, now_ms};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const X_IDEMPOTENCY_KEY: &str = "x-idempotency-key";
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Longest key accepted (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

/// Default retention of stored responses.
pub const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A validated idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse one header value: an sf-string (`"key"`, with `\"` and `\\` escapes) or a bare key;
    /// 1..=255 printable ASCII characters.
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(raw).map_err(|_| "idempotency key must be ASCII".to_owned())?;
        let text = text.trim_matches(|c| c == ' ' || c == '\t');
        let key = if text.len() >= 2 && text.starts_with('"') && text.ends_with('"') {
            let mut out = String::with_capacity(text.len());
            let mut chars = text[1..text.len() - 1].chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(e @ ('"' | '\\')) => out.push(e),
                        _ => return Err("invalid escape in idempotency key string".into()),
                    },
                    '"' => return Err("unescaped quote in idempotency key string".into()),
                    c => out.push(c),
                }
            }
            out
        } else if text.contains('"') {
            return Err("idempotency key has unbalanced quotes".into());
        } else {
            text.to_owned()
        };
        if key.is_empty() {
            return Err("idempotency key is empty".into());
        }
        if key.len() > MAX_KEY_LEN {
            return Err(format!("idempotency key is longer than {MAX_KEY_LEN} characters"));
        }
        if !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err("idempotency key must be printable ASCII".into());
        }
        Ok(IdempotencyKey(key))
    }

    /// The key from `Idempotency-Key` or `X-Idempotency-Key`. `Ok(None)` if neither is present;
    /// a malformed key, several values, or two headers that disagree are errors.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, Problem> {
        let mut found: Option<IdempotencyKey> = None;
        for name in [IDEMPOTENCY_KEY, X_IDEMPOTENCY_KEY] {
            let mut values = headers.get_all(name).iter();
            let Some(v) = values.next() else { continue };
            if values.next().is_some() {
                return Err(key_problem(format!("{name} given more than once")));
            }
            let key = Self::parse(v.as_bytes()).map_err(key_problem)?;
            match &found {
                Some(k) if *k != key => {
                    return Err(key_problem("Idempotency-Key and X-Idempotency-Key disagree".into()));
                }
                _ => found = Some(key),
            }
        }
        Ok(found)
    }

    /// The key, or a 400 problem saying it is required.
    pub fn required(headers: &HeaderMap) -> Result<Self, Problem> {
        Self::from_headers(headers)?.ok_or_else(|| {
            Problem::bad_request("this operation requires an Idempotency-Key (or X-Idempotency-Key) header")
                .with_type("/problems/idempotency-key-missing", "Idempotency key missing")
        })
    }
}

fn key_problem(detail: String) -> Problem {
    Problem::bad_request(detail).with_type("/problems/idempotency-key-invalid", "Invalid idempotency key")
}

/// The fingerprint of a request: same key with another fingerprint is a client error (422).
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    hex::encode(h.finalize())
}

/// A response kept for replay.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl StoredResponse {
    /// The stored response, marked `Idempotent-Replayed: true`.
    pub fn replay(self) -> Response {
        let mut res = (StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK), self.body).into_response();
        for (name, value) in self.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                res.headers_mut().insert(n, v);
            }
        }
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        res
    }
}

/// What the store knows about a key.
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    /// Unknown (or expired): the key is now claimed by this transaction; do the work, then
    /// [`complete`] in the same transaction.
    New,
    /// Completed before with the same request: replay this.
    Replay(StoredResponse),
    /// Used before for a different request.
    Mismatch,
}

/// Look the key up and, if it is new, claim it, inside the transaction that will do the work.
///
/// The claim is a row insert: on PostgreSQL a concurrent request with the same key blocks on it
/// until this transaction ends, then replays what it stored; if this transaction rolls back
/// (handler failure), the key is free again. On SQLite writers are serialised anyway.
pub async fn begin<'c>(
    tx: impl Into<Conn<'c>>,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: std::time::Duration,
) -> Result<Lookup, sqlx::Error> {
    let now = now_ms();
    let expires = now + retention.as_millis() as i64;
    on_conn!(tx, c => {
        // An expired entry no longer counts.
        sqlx::query("DELETE FROM seaport_idempotency_keys WHERE scope = $1 AND key = $2 AND expires_at <= $3")
            .bind(scope)
            .bind(key.as_str())
            .bind(now)
            .execute(&mut *c)
            .await?;
        let claimed = sqlx::query(
            "INSERT INTO seaport_idempotency_keys (scope, key, fingerprint, status, headers, body, created_at, expires_at)
             VALUES ($1, $2, $3, 0, '[]', $4, $5, $6)
             ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(scope)
        .bind(key.as_str())
        .bind(fingerprint)
        .bind(Vec::<u8>::new())
        .bind(now)
        .bind(expires)
        .execute(&mut *c)
        .await?
        .rows_affected();
        if claimed == 1 {
            return Ok(Lookup::New);
        }
        let r = sqlx::query("SELECT fingerprint, status, headers, body FROM seaport_idempotency_keys WHERE scope = $1 AND key = $2")
            .bind(scope)
            .bind(key.as_str())
            .fetch_one(&mut *c)
            .await?;
        Ok(if r.get::<String, _>(0) != fingerprint {
            Lookup::Mismatch
        } else {
            Lookup::Replay(StoredResponse {
                status: r.get::<i64, _>(1) as u16,
                headers: serde_json::from_str(&r.get::<String, _>(2)).unwrap_or_default(),
                body: r.get(3),
            })
        })
    })
}

/// Store the response for a key claimed by [`begin`], in the same transaction.
pub async fn complete<'c>(
    tx: impl Into<Conn<'c>>,
    scope: &str,
    key: &IdempotencyKey,
    response: &StoredResponse,
) -> Result<(), sqlx::Error> {
    let headers = serde_json::to_string(&response.headers).expect("strings serialise");
    on_conn!(tx, c => sqlx::query(
        "UPDATE seaport_idempotency_keys SET status = $1, headers = $2, body = $3 WHERE scope = $4 AND key = $5",
    )
    .bind(response.status as i64)
    .bind(&headers)
    .bind(&response.body)
    .bind(scope)
    .bind(key.as_str())
    .execute(c)
    .await
    .map(|_| ()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_in_both_forms() {
        assert_eq!(IdempotencyKey::parse(b"abc-1").unwrap().as_str(), "abc-1");
        assert_eq!(
            IdempotencyKey::parse(br#""8e03978e-40d5""#).unwrap().as_str(),
            "8e03978e-40d5"
        );
        assert_eq!(IdempotencyKey::parse(br#""a\"b""#).unwrap().as_str(), "a\"b");
        for bad in [
            &b""[..],
            b"\"\"",
            b"\"abc",
            b"a\"b",
            b"\"a\\x\"",
            b"caf\xc3\xa9",
            b"\x01",
        ] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IdempotencyKey::parse("k".repeat(255).as_bytes()).is_ok());
        assert!(IdempotencyKey::parse("k".repeat(256).as_bytes()).is_err());
    }

    #[test]
    fn reads_either_header_and_rejects_disagreement() {
        let mut h = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&h).unwrap(), None);
        assert_eq!(IdempotencyKey::required(&h).unwrap_err().status, 400);
        h.insert(X_IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        assert_eq!(IdempotencyKey::required(&h).unwrap().as_str(), "k1");
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("\"k1\""));
        assert_eq!(IdempotencyKey::required(&h).unwrap().as_str(), "k1");
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k2"));
        assert_eq!(IdempotencyKey::from_headers(&h).unwrap_err().status, 400);
    }

    #[test]
    fn fingerprint_depends_on_every_part() {
        let a = fingerprint("POST", "/cases", b"{}");
        assert_eq!(a, fingerprint("POST", "/cases", b"{}"));
        assert_ne!(a, fingerprint("PUT", "/cases", b"{}"));
        assert_ne!(a, fingerprint("POST", "/other", b"{}"));
        assert_ne!(a, fingerprint("POST", "/cases", b"{ }"));
    }
}
