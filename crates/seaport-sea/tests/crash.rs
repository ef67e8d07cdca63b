//! Kill the real `seaport` process at the worst moments and check that, after a restart, every
//! committed case's event reaches each fan-out consumer's effects exactly once. On both
//! deployments: embedded, and PostgreSQL + NATS JetStream.
//!
//! The process aborts itself (SIGABRT: no destructors, no flush, like `kill -9`) at a named
//! crash point (`SEAPORT_CRASH_AT`), so the moment is exact rather than a lucky timing.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::FAN_OUT;
use seaport::on_pool;
use seaport::store::Db;
use seaport::testing::Kind;
use serde_json::{Value, json};

/// Where one crash scenario keeps its data.
struct Deployment {
    kind: Kind,
    dir: tempfile::TempDir,
    database_url: Option<String>,
    stream: String,
    root: String,
}

impl Deployment {
    async fn new(kind: Kind) -> Self {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let tag = tag[tag.len() - 12..].to_owned();
        let database_url = match kind {
            Kind::Embedded => None,
            Kind::PgJetStream => Some(seaport::testing::fresh_pg_database().await),
        };
        Deployment {
            kind,
            dir: tempfile::tempdir().unwrap(),
            database_url,
            stream: format!("C{tag}"),
            root: format!("c{tag}"),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--data-dir".to_owned(),
            self.dir.path().display().to_string(),
            "--stream".into(),
            self.stream.clone(),
            "--subject-root".into(),
            self.root.clone(),
        ];
        if let Some(url) = &self.database_url {
            a.extend([
                "--database-url".to_owned(),
                url.clone(),
                "--nats-url".into(),
                seaport::testing::nats_url(),
            ]);
        }
        a
    }

    async fn db(&self) -> Db {
        match &self.database_url {
            Some(url) => Db::open(url).await.unwrap(),
            None => Db::open(&self.dir.path().join("seaport.db").display().to_string())
                .await
                .unwrap(),
        }
    }

    /// The `cases.created` messages the broker holds: message id and payload of each copy.
    async fn case_messages(&self, db: &Db) -> Vec<(String, Vec<u8>)> {
        let subject = format!("{}.cases.created", self.root);
        match self.kind {
            Kind::Embedded => {
                on_pool!(db, p => sqlx::query_as("SELECT msg_id, payload FROM seaport_broker_messages WHERE subject = $1")
                .bind(&subject)
                .fetch_all(p)
                .await
                .unwrap())
            }
            Kind::PgJetStream => {
                let client = async_nats::connect(seaport::testing::nats_url()).await.unwrap();
                let js = async_nats::jetstream::new(client);
                let mut stream = js.get_stream(&self.stream).await.unwrap();
                let mut out = Vec::new();
                for seq in 1..=stream.info().await.unwrap().state.last_sequence {
                    if let Ok(m) = stream.get_raw_message(seq).await
                        && m.subject.as_str() == subject
                    {
                        let id = m
                            .headers
                            .get(seaport::broker::MSG_ID_HEADER)
                            .map(|v| v.as_str().to_owned());
                        out.push((id.unwrap_or_default(), m.payload.to_vec()));
                    }
                }
                out
            }
        }
    }

    /// The case id (the event's subject) and event id of the one `cases.created` event: from the
    /// outbox while it is unpublished, else from the broker (the relay deleted its row).
    async fn case_created_event(&self, db: &Db) -> (String, String) {
        let unpublished: Option<(String, String)> = on_pool!(db, p => sqlx::query_as(
            "SELECT ordering_key, event_id FROM seaport_outbox WHERE topic LIKE '%.cases.created'",
        )
        .fetch_optional(p)
        .await
        .unwrap());
        if let Some(found) = unpublished {
            return found;
        }
        let messages = self.case_messages(db).await;
        let (_, payload) = messages
            .first()
            .expect("the committed case's event is in the outbox or the broker");
        let event = seaport::Event::from_json(payload).unwrap();
        (event.subject.expect("case events name their case"), event.id)
    }

    /// How many copies of the message with this id the broker holds.
    async fn broker_copies(&self, db: &Db, msg_id: &str) -> i64 {
        self.case_messages(db)
            .await
            .iter()
            .filter(|(id, _)| id == msg_id)
            .count() as i64
    }

