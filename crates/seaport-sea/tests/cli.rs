//! The operator commands: readable output, readable errors, non-zero exit on errors.

mod common;

use std::process::Command;

use common::{TestService, wait_for};

fn seaport(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_seaport"))
        .args(args)
        .env("SEAPORT_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn errors_are_readable_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = seaport(&["outbox", "status", "--data-dir", d]);
    assert_eq!(code, 1);
    assert!(err.contains("no database at"), "{err}");
    assert!(
        !dir.path().join("seaport.db").exists(),
        "a read command does not create a database"
    );
    let (code, _, err) = seaport(&["trace", "bad id!", "--data-dir", d]);
    assert_eq!(code, 1);
    assert!(err.contains("not a valid correlation id"), "{err}");
    let (code, _, err) = seaport(&["serve", "--listen", "not-an-address"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value"), "{err}");
    let (code, _, _) = seaport(&["no-such-command"]);
    assert_eq!(code, 2);
    let (code, out, _) = seaport(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("serve") && out.contains("outbox") && out.contains("trace"));
}

#[tokio::test]
async fn serve_refuses_a_busy_port_with_a_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = seaport(&["serve", "--listen", &addr, "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot listen on"), "{err}");
}

#[tokio::test]
async fn outbox_status_and_trace_read_the_live_database() {
    let s = TestService::start().await;
    let res = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "cli-1")
        .header("X-Correlation-Id", "cli-corr")
        .json(&serde_json::json!({"title": "t", "customer_id": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let d = s.dir.path().to_str().unwrap().to_owned();
    wait_for("the trace", async || {
        let (code, out, _) = seaport(&["trace", "cli-corr", "--data-dir", &d]);
        code == 0 && out.matches("├").count() == 6
    })
    .await;
    let (code, out, _) = seaport(&["trace", "cli-corr", "--data-dir", &d]);
    assert_eq!(code, 0);
    assert!(
        out.contains("sea.cases.created") && out.contains("audit__from_sea") && out.contains("appended audit entry"),
        "{out}"
    );
    let (code, out, _) = seaport(&["trace", "cli-corr", "--json", "--data-dir", &d]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["correlation_id"], "cli-corr");
    let (code, out, _) = seaport(&["outbox", "status", "--json", "--data-dir", &d]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["unpublished"], 0);
    assert_eq!(status["published"], 2);
    let (code, out, _) = seaport(&["outbox", "status", "--data-dir", &d]);
    assert_eq!(code, 0);
    assert!(out.contains("unpublished: 0"), "{out}");
    let (code, _, err) = seaport(&["trace", "unknown-corr", "--data-dir", &d]);
    assert_eq!(code, 1);
    assert!(err.contains("no events recorded"), "{err}");

    // The embedded database runs in WAL mode, and the audit log refuses rewrites.
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", s.dir.path().join("seaport.db").display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&db).await.unwrap();
    assert_eq!(mode, "wal");
    assert!(
        sqlx::query("UPDATE audit_log SET event_type = 'x'")
            .execute(&db)
            .await
            .is_err()
    );
    assert!(sqlx::query("DELETE FROM audit_log").execute(&db).await.is_err());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_replayed() {
    let s = TestService::start().await;
    // An event the notifications consumer cannot process (no data.id): it ends in the dead letters.
    let bad = seaport::Event::new("sea.cases.created", "/test", serde_json::json!({"title": "no id"}))
        .with_subject("broken")
        .correlated("dlq-corr", None);
    let mut tx = s.db.begin_write().await.unwrap();
    seaport::outbox::Outbox::new().insert(&mut tx, &bad).await.unwrap();
    tx.commit().await.unwrap();
    wait_for("the dead letter", async || {
        s.count("SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;

    let d = s.dir.path().to_str().unwrap().to_owned();
    let (code, out, _) = seaport(&["dlq", "list", "--json", "--data-dir", &d]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["consumer"], "notifications__from_sea");
    assert_eq!(list[0]["message_id"], bad.id.as_str());
    assert_eq!(list[0]["delivery_count"], 5);
    assert!(list[0]["last_error"].as_str().unwrap().contains("data.id"));
    let id = list[0]["id"].as_i64().unwrap().to_string();
    let (code, out, _) = seaport(&["dlq", "list", "--data-dir", &d]);
    assert_eq!(code, 0);
    assert!(
        out.contains("notifications__from_sea") && out.contains("data.id"),
        "{out}"
    );
    let (code, out, _) = seaport(&["dlq", "show", &id, "--data-dir", &d]);
    assert_eq!(code, 0);
    assert!(out.contains("payload:") && out.contains("no id"), "{out}");
    let (code, out, _) = seaport(&["dlq", "show", &id, "--json", "--data-dir", &d]);
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["payload"]["id"], bad.id.as_str());

    let (code, out, _) = seaport(&["dlq", "replay", &id, "--data-dir", &d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("replayed dead letter #{id}")));
    assert_eq!(
        s.count("SELECT COUNT(*) FROM seaport_dead_letters WHERE replays = 1")
            .await,
        1
    );
    let (code, out, _) = seaport(&["dlq", "replay", "--all", "--data-dir", &d]);
    assert_eq!((code, out.trim()), (0, "nothing to replay"));
    let (code, _, err) = seaport(&["dlq", "replay", "999999", "--data-dir", &d]);
    assert_eq!(code, 1);
    assert!(err.contains("no dead letter with id 999999"), "{err}");
    let (code, _, err) = seaport(&["dlq", "show", "999999", "--data-dir", &d]);
    assert_eq!(code, 1);
    assert!(err.contains("no dead letter"), "{err}");
    let (code, _, _) = seaport(&["dlq", "replay", "--data-dir", &d]);
    assert_eq!(code, 2, "an id or --all is required");
    // The other consumers processed the event once and dropped the replayed copy in their inbox.
    wait_for(
        "the audit consumer to have taken and settled the replayed copy",
        async || {
            s.count(
                "SELECT COUNT(*) FROM seaport_broker_consumers c WHERE c.name = 'audit__from_sea'
               AND c.delivered_seq = (SELECT MAX(seq) FROM seaport_broker_messages)
               AND NOT EXISTS (SELECT 1 FROM seaport_broker_pending p WHERE p.consumer = c.name)",
            )
            .await
                == 1
        },
    )
    .await;
    assert_eq!(
        s.count("SELECT COUNT(*) FROM consumer_effects WHERE consumer = 'audit__from_sea'")
            .await,
        1
    );
    s.stop().await;
}
