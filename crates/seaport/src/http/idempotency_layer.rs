//! The Idempotency-Key layer: hold the key, run the handler with a transaction it writes in,
//! store the response in that same transaction, commit; replay, refuse or release otherwise.
//!
//! One commit per request: the key is held without writing anything while the handler runs (on
//! PostgreSQL an advisory lock in the handler's own transaction, on SQLite a mark in the process),
//! and its row is written once, completed, with the handler's writes. Only a handler that has not
//! asked for its transaction within [`HOLD_BEFORE_CLAIM`] (it calls out first) gets a durable
//! claim row before it writes, as every request did before (see `http::idempotency::open`).
//!
//! ```ignore
//! Router::new().route("/cases", post(create_case).layer(IdempotencyLayer::new(db.clone())));
//!
//! async fn create_case(tx: IdempotentTx, Json(body): Json<NewCase>) -> Result<impl IntoResponse, Problem> {
//!     let mut tx = tx.get().await?;                     // the layer commits it, with the response
//!     sqlx::query("INSERT ...").execute(...)            // via seaport::on_conn!(&mut *tx, c => ...)
//! }
//! ```
//!
//! Statuses: missing key on a route that requires one or a malformed key → 400; same key, other
//! request → 422; same key while the first request runs → 409 (with `Retry-After`); completed →
//! the stored status, headers and body with `Idempotent-Replayed: true`. Only successful (2xx)
//! outcomes are stored; any other response rolls the handler's transaction back and releases the
//! key, so the client can correct the request or retry it under the same key.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, Request, StatusCode};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tower::{Layer, Service};

use super::idempotency::{
    Claim, DEFAULT_LEASE, DEFAULT_RETENTION, IdempotencyKey, Opened, answer, begin, fingerprint, new_token, open,
    persist, record, release, store_response,
};
use super::problem::Problem;
use crate::store::{Db, Tx};

/// Who a key belongs to. The default reads `X-Client-Id` (well-formed, else `anonymous`);
/// services with authentication should scope by the authenticated principal.
pub type ScopeFn = Arc<dyn Fn(&Parts) -> String + Send + Sync>;

/// The default scope: `client:<X-Client-Id>` or `anonymous`.
pub fn client_id_scope(parts: &Parts) -> String {
    parts
        .headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| super::correlation::valid_id(v))
        .map(|v| format!("client:{v}"))
        .unwrap_or_else(|| "anonymous".to_owned())
}

/// Response headers that describe one exchange, not the resource: never stored or replayed.
const NOT_STORED: &[&str] = &[
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "set-cookie",
    "x-correlation-id",
    "x-request-id",
    "traceparent",
];

#[derive(Clone)]
pub struct IdempotencyLayer {
    db: Db,
    retention: Duration,
    lease: Duration,
    required: bool,
    body_limit: usize,
    scope: ScopeFn,
}

impl IdempotencyLayer {
    /// A layer that requires a key, keeps responses 24 h, and scopes keys by `X-Client-Id`.
    pub fn new(db: impl Into<Db>) -> Self {
        IdempotencyLayer {
            db: db.into(),
            retention: DEFAULT_RETENTION,
            lease: DEFAULT_LEASE,
            required: true,
            body_limit: 2 << 20,
            scope: Arc::new(client_id_scope),
        }
    }

    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long an unfinished claim blocks the key before it may be taken over.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Requests without a key pass through unprotected instead of getting 400.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    pub fn scope(mut self, scope: impl Fn(&Parts) -> String + Send + Sync + 'static) -> Self {
        self.scope = Arc::new(scope);
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            config: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: IdempotencyLayer,
}

/// The transaction a handler behind [`IdempotencyLayer`] writes in. Begun on first use; the
/// layer stores the response in it and commits (or rolls back on failure). Do not commit it,
/// and on SQLite do not begin another write transaction while holding it (one writer at a time:
/// the second would wait for the first forever).
///
/// On PostgreSQL it is a READ COMMITTED transaction, whatever the database's default.
///
/// Ask for it as soon as the handler knows it will write: on PostgreSQL it is the transaction
/// that already holds the key, and the request then commits once. A handler that has not asked
/// within [`HOLD_BEFORE_CLAIM`] (it calls out first, say) gets its key claimed durably instead,
/// a second commit, so that no connection waits on the call.
#[derive(Clone)]
pub struct IdempotentTx {
    inner: Arc<TxSlot>,
    db: Db,
}

struct TxSlot {
    tx: Mutex<Option<Tx>>,
    before: std::sync::Mutex<Before>,
}

/// Where a request stands before its handler asked for the transaction.
enum Before {
    /// Not asked yet. PostgreSQL: the transaction holding the key, which the handler gets.
    Waiting(Option<PgTx>),
    /// The handler asked: its transaction (begun or being begun) carries the response.
    Asked,
    /// The layer claimed the key durably meanwhile: the handler's transaction is a new one.
    Claimed,
}

type PgTx = sqlx::Transaction<'static, sqlx::Postgres>;

/// How long a request may hold its key without a durable claim, waiting for its handler to ask
/// for the transaction. Handlers that write at once ask within microseconds; one that calls out
/// first (a CRM lookup, say) must not keep a PostgreSQL connection idle in a transaction
/// meanwhile, nor leave the key unclaimed for other processes on SQLite.
pub const HOLD_BEFORE_CLAIM: Duration = Duration::from_millis(10);

impl IdempotentTx {
    fn new(db: Db, held: Option<PgTx>) -> Self {
        IdempotentTx {
            inner: Arc::new(TxSlot {
                tx: Mutex::new(None),
                before: std::sync::Mutex::new(Before::Waiting(held)),
            }),
            db,
        }
    }

