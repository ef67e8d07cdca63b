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
use crate::store::{Conn, Db, now_ms};
use std::time::Duration;

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const X_IDEMPOTENCY_KEY: &str = "x-idempotency-key";
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Longest key accepted (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

/// Default retention of stored responses.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long a claimed key stays "in flight" before a crashed request's claim may be taken over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

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

/// The outcome of claiming a key before running the handler.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// The key is ours (new, expired, or abandoned by a crashed request): run the handler, then
    /// [`complete`] in the handler's transaction. The token proves ownership.
    Claimed(String),
    /// Completed before with the same request: replay this.
    Replay(StoredResponse),
    /// Used before for a different request (422).
    Mismatch,
    /// The first request with this key is still running (409).
    InFlight,
}

/// Claim `key` for this request, in its own short transaction, so that a concurrent request
/// with the same key sees the claim at once (409) instead of waiting or racing.
///
/// A claim not completed within `lease` (the request crashed) may be taken over. Expired keys
/// (older than their retention) no longer count.
pub async fn claim(
    db: &Db,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: Duration,
    lease: Duration,
) -> Result<Claim, sqlx::Error> {
    let now = now_ms();
    // Read first, without the write lock: replays, mismatches and in-flight keys are answered
    // without queueing behind writers (on SQLite, behind the very request that holds the key).
    let existing: Option<(String, i64, String, Vec<u8>, i64, i64)> = crate::on_pool!(db, p => sqlx::query_as(
        "SELECT fingerprint, status, headers, body, locked_until, expires_at FROM seaport_idempotency_keys
         WHERE scope = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key.as_str())
    .fetch_optional(p)
    .await?);
    // Only a key seen expired needs clearing (one that appears meanwhile is not expired).
    let clear_expired = existing.is_some();
    if let Some((fp, status, headers, body, locked_until, expires_at)) = existing
        && expires_at > now
    {
        if fp != fingerprint {
            return Ok(Claim::Mismatch);
        }
        if status != 0 {
            return Ok(Claim::Replay(StoredResponse {
                status: status as u16,
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                body,
            }));
        }
        if locked_until > now {
            return Ok(Claim::InFlight);
        }
    }
    let token = uuid::Uuid::now_v7().to_string();
    let mut tx = db.begin_write().await?;
    if let crate::store::Tx::Postgres(t) = &mut tx {
        // The claim needs no flush of its own: the handler's commit, which makes the outcome
        // durable, comes later in the same WAL and flushes it too; a claim lost in a crash
        // before that only frees the key of a request that never answered.
        sqlx::query("SET LOCAL synchronous_commit TO off")
            .execute(&mut **t)
            .await?;
    }
    let outcome = on_conn!(&mut tx, c => {
        if clear_expired {
            sqlx::query("DELETE FROM seaport_idempotency_keys WHERE scope = $1 AND key = $2 AND expires_at <= $3")
                .bind(scope)
                .bind(key.as_str())
                .bind(now)
                .execute(&mut *c)
                .await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO seaport_idempotency_keys
                (scope, key, fingerprint, status, headers, body, created_at, expires_at, token, locked_until)
             VALUES ($1, $2, $3, 0, '[]', $4, $5, $6, $7, $8)
             ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(scope)
        .bind(key.as_str())
        .bind(fingerprint)
        .bind(Vec::<u8>::new())
        .bind(now)
        .bind(now + retention.as_millis() as i64)
        .bind(&token)
        .bind(now + lease.as_millis() as i64)
        .execute(&mut *c)
        .await?
        .rows_affected();
        if inserted == 1 {
            Claim::Claimed(token.clone())
        } else {
            let r = sqlx::query(
                "SELECT fingerprint, status, headers, body, token, locked_until FROM seaport_idempotency_keys
                 WHERE scope = $1 AND key = $2",
            )
            .bind(scope)
            .bind(key.as_str())
            .fetch_one(&mut *c)
            .await?;
            let (status, old_token, locked_until): (i64, String, i64) = (r.get(1), r.get(4), r.get(5));
            if r.get::<String, _>(0) != fingerprint {
                Claim::Mismatch
            } else if status != 0 {
                Claim::Replay(StoredResponse {
                    status: status as u16,
                    headers: serde_json::from_str(&r.get::<String, _>(2)).unwrap_or_default(),
                    body: r.get(3),
                })
            } else if locked_until > now {
                Claim::InFlight
            } else {
                // Abandoned by a request that never finished: take it over.
                let took = sqlx::query(
                    "UPDATE seaport_idempotency_keys SET token = $1, locked_until = $2
                     WHERE scope = $3 AND key = $4 AND token = $5 AND status = 0",
                )
                .bind(&token)
                .bind(now + lease.as_millis() as i64)
                .bind(scope)
                .bind(key.as_str())
                .bind(&old_token)
                .execute(&mut *c)
                .await?
                .rows_affected();
                if took == 1 { Claim::Claimed(token.clone()) } else { Claim::InFlight }
            }
        }
    });
    tx.commit().await?;
    Ok(outcome)
}

/// Store the response of a claimed key, in the handler's transaction. Returns `false` if the
/// claim was lost meanwhile (taken over after its lease); the caller must then roll back.
pub async fn complete<'c>(
    tx: impl Into<Conn<'c>>,
    scope: &str,
    key: &IdempotencyKey,
    token: &str,
    response: &StoredResponse,
) -> Result<bool, sqlx::Error> {
    let headers = serde_json::to_string(&response.headers).expect("strings serialise");
    let n = on_conn!(tx, c => sqlx::query(
        "UPDATE seaport_idempotency_keys SET status = $1, headers = $2, body = $3, locked_until = 0
         WHERE scope = $4 AND key = $5 AND token = $6 AND status = 0",
    )
    .bind(response.status as i64)
    .bind(&headers)
    .bind(&response.body)
    .bind(scope)
    .bind(key.as_str())
    .bind(token)
    .execute(c)
    .await?
    .rows_affected());
    Ok(n == 1)
}

/// Give a claimed key back (the handler failed), so the client can retry with it.
pub async fn release(db: &Db, scope: &str, key: &IdempotencyKey, token: &str) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    on_conn!(&mut tx, c => sqlx::query("DELETE FROM seaport_idempotency_keys WHERE scope = $1 AND key = $2 AND token = $3 AND status = 0")
        .bind(scope)
        .bind(key.as_str())
        .bind(token)
        .execute(c)
        .await
        .map(|_| ()))?;
    tx.commit().await
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
