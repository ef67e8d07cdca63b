//! Secrets stay secret: the real `seaport` process, with webhook secrets in its environment and
//! debug logging, receives good and forged deliveries; its whole output never contains a secret.

use std::process::{Command, Stdio};
use std::time::Duration;

use seaport::webhooks::{github, standard, stripe};

const STRIPE: &str = "whsec_stripe_SECRET_never_logged";
const GITHUB: &str = "github_SECRET_never_logged";
const PARTNER: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_secrets_never_appear_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("out.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_seaport"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path().join("data"))
        .env("SEAPORT_LOG", "debug")
        .env("SEAPORT_STRIPE_WEBHOOK_SECRET", STRIPE)
        .env("SEAPORT_GITHUB_WEBHOOK_SECRET", GITHUB)
        .env("SEAPORT_WEBHOOK_SOURCES", format!("partner={PARTNER}"))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..400 {
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "seaport did not start");
    let now = chrono::Utc::now().timestamp();
    let body = br#"{"id":"evt_1","type":"invoice.paid","data":{"object":{"id":"in_1"}}}"#;
    let sends: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "/webhooks/stripe",
            vec![("stripe-signature", stripe::sign(STRIPE, now, body))],
        ),
        (
            "/webhooks/stripe",
            vec![("stripe-signature", stripe::sign("whsec_forged", now, body))],
        ),
        (
            "/webhooks/stripe",
            vec![("stripe-signature", stripe::sign(STRIPE, now - 3600, body))],
        ),
        (
            "/webhooks/github",
            vec![
                ("x-hub-signature-256", github::sign(GITHUB, body)),
                ("x-github-delivery", "d1".into()),
                ("x-github-event", "push".into()),
            ],
        ),
        (
            "/webhooks/github",
            vec![
                ("x-hub-signature-256", github::sign("forged", body)),
                ("x-github-delivery", "d2".into()),
            ],
        ),
    ];
    for (path, headers) in sends {
        let mut req = http.post(format!("{base}{path}")).body(body.to_vec());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let res = req.send().await.unwrap();
        assert!(res.status() == 200 || res.status() == 400, "{path}: {}", res.status());
    }
    let h = standard::sign_headers(PARTNER, "msg_1", now, body).unwrap();
    let res = http
        .post(format!("{base}/webhooks/partner"))
        .headers(h)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = child.kill();
    let _ = child.wait();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        output.contains("webhook rejected"),
        "the rejections were logged: {output}"
    );
    for secret in [
        STRIPE,
        GITHUB,
        PARTNER,
        "SECRET_never_logged",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        assert!(!output.contains(secret), "a secret appears in the output");
    }
}
