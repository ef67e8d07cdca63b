//! The operator commands: readable output, readable errors, non-zero exit on errors.

mod common;

use std::process::Command;

use common::{FAN_OUT, TestService, wait_for};
use seaport::testing::Kind;

/// The flags that point an operator command at the service's database.
fn target(s: &TestService) -> Vec<String> {
    match &s.config.database_url {
        Some(url) => vec!["--database-url".into(), url.clone()],
        None => vec!["--data-dir".into(), s.dir.path().display().to_string()],
    }
}

/// ...and, for commands that publish, at its broker.
fn broker_target(s: &TestService) -> Vec<String> {
    let mut args = target(s);
    if let Some(nats) = &s.config.nats_url {
        args.extend(["--nats-url".into(), nats.clone()]);
    }
    args.extend([
        "--stream".into(),
        s.config.stream.clone(),
        "--subject-root".into(),
        s.config.topics.root.clone(),
    ]);
    args
}

fn run_on(args: &[&str], target: &[String]) -> (i32, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(target.iter().map(String::as_str));
    seaport(&all)
}

/// Has `consumer` settled everything in the service's stream?
async fn settled(s: &TestService, consumer: &str) -> bool {
    match &s.config.nats_url {
        None => {
            s.count_for(
                "SELECT COUNT(*) FROM seaport_broker_consumers c WHERE c.name = $1
                   AND c.delivered_seq = (SELECT MAX(seq) FROM seaport_broker_messages)
                   AND NOT EXISTS (SELECT 1 FROM seaport_broker_pending p WHERE p.consumer = c.name)",
                consumer,
            )
            .await
                == 1
        }
        Some(url) => {
            let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                js.get_consumer_from_stream(consumer, &s.config.stream).await.unwrap();
            let info = c.info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        }
    }
}

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

async fn outbox_status_and_trace_read_the_live_database(kind: Kind) {
    let s = TestService::start_on(kind).await;
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
    let t = target(&s);
    wait_for("the trace", async || {
        let (code, out, _) = run_on(&["trace", "cli-corr"], &t);
        code == 0 && out.matches("├").count() == 6
    })
    .await;
    let (code, out, _) = run_on(&["trace", "cli-corr"], &t);
    assert_eq!(code, 0);
    assert!(
        out.contains("sea.cases.created") && out.contains("audit__from_sea") && out.contains("appended audit entry"),
        "{out}"
    );
    let (code, out, _) = run_on(&["trace", "cli-corr", "--json"], &t);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["correlation_id"], "cli-corr");
    let (code, out, _) = run_on(&["outbox", "status", "--json"], &t);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["unpublished"], 0);
    assert_eq!(status["failing"], 0);
    assert!(
        status.get("published").is_none(),
        "published rows are deleted, not counted: {status}"
    );
    let (code, out, _) = run_on(&["outbox", "status"], &t);
    assert_eq!(code, 0);
    assert!(out.contains("unpublished: 0"), "{out}");
    let (code, _, err) = run_on(&["trace", "unknown-corr"], &t);
    assert_eq!(code, 1);
    assert!(err.contains("no events recorded"), "{err}");

    // The audit log refuses rewrites; the embedded database runs in WAL mode.
    seaport::on_pool!(&s.db, p => {
        assert!(sqlx::query("UPDATE audit_log SET event_type = 'x'").execute(p).await.is_err());
        assert!(sqlx::query("DELETE FROM audit_log").execute(p).await.is_err());
    });
    if kind == Kind::Embedded {
        let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", s.dir.path().join("seaport.db").display()))
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&db).await.unwrap();
        assert_eq!(mode, "wal");
    }
    s.stop().await;
}

