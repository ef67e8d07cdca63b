//! The Idempotency-Key layer on both backends, with a small axum app whose handler can be made
//! slow or failing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::post;
use http::StatusCode;
use seaport::http::idempotency::{IdempotencyKey, claim};
use seaport::http::{IdempotencyLayer, IdempotentTx, Problem};
use seaport::on_conn;
use seaport::testing::{Fixture, Kind};
use serde_json::{Value, json};
use tokio::sync::Notify;

#[derive(Clone, Default)]
struct Behaviour {
    calls: Arc<AtomicUsize>,
    /// Calls that fail with 500 before the handler succeeds.
    failures: Arc<AtomicUsize>,
    /// When set, the handler waits for it.
    gate: Option<Arc<Notify>>,
}

async fn make_thing(
    State(b): State<Behaviour>,
    tx: IdempotentTx,
    body: String,
) -> Result<axum::response::Response, Problem> {
    let n = b.calls.fetch_add(1, Ordering::SeqCst);
    {
        let mut tx = tx.get().await?;
        on_conn!(&mut *tx, c => sqlx::query("INSERT INTO things (body) VALUES ($1)").bind(&body).execute(c).await.map(|_| ()))?;
    }
    if let Some(gate) = &b.gate {
        gate.notified().await;
    }
    if b.failures.load(Ordering::SeqCst) > 0 {
        b.failures.fetch_sub(1, Ordering::SeqCst);
        return Err(Problem::internal("injected failure"));
    }
    Ok((
        StatusCode::CREATED,
        [("location", "/things/1"), ("x-request-id", "per-request")],
        axum::Json(json!({"call": n, "body": body})),
    )
        .into_response())
}

struct App {
    f: Fixture,
    base: String,
    http: reqwest::Client,
    b: Behaviour,
}

async fn app(kind: Kind, b: Behaviour, layer: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> App {
    let f = Fixture::new(kind).await;
    seaport::on_pool!(&f.db, p => sqlx::query("CREATE TABLE things (body TEXT NOT NULL)").execute(p).await.map(|_| ()).unwrap());
    let router = Router::new()
        .route(
            "/things",
            post(make_thing).layer(layer(IdempotencyLayer::new(f.db.clone()))),
        )
        .with_state(b.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    App {
        f,
        base,
        http: reqwest::Client::new(),
        b,
    }
}

impl App {
    async fn post(&self, key: Option<&str>, client: Option<&str>, body: &str) -> reqwest::Response {
        let mut r = self.http.post(format!("{}/things", self.base)).body(body.to_owned());
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        if let Some(c) = client {
            r = r.header("X-Client-Id", c);
        }
        r.send().await.unwrap()
    }

    async fn things(&self) -> i64 {
        seaport::on_pool!(&self.f.db, p => sqlx::query_scalar("SELECT COUNT(*) FROM things").fetch_one(p).await.unwrap())
    }
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Embedded).await } )* }
        mod pg_jetstream { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::PgJetStream).await } )* }
    };
}

on_both!(
    statuses_400_422_and_replay,
    in_flight_duplicate_gets_409,
    handler_failure_releases_the_key,
    keys_are_scoped_to_the_caller,
    expired_keys_execute_again,
    abandoned_claim_is_taken_over_after_its_lease,
    a_duplicate_through_another_instance_never_doubles_the_effect,
    a_request_dropped_mid_handler_frees_its_key_at_once,
    duplicates_of_a_completed_request_all_replay,
);

/// Once a request has completed, every duplicate replays it, however many arrive at once and
/// however soon after one another. A replay holds the key for a moment as well: duplicates that
/// met it there got 409 as if the first request were still running, and on PostgreSQL a replay
/// that dropped its transaction kept the key's lock until its connection was next used.
async fn duplicates_of_a_completed_request_all_replay(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l).await;
    assert_eq!(a.post(Some("done"), None, "x").await.status(), 201);
    for round in 0..5 {
        let replays: Vec<_> = (0..8)
            .map(|_| {
                let (http, url) = (a.http.clone(), format!("{}/things", a.base));
                tokio::spawn(async move {
                    let r = http
                        .post(url)
                        .header("Idempotency-Key", "done")
                        .body("x")
                        .send()
                        .await
                        .unwrap();
                    (r.status().as_u16(), r.headers().get("idempotent-replayed").is_some())
                })
            })
            .collect();
        for r in replays {
            assert_eq!(
                r.await.unwrap(),
                (201, true),
                "round {round}: a duplicate did not replay"
            );
        }
    }
    assert_eq!((a.things().await, a.b.calls.load(Ordering::SeqCst)), (1, 1));
    a.f.cleanup().await;
}

