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

/// Claim `key` for this request, committed at once (before the handler runs), so that a
/// concurrent request with the same key sees the claim (409) instead of waiting or racing.
/// The [`IdempotencyLayer`](super::IdempotencyLayer) writes such a claim only for a handler that
/// calls out before it writes; otherwise it holds the key without writing (see [`open`]).
///
/// A claim not completed within `lease` (the request crashed) may be taken over. Expired keys
/// (older than their retention) no longer count: a new request reclaims them. Of several requests
/// racing for a new, expired or abandoned key exactly one gets [`Claim::Claimed`]: the claim is a
/// single `INSERT … ON CONFLICT DO UPDATE … WHERE <expired or abandoned>`, which the database
/// applies to the latest version of the row, under its row (PostgreSQL) or write (SQLite) lock.
/// On PostgreSQL the claim also needs the key's advisory lock for its statement, so it answers
/// 409 while a request holds the key without a claim row.
///
/// The claim's commit is not flushed on its own (PostgreSQL: `synchronous_commit = off` for its
/// transaction; SQLite: `synchronous = NORMAL` for its statement). The handler's commit, which
/// makes the outcome durable, comes later in the same write-ahead log and flushes it too; a claim
/// lost in a crash before that only frees the key of a request that never answered.
///
/// - PostgreSQL: one statement, one round trip (on an idle pooled connection, taken without the
///   pool's liveness ping). It inserts the claim, or takes over an expired or abandoned one, or
///   else returns the existing row (to replay, refuse or answer 409). It takes
///   the row's lock even when it changes nothing, so a duplicate that arrives while the first
///   request is storing its response waits for that commit (one round trip) and replays it.
/// - SQLite: a read without the write lock first, so that replays, mismatches and in-flight keys
///   are answered without queueing behind writers (on SQLite, behind the very request that holds
///   the key); a key that is new, expired or abandoned is then claimed by one autocommit statement
///   in the process's writer turn.
pub async fn claim(
    db: &Db,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: Duration,
    lease: Duration,
) -> Result<Claim, sqlx::Error> {
    claim_as(db, scope, key, fingerprint, retention, lease, new_token()).await
}