async fn dead_letters_are_listed_shown_and_replayed(kind: Kind) {
    let s = TestService::start_on(kind).await;
    // An event the notifications consumer cannot process (no data.id): it ends in the dead letters.
    let bad = seaport::Event::new("sea.cases.created", "/test", serde_json::json!({"title": "no id"}))
        .with_subject("broken")
        .correlated("dlq-corr", None);
    let mut tx = s.db.begin_write().await.unwrap();
    seaport::outbox::Outbox::new()
        .insert_to(&mut tx, &s.topic("sea.cases.created"), &bad)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_for("the dead letter", async || {
        s.count("SELECT COUNT(*) FROM seaport_dead_letters").await == 1
    })
    .await;

    let (t, bt) = (target(&s), broker_target(&s));
    let (code, out, _) = run_on(&["dlq", "list", "--json"], &t);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["consumer"], "notifications__from_sea");
    assert_eq!(list[0]["message_id"], bad.id.as_str());
    assert_eq!(list[0]["delivery_count"], 5);
    assert!(list[0]["last_error"].as_str().unwrap().contains("data.id"));
    let id = list[0]["id"].as_i64().unwrap().to_string();
    let (code, out, _) = run_on(&["dlq", "list"], &t);
    assert_eq!(code, 0);
    assert!(
        out.contains("notifications__from_sea") && out.contains("data.id"),
        "{out}"
    );
    let (code, out, _) = run_on(&["dlq", "show", &id], &t);
    assert_eq!(code, 0);
    assert!(out.contains("payload:") && out.contains("no id"), "{out}");
    let (code, out, _) = run_on(&["dlq", "show", &id, "--json"], &t);
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["payload"]["id"], bad.id.as_str());

    let (code, out, _) = run_on(&["dlq", "replay", &id], &bt);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("replayed dead letter #{id}")));
    assert_eq!(
        s.count("SELECT COUNT(*) FROM seaport_dead_letters WHERE replays = 1")
            .await,
        1
    );
    let (code, out, _) = run_on(&["dlq", "replay", "--all"], &bt);
    assert_eq!((code, out.trim()), (0, "nothing to replay"));
    let (code, _, err) = run_on(&["dlq", "replay", "999999"], &bt);
    assert_eq!(code, 1);
    assert!(err.contains("no dead letter with id 999999"), "{err}");
    let (code, _, err) = run_on(&["dlq", "show", "999999"], &t);
    assert_eq!(code, 1);
    assert!(err.contains("no dead letter"), "{err}");
    let (code, _, _) = run_on(&["dlq", "replay"], &bt);
    assert_eq!(code, 2, "an id or --all is required");
    // The other consumers processed the event once and acked the replayed copy unprocessed.
    wait_for(
        "the audit consumer to have taken and settled the replayed copy",
        async || settled(&s, "audit__from_sea").await,
    )
    .await;
    assert_eq!(
        s.count("SELECT COUNT(*) FROM consumer_effects WHERE consumer = 'audit__from_sea'")
            .await,
        1
    );
    s.stop().await;
}

#[tokio::test]
async fn serve_refuses_inbox_retention_shorter_than_the_redelivery_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = seaport(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--inbox-retention-hours",
        "1",
        "--ack-wait-secs",
        "3600",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("inbox retention") && err.contains("redelivery horizon"),
        "{err}"
    );
}