    async fn cleanup(self) {
        if self.database_url.is_some() {
            seaport::testing::remove_pg_and_stream(self.database_url.as_deref(), &self.stream).await;
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn(dep: &Deployment, crash_at: Option<&str>) -> Proc {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seaport"));
    // A short ack wait so that the delivery the dead process held comes back quickly.
    cmd.args([
        "serve",
        "--ack-wait-secs",
        "2",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .args(dep.args())
    .env("SEAPORT_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    match crash_at {
        Some(point) => cmd.env("SEAPORT_CRASH_AT", point),
        None => cmd.env_remove("SEAPORT_CRASH_AT"),
    };
    let mut proc = Proc {
        child: cmd.spawn().expect("start seaport"),
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{}/healthz", proc.base)).send().await
            && r.status() == 200
        {
            return proc;
        }
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("seaport exited before serving: {status}");
        }
        assert!(Instant::now() < deadline, "seaport did not become healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(proc: &mut Proc) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not reach its crash point");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn effects_of(db: &Db, event_id: &str) -> Vec<(String, i64)> {
    on_pool!(db, p => sqlx::query_as(
        "SELECT consumer, COUNT(*) FROM consumer_effects WHERE event_id = $1 GROUP BY consumer ORDER BY consumer",
    )
    .bind(event_id)
    .fetch_all(p)
    .await
    .unwrap())
}

async fn scalar(db: &Db, sql: &'static str, arg: &str) -> i64 {
    on_pool!(db, p => sqlx::query_scalar(sql).bind(arg).fetch_one(p).await.unwrap())
}

/// Create a case, let the process die at `point`, restart it, and check exactly-once effects.
async fn survive(point: &str, kind: Kind) {
    let dep = Deployment::new(kind).await;
    let mut first = spawn(&dep, Some(point)).await;
    let http = reqwest::Client::new();
    // The relay may reach its crash point before the 201 is written (it wakes at commit): then the
    // client sees a dropped connection, as after any crash, and retries later with the same key.
    let acknowledged: Option<Value> = match http
        .post(format!("{}/cases", first.base))
        .header("X-Idempotency-Key", "crash-1")
        .header("X-Correlation-Id", format!("crash-{point}"))
        .json(&json!({"title": "crash", "customer_id": "C-1"}))
        .send()
        .await
    {
        Ok(res) => {
            assert_eq!(res.status(), 201);
            res.json().await.ok()
        }
        Err(e) => {
            assert!(e.is_request(), "unexpected client error {e}");
            None
        }
    };
    let status = wait_exit(&mut first).await;
    assert!(!status.success(), "aborted at {point}: {status}");
    drop(first);

    let db = dep.db().await;
    let (case_id, event_id) = dep.case_created_event(&db).await;
    if let Some(case) = &acknowledged {
        assert_eq!(
            case["id"],
            case_id.as_str(),
            "the acknowledged case is the committed one"
        );
    }

    // The crash really happened at the worst moment for this point.
    let in_broker = dep.broker_copies(&db, &event_id).await;
    // The relay deletes a row only once the broker confirmed it, in the claim's transaction.
    let in_outbox = scalar(
        &db,
        "SELECT COUNT(*) FROM seaport_outbox WHERE event_id = $1",
        &event_id,
    )
    .await;
    let in_inbox = scalar(
        &db,
        "SELECT COUNT(*) FROM seaport_inbox WHERE message_id = $1",
        &event_id,
    )
    .await;
    match point {
        "relay.before_publish" => assert_eq!((in_broker, in_outbox, in_inbox), (0, 1, 0)),
        "relay.after_publish" => assert_eq!((in_broker, in_outbox, in_inbox), (1, 1, 0)),
        // At least one consumer committed its effect and died before acking (on PostgreSQL
        // others may have committed concurrently, and the relay may not have deleted it yet).
        "consumer.after_commit" => assert!(in_broker == 1 && in_inbox >= 1, "{in_broker} {in_outbox} {in_inbox}"),
        // A consumer died mid-handler: its effects were written but not committed (others may
        // have committed theirs concurrently).
        "consumer.before_commit" => assert!(in_broker == 1 && in_inbox < 3, "{in_broker} {in_outbox} {in_inbox}"),
        other => panic!("unknown point {other}"),
    }

    let second = spawn(&dep, None).await;
    let want: Vec<(String, i64)> = FAN_OUT.iter().map(|c| (c.to_string(), 1)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while effects_of(&db, &event_id).await != want {
        assert!(
            Instant::now() < deadline,
            "after restart: effects {:?}",
            effects_of(&db, &event_id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let any wrong redelivery arrive, then look again: still exactly once each, and settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        effects_of(&db, &event_id).await,
        want,
        "exactly one effect per consumer"
    );
    assert_eq!(
        dep.broker_copies(&db, &event_id).await,
        1,
        "the broker kept one copy of the event"
    );
    let unpublished: i64 =
        on_pool!(&db, p => sqlx::query_scalar("SELECT COUNT(*) FROM seaport_outbox").fetch_one(p).await.unwrap());
    assert_eq!(unpublished, 0);
    let cases: i64 = on_pool!(&db, p => sqlx::query_scalar("SELECT COUNT(*) FROM cases").fetch_one(p).await.unwrap());
    assert_eq!(cases, 1);
    // A client retry after the crash replays the committed case; it does not create a second one.
    let retry = http
        .post(format!("{}/cases", second.base))
        .header("X-Idempotency-Key", "crash-1")
        .json(&json!({"title": "crash", "customer_id": "C-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], case_id.as_str());
    drop(second);
    db.close().await;
    dep.cleanup().await;
}

async fn crash_between_commit_and_publish(kind: Kind) {
    survive("relay.before_publish", kind).await;
}

async fn crash_after_publish_before_deleting_the_row(kind: Kind) {
    survive("relay.after_publish", kind).await;
}

async fn crash_after_consumer_commit_before_ack(kind: Kind) {
    survive("consumer.after_commit", kind).await;
}

/// A worker killed mid-handler: the message goes to the next worker (here: the restarted
/// process) after the ack wait, and takes effect once.
async fn crash_mid_handler_before_the_consumer_commits(kind: Kind) {
    survive("consumer.before_commit", kind).await;
}

on_both_backends!(
    crash_mid_handler_before_the_consumer_commits,
    crash_between_commit_and_publish,
    crash_after_publish_before_deleting_the_row,
    crash_after_consumer_commit_before_ack,
);