    /// The transaction (begun now if it was not yet).
    pub async fn get(&self) -> Result<MappedMutexGuard<'_, Tx>, sqlx::Error> {
        let mut guard = self.inner.tx.lock().await;
        if guard.is_none() {
            let held = {
                let mut before = self.before();
                match &mut *before {
                    Before::Waiting(held) => {
                        let held = held.take();
                        *before = Before::Asked;
                        held
                    }
                    Before::Asked | Before::Claimed => None,
                }
            };
            *guard = Some(match held {
                Some(tx) => Tx::Postgres(tx),
                None => begin(&self.db).await?,
            });
        }
        Ok(MutexGuard::map(guard, |t| t.as_mut().expect("set above")))
    }

    fn before(&self) -> std::sync::MutexGuard<'_, Before> {
        self.inner.before.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If the handler has not asked yet: from now on it gets a new transaction, and the held one
    /// (PostgreSQL) is the caller's, to claim the key in. `None` if the handler asked.
    fn stop_waiting(&self) -> Option<Option<PgTx>> {
        let mut before = self.before();
        match &mut *before {
            Before::Waiting(held) => {
                let held = held.take();
                *before = Before::Claimed;
                Some(held)
            }
            _ => None,
        }
    }

    /// After the handler: its transaction, else the one still held (PostgreSQL, never asked for).
    async fn finish(&self) -> Option<Tx> {
        let asked = self.inner.tx.lock().await.take();
        let held = match &mut *self.before() {
            Before::Waiting(held) => held.take(),
            Before::Asked | Before::Claimed => None,
        };
        asked.or(held.map(Tx::Postgres))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotentTx {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<IdempotentTx>()
            .cloned()
            .ok_or_else(|| Problem::internal("IdempotentTx used on a route without IdempotencyLayer"))
    }
}

impl<S> Service<Request<Body>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone that was polled ready runs this request (tower's usual dance).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move { Ok(handle(inner, config, req).await) })
    }
}

/// The answer to a request that does not run its handler: replay, 422 or 409.
fn answer_response(claim: Claim) -> Response {
    match claim {
        Claim::Replay(stored) => {
            crate::telemetry::idempotency_replay();
            stored.replay()
        }
        Claim::Mismatch => {
            crate::telemetry::idempotency_conflict("reused");
            Problem::unprocessable("this idempotency key was already used for a different request")
                .with_type("/problems/idempotency-key-reused", "Idempotency key reused")
                .into_response()
        }
        Claim::InFlight | Claim::Claimed(_) => {
            crate::telemetry::idempotency_conflict("in_flight");
            let mut res = Problem::new(
                StatusCode::CONFLICT,
                "a request with this idempotency key is still being processed",
            )
            .with_type("/problems/idempotency-key-in-flight", "Idempotency key in use")
            .into_response();
            res.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            res
        }
    }
}