/// Post a case and wait until it and the events it led to are relayed and processed by every
/// fan-out consumer: a new case leads to two events (`sea.cases.created`, and the
/// notifications consumer's `sea.notifications.queued`), each with one inbox record per fan-out
/// consumer (a message waiting for a retry may not show in the broker's counts, the inbox does
/// not lie), and then the broker has nothing left to deliver.
async fn post_case_and_settle(s: &TestService, key: &str) {
    let res = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", key)
        .header("X-Correlation-Id", key)
        .json(&serde_json::json!({"title": "t", "customer_id": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(FAN_OUT.len(), 3);
    wait_for("the case to be published and processed", async || {
        s.count("SELECT COUNT(*) FROM seaport_outbox").await == 0
            && s.count_for(
                "SELECT COUNT(*) FROM seaport_inbox WHERE correlation_id = $1
                   AND consumer IN ('analytics__from_sea', 'audit__from_sea', 'notifications__from_sea')",
                key,
            )
            .await
                == 2 * 3
    })
    .await;
    for consumer in FAN_OUT {
        wait_for("the consumers to have acknowledged everything", async || {
            settled(s, consumer).await
        })
        .await;
    }
}

/// Run `sql` with one bound integer; the rows it changed.
async fn execute(s: &TestService, sql: &'static str, arg: i64) -> u64 {
    seaport::on_pool!(&s.db, p => sqlx::query(sql).bind(arg).execute(p).await.unwrap().rows_affected())
}

async fn retention_sweep_deletes_only_what_is_old(kind: Kind) {
    const HOUR_MS: i64 = 3_600_000;
    // The service's own sweeper must not race the command: it runs once at start, then hourly,
    // and only for rows over ten years old.
    let mut s = TestService::start_with(kind, |c| {
        c.retention.interval = std::time::Duration::from_secs(3600);
        c.retention.inbox = std::time::Duration::from_secs(10 * 365 * 24 * 3600);
    })
    .await;

    // Old: everything the first case made, aged by two hours (timestamps are ms since epoch).
    post_case_and_settle(&s, "ret-old").await;
    let old_inbox = execute(
        &s,
        "UPDATE seaport_inbox SET processed_at = processed_at - $1",
        2 * HOUR_MS,
    )
    .await;
    let expired_keys = execute(
        &s,
        "UPDATE seaport_idempotency_keys SET expires_at = $1",
        seaport::store::now_ms() - 1000,
    )
    .await;
    assert!(old_inbox > 0 && expired_keys == 1, "{old_inbox} {expired_keys}");

    // Recent: a second case, untouched.
    post_case_and_settle(&s, "ret-new").await;
    let (inbox_before, keys_before) = (
        s.count("SELECT COUNT(*) FROM seaport_inbox").await as u64,
        s.count("SELECT COUNT(*) FROM seaport_idempotency_keys").await as u64,
    );

    // Stop the service, then an old outbox row that was never published: never deleted.
    s.running.take().unwrap().shutdown().await.unwrap();
    let unpublished = seaport::Event::new("sea.cases.created", "/test", serde_json::json!({"id": "x"}));
    let mut tx = s.db.begin_write().await.unwrap();
    seaport::outbox::Outbox::new()
        .insert_to(&mut tx, &s.topic("sea.cases.created"), &unpublished)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let aged = execute(
        &s,
        "UPDATE seaport_outbox SET created_at = created_at - $1",
        2 * HOUR_MS,
    )
    .await;
    assert_eq!(aged, 1);

    // What the progress bar is sized by: exactly the rows made old.
    let config = seaport::retention::RetentionConfig {
        inbox: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let eligible = seaport::retention::eligible(&s.db, &config).await.unwrap();
    assert_eq!((eligible.inbox, eligible.idempotency_keys), (old_inbox, expired_keys));

    let t = target(&s);
    let sweep = ["retention", "sweep", "--inbox-retention-hours", "1", "--batch", "2"];
    let mut json_sweep = sweep.to_vec();
    json_sweep.push("--json");
    let (code, out, err) = run_on(&json_sweep, &t);
    assert_eq!(code, 0, "{err}");
    let totals: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(totals["inbox_records"], old_inbox, "{totals}");
    assert_eq!(totals["idempotency_keys"], expired_keys, "{totals}");
    assert_eq!(totals["skipped"], false, "{totals}");
    // Batches of 2: enough rounds for the largest kind, plus the round that found nothing.
    let most = old_inbox.max(expired_keys);
    assert_eq!(totals["rounds"], most.div_ceil(2) + 1, "{totals}");
    assert!(err.trim().is_empty(), "--json prints no round lines: {err}");

    // Recent rows and the unpublished one are still there.
    assert_eq!(s.count("SELECT COUNT(*) FROM seaport_outbox").await, 1);
    assert_eq!(
        s.count("SELECT COUNT(*) FROM seaport_inbox").await as u64,
        inbox_before - old_inbox
    );
    assert_eq!(
        s.count_for(
            "SELECT COUNT(*) FROM seaport_inbox WHERE correlation_id = $1",
            "ret-old"
        )
        .await,
        0
    );
    assert!(
        s.count_for(
            "SELECT COUNT(*) FROM seaport_inbox WHERE correlation_id = $1",
            "ret-new"
        )
        .await
            > 0
    );
    assert_eq!(
        s.count("SELECT COUNT(*) FROM seaport_idempotency_keys").await as u64,
        keys_before - expired_keys
    );

    // Nothing left to do: a second sweep deletes nothing, in one round.
    let (code, out, _) = run_on(&json_sweep, &t);
    assert_eq!(code, 0);
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        again,
        serde_json::json!({"inbox_records": 0, "idempotency_keys": 0, "rounds": 1, "skipped": false})
    );
    let (code, out, err) = run_on(&sweep, &t);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "deleted 0 inbox records and 0 expired idempotency keys in 1 round"
    );
    assert!(err.trim().is_empty(), "no round lines when nothing was deleted: {err}");
    // The outbox retention of earlier versions is still accepted, and said to do nothing.
    let (code, _, err) = run_on(&["retention", "sweep", "--outbox-retention-hours", "24"], &t);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--outbox-retention-hours is ignored"), "{err}");
    s.stop().await;
}

#[test]
fn retention_sweep_checks_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (flag, value) in [
        ("--batch", "0"),
        ("--batch", "many"),
        ("--inbox-retention-hours", "0"),
        ("--inbox-retention-hours", "1.5"),
        ("--inbox-retention-hours", "100000"),
    ] {
        let (code, out, err) = seaport(&["retention", "sweep", flag, value, "--data-dir", d]);
        assert_eq!(code, 2, "{flag} {value}: {out}{err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag}")),
            "{flag} {value}: {err}"
        );
        assert!(out.is_empty(), "{out}");
    }
    let (code, out, err) = seaport(&["retention", "sweep", "--json", "--data-dir", d]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("no database at"), "{err}");
    assert!(!dir.path().join("seaport.db").exists());
}