async fn statuses_400_422_and_replay(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l).await;
    assert_eq!(a.post(None, None, "x").await.status(), 400);
    assert_eq!(a.post(Some(&"k".repeat(256)), None, "x").await.status(), 400);
    let first = a.post(Some("k1"), None, "x").await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();
    let replay = a.post(Some("k1"), None, "x").await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["location"], "/things/1", "stored headers are replayed");
    assert!(
        replay.headers().get("x-request-id").is_none(),
        "per-exchange headers are not"
    );
    assert_eq!(replay.json::<Value>().await.unwrap(), first_body);
    let other = a.post(Some("k1"), None, "different body").await;
    assert_eq!(other.status(), 422);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    assert_eq!((a.things().await, a.b.calls.load(Ordering::SeqCst)), (1, 1));
    a.f.cleanup().await;
}

async fn in_flight_duplicate_gets_409(kind: Kind) {
    let gate = Arc::new(Notify::new());
    let a = app(
        kind,
        Behaviour {
            gate: Some(gate.clone()),
            ..Default::default()
        },
        |l| l,
    )
    .await;
    let (http, url) = (a.http.clone(), format!("{}/things", a.base));
    let first = tokio::spawn(async move {
        http.post(url)
            .header("Idempotency-Key", "busy")
            .body("x")
            .send()
            .await
            .unwrap()
    });
    while a.b.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = a.post(Some("busy"), None, "x").await;
    assert_eq!(second.status(), 409);
    assert_eq!(second.headers()["retry-after"], "1");
    gate.notify_one();
    assert_eq!(first.await.unwrap().status(), 201);
    assert_eq!(
        a.post(Some("busy"), None, "x").await.headers()["idempotent-replayed"],
        "true"
    );
    assert_eq!(a.things().await, 1);
    a.f.cleanup().await;
}

async fn handler_failure_releases_the_key(kind: Kind) {
    let b = Behaviour::default();
    b.failures.store(1, Ordering::SeqCst);
    let a = app(kind, b, |l| l).await;
    let failed = a.post(Some("retry-me"), None, "x").await;
    assert_eq!(failed.status(), 500);
    assert_eq!(a.things().await, 0, "the failed attempt's writes were rolled back");
    let retried = a.post(Some("retry-me"), None, "x").await;
    assert_eq!(retried.status(), 201, "the key was released");
    assert!(retried.headers().get("idempotent-replayed").is_none());
    assert_eq!(
        a.post(Some("retry-me"), None, "x").await.headers()["idempotent-replayed"],
        "true"
    );
    assert_eq!(a.things().await, 1);
    a.f.cleanup().await;
}

async fn keys_are_scoped_to_the_caller(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l).await;
    let alice: Value = a
        .post(Some("shared"), Some("alice"), "secret of alice")
        .await
        .json()
        .await
        .unwrap();
    let bob = a.post(Some("shared"), Some("bob"), "secret of alice").await;
    assert_eq!(bob.status(), 201);
    assert!(
        bob.headers().get("idempotent-replayed").is_none(),
        "bob never gets alice's stored response"
    );
    assert_ne!(bob.json::<Value>().await.unwrap()["call"], alice["call"]);
    assert_eq!(a.things().await, 2);
    a.f.cleanup().await;
}

async fn expired_keys_execute_again(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l.retention(Duration::from_secs(2))).await;
    assert_eq!(a.post(Some("short"), None, "x").await.status(), 201);
    assert_eq!(
        a.post(Some("short"), None, "x").await.headers()["idempotent-replayed"],
        "true"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let after = a.post(Some("short"), None, "x").await;
    assert_eq!(after.status(), 201);
    assert!(
        after.headers().get("idempotent-replayed").is_none(),
        "an expired key is new again"
    );
    assert_eq!(a.things().await, 2);
    // And the sweeper deletes expired keys.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let swept = seaport::retention::sweep_once(&a.f.db, &Default::default())
        .await
        .unwrap();
    assert_eq!(swept.idempotency_keys, 1);
    a.f.cleanup().await;
}

async fn abandoned_claim_is_taken_over_after_its_lease(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l.lease(Duration::from_secs(2))).await;
    // A request claimed the key and then its process died (no completion, no release).
    let fp = seaport::http::idempotency::fingerprint("POST", "/things", b"x");
    let key = IdempotencyKey::parse(b"orphan").unwrap();
    let c = claim(
        &a.f.db,
        "anonymous",
        &key,
        &fp,
        Duration::from_secs(3600),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(matches!(c, seaport::http::idempotency::Claim::Claimed(_)));
    assert_eq!(
        a.post(Some("orphan"), None, "x").await.status(),
        409,
        "within the lease it is in flight"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        a.post(Some("orphan"), None, "x").await.status(),
        201,
        "after the lease it is taken over"
    );
    a.f.cleanup().await;
}