async fn handle<S>(mut inner: S, config: IdempotencyLayer, req: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let (parts, body) = req.into_parts();
    let key = match IdempotencyKey::from_headers(&parts.headers) {
        Err(problem) => return problem.into_response(),
        Ok(Some(key)) => key,
        Ok(None) if !config.required => {
            return match inner.call(Request::from_parts(parts, body)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
        }
        Ok(None) => return IdempotencyKey::required(&parts.headers).unwrap_err().into_response(),
    };
    let bytes = match to_bytes(body, config.body_limit).await {
        Ok(b) => b,
        Err(e) => {
            // axum reports the limit as http-body-util's `LengthLimitError` ("length limit
            // exceeded") somewhere in the chain; anything else is a body we could not read
            // (e.g. malformed chunked encoding): the client's fault too, but not a 413.
            let mut too_large = false;
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                too_large |= err.to_string().contains("length limit exceeded");
                source = err.source();
            }
            return if too_large {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {} bytes", config.body_limit),
                )
            } else {
                Problem::bad_request(format!("cannot read the request body: {e}"))
            }
            .into_response();
        }
    };
    let scope = (config.scope)(&parts);
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let fp = fingerprint(parts.method.as_str(), target, &bytes);
    // Held until this function returns (SQLite: the process's mark on the key).
    let mut held = match open(&config.db, &scope, &key, &fp).await {
        Err(e) => return Problem::internal(e).into_response(),
        Ok(Opened::Answer(claim)) => return answer_response(claim),
        Ok(Opened::Held(held)) => held,
    };

    let tx = IdempotentTx::new(config.db.clone(), held.tx.take());
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(tx.clone());
    // The durable claim, if the handler was slow to ask for its transaction.
    let mut claimed: Option<DurableClaim> = None;
    let res = {
        let mut call = std::pin::pin!(inner.call(req));
        tokio::select! {
            biased;
            r = &mut call => r,
            () = tokio::time::sleep(HOLD_BEFORE_CLAIM) => {
                // The handler is not polled meanwhile, so it cannot ask while the key is claimed.
                if let Some(waiting) = tx.stop_waiting() {
                    // Armed before the claim is written: if this request is dropped while it is
                    // being written, it is released all the same (releasing a claim that was
                    // never written does nothing).
                    let mut guard = DurableClaim {
                        db: config.db.clone(),
                        scope: scope.clone(),
                        key: key.clone(),
                        token: new_token(),
                        open: true,
                    };
                    let token = guard.token.clone();
                    match persist(&config.db, waiting, &scope, &key, &fp, config.retention, config.lease, token).await {
                        Ok(Claim::Claimed(_)) => claimed = Some(guard),
                        // Answered before the handler wrote anything: it is dropped unfinished.
                        Ok(other) => {
                            guard.open = false;
                            return answer_response(other);
                        }
                        // The claim may have committed although its answer was lost: the guard
                        // releases it.
                        Err(e) => return Problem::internal(e).into_response(),
                    }
                }
                call.await
            }
        }
    };
    let res = match res {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let open_tx = tx.finish().await;
    if !res.status().is_success() {
        give_back(open_tx, claimed.as_mut()).await;
        return res;
    }
    let (res_parts, res_body) = res.into_parts();
    let body = match to_bytes(res_body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            give_back(open_tx, claimed.as_mut()).await;
            return Problem::internal(e).into_response();
        }
    };
    // Stored as a JSON array of [name, value] pairs (what `StoredResponse::headers` reads back),
    // straight from the response's headers; the body is bound as it is, not copied.
    let headers: Vec<(&str, &str)> = res_parts
        .headers
        .iter()
        .filter(|(n, _)| !NOT_STORED.contains(&n.as_str()))
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
        .collect();
    let headers = serde_json::to_string(&headers).expect("strings serialise");
    let mut t = match open_tx {
        Some(t) => t,
        None => match begin(&config.db).await {
            Ok(t) => t,
            Err(e) => {
                give_back(None, claimed.as_mut()).await;
                return Problem::internal(e).into_response();
            }
        },
    };
    let status = res_parts.status.as_u16();
    let stored = match &claimed {
        Some(c) => store_response(&mut t, &scope, &key, &c.token, status, &headers, &body).await,
        None => record(&mut t, &scope, &key, &fp, config.retention, status, &headers, &body).await,
    };
    match stored {
        Ok(true) => {}
        Ok(false) => {
            let _ = t.rollback().await;
            if let Some(c) = claimed.as_mut() {
                // Taken over: the claim is someone else's now, nothing to release.
                c.open = false;
                return Problem::new(
                    StatusCode::CONFLICT,
                    "the idempotency key was taken over while this request ran; retry it",
                )
                .with_type("/problems/idempotency-key-in-flight", "Idempotency key in use")
                .into_response();
            }
            // Another process completed or claimed the key meanwhile (SQLite): answer as it would.
            return match answer(&config.db, &scope, &key, &fp).await {
                Ok(claim) => answer_response(claim),
                Err(e) => Problem::internal(e).into_response(),
            };
        }
        Err(e) => {
            give_back(Some(t), claimed.as_mut()).await;
            return Problem::internal(e).into_response();
        }
    }
    if let Err(e) = t.commit().await {
        give_back(None, claimed.as_mut()).await;
        return Problem::internal(e).into_response();
    }
    if let Some(c) = claimed.as_mut() {
        c.open = false;
    }
    drop(held);
    Response::from_parts(res_parts, Body::from(body))
}

