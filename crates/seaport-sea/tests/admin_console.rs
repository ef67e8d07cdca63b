//! The admin console end to end, in a real browser: headless Chromium driven over WebDriver by
//! `tests/interop/admin_console.py` (Selenium, from the interop Python of `scripts/test`, which
//! also installs Debian's `chromium` and `chromium-driver`). Missing pieces fail the test with a
//! message saying how to get them; it never skips.
//!
//! How the dead letter is made, the real way and so that a replay can succeed: a signed Stripe
//! `payment_intent.succeeded` webhook goes through `POST /webhooks/stripe` naming a case that does
//! not exist yet. The `sea_service__context` group fails it on each attempt ("names case …, which
//! does not exist", see `consumers::context`) and it ends in the dead letters. Then the case
//! turns up (the test inserts the row, as an import or a late replica would; the API cannot
//! open a case under an id of the caller's choosing), so the replay marks it paid and emits
//! `sea.cases.paid`. The case id carries markup (`<i id="xss">`), so the dead letter's error
//! is attacker-controlled text that the console must show as text.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{TestService, wait_for};
use seaport::testing::Kind;
use seaport::webhooks::stripe;
use seaport_sea::admin::AdminToken;
use seaport_sea::webhooks::Webhooks;
use serde_json::{Value, json};

const STRIPE: &str = "whsec_admin_console_test";
const TOKEN: &str = "admin-console-test-token-0123456789";
const CONTEXT: &str = "sea_service__context";

/// The interop Python, and the browser and driver the script uses: all must be there.
fn browser_tools() -> (String, PathBuf, PathBuf) {
    let python = std::env::var("SEAPORT_INTEROP_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SEAPORT_INTEROP_PYTHON is not set: run the suite with `bash scripts/test` (it installs selenium \
             into target/interop-py, and the Debian packages chromium and chromium-driver)"
        )
    });
    let find = |env: &str, names: &[&str]| -> PathBuf {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let candidates: Vec<PathBuf> = match std::env::var_os(env) {
            Some(p) => vec![PathBuf::from(p)],
            None => std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/bin")])
                .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
                .collect(),
        };
        candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
            panic!(
                "{} not found (PATH or ${env}): the admin console test needs headless Chromium and its \
                     WebDriver; `bash scripts/test` installs them, or `apt-get install chromium chromium-driver`",
                names.join(" / ")
            )
        })
    };
    (
        python,
        find("SEAPORT_CHROMIUM", &["chromium", "chromium-browser"]),
        find("SEAPORT_CHROMEDRIVER", &["chromedriver"]),
    )
}

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("test-artifacts")
}

async fn service(token: Option<&str>) -> TestService {
    let token = token.map(|t| AdminToken::configure(Some(t)).unwrap().unwrap());
    TestService::start_with(Kind::Embedded, move |c| {
        c.webhooks = Webhooks::configure(&[STRIPE.to_owned()], None, &[]).unwrap();
        c.max_attempts = 3;
        c.admin_token = token;
    })
    .await
}