/// The same database opened a second time, as another process of the service would.
async fn second_instance(f: &Fixture) -> seaport::store::Db {
    match f.kind {
        Kind::PgJetStream => f.another_db().await,
        Kind::Embedded => {
            let path = f.dir.as_ref().expect("embedded dir").path().join("seaport.db");
            seaport::store::Db::open(path.to_str().unwrap()).await.unwrap()
        }
    }
}

/// A handler that waits `first` (calling out, say), writes a row, then waits until `open` says
/// true.
fn gated_router(
    db: seaport::store::Db,
    open: tokio::sync::watch::Receiver<bool>,
    calls: Arc<AtomicUsize>,
    first: Duration,
) -> Router {
    Router::new().route(
        "/things",
        post(move |tx: IdempotentTx, body: String| {
            let (mut open, calls) = (open.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if !first.is_zero() {
                    tokio::time::sleep(first).await;
                }
                {
                    let mut tx = tx.get().await?;
                    on_conn!(&mut *tx, c => sqlx::query("INSERT INTO things (body) VALUES ($1)").bind(&body).execute(c).await.map(|_| ()))?;
                }
                let _ = open.wait_for(|o| *o).await;
                Ok::<_, Problem>((StatusCode::CREATED, body))
            }
        })
        .layer(IdempotencyLayer::new(db)),
    )
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

/// Two instances of a service on one database (two pools; on SQLite two opens of the file, so
/// no shared in-process state): a duplicate that reaches the other one while the first request
/// runs gets 409 (PostgreSQL: the key's advisory lock) or, on SQLite, waits for the single
/// writer and then replays the first response (its own writes rolled back). Never two effects.
async fn a_duplicate_through_another_instance_never_doubles_the_effect(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l).await;
    let other = second_instance(&a.f).await;
    let (open_tx, open) = tokio::sync::watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let first_base = serve(gated_router(
        a.f.db.clone(),
        open.clone(),
        calls.clone(),
        Duration::ZERO,
    ))
    .await;
    let second_base = serve(gated_router(other.clone(), open, calls.clone(), Duration::ZERO)).await;
    let send = |base: String| {
        let http = a.http.clone();
        tokio::spawn(async move {
            http.post(format!("{base}/things"))
                .header("Idempotency-Key", "twice")
                .body("x")
                .send()
                .await
                .unwrap()
        })
    };
    let first = send(first_base);
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Past the layer's hold, so a request still waiting to write would have its claim by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = send(second_base);
    match kind {
        Kind::PgJetStream => {
            let second = tokio::time::timeout(Duration::from_secs(10), second)
                .await
                .expect("the duplicate is answered at once, not after the first request")
                .unwrap();
            assert_eq!(second.status(), 409);
            assert_eq!(second.headers()["retry-after"], "1");
            open_tx.send(true).unwrap();
        }
        Kind::Embedded => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!second.is_finished(), "the duplicate waits for the writer");
            open_tx.send(true).unwrap();
            let second = second.await.unwrap();
            assert_eq!(second.status(), 201);
            assert_eq!(second.headers()["idempotent-replayed"], "true");
        }
    }
    let first = first.await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(a.things().await, 1, "one effect");
    other.close().await;
    a.f.cleanup().await;
}

/// A request whose client went away mid-handler (its future dropped, as a server does on a
/// closed connection) leaves nothing behind: its writes roll back and the key is free again at
/// once, not after the lease (60 s here). A handler that writes at once had nothing about the
/// key written; one that called out first had its claim written, and released on the drop.
async fn a_request_dropped_mid_handler_frees_its_key_at_once(kind: Kind) {
    let a = app(kind, Behaviour::default(), |l| l).await;
    for (key, first) in [
        ("dropped-fast", Duration::ZERO),
        ("dropped-slow", Duration::from_millis(100)),
    ] {
        dropped_then_retried(&a, key, first).await;
    }
    assert_eq!(a.things().await, 2, "the dropped requests' writes were rolled back");
    a.f.cleanup().await;
}

async fn dropped_then_retried(a: &App, key: &str, first: Duration) {
    use tower::ServiceExt;
    let (open_tx, open) = tokio::sync::watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let router = gated_router(a.f.db.clone(), open, calls.clone(), first);
    let request = || {
        http::Request::post("/things")
            .header("idempotency-key", key)
            .body(axum::body::Body::from("x"))
            .unwrap()
    };
    let dropped = tokio::time::timeout(first + Duration::from_millis(300), router.clone().oneshot(request())).await;
    assert!(dropped.is_err(), "the handler was still waiting");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    open_tx.send(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let retried = loop {
        let res = router.clone().oneshot(request()).await.unwrap();
        if res.status() != StatusCode::CONFLICT || std::time::Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        retried.status(),
        StatusCode::CREATED,
        "{key}: the key is free well before its lease"
    );
    assert!(retried.headers().get("idempotent-replayed").is_none());
}