/// Roll back what the handler wrote and free the key for a retry.
async fn give_back(open: Option<Tx>, claim: Option<&mut DurableClaim>) {
    if let Some(t) = open {
        let _ = t.rollback().await;
    }
    if let Some(c) = claim {
        // Still open until released: if this is dropped meanwhile, the guard releases it.
        match release(&c.db, &c.scope, &c.key, &c.token).await {
            Ok(()) => c.open = false,
            Err(e) => {
                tracing::warn!(error = %e, "could not release an idempotency key; it frees itself after its lease")
            }
        }
    }
}

/// A request's durable claim (see [`HOLD_BEFORE_CLAIM`]). If the request is dropped before it
/// settles the claim (its client went away, the server shut down), the claim is released in
/// the background, so the key is not blocked for the rest of its lease.
struct DurableClaim {
    db: Db,
    scope: String,
    key: IdempotencyKey,
    token: String,
    /// Neither completed, released nor taken over yet.
    open: bool,
}

impl Drop for DurableClaim {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (db, scope, key, token) = (
                self.db.clone(),
                std::mem::take(&mut self.scope),
                self.key.clone(),
                std::mem::take(&mut self.token),
            );
            runtime.spawn(async move {
                if let Err(e) = release(&db, &scope, &key, &token).await {
                    tracing::warn!(error = %e, "could not release the idempotency key of a dropped request; it frees itself after its lease");
                }
            });
        }
    }
}

/// The layer's own transaction handling on both backends: the claim's connection kept for the
/// handler (PostgreSQL), given back when the handler calls out first, or used by the layer
/// itself when the handler writes nothing.
#[cfg(all(test, feature = "testing"))]
mod tests {
    use axum::Router;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;
    use crate::testing::{Fixture, Kind};

    macro_rules! on_both {
        ($($name:ident),* $(,)?) => {
            mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Embedded).await } )* }
            mod pg { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::PgJetStream).await } )* }
        };
    }

    on_both!(handler_that_calls_out_before_writing, handler_that_writes_nothing,);

    async fn send(app: &Router, key: &str) -> Response {
        let req = Request::post("/t")
            .header("idempotency-key", key)
            .body(Body::from("x"))
            .unwrap();
        app.clone().oneshot(req).await.unwrap()
    }

    async fn count(db: &Db) -> i64 {
        crate::on_pool!(db, p => sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(p).await.unwrap())
    }

    /// Longer than `HOLD_BEFORE_CLAIM` between the claim and the first write: the kept connection went
    /// back to the pool, and the transaction begins on another.
    async fn handler_that_calls_out_before_writing(kind: Kind) {
        let f = Fixture::new(kind).await;
        crate::on_pool!(&f.db, p => sqlx::query("CREATE TABLE t (v TEXT NOT NULL)").execute(p).await.map(|_| ()).unwrap());
        let app = Router::new().route(
            "/t",
            post(|tx: IdempotentTx| async move {
                tokio::time::sleep(HOLD_BEFORE_CLAIM * 3).await;
                let mut tx = tx.get().await?;
                crate::on_conn!(&mut *tx, c => sqlx::query("INSERT INTO t (v) VALUES ('x')").execute(c).await.map(|_| ()))?;
                Ok::<_, Problem>((StatusCode::CREATED, "made"))
            })
            .layer(IdempotencyLayer::new(f.db.clone())),
        );
        for key in ["a", "b"] {
            assert_eq!(send(&app, key).await.status(), StatusCode::CREATED);
        }
        let replay = send(&app, "a").await;
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(count(&f.db).await, 2);
        f.cleanup().await;
    }

    /// No transaction asked for: the layer stores the response in one of its own.
    async fn handler_that_writes_nothing(kind: Kind) {
        let f = Fixture::new(kind).await;
        crate::on_pool!(&f.db, p => sqlx::query("CREATE TABLE t (v TEXT NOT NULL)").execute(p).await.map(|_| ()).unwrap());
        let app = Router::new().route(
            "/t",
            post(|| async { (StatusCode::ACCEPTED, "noted") }).layer(IdempotencyLayer::new(f.db.clone())),
        );
        assert_eq!(send(&app, "a").await.status(), StatusCode::ACCEPTED);
        let replay = send(&app, "a").await;
        assert_eq!(replay.status(), StatusCode::ACCEPTED);
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(to_bytes(replay.into_body(), 100).await.unwrap(), "noted");
        f.cleanup().await;
    }
}