/// [`claim`] under a token chosen by the caller (who may need to release it before knowing
/// whether the claim was written).
async fn claim_as(
    db: &Db,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: Duration,
    lease: Duration,
    token: String,
) -> Result<Claim, sqlx::Error> {
    let c = Claiming::new(scope, key, fingerprint, &token, retention, lease);
    // Another attempt is needed only when the key changed hands between our read and our write
    // (a racing request claimed it, or its row was deleted meanwhile), or when a pooled
    // connection taken without a liveness check turned out dead; after a few, the key is
    // evidently busy.
    let mut checked = false;
    for _ in 0..CLAIM_ATTEMPTS {
        let outcome = match db {
            Db::Postgres(p) => claim_pg(p.pool(), &c, checked).await,
            Db::Sqlite(s) => claim_sqlite(s, &c).await,
        };
        match outcome {
            Ok(Attempt::Claimed) => return Ok(Claim::Claimed(token)),
            Ok(Attempt::Answer(a)) => return Ok(a),
            Ok(Attempt::Again) => {}
            Err(sqlx::Error::Io(e)) if !checked => {
                tracing::debug!(error = %e, "idempotency claim on a dead pooled connection; retrying on a checked one");
                checked = true;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Claim::InFlight)
}

const CLAIM_ATTEMPTS: usize = 3;

/// A new claim token (unique, so it alone names one claim).
pub(crate) fn new_token() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The key of a request as the layer holds it while the handler runs, before anything about it
/// is written. One commit per request instead of two (a claim, then the handler's), and nothing
/// to clean up when the request dies:
/// - PostgreSQL: an open transaction holding the key's advisory lock. The handler's transaction
///   *is* this one, so the lock lasts until the response is committed with the handler's writes,
///   and ends by itself if the process or its connection dies (no lease to wait out).
/// - SQLite: this process's mark on the key; the key's row is written in the handler's write
///   transaction, whose single-writer lock covers other processes.
pub(crate) struct Held {
    /// PostgreSQL: the transaction holding the lock, until the handler takes it.
    pub(crate) tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    _mark: Option<Mark>,
}

/// What [`open`] found.
pub(crate) enum Opened {
    /// Replay, refuse (422) or 409, without running the handler.
    Answer(Claim),
    /// The key is this request's while the value lives.
    Held(Held),
}

/// Hold `key` for this request without writing anything (see [`Held`]), or say why not.
/// PostgreSQL: `BEGIN` and one statement, [`PG_OPEN`]. SQLite: the process's mark, then a read
/// without the write lock.
pub(crate) async fn open(db: &Db, scope: &str, key: &IdempotencyKey, fingerprint: &str) -> Result<Opened, sqlx::Error> {
    let c = Claiming::new(scope, key, fingerprint, "", Duration::ZERO, Duration::ZERO);
    match db {
        Db::Postgres(p) => {
            let mut checked = false;
            loop {
                match open_pg(p.pool(), &c, checked).await {
                    Err(sqlx::Error::Io(e)) if !checked => {
                        tracing::debug!(error = %e, "idempotency key opened on a dead pooled connection; retrying on a checked one");
                        checked = true;
                    }
                    outcome => return outcome,
                }
            }
        }
        Db::Sqlite(s) => {
            let Some(mark) = s.key_marks().try_mark(scope, key.as_str()) else {
                // Held by another request here: what the key's row already answers, else 409
                // (the holder may only be replaying it).
                let (_, row) = read_sqlite(s, &c).await?;
                return Ok(Opened::Answer(match judge(row, &c, now_ms()) {
                    Some(Attempt::Answer(a)) => a,
                    _ => Claim::InFlight,
                }));
            };
            let (_, row) = read_sqlite(s, &c).await?;
            Ok(match judge(row, &c, now_ms()) {
                Some(Attempt::Answer(a)) => Opened::Answer(a),
                _ => Opened::Held(Held {
                    tx: None,
                    _mark: Some(mark),
                }),
            })
        }
    }
}

/// PostgreSQL: lock the key for the transaction, then read its row (one round trip, in this
/// order; see the function's migration, `20261127000008_idempotency_open.sql`).
const PG_OPEN: &str = "SELECT o_held, o_fingerprint, o_status, o_headers, o_body, o_token, o_locked_until, o_expires_at
    FROM seaport_idempotency_open($1, $2, $3)";

/// The read-committed level is named: the function's fresh snapshot after the lock is what
/// makes the read current, and a database whose default is stricter would read as of `BEGIN`.
const PG_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A write transaction for the layer's handler: on PostgreSQL at READ COMMITTED, as the held
/// one is, so that a handler sees the same level whichever path it took.
pub(crate) async fn begin(db: &Db) -> Result<crate::store::Tx, sqlx::Error> {
    use sqlx::SqlSafeStr;
    match db {
        Db::Postgres(p) => Ok(crate::store::Tx::Postgres(
            sqlx::Transaction::begin(p.pool().acquire().await?, Some(PG_BEGIN.into_sql_str())).await?,
        )),
        Db::Sqlite(_) => db.begin_write().await,
    }
}

async fn open_pg(pool: &sqlx::PgPool, c: &Claiming<'_>, checked: bool) -> Result<Opened, sqlx::Error> {
    use sqlx::SqlSafeStr;
    let conn = pooled(pool, checked).await?;
    let mut tx = sqlx::Transaction::begin(conn, Some(PG_BEGIN.into_sql_str())).await?;
    let opened = sqlx::query_as(PG_OPEN)
        .bind(c.scope)
        .bind(c.key)
        .bind(lock_id(c.scope, c.key))
        .fetch_one(&mut *tx)
        .await;
    let (held, row) = match opened {
        Ok(r) => split::<bool>(r),
        Err(e) => {
            // Ended here on errors too (the lock may have been granted): see below.
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    if !held {
        // An answer is given even if the rollback fails: a connection that failed it is closed,
        // which ends the transaction too.
        let _ = tx.rollback().await;
        // Held by another request: what the key's row already answers (a replay, a different
        // body), else 409. The holder may only be replaying it (migration `…000010`).
        return Ok(Opened::Answer(match judge(row, c, now_ms()) {
            Some(Attempt::Answer(a)) => a,
            _ => Claim::InFlight,
        }));
    }
    Ok(match judge(row, c, now_ms()) {
        // Ended here, not by dropping it: a dropped transaction's rollback is only sent when
        // its connection goes back to the pool, a moment later, and until then its lock would
        // answer a client's next retry with 409.
        Some(Attempt::Answer(a)) => {
            let _ = tx.rollback().await;
            Opened::Answer(a)
        }
        _ => Opened::Held(Held {
            tx: Some(tx),
            _mark: None,
        }),
    })
}

/// Turn a hold into a durable claim, for a handler that calls out before it writes: the key must
/// not keep a PostgreSQL connection (and its transaction) open meanwhile, and on SQLite other
/// processes must see it taken. PostgreSQL: the claim statement in the held transaction, which
/// commits it and lets the lock go (the claim row now guards the key). SQLite: [`claim`]; the
/// mark stays until the request ends. The claim is written under `token`, which the caller
/// chose beforehand so that it can release the claim if it is dropped halfway.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn persist(
    db: &Db,
    held: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: Duration,
    lease: Duration,
    token: String,
) -> Result<Claim, sqlx::Error> {
    let Some(mut tx) = held else {
        return claim_as(db, scope, key, fingerprint, retention, lease, token).await;
    };
    let c = Claiming::new(scope, key, fingerprint, &token, retention, lease);
    let attempt = match claim_pg_on(&mut tx, &c).await {
        Ok(a) => a,
        Err(e) => {
            // The key's lock is let go now, not when the connection goes back to the pool: the
            // client's retry after the 500 must not find it held (see `open_pg`).
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    match attempt {
        Attempt::Claimed => {
            tx.commit().await?;
            Ok(Claim::Claimed(token))
        }
        // The lock is let go here too (see `open_pg`).
        Attempt::Answer(a) => {
            let _ = tx.rollback().await;
            Ok(a)
        }
        // The key changed under our lock: only a request that claimed it before us and was
        // taken for dead can do that, by storing its response late. Let the client retry.
        Attempt::Again => {
            let _ = tx.rollback().await;
            Ok(Claim::InFlight)
        }
    }
}

/// What a request that lost its key at the end (see [`record`]) tells its client: the stored
/// response, a refusal, or 409.
pub(crate) async fn answer(
    db: &Db,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<Claim, sqlx::Error> {
    const READ: &str = "SELECT CAST(0 AS BIGINT), fingerprint, status, headers, body, token, locked_until, expires_at
        FROM seaport_idempotency_keys WHERE scope = $1 AND key = $2";
    let row: Option<RowOf<i64>> =
        crate::on_pool!(db, p => sqlx::query_as(READ).bind(scope).bind(key.as_str()).fetch_optional(p).await)?;
    let row = row.and_then(|row| split(row).1);
    let c = Claiming::new(scope, key, fingerprint, "", Duration::ZERO, Duration::ZERO);
    Ok(match judge(row, &c, now_ms()) {
        Some(Attempt::Answer(a)) => a,
        _ => Claim::InFlight,
    })
}

/// Store the completed response of a held key (see [`open`]) in the handler's transaction.
/// Returns `false` if the key is no longer free to take (on SQLite, another process completed or
/// claimed it meanwhile; on PostgreSQL, only a claim taken for dead that came back): the caller
/// must then roll back and [`answer`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record<'c>(
    tx: impl Into<Conn<'c>>,
    scope: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: Duration,
    status: u16,
    headers_json: &str,
    body: &[u8],
) -> Result<bool, sqlx::Error> {
    // The same conditions as the claim's: a row may only be replaced once expired or abandoned.
    const RECORD: &str = "INSERT INTO seaport_idempotency_keys AS k
            (scope, key, fingerprint, status, headers, body, created_at, expires_at, token, locked_until)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0)
        ON CONFLICT (scope, key) DO UPDATE SET
            fingerprint = excluded.fingerprint, status = excluded.status, headers = excluded.headers,
            body = excluded.body,
            created_at = CASE WHEN k.expires_at <= $7 THEN excluded.created_at ELSE k.created_at END,
            expires_at = CASE WHEN k.expires_at <= $7 THEN excluded.expires_at ELSE k.expires_at END,
            token = excluded.token, locked_until = 0
        WHERE k.expires_at <= $7
           OR (k.status = 0 AND k.locked_until <= $7 AND k.fingerprint = excluded.fingerprint)
        RETURNING 1";
    let now = now_ms();
    let token = new_token();
    let done = on_conn!(tx, c => sqlx::query(RECORD)
        .bind(scope)
        .bind(key.as_str())
        .bind(fingerprint)
        .bind(status as i64)
        .bind(headers_json)
        .bind(body)
        .bind(now)
        .bind(now + retention.as_millis() as i64)
        .bind(&token)
        .fetch_optional(c)
        .await?
        .is_some());
    Ok(done)
}

/// The keys this process's requests hold on SQLite, where nothing in the database can be held
/// across a handler's run without holding the single writer: a second request for a held key
/// gets 409 at once.
#[derive(Default)]
pub(crate) struct KeyMarks(std::sync::Mutex<std::collections::HashSet<String>>);

/// One key's mark; dropping it frees the key.
pub(crate) struct Mark {
    marks: std::sync::Arc<KeyMarks>,
    id: String,
}

impl KeyMarks {
    fn try_mark(self: &std::sync::Arc<Self>, scope: &str, key: &str) -> Option<Mark> {
        let id = format!("{scope}\0{key}");
        let fresh = self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone());
        fresh.then(|| Mark {
            marks: self.clone(),
            id,
        })
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.marks.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// The key's advisory lock on PostgreSQL: the first 8 bytes of SHA-256 over the scope and the
/// key. It is the single-`bigint` form, a space apart from Seaport's other advisory locks (two
/// `int4`s). Two keys that share a lock only make each other's concurrent requests answer 409.
fn lock_id(scope: &str, key: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(b"seaport.idempotency\0");
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The parameters of one claim.
struct Claiming<'a> {
    scope: &'a str,
    key: &'a str,
    fingerprint: &'a str,
    token: &'a str,
    /// Milliseconds.
    retention: i64,
    /// Milliseconds.
    lease: i64,
}

impl<'a> Claiming<'a> {
    fn new(
        scope: &'a str,
        key: &'a IdempotencyKey,
        fingerprint: &'a str,
        token: &'a str,
        retention: Duration,
        lease: Duration,
    ) -> Self {
        Claiming {
            scope,
            key: key.as_str(),
            fingerprint,
            token,
            retention: retention.as_millis() as i64,
            lease: lease.as_millis() as i64,
        }
    }
}

/// The row of a key as a claim finds it.
struct Existing {
    fingerprint: String,
    status: i64,
    headers: String,
    body: Vec<u8>,
    token: String,
    locked_until: i64,
    expires_at: i64,
}

/// A leading value and the key's columns as an outer join reads them (all `NULL`: no row).
type RowOf<T> = (
    T,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

/// The leading value of `row`, and the key's row if it has one.
fn split<T>(row: RowOf<T>) -> (T, Option<Existing>) {
    let (lead, fingerprint, status, headers, body, token, locked_until, expires_at) = row;
    let existing = fingerprint.map(|fingerprint| Existing {
        fingerprint,
        status: status.unwrap_or_default(),
        headers: headers.unwrap_or_default(),
        body: body.unwrap_or_default(),
        token: token.unwrap_or_default(),
        locked_until: locked_until.unwrap_or_default(),
        expires_at: expires_at.unwrap_or_default(),
    });
    (lead, existing)
}

enum Attempt {
    Claimed,
    Answer(Claim),
    /// The key changed between reading and writing it: look again.
    Again,
}

/// What an existing row means for the claim `c` at `now`: `Some(Claimed)` if it is already ours
/// (an earlier attempt committed although its answer was lost), an answer for the client, or
/// `None` if the key may be claimed (absent, expired, or abandoned by a request that never
/// finished). The claim statements' `WHERE` clauses are the SQL form of the `None` cases.
fn judge(row: Option<Existing>, c: &Claiming<'_>, now: i64) -> Option<Attempt> {
    let row = row?;
    if !c.token.is_empty() && row.token == c.token && row.status == 0 {
        return Some(Attempt::Claimed);
    }
    if row.expires_at <= now {
        return None;
    }
    if row.fingerprint != c.fingerprint {
        return Some(Attempt::Answer(Claim::Mismatch));
    }
    if row.status != 0 {
        return Some(Attempt::Answer(Claim::Replay(StoredResponse {
            status: row.status as u16,
            headers: serde_json::from_str(&row.headers).unwrap_or_default(),
            body: row.body,
        })));
    }
    if row.locked_until > now {
        return Some(Attempt::Answer(Claim::InFlight));
    }
    None
}

/// An idle pooled connection without the pool's liveness round trip (`test_before_acquire`),
/// else one the ordinary way. A dead one fails the statement with an I/O error, and the claim
/// then retries on a checked connection (see [`judge`]: a claim that did commit is recognised).
async fn pooled<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    checked: bool,
) -> Result<sqlx::pool::PoolConnection<DB>, sqlx::Error> {
    match (!checked).then(|| pool.try_acquire()).flatten() {
        Some(conn) => Ok(conn),
        None => pool.acquire().await,
    }
}

/// PostgreSQL: if the key's advisory lock is free (or ours: the layer's hold), insert the claim
/// or take over an expired or abandoned one (`claimed`), else read the row; `busy` (with the row,
/// if any) if another transaction holds the lock. `set_config(…, true)` applies to this statement's own (implicit)
/// transaction, or the layer's held one, whose commit then does not wait for a WAL flush. The row
/// read is the one of the statement's snapshot: if the key was claimed by a transaction that
/// committed after it, the read finds no row or one that looks claimable (`Again`).
const PG_CLAIM: &str = "WITH lock AS (SELECT pg_try_advisory_xact_lock($8) AS held),
claimed AS (
    INSERT INTO seaport_idempotency_keys AS k
        (scope, key, fingerprint, status, headers, body, created_at, expires_at, token, locked_until)
    SELECT $1, $2, $3, 0, '[]', ''::bytea, $4, $5, $6, $7 FROM lock
    WHERE lock.held AND set_config('synchronous_commit', 'off', true) IS NOT NULL
    ON CONFLICT (scope, key) DO UPDATE SET
        fingerprint = excluded.fingerprint, status = 0, headers = '[]', body = excluded.body,
        created_at = CASE WHEN k.expires_at <= $4 THEN excluded.created_at ELSE k.created_at END,
        expires_at = CASE WHEN k.expires_at <= $4 THEN excluded.expires_at ELSE k.expires_at END,
        token = excluded.token, locked_until = excluded.locked_until
    WHERE k.expires_at <= $4
       OR (k.status = 0 AND k.locked_until <= $4 AND k.fingerprint = excluded.fingerprint)
    RETURNING 1
)
SELECT 'claimed', NULL::text, NULL::int8, NULL::text, NULL::bytea, NULL::text, NULL::int8, NULL::int8 FROM claimed
UNION ALL
SELECT 'busy', k.fingerprint, k.status, k.headers, k.body, k.token, k.locked_until, k.expires_at
FROM lock LEFT JOIN seaport_idempotency_keys AS k ON k.scope = $1 AND k.key = $2 WHERE NOT lock.held
UNION ALL
SELECT 'row', fingerprint, status, headers, body, token, locked_until, expires_at FROM seaport_idempotency_keys
WHERE scope = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM claimed) AND (SELECT held FROM lock)";

async fn claim_pg(pool: &sqlx::PgPool, c: &Claiming<'_>, checked: bool) -> Result<Attempt, sqlx::Error> {
    let mut conn = pooled(pool, checked).await?;
    let attempt = claim_pg_on(&mut conn, c).await;
    if matches!(attempt, Err(sqlx::Error::Io(_))) {
        conn.close_on_drop();
    }
    attempt
}

async fn claim_pg_on(conn: &mut sqlx::PgConnection, c: &Claiming<'_>) -> Result<Attempt, sqlx::Error> {
    let now = now_ms();
    let row: Option<RowOf<String>> = sqlx::query_as(PG_CLAIM)
        .bind(c.scope)
        .bind(c.key)
        .bind(c.fingerprint)
        .bind(now)
        .bind(now + c.retention)
        .bind(c.token)
        .bind(now + c.lease)
        .bind(lock_id(c.scope, c.key))
        .fetch_optional(conn)
        .await?;
    Ok(match row.map(split) {
        Some((kind, _)) if kind == "claimed" => Attempt::Claimed,
        // Held by another request: what the key's row already answers (a replay, a different
        // body), else 409. The holder may only be replaying it, as `open_pg` does.
        Some((kind, existing)) if kind == "busy" => Attempt::Answer(match judge(existing, c, now) {
            Some(Attempt::Answer(a)) => a,
            _ => Claim::InFlight,
        }),
        Some((_, existing)) => judge(existing, c, now).unwrap_or(Attempt::Again),
        None => Attempt::Again,
    })
}

/// SQLite: the key's row, if any, and the connection's `synchronous` level (one row always).
const SQLITE_READ: &str =
    "SELECT s.synchronous, k.fingerprint, k.status, k.headers, k.body, k.token, k.locked_until, k.expires_at
    FROM pragma_synchronous AS s
    LEFT JOIN seaport_idempotency_keys AS k ON k.scope = $1 AND k.key = $2";

async fn read_sqlite(
    store: &crate::store::SqliteStore,
    c: &Claiming<'_>,
) -> Result<(i64, Option<Existing>), sqlx::Error> {
    let row: RowOf<i64> = sqlx::query_as(SQLITE_READ)
        .bind(c.scope)
        .bind(c.key)
        .fetch_one(&mut *pooled(store.pool(), false).await?)
        .await?;
    Ok(split(row))
}

/// SQLite: the claim; a row returned means it is ours (inserted, or an expired or abandoned
/// claim taken over).
macro_rules! sqlite_claim {
    () => {
        "INSERT INTO seaport_idempotency_keys AS k
            (scope, key, fingerprint, status, headers, body, created_at, expires_at, token, locked_until)
        VALUES ($1, $2, $3, 0, '[]', X'', $4, $5, $6, $7)
        ON CONFLICT (scope, key) DO UPDATE SET
            fingerprint = excluded.fingerprint, status = 0, headers = '[]', body = excluded.body,
            created_at = CASE WHEN k.expires_at <= $4 THEN excluded.created_at ELSE k.created_at END,
            expires_at = CASE WHEN k.expires_at <= $4 THEN excluded.expires_at ELSE k.expires_at END,
            token = excluded.token, locked_until = excluded.locked_until
        WHERE k.expires_at <= $4
           OR (k.status = 0 AND k.locked_until <= $4 AND k.fingerprint = excluded.fingerprint)
        RETURNING 1"
    };
}

/// The claim for each `synchronous` level of the connection (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA):
/// stricter than NORMAL is relaxed for the claim alone and put back, in the same call to the
/// connection's worker (one hop inside the writer turn instead of three).
const SQLITE_CLAIM: [&str; 3] = [
    sqlite_claim!(),
    concat!(
        "PRAGMA synchronous = NORMAL; ",
        sqlite_claim!(),
        "; PRAGMA synchronous = FULL"
    ),
    concat!(
        "PRAGMA synchronous = NORMAL; ",
        sqlite_claim!(),
        "; PRAGMA synchronous = EXTRA"
    ),
];

async fn claim_sqlite(store: &crate::store::SqliteStore, c: &Claiming<'_>) -> Result<Attempt, sqlx::Error> {
    let (synchronous, row) = read_sqlite(store, c).await?;
    if let Some(attempt) = judge(row, c, now_ms()) {
        return Ok(attempt);
    }
    // The writer turn before the connection, as `begin_write` takes them (the other order can
    // leave every connection of the pool waiting for a turn whose holder waits for a connection).
    let _turn = store.writer_turn().await;
    let statement = match synchronous {
        ..=1 => SQLITE_CLAIM[0],
        2 => SQLITE_CLAIM[1],
        _ => SQLITE_CLAIM[2],
    };
    let mut conn = RelaxedSync {
        conn: pooled(store.pool(), false).await?,
        relaxed: synchronous > 1,
    };
    let now = now_ms();
    let claimed = sqlx::query(statement)
        .bind(c.scope)
        .bind(c.key)
        .bind(c.fingerprint)
        .bind(now)
        .bind(now + c.retention)
        .bind(c.token)
        .bind(now + c.lease)
        .fetch_all(&mut *conn.conn)
        .await?
        .len();
    // All statements ran: `synchronous` is back.
    conn.relaxed = false;
    Ok(if claimed == 1 { Attempt::Claimed } else { Attempt::Again })
}

/// A pooled SQLite connection whose `synchronous` level may be relaxed from FULL (or EXTRA) to
/// NORMAL: in WAL mode the WAL is then not synced at commit, only before checkpoints, and a later
/// FULL commit syncs it with everything before. Unless the level is known to be put back (an
/// error, or the future dropped halfway), the connection is closed instead of returned to the
/// pool, so that no other user ever gets it relaxed.
struct RelaxedSync {
    conn: sqlx::pool::PoolConnection<sqlx::Sqlite>,
    relaxed: bool,
}

impl Drop for RelaxedSync {
    fn drop(&mut self) {
        if self.relaxed {
            self.conn.close_on_drop();
        }
    }
}

/// Store the response of a claimed key, in the handler's transaction. Returns `false` if the
/// claim was lost meanwhile (taken over after its lease, or reclaimed after expiry); the caller
/// must then roll back.
pub async fn complete<'c>(
    tx: impl Into<Conn<'c>>,
    scope: &str,
    key: &IdempotencyKey,
    token: &str,
    response: &StoredResponse,
) -> Result<bool, sqlx::Error> {
    let headers = serde_json::to_string(&response.headers).expect("strings serialise");
    store_response(tx, scope, key, token, response.status, &headers, &response.body).await
}

/// [`complete`] with the headers already as their JSON array of `[name, value]` pairs, and the
/// body borrowed (the layer's path: no copies of either).
pub(crate) async fn store_response<'c>(
    tx: impl Into<Conn<'c>>,
    scope: &str,
    key: &IdempotencyKey,
    token: &str,
    status: u16,
    headers_json: &str,
    body: &[u8],
) -> Result<bool, sqlx::Error> {
    // The token alone names the claim: tokens are unique, and a takeover or a reclaim replaces
    // it; `status = 0` keeps a completed response from ever being overwritten.
    let n = on_conn!(tx, c => sqlx::query(
        "UPDATE seaport_idempotency_keys SET status = $1, headers = $2, body = $3, locked_until = 0
         WHERE scope = $4 AND key = $5 AND token = $6 AND status = 0",
    )
    .bind(status as i64)
    .bind(headers_json)
    .bind(body)
    .bind(scope)
    .bind(key.as_str())
    .bind(token)
    .execute(c)
    .await?
    .rows_affected());
    Ok(n == 1)
}

/// Give a claimed key back (the handler failed), so the client can retry with it. One autocommit
/// statement (on SQLite, in the process's writer turn).
pub async fn release(db: &Db, scope: &str, key: &IdempotencyKey, token: &str) -> Result<(), sqlx::Error> {
    const RELEASE: &str =
        "DELETE FROM seaport_idempotency_keys WHERE scope = $1 AND key = $2 AND token = $3 AND status = 0";
    match db {
        Db::Sqlite(s) => {
            let _turn = s.writer_turn().await;
            sqlx::query(RELEASE)
                .bind(scope)
                .bind(key.as_str())
                .bind(token)
                .execute(s.pool())
                .await?;
        }
        Db::Postgres(p) => {
            sqlx::query(RELEASE)
                .bind(scope)
                .bind(key.as_str())
                .bind(token)
                .execute(p.pool())
                .await?;
        }
    }
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
    fn a_claim_recognises_its_own_committed_attempt() {
        let c = Claiming {
            scope: "s",
            key: "k",
            fingerprint: "fp",
            token: "mine",
            retention: 1000,
            lease: 1000,
        };
        let row = |token: &str, fingerprint: &str| Existing {
            fingerprint: fingerprint.into(),
            status: 0,
            headers: "[]".into(),
            body: Vec::new(),
            token: token.into(),
            locked_until: 2000,
            expires_at: 3000,
        };
        assert!(matches!(
            judge(Some(row("mine", "fp")), &c, 1000),
            Some(Attempt::Claimed)
        ));
        assert!(matches!(
            judge(Some(row("theirs", "fp")), &c, 1000),
            Some(Attempt::Answer(Claim::InFlight))
        ));
        assert!(matches!(
            judge(Some(row("theirs", "other")), &c, 1000),
            Some(Attempt::Answer(Claim::Mismatch))
        ));
        assert!(
            judge(Some(row("theirs", "fp")), &c, 2000).is_none(),
            "abandoned: claimable"
        );
        assert!(
            judge(Some(row("theirs", "other")), &c, 3000).is_none(),
            "expired: claimable"
        );
        assert!(judge(None, &c, 1000).is_none());
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

/// Claims racing each other on both backends (real PostgreSQL; `seaport::testing` fixtures).
#[cfg(all(test, feature = "testing"))]
mod races {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{Fixture, Kind};

    const HOUR: Duration = Duration::from_secs(3600);
    const RACERS: usize = 8;

    macro_rules! on_both {
        ($($name:ident),* $(,)?) => {
            mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Embedded).await } )* }
            mod pg { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::PgJetStream).await } )* }
        };
    }

    on_both!(
        racing_claims_of_a_new_key_have_one_winner,
        racing_claims_of_an_expired_key_have_one_winner,
        racing_takeovers_of_an_abandoned_claim_have_one_winner,
        claims_leave_pooled_connections_durable,
        a_lost_key_is_answered_as_a_duplicate_would_be,
    );

    /// PostgreSQL: a claim that finds the key's advisory lock held (a layered request replaying
    /// the key holds it for a moment) still answers from the row: replay, or 422 for another
    /// body; only a key with nothing to answer yet gets 409.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_of_a_held_key_still_replays_what_it_can() {
        let f = Fixture::new(Kind::PgJetStream).await;
        let Claim::Claimed(token) = claim(&f.db, "s", &key("k"), "fp", HOUR, HOUR).await.unwrap() else {
            panic!("a new key is claimed");
        };
        assert!(finish(&f.db, "k", &token, b"done").await);
        let Db::Postgres(pg) = &f.db else { unreachable!() };
        let mut holder = pg.pool().begin().await.unwrap();
        for k in ["k", "new"] {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(lock_id("s", k))
                .execute(&mut *holder)
                .await
                .unwrap();
        }
        let replay = claim(&f.db, "s", &key("k"), "fp", HOUR, HOUR).await.unwrap();
        assert!(matches!(&replay, Claim::Replay(r) if r.body == b"done"), "{replay:?}");
        let other = claim(&f.db, "s", &key("k"), "other", HOUR, HOUR).await.unwrap();
        assert_eq!(other, Claim::Mismatch);
        let new = claim(&f.db, "s", &key("new"), "fp", HOUR, HOUR).await.unwrap();
        assert_eq!(new, Claim::InFlight);
        holder.rollback().await.unwrap();
        f.cleanup().await;
    }

    fn key(k: &str) -> IdempotencyKey {
        IdempotencyKey::parse(k.as_bytes()).unwrap()
    }

    /// `RACERS` claims of `k` released at once; their outcomes.
    async fn race(db: &Db, k: &str, fp: &str) -> Vec<Claim> {
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..RACERS {
            let (db, k, fp, barrier) = (db.clone(), key(k), fp.to_owned(), barrier.clone());
            set.spawn(async move {
                barrier.wait().await;
                claim(&db, "s", &k, &fp, HOUR, HOUR).await.unwrap()
            });
        }
        set.join_all().await
    }

    /// The one `Claimed` token of `outcomes`; every other outcome is `InFlight`.
    fn one_winner(outcomes: Vec<Claim>) -> String {
        let mut tokens = Vec::new();
        for c in outcomes {
            match c {
                Claim::Claimed(t) => tokens.push(t),
                Claim::InFlight => {}
                other => panic!("a loser gets 409, not {other:?}"),
            }
        }
        assert_eq!(tokens.len(), 1, "exactly one racer wins: {tokens:?}");
        tokens.pop().unwrap()
    }

    /// Store a response for `token`; whether the claim was still ours.
    async fn finish(db: &Db, k: &str, token: &str, body: &[u8]) -> bool {
        let mut tx = db.begin_write().await.unwrap();
        let response = StoredResponse {
            status: 201,
            headers: vec![("location".into(), "/x/1".into())],
            body: body.to_vec(),
        };
        let ours = complete(&mut tx, "s", &key(k), token, &response).await.unwrap();
        if ours {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        ours
    }

    async fn racing_claims_of_a_new_key_have_one_winner(kind: Kind) {
        let f = Fixture::new(kind).await;
        let token = one_winner(race(&f.db, "new", "fp").await);
        assert!(finish(&f.db, "new", &token, b"done").await);
        let again = claim(&f.db, "s", &key("new"), "fp", HOUR, HOUR).await.unwrap();
        assert!(matches!(again, Claim::Replay(r) if r.body == b"done"));
        f.cleanup().await;
    }

    async fn racing_claims_of_an_expired_key_have_one_winner(kind: Kind) {
        let f = Fixture::new(kind).await;
        // A completed key with a short retention, then expired.
        let retention = Duration::from_millis(100);
        let Claim::Claimed(old) = claim(&f.db, "s", &key("k"), "old", retention, HOUR).await.unwrap() else {
            panic!("a new key is claimed");
        };
        assert!(finish(&f.db, "k", &old, b"old response").await);
        let replay = claim(&f.db, "s", &key("k"), "old", HOUR, HOUR).await.unwrap();
        assert!(matches!(replay, Claim::Replay(_)), "within its retention it replays");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Racers with another payload: expired keys are reusable, by exactly one of them.
        let token = one_winner(race(&f.db, "k", "new").await);
        assert!(
            !finish(&f.db, "k", &old, b"stale").await,
            "the expired claim's old owner no longer owns it"
        );
        assert!(finish(&f.db, "k", &token, b"new response").await);
        let replay = claim(&f.db, "s", &key("k"), "new", HOUR, HOUR).await.unwrap();
        assert!(
            matches!(&replay, Claim::Replay(r) if r.body == b"new response"),
            "{replay:?}"
        );
        let reused = claim(&f.db, "s", &key("k"), "old", HOUR, HOUR).await.unwrap();
        assert_eq!(reused, Claim::Mismatch);
        f.cleanup().await;
    }

    async fn racing_takeovers_of_an_abandoned_claim_have_one_winner(kind: Kind) {
        let f = Fixture::new(kind).await;
        let lease = Duration::from_millis(100);
        let Claim::Claimed(crashed) = claim(&f.db, "s", &key("k"), "fp", HOUR, lease).await.unwrap() else {
            panic!("a new key is claimed");
        };
        assert_eq!(
            claim(&f.db, "s", &key("k"), "fp", HOUR, HOUR).await.unwrap(),
            Claim::InFlight
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        // After the lease: another payload is still refused; the same request is taken over once.
        assert_eq!(
            claim(&f.db, "s", &key("k"), "other", HOUR, HOUR).await.unwrap(),
            Claim::Mismatch
        );
        let token = one_winner(race(&f.db, "k", "fp").await);
        assert!(
            !finish(&f.db, "k", &crashed, b"late").await,
            "the crashed request lost its claim"
        );
        assert!(finish(&f.db, "k", &token, b"taken over").await);
        f.cleanup().await;
    }

    /// Every idle pooled connection (one in use elsewhere, e.g. a listener, would make waiting
    /// for all of them time out).
    fn idle<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Vec<sqlx::pool::PoolConnection<DB>> {
        let conns: Vec<_> = std::iter::from_fn(|| pool.try_acquire()).collect();
        assert!(!conns.is_empty(), "the claims left connections in the pool");
        conns
    }

    /// The claim's relaxed durability stays with the claim: every pooled connection afterwards
    /// commits durably (SQLite `synchronous` FULL, PostgreSQL `synchronous_commit` on).
    async fn claims_leave_pooled_connections_durable(kind: Kind) {
        let f = Fixture::new(kind).await;
        for i in 0..4 {
            let _ = race(&f.db, &format!("k{i}"), "fp").await;
        }
        match &f.db {
            Db::Sqlite(s) => {
                for c in &mut idle(s.pool()) {
                    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
                        .fetch_one(&mut **c)
                        .await
                        .unwrap();
                    assert_eq!(level, 2, "FULL");
                }
            }
            Db::Postgres(p) => {
                for c in &mut idle(p.pool()) {
                    let level: String = sqlx::query_scalar("SHOW synchronous_commit")
                        .fetch_one(&mut **c)
                        .await
                        .unwrap();
                    assert_eq!(level, "on");
                }
            }
        }
        f.cleanup().await;
    }

    /// What a request that found its key taken at the end tells its client (`answer`).
    async fn a_lost_key_is_answered_as_a_duplicate_would_be(kind: Kind) {
        let f = Fixture::new(kind).await;
        assert_eq!(answer(&f.db, "s", &key("k"), "fp").await.unwrap(), Claim::InFlight);
        let Claim::Claimed(token) = claim(&f.db, "s", &key("k"), "fp", HOUR, HOUR).await.unwrap() else {
            panic!("a new key is claimed");
        };
        assert_eq!(answer(&f.db, "s", &key("k"), "fp").await.unwrap(), Claim::InFlight);
        assert!(finish(&f.db, "k", &token, b"done").await);
        let replay = answer(&f.db, "s", &key("k"), "fp").await.unwrap();
        assert!(
            matches!(&replay, Claim::Replay(r) if r.body == b"done" && r.status == 201),
            "{replay:?}"
        );
        assert_eq!(answer(&f.db, "s", &key("k"), "other").await.unwrap(), Claim::Mismatch);
        f.cleanup().await;
    }
}