/// The replay route as a script sees it (no `Accept: text/html`): problem+json.
async fn post_replay(s: &TestService, id: i64, form: &str) -> (u16, String, Value) {
    let res = s
        .http
        .post(s.url(&format!("/admin/dead-letters/{id}/replay")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    (status, ct, res.json().await.unwrap_or(Value::Null))
}

async fn replays(s: &TestService, id: i64) -> i64 {
    seaport::on_pool!(&s.db, p => sqlx::query_scalar::<_, i64>("SELECT replays FROM seaport_dead_letters WHERE id = $1")
        .bind(id).fetch_one(p).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_replayed_from_the_console_in_a_browser() {
    let (python, chromium, chromedriver) = browser_tools();
    let s = service(Some(TOKEN)).await;
    assert!(
        !format!("{:?}", s.config).contains(TOKEN),
        "the admin token shows in the config's Debug output"
    );

    // A payment webhook for a case that does not exist (yet).
    let case_id = format!("case-{}<i id=\"xss\">'&amp;</i>", uuid::Uuid::now_v7());
    let correlation_id = format!("admin-e2e-{}", uuid::Uuid::now_v7());
    let delivery = format!("evt_admin_{}", uuid::Uuid::now_v7().simple());
    let body = serde_json::to_vec(&json!({
        "id": delivery, "object": "event", "type": "payment_intent.succeeded",
        "data": {"object": {"id": "pi_admin_1", "object": "payment_intent", "metadata": {"case_id": case_id}}}
    }))
    .unwrap();
    let res = s
        .http
        .post(s.url("/webhooks/stripe"))
        .header(
            "stripe-signature",
            stripe::sign(STRIPE, chrono::Utc::now().timestamp(), &body),
        )
        .header("x-correlation-id", &correlation_id)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let event_id: String = seaport::on_pool!(&s.db, p => sqlx::query_scalar(
        "SELECT event_id FROM webhook_deliveries WHERE source = 'stripe' AND delivery_id = $1")
        .bind(&delivery).fetch_one(p).await.unwrap());
    wait_for("the dead letter", async || {
        s.count_for(
            "SELECT COUNT(*) FROM seaport_dead_letters WHERE consumer = 'sea_service__context' AND message_id = $1",
            &event_id,
        )
        .await
            == 1
    })
    .await;
    let dead_letter: i64 = seaport::on_pool!(&s.db, p => sqlx::query_scalar(
        "SELECT id FROM seaport_dead_letters WHERE consumer = $1 AND message_id = $2")
        .bind(CONTEXT).bind(&event_id).fetch_one(p).await.unwrap());

    // The page's security headers.
    let res = s.http.get(s.url("/admin")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"),
        "{h:?}"
    );
    assert_eq!(h["x-frame-options"], "DENY");
    let page = res.text().await.unwrap();
    assert!(!page.contains("<i id=\"xss\">"), "the dead letter's error is escaped");
    assert!(
        page.contains("&lt;i id=&quot;xss&quot;&gt;&#x27;&amp;amp;&lt;/i&gt;"),
        "{page}"
    );

    // Scripts get problem+json refusals; nothing is replayed.
    for form in [
        "",
        "token=",
        "token=wrong-token-wrong-token-wrong",
        &format!("token={TOKEN}x"),
    ] {
        let (status, ct, problem) = post_replay(&s, dead_letter, form).await;
        assert_eq!(
            (status, ct.as_str()),
            (403, "application/problem+json"),
            "{form}: {problem}"
        );
    }
    assert_eq!(replays(&s, dead_letter).await, 0, "a refused replay replayed");

    // The case turns up; the browser does the rest.
    seaport::on_pool!(&s.db, p => sqlx::query(
        "INSERT INTO cases (id, title, customer_id, status, correlation_id, created_at)
         VALUES ($1, 'paid before it was opened', 'C-1', 'open', $2, $3)")
        .bind(&case_id).bind(&correlation_id).bind(chrono::Utc::now().to_rfc3339())
        .execute(p).await.map(|_| ()).unwrap());
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let dir = std::fs::canonicalize(&dir).unwrap();
    let screenshot = dir.join("admin-console.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/admin_console.py");
    let args = [
        script.display().to_string(),
        s.base.clone(),
        TOKEN.to_owned(),
        dead_letter.to_string(),
        correlation_id.clone(),
        event_id.clone(),
        screenshot.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args(&args)
            .env("SEAPORT_CHROMIUM", chromium)
            .env("SEAPORT_CHROMEDRIVER", chromedriver)
            .env("SE_OFFLINE", "true")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success() && result["ok"] == true,
        "the browser script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!("admin console screenshot: {}", screenshot.display());
    println!("browser run: {result}");

    assert_eq!(result["state_before"], "dead", "{result}");
    assert_eq!(result["consumer"], CONTEXT, "{result}");
    assert_eq!(
        result["xss_elements"], 0,
        "markup in a dead letter became an element: {result}"
    );
    assert!(
        result["error_text"]
            .as_str()
            .unwrap()
            .contains(&format!("names case {case_id}, which does not exist")),
        "{result}"
    );
    assert_eq!(result["without_token"], 403, "{result}");
    assert_eq!(result["wrong_token"], 403, "{result}");
    assert!(
        result["without_token_text"].as_str().unwrap().contains("refused"),
        "{result}"
    );
    assert_eq!(result["replays_after_refusals"], 0, "{result}");
    assert_eq!(result["state_after_refusals"], "dead", "{result}");
    assert!(
        result["redirected_to"]
            .as_str()
            .unwrap()
            .contains(&format!("/admin?replayed={dead_letter}")),
        "{result}"
    );
    assert_eq!(result["state_after_replay"], "processed", "{result}");
    assert_eq!(result["replays_after_replay"], 1, "{result}");
    assert_eq!(result["trace_event_type"], "sea.webhooks.received", "{result}");
    assert!(
        result["trace_processed_by"]
            .as_array()
            .unwrap()
            .contains(&json!(CONTEXT)),
        "{result}"
    );
    assert_eq!(result["trace_children"], json!(["sea.cases.paid"]), "{result}");
    assert_eq!(result["trace_xss_elements"], 0, "{result}");
    assert!(screenshot.is_file(), "no screenshot at {}", screenshot.display());
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot"
    );

    // And in the database: one replay (the refused ones did nothing), processed once.
    assert_eq!(replays(&s, dead_letter).await, 1);
    assert_eq!(
        s.count_for(
            "SELECT COUNT(*) FROM seaport_inbox WHERE consumer = 'sea_service__context' AND message_id = $1",
            &event_id
        )
        .await,
        1
    );
    let effect: String = seaport::on_pool!(&s.db, p => sqlx::query_scalar(
        "SELECT effect FROM consumer_effects WHERE consumer = $1 AND event_id = $2")
        .bind(CONTEXT).bind(&event_id).fetch_one(p).await.unwrap());
    assert_eq!(
        effect,
        format!("marked case {case_id} paid (stripe payment_intent.succeeded)")
    );
    assert_eq!(
        s.count_for(
            "SELECT COUNT(*) FROM cases WHERE id = $1 AND paid_at IS NOT NULL",
            &case_id
        )
        .await,
        1
    );
    s.stop().await;
}

/// Without a configured token the console shows everything but changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_console_is_read_only() {
    let s = service(None).await;
    let page = s.http.get(s.url("/admin")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("id=\"read-only\""), "{page}");
    let (status, ct, problem) = post_replay(&s, 1, &format!("token={TOKEN}")).await;
    assert_eq!((status, ct.as_str()), (403, "application/problem+json"));
    assert!(problem["detail"].as_str().unwrap().contains("read-only"), "{problem}");
    // A browser gets a page saying so.
    let res = s
        .http
        .post(s.url("/admin/dead-letters/1/replay"))
        .header("accept", "text/html")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(res.headers()["x-frame-options"], "DENY");
    assert!(res.text().await.unwrap().contains("read-only"));
    // A correlation id that is not one is refused; an unknown one is a 404 page.
    let res = s
        .http
        .get(s.url("/admin/trace?correlation_id=%3Cscript%3E"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(!res.text().await.unwrap().contains("<script>"));
    let res = s.http.get(s.url("/admin/trace/nothing-here")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    s.stop().await;
}

/// The token is given like the webhook secrets: from the environment, and never shown.
#[test]
fn the_token_never_shows_in_the_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_seaport"))
        .args(["serve", "--help"])
        .env("SEAPORT_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--admin-token"), "{help}");
    assert!(!help.contains(TOKEN), "the token shows in --help");
    // A short token is refused, naming the flag but not the token.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_seaport"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SEAPORT_ADMIN_TOKEN", "tooshort")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--admin-token must be at least 16"), "{stderr}");
    assert!(!stderr.contains("tooshort"), "{stderr}");
}