on_both_backends!(
    outbox_status_and_trace_read_the_live_database,
    dead_letters_are_listed_shown_and_replayed,
    retention_sweep_deletes_only_what_is_old
);

#[tokio::test]
async fn demo_crm_serves_the_external_model_and_checks_its_flags() {
    let (code, _, err) = seaport(&["demo-crm", "--failure-rate", "1.5"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a rate between 0.0 and 1.0"), "{err}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_seaport"))
        .args(["demo-crm", "--listen", &format!("127.0.0.1:{port}")])
        .env("SEAPORT_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/customers/C-42");
    let mut answer = None;
    for _ in 0..200 {
        if let Ok(r) = http.get(&url).send().await {
            answer = Some(r.json::<serde_json::Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let answer = answer.expect("demo CRM answered");
    assert_eq!(answer["cust_id"], "C-42");
    assert_eq!(answer["full_name"], "Customer C-42");
    assert_eq!(answer["email_address"], "c.42@example.com");
}

#[test]
fn webhook_secrets_never_show_in_help_or_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_seaport"))
        .args(["serve", "--help"])
        .env("SEAPORT_STRIPE_WEBHOOK_SECRET", "whsec_topsecret_stripe")
        .env("SEAPORT_GITHUB_WEBHOOK_SECRET", "topsecret_github")
        .env("SEAPORT_WEBHOOK_SOURCES", "partner=whsec_topsecret_partner")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--stripe-webhook-secret") && help.contains("--webhook-source"),
        "{help}"
    );
    assert!(!help.contains("topsecret"), "{help}");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (entry, want) in [
        ("no-equals-sign-whsec_topsecret", "expected NAME=SECRET"),
        ("Bad Name=whsec_topsecret", "not a valid source name"),
        ("partner=whsec_!!!topsecret", "--webhook-source partner"),
    ] {
        let (code, _, err) = seaport(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            d,
            "--webhook-source",
            entry,
        ]);
        assert_eq!(code, 1, "{entry}: {err}");
        assert!(err.contains(want), "{entry}: {err}");
        assert!(!err.contains("topsecret"), "{entry}: the secret leaked: {err}");
    }
}

/// OTLP export is off by default and asked for with `--otlp-endpoint`: a build without the
/// `otlp` feature refuses the flag clearly (and only warns about the environment variable, which
/// may be meant for another program); a build with it refuses what is not an http(s) URL.
#[test]
fn otlp_endpoint_is_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = seaport(&["--otlp-endpoint", "collector:4318", "--data-dir", d, "outbox", "status"]);
    assert_eq!(code, 1, "{err}");
    if seaport_sea::logging::OTLP_BUILT_IN {
        assert!(err.contains("must be an http:// or https:// URL"), "{err}");
    } else {
        assert!(
            err.contains("built without it") && err.contains("--features otlp"),
            "{err}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_seaport"))
            .args(["--data-dir", d, "outbox", "status"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("warning: OTEL_EXPORTER_OTLP_ENDPOINT is set"), "{err}");
        assert!(!err.contains("built without it\n"), "{err}");
    }
}
