//! Hostile input against the live service: malformed JSON, oversized bodies, huge and numerous
//! headers, unicode and control characters in paths, headers and queries (also as raw bytes on
//! the wire), absurd paging values, forged webhook signatures, and a few hundred random requests.
//! Every answer is a 4xx (never a 5xx, never a dropped connection) with an
//! `application/problem+json` body, except that hyper may refuse oversized heads itself (414/431
//! or a closed connection); the service stays healthy and its tasks stop cleanly.
//!
//! The `regression_*` tests pin bugs this suite found (fixed).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::TestService;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRng, TestRunner};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use seaport::testing::Kind;
use seaport::webhooks::{github, standard, stripe};
use seaport_sea::webhooks::Webhooks;
use serde_json::{Value, json};

const STRIPE: &str = "whsec_hostile_stripe";
const GITHUB: &str = "hostile github secret";
const PARTNER: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

on_both_backends!(random_requests_never_5xx, regression_nul_in_text_is_not_5xx);

/// The service with every webhook receiver configured (`stripe`, `github`, source `partner`).
async fn service(kind: Kind) -> TestService {
    TestService::start_with(kind, |c| {
        c.webhooks = Webhooks::configure(&[STRIPE.to_owned()], Some(GITHUB), &[format!("partner={PARTNER}")]).unwrap();
    })
    .await
}

/// A client that opens a new connection per request: after a 413 or 431 the server closes the
/// connection, which a pooled client would otherwise try to reuse.
fn one_shot() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// One answer of the service, or how the connection ended without one.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    headers: HeaderMap,
}

async fn answer(res: reqwest::Result<reqwest::Response>) -> Result<Answer, String> {
    let res = res.map_err(|e| {
        // A request the client refused to build would make the test vacuous.
        assert!(!e.is_builder(), "the client cannot send this request: {e}");
        format!("no response: {e}")
    })?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let content_type = headers
        .get("content-type")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let body = res
        .bytes()
        .await
        .map_err(|e| format!("{status}, body cut: {e:?}"))?
        .to_vec();
    Ok(Answer {
        status,
        content_type,
        body,
        headers,
    })
}

/// Collects every deviation, so one run reports all of them.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// A 4xx problem+json whose body's `status` matches, or (if `hyper_may_refuse`) a 431/414
    /// from hyper or a closed connection.
    fn problem(&mut self, what: &str, got: &Result<Answer, String>, hyper_may_refuse: bool) {
        match got {
            Ok(a) if (400..500).contains(&a.status) => {
                if hyper_may_refuse && matches!(a.status, 414 | 431) && a.content_type.is_empty() {
                    return;
                }
                if known_plain_text(a) {
                    return;
                }
                if a.content_type != "application/problem+json" {
                    self.0.push(format!(
                        "{what}: {} with content-type {:?} instead of application/problem+json: {:?}",
                        a.status,
                        a.content_type,
                        String::from_utf8_lossy(&a.body[..a.body.len().min(200)])
                    ));
                    return;
                }
                match serde_json::from_slice::<Value>(&a.body) {
                    Ok(p) if p["status"] == a.status && p["title"].is_string() && p["type"].is_string() => {}
                    _ => self.0.push(format!(
                        "{what}: {} with a malformed problem body {:?}",
                        a.status,
                        String::from_utf8_lossy(&a.body[..a.body.len().min(200)])
                    )),
                }
            }
            Ok(a) => self.0.push(format!(
                "{what}: status {} (expected 4xx): {:?}",
                a.status,
                String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
            )),
            Err(_) if hyper_may_refuse => {}
            Err(e) => self.0.push(format!("{what}: {e}")),
        }
    }

    /// Any answer but a 5xx or a dropped connection (the request may be valid).
    fn not_5xx(&mut self, what: &str, got: &Result<Answer, String>) {
        match got {
            Ok(a) if a.status < 500 => {
                if a.status >= 400 {
                    self.problem(what, got, false);
                }
            }
            Ok(a) => self.0.push(format!(
                "{what}: status {}: {:?}",
                a.status,
                String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
            )),
            Err(e) => self.0.push(format!("{what}: {e}")),
        }
    }

    fn assert_none(self) {
        let lines: Vec<String> = self.0.iter().map(|l| l.chars().take(500).collect()).collect();
        assert!(
            lines.is_empty(),
            "{} hostile request(s) misanswered:\n{}",
            lines.len(),
            lines.join("\n")
        );
    }
}

/// Plain-text answers of axum's own extractors once tolerated here; fixed (the `regression_*`
/// tests below pin them), so nothing is tolerated any more.
fn known_plain_text(_: &Answer) -> bool {
    false
}

/// The service still answers, and its tasks stopped cleanly (a panicked task fails `stop`).
async fn still_healthy(s: TestService) {
    let res = one_shot().get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200, "the service is unhealthy after hostile input");
    s.stop().await;
}

fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Send raw bytes over a fresh connection (then end the request stream if `half_close`); the
/// status code of the answer, or `None` if the server closed the connection without one.
async fn raw(addr: std::net::SocketAddr, request: Vec<u8>, half_close: bool) -> Result<Option<u16>, String> {
    tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may answer and close before reading all of it.
        let _ = conn.write_all(&request);
        if half_close {
            let _ = conn.shutdown(std::net::Shutdown::Write);
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if got.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) if got.is_empty() => return Err(format!("no answer: {e}")),
                Err(_) => break,
            }
        }
        if got.is_empty() {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(&got[..got.len().min(100)]).into_owned();
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| line.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
        Ok(Some(status))
    })
    .await
    .unwrap()
}

fn headers_of(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    h
}

/// Bodies that are not acceptable JSON.
fn malformed_json() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("truncated", br#"{"title": "pump", "customer_id": "C-"#.to_vec()),
        ("truncated in an escape", br#"{"title": "\u00"#.to_vec()),
        (
            "invalid UTF-8",
            b"{\"title\": \"\xff\xfe\", \"customer_id\": \"C\"}".to_vec(),
        ),
        ("lone surrogate", br#"{"title": "\ud800", "customer_id": "C"}"#.to_vec()),
        ("100k [", vec![b'['; 100_000]),
        ("100k [ closed", [vec![b'['; 100_000], vec![b']'; 100_000]].concat()),
        ("100k nested objects", r#"{"a":"#.repeat(100_000).into_bytes()),
        (
            "deep in a field",
            format!(
                r#"{{"title": {}1{}, "customer_id": "C"}}"#,
                "[".repeat(50_000),
                "]".repeat(50_000)
            )
            .into_bytes(),
        ),
        ("NaN", br#"{"title": NaN, "customer_id": "C"}"#.to_vec()),
        (
            "Infinity",
            br#"{"title": "t", "customer_id": "C", "description": Infinity}"#.to_vec(),
        ),
        (
            "1e999",
            br#"{"title": "t", "customer_id": "C", "description": 1e999}"#.to_vec(),
        ),
        (
            "huge integer",
            format!(r#"{{"title": {}, "customer_id": "C"}}"#, "9".repeat(10_000)).into_bytes(),
        ),
        (
            "-0 and huge exponent",
            br#"{"title": -0e-99999999999999999999, "customer_id": 1}"#.to_vec(),
        ),
        ("null", b"null".to_vec()),
        ("array", b"[]".to_vec()),
        ("string", br#""title""#.to_vec()),
        ("number", b"18446744073709551616".to_vec()),
        ("trailing garbage", br#"{"title": "t", "customer_id": "C"} {}"#.to_vec()),
        (
            "duplicate keys",
            br#"{"title": "a", "title": "b", "customer_id": "C"}"#.to_vec(),
        ),
        (
            "unknown field",
            br#"{"title": "a", "customer_id": "C", "admin": true}"#.to_vec(),
        ),
        ("wrong types", br#"{"title": ["a"], "customer_id": {"id": 1}}"#.to_vec()),
        (
            "NUL bytes raw",
            b"{\"title\": \"a\0b\", \"customer_id\": \"C\"}".to_vec(),
        ),
        (
            "control in customer_id",
            br#"{"title": "a", "customer_id": "C\u0007"}"#.to_vec(),
        ),
        (
            "BOM",
            b"\xef\xbb\xbf{\"title\": \"a\", \"customer_id\": \"C\"}".to_vec(),
        ),
        (
            "UTF-16",
            "{\"title\": \"a\"}".encode_utf16().flat_map(u16::to_le_bytes).collect(),
        ),
        (
            "title too long",
            json!({"title": "ä".repeat(201), "customer_id": "C"})
                .to_string()
                .into_bytes(),
        ),
        (
            "blank title",
            json!({"title": " \t\n ", "customer_id": "C"}).to_string().into_bytes(),
        ),
        (
            "description too long",
            json!({"title": "t", "customer_id": "C", "description": "💩".repeat(10_001)})
                .to_string()
                .into_bytes(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_bodies_are_4xx() {
    let s = service(Kind::Embedded).await;
    let mut f = Findings::default();
    for (what, body) in malformed_json() {
        let got = answer(
            s.http
                .post(s.url("/cases"))
                .header("Idempotency-Key", key())
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await,
        )
        .await;
        f.problem(&format!("POST /cases {what}"), &got, false);

        // Forged signatures are refused before the body is read; correctly signed malformed
        // bodies must be refused after.
        let t = now();
        for (path, forged, signed) in [
            (
                "/webhooks/stripe",
                headers_of(&[("stripe-signature", &format!("t={t},v1={}", "0".repeat(64)))]),
                headers_of(&[("stripe-signature", &stripe::sign(STRIPE, t, &body))]),
            ),
            (
                "/webhooks/github",
                headers_of(&[
                    ("x-hub-signature-256", "sha256=00"),
                    ("x-github-delivery", "d-1"),
                    ("x-github-event", "push"),
                ]),
                headers_of(&[
                    ("x-hub-signature-256", &github::sign(GITHUB, &body)),
                    ("x-github-delivery", &key()),
                    ("x-github-event", "push"),
                ]),
            ),
            (
                "/webhooks/partner",
                headers_of(&[
                    ("webhook-id", "m"),
                    ("webhook-timestamp", &t.to_string()),
                    ("webhook-signature", "v1,AAAA"),
                ]),
                standard::sign_headers(PARTNER, &key(), t, &body).unwrap(),
            ),
        ] {
            for (kind, headers) in [("forged", forged), ("signed", signed)] {
                let got = answer(
                    s.http
                        .post(s.url(path))
                        .headers(headers)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await,
                )
                .await;
                // A signed, well-formed object that GitHub or Standard Webhooks sends is valid.
                let valid_object = serde_json::from_slice::<Value>(&body).is_ok_and(|v| v.is_object());
                if kind == "signed" && valid_object && path != "/webhooks/stripe" {
                    f.not_5xx(&format!("POST {path} {kind} {what}"), &got);
                } else {
                    f.problem(&format!("POST {path} {kind} {what}"), &got, false);
                }
            }
        }
    }
    for ct in [
        "text/plain",
        "application/xml",
        "application/jsonx",
        "multipart/form-data; boundary=x",
        "",
    ] {
        let got = answer(
            s.http
                .post(s.url("/cases"))
                .header("Idempotency-Key", key())
                .header("content-type", ct)
                .body(r#"{"title": "t", "customer_id": "C"}"#)
                .send()
                .await,
        )
        .await;
        f.problem(&format!("POST /cases content-type {ct:?}"), &got, false);
    }
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413() {
    let s = service(Kind::Embedded).await;
    let client = one_shot();
    let mut f = Findings::default();
    let big = vec![b' '; 3 << 20];
    let cases: Vec<(&str, HeaderMap, u16)> = vec![
        ("/cases", headers_of(&[("idempotency-key", "big-1")]), 413),
        (
            "/webhooks/stripe",
            headers_of(&[("stripe-signature", "t=1,v1=00")]),
            413,
        ),
        (
            "/webhooks/github",
            headers_of(&[("x-hub-signature-256", "sha256=00")]),
            413,
        ),
        ("/webhooks/partner", HeaderMap::new(), 413),
    ];
    for (path, headers, expected) in cases {
        let got = answer(
            client
                .post(s.url(path))
                .headers(headers)
                .header("content-type", "application/json")
                .body(big.clone())
                .send()
                .await,
        )
        .await;
        f.problem(&format!("POST {path} with 3 MiB"), &got, false);
        if let Ok(a) = &got {
            if a.status != expected {
                f.0.push(format!("POST {path} with 3 MiB: {} instead of {expected}", a.status));
            }
        }
    }
    // Without a key the request is refused (400) before its body is read; hyper then closes the
    // connection with the body unread, which may reset it before the client reads the answer.
    let got = answer(client.post(s.url("/cases")).body(big.clone()).send().await).await;
    f.problem("POST /cases with 3 MiB and no key", &got, true);
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_numerous_headers_are_refused() {
    let s = service(Kind::Embedded).await;
    let client = one_shot();
    let mut f = Findings::default();
    let kib100 = "a".repeat(100 << 10);

    // Within hyper's limits: the service ignores (correlation) or refuses (keys) the value.
    let got = answer(
        client
            .get(s.url("/cases/not-a-uuid"))
            .header("x-correlation-id", &kib100)
            .header("x-request-id", &kib100)
            .header("traceparent", &kib100)
            .send()
            .await,
    )
    .await;
    f.problem("100 KiB correlation headers", &got, false);
    if let Ok(a) = &got {
        let echoed = a.headers.get("x-correlation-id").map(|v| v.len()).unwrap_or(0);
        if echoed > 128 {
            f.0.push(format!("a 100 KiB X-Correlation-Id was echoed ({echoed} bytes)"));
        }
    }
    for (path, name) in [
        ("/cases", "idempotency-key"),
        ("/cases", "x-idempotency-key"),
        ("/webhooks/stripe", "stripe-signature"),
        ("/webhooks/github", "x-hub-signature-256"),
        ("/webhooks/partner", "webhook-signature"),
        ("/webhooks/partner", "webhook-timestamp"),
        ("/webhooks/partner", "webhook-id"),
    ] {
        let got = answer(
            client
                .post(s.url(path))
                .header(name, &kib100)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await,
        )
        .await;
        f.problem(&format!("POST {path} with a 100 KiB {name}"), &got, false);
    }

    // Beyond them: hyper answers 431 or closes the connection.
    let mib = "b".repeat(1 << 20);
    let got = answer(
        client
            .get(s.url("/cases/x"))
            .header("x-correlation-id", &mib)
            .send()
            .await,
    )
    .await;
    f.problem("1 MiB header", &got, true);
    let mut many = HeaderMap::new();
    for i in 0..1000 {
        many.insert(
            HeaderName::from_bytes(format!("x-hostile-{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    let got = answer(client.get(s.url("/cases/x")).headers(many.clone()).send().await).await;
    f.problem("1000 headers", &got, true);
    let got = answer(
        client
            .post(s.url("/webhooks/stripe"))
            .headers(many)
            .body("{}")
            .send()
            .await,
    )
    .await;
    f.problem("1000 headers on a webhook", &got, true);
    let mut repeated = HeaderMap::new();
    for _ in 0..90 {
        repeated.append("idempotency-key", HeaderValue::from_static("k"));
    }
    let got = answer(client.post(s.url("/cases")).headers(repeated).body("{}").send().await).await;
    f.problem("90 Idempotency-Key headers", &got, true);
    // Targets longer than a client will build (64 KiB): on the wire.
    let addr = s.running.as_ref().unwrap().addr;
    for (what, target) in [
        ("60 KiB path", format!("/trace/{}", "c".repeat(60 << 10))),
        ("1 MiB path", format!("/trace/{}", "c".repeat(1 << 20))),
        ("800 KiB query", format!("/cases?page=1&{}", "x=1&".repeat(200_000))),
        ("300 KiB cursor", format!("/cases?cursor={}", "A".repeat(300 << 10))),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
        match raw(addr, request, false).await {
            Ok(None) => {}
            Ok(Some(status)) if (400..500).contains(&status) => {}
            other => f.0.push(format!("{what}: {other:?}")),
        }
    }
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_and_control_characters_are_4xx() {
    let s = service(Kind::Embedded).await;
    let mut f = Findings::default();
    let long = "x".repeat(10_000);
    let paths = [
        "/cases/%00".to_owned(),
        "/cases/%F0%9F%92%A9".to_owned(),
        "/cases/💩".to_owned(),
        "/cases/%FF%FE".to_owned(),
        "/cases/%C0%AF".to_owned(),
        "/cases/%ED%A0%80".to_owned(),
        "/cases/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/cases/%2e%2e".to_owned(),
        "/cases/%".to_owned(),
        "/cases/%ZZ".to_owned(),
        "/cases/0190b7a2-0000-7000-8000-00000000000%00".to_owned(),
        "/cases/0190B7A2-0000-7000-8000-000000000000".to_owned(),
        "/cases/%20".to_owned(),
        "/cases/a%0D%0Ab".to_owned(),
        format!("/cases/{long}"),
        "/trace/%00".to_owned(),
        "/trace/%FF".to_owned(),
        "/trace/💩".to_owned(),
        "/trace/a%20b".to_owned(),
        "/trace/a%0Ab".to_owned(),
        "/trace/%3Cscript%3E".to_owned(),
        format!("/trace/{long}"),
        format!("/trace/{}", "y".repeat(129)),
        "/%00".to_owned(),
        "/💩".to_owned(),
        "/cases/a/b".to_owned(),
        "/webhooks".to_owned(),
        format!("/{long}"),
    ];
    for path in &paths {
        let got = answer(s.http.get(s.url(path)).send().await).await;
        f.problem(&format!("GET {path:.80}"), &got, false);
    }
    // Webhook routes: unknown sources are 404, undecodable ones 400.
    for path in [
        "/webhooks/%00",
        "/webhooks/%FF",
        "/webhooks/💩",
        "/webhooks/Partner",
        "/webhooks/partner%00",
        "/webhooks/stripe%20",
        "/webhooks/..%2Fstripe",
    ] {
        let got = answer(s.http.post(s.url(path)).body("{}").send().await).await;
        f.problem(&format!("POST {path}"), &got, false);
    }
    // Header values with non-ASCII (obs-text) bytes: ignored or refused, never echoed raw.
    let odd: [&[u8]; 5] = [b"caf\xc3\xa9", b"\xff\xfe", b"\xf0\x9f\x92\xa9", b"a\tb", b"\x80"];
    for value in odd {
        let v = HeaderValue::from_bytes(value).unwrap();
        for name in [
            "x-correlation-id",
            "x-request-id",
            "x-causation-id",
            "traceparent",
            "x-client-id",
        ] {
            let got = answer(s.http.get(s.url("/cases/nope")).header(name, v.clone()).send().await).await;
            f.problem(&format!("{name}: {value:?}"), &got, false);
            if let Ok(a) = &got
                && a.headers.get(name).is_some_and(|h| h.as_bytes() == value)
            {
                f.0.push(format!("{name}: {value:?} was echoed"));
            }
        }
        for name in ["idempotency-key", "x-idempotency-key", "content-type"] {
            let got = answer(
                s.http
                    .post(s.url("/cases"))
                    .header(name, v.clone())
                    .body(r#"{"title": 1}"#)
                    .send()
                    .await,
            )
            .await;
            f.problem(&format!("POST /cases {name}: {value:?}"), &got, false);
        }
        for (path, name) in [
            ("/webhooks/stripe", "stripe-signature"),
            ("/webhooks/github", "x-hub-signature-256"),
            ("/webhooks/github", "x-github-delivery"),
            ("/webhooks/partner", "webhook-id"),
            ("/webhooks/partner", "webhook-timestamp"),
            ("/webhooks/partner", "webhook-signature"),
            ("/webhooks/partner", "svix-signature"),
        ] {
            let got = answer(s.http.post(s.url(path)).header(name, v.clone()).body("{}").send().await).await;
            f.problem(&format!("POST {path} {name}: {value:?}"), &got, false);
        }
    }

    // What reqwest will not send: raw bytes on the wire. hyper refuses them (400) or closes.
    let addr = s.running.as_ref().unwrap().addr;
    let host = format!("Host: {addr}\r\n");
    let raw_requests: Vec<(&str, Vec<u8>)> = vec![
        ("NUL in the path", format!("GET /cases/\0 HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("raw UTF-8 in the path", format!("GET /cases/💩 HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("raw 0xFF in the path", [b"GET /cases/\xff HTTP/1.1\r\n".as_ref(), host.as_bytes(), b"\r\n"].concat()),
        ("space in the path", format!("GET /cases/a b HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("control in a header", format!("GET /healthz HTTP/1.1\r\n{host}X-Correlation-Id: a\x01b\r\n\r\n").into_bytes()),
        ("NUL in a header", format!("GET /healthz HTTP/1.1\r\n{host}X-Correlation-Id: a\0b\r\n\r\n").into_bytes()),
        ("header without colon", format!("GET /healthz HTTP/1.1\r\n{host}Broken\r\n\r\n").into_bytes()),
        ("obs-fold", format!("GET /healthz HTTP/1.1\r\n{host}X-A: a\r\n b\r\n\r\n").into_bytes()),
        ("bare LF", format!("GET /cases/x HTTP/1.1\n{host}\n").into_bytes()),
        ("bad method", format!("G\x7fT /healthz HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("bad version", format!("GET /healthz HTTP/9.9\r\n{host}\r\n").into_bytes()),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
        (
            "negative content-length",
            format!("POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-1\r\nContent-Length: -1\r\n\r\n{{}}").into_bytes(),
        ),
        (
            "two content-lengths",
            format!("POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-2\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{{}}")
                .into_bytes(),
        ),
        (
            "content-length overflow",
            format!(
                "POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-3\r\nContent-Length: 18446744073709551616\r\n\r\n{{}}"
            )
            .into_bytes(),
        ),
        (
            "content-length and chunked",
            format!(
                "POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-4\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{{}}"
            )
            .into_bytes(),
        ),
        (
            "bad chunk size",
            format!("POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-5\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n")
                .into_bytes(),
        ),
        (
            "huge chunk size",
            format!(
                "POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-6\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n{{}}\r\n"
            )
            .into_bytes(),
        ),
        (
            "body shorter than content-length",
            format!("POST /cases HTTP/1.1\r\n{host}Idempotency-Key: raw-7\r\nContent-Length: 100000\r\n\r\n{{}}").into_bytes(),
        ),
        (
            "webhook body shorter than content-length",
            format!("POST /webhooks/stripe HTTP/1.1\r\n{host}Stripe-Signature: t=1,v1=00\r\nContent-Length: 100000\r\n\r\n{{}}")
                .into_bytes(),
        ),
    ];
    for (what, request) in raw_requests {
        let half_close = what.contains("shorter");
        match raw(addr, request, half_close).await {
            Ok(None) => {}
            Ok(Some(status)) if (400..500).contains(&status) => {}
            Ok(Some(status)) => f.0.push(format!("raw {what}: status {status}")),
            Err(e) => f.0.push(format!("raw {what}: {e}")),
        }
    }
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paging_parameters_are_400() {
    let s = service(Kind::Embedded).await;
    let mut f = Findings::default();
    for q in [
        "page=-1",
        "page=0",
        "page=-0",
        "page=18446744073709551616",
        "page=9223372036854775808",
        "page=-9223372036854775809",
        "page=1000000001",
        "page=170141183460469231731687303715884105728",
        "limit=99999999999999999999",
        "limit=-1",
        "limit=0",
        "limit=101",
        "limit=1e2",
        "limit=0x10",
        "limit=1.0",
        "limit=",
        "limit",
        "page=%00",
        "page=%FF",
        "page=%EF%BC%91",
        "page=١",
        "page=1%00",
        "page=NaN",
        "page=1&page=2",
        "page=1&page=1",
        "limit=1&limit=1",
        "cursor=",
        "cursor=garbage",
        "cursor=%00",
        "cursor=%FF%FE",
        "cursor=AQAAAAAAAAAqAAAAAAAAAAAAAAAAAAAAAA",
        "cursor=AQAAAAAAAAAq",
        "cursor=💩",
        "cursor=&cursor=",
        "cursor=&page=1",
        "cursor=&limit=0",
        "cursor=&limit=99999999999999999999",
    ] {
        let expect_ok = q == "page=1&page=1" || q == "limit=1&limit=1" || q == "cursor=";
        let got = answer(s.http.get(s.url(&format!("/cases?{q}"))).send().await).await;
        if expect_ok {
            f.not_5xx(&format!("GET /cases?{q}"), &got);
        } else {
            f.problem(&format!("GET /cases?{q}"), &got, false);
        }
    }
    let long_cursor = format!("cursor={}", "A".repeat(60_000));
    let got = answer(s.http.get(s.url(&format!("/cases?{long_cursor}"))).send().await).await;
    f.problem("GET /cases with a 60k cursor", &got, false);
    // The valid extremes answer 200.
    for q in [
        "page=1000000000&limit=100",
        "page=+1",
        "limit=%201%20",
        "cursor=&limit=100",
        "x=%FF&page=1",
    ] {
        let got = answer(s.http.get(s.url(&format!("/cases?{q}"))).send().await).await;
        match &got {
            Ok(a) if a.status == 200 => {}
            other => f.0.push(format!("GET /cases?{q}: expected 200, got {other:?}")),
        }
    }
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_with_garbage_signatures_are_400() {
    let s = service(Kind::Embedded).await;
    let mut f = Findings::default();
    let body = br#"{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1"}}}"#;
    let t = now();
    let stripe_garbage = [
        "".to_owned(),
        ",".to_owned(),
        "t=".to_owned(),
        "t=,v1=".to_owned(),
        format!("t={t}"),
        format!("t={t},v1="),
        format!("t={t},v1=zz"),
        format!("t={t},v1={}", "0".repeat(64)),
        format!("t={t},t={t},v1={}", "0".repeat(64)),
        format!("t={},v1=00", i64::MAX),
        format!("t={},v1=00", i64::MIN),
        "t=9223372036854775808,v1=00".to_owned(),
        "t=-9223372036854775809,v1=00".to_owned(),
        format!(
            "t={t},v0={}",
            stripe::sign(STRIPE, t, body).split_once("v1=").unwrap().1
        ),
        stripe::sign("whsec_other", t, body),
        stripe::sign(STRIPE, t - 301, body),
        // Well past the tolerance: the server's clock may have moved on since `t` was read.
        stripe::sign(STRIPE, t + 360, body),
        stripe::sign(STRIPE, i64::MAX, body),
        stripe::sign(STRIPE, i64::MIN, body),
        format!("{},v1={}", stripe::sign(STRIPE, t, b"other"), "f".repeat(64)),
        "v1=ab,t=1".to_owned(),
        "t = 1 , v1 = 00".to_owned(),
        "ünïcödé".to_owned(),
    ];
    for sig in &stripe_garbage {
        let got = answer(
            s.http
                .post(s.url("/webhooks/stripe"))
                .header("stripe-signature", HeaderValue::from_bytes(sig.as_bytes()).unwrap())
                .body(body.to_vec())
                .send()
                .await,
        )
        .await;
        f.problem(&format!("stripe {sig:?}"), &got, false);
    }
    let github_garbage: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("x-hub-signature-256", "sha256=".into())],
        vec![
            ("x-hub-signature-256", "sha1=00".into()),
            ("x-github-delivery", "d".into()),
        ],
        vec![
            ("x-hub-signature-256", "sha256=zz".into()),
            ("x-github-delivery", "d".into()),
        ],
        vec![
            ("x-hub-signature-256", github::sign("other", body)),
            ("x-github-delivery", "d".into()),
        ],
        vec![
            ("x-hub-signature-256", github::sign(GITHUB, b"other")),
            ("x-github-delivery", "d".into()),
        ],
        vec![("x-hub-signature-256", github::sign(GITHUB, body))],
        vec![
            ("x-hub-signature-256", github::sign(GITHUB, body)),
            ("x-github-delivery", " ".into()),
        ],
        vec![
            ("x-hub-signature-256", github::sign(GITHUB, body)),
            ("x-github-delivery", "d-ok".into()),
            ("x-github-event", "".into()),
        ],
        vec![
            ("x-hub-signature-256", github::sign(GITHUB, body)),
            ("x-github-delivery", "d-ok".into()),
            ("x-github-event", "e".repeat(101)),
        ],
    ];
    for headers in &github_garbage {
        let mut h = HeaderMap::new();
        for (name, value) in headers {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let got = answer(
            s.http
                .post(s.url("/webhooks/github"))
                .headers(h)
                .body(body.to_vec())
                .send()
                .await,
        )
        .await;
        f.problem(&format!("github {headers:?}"), &got, false);
    }
    let good = standard::sign(PARTNER, "msg_1", t, body).unwrap();
    let (ts, ts_before) = (t.to_string(), (t - 1).to_string());
    let other_version = good.replace("v1,", "v1a,");
    let standard_garbage: Vec<[&str; 3]> = vec![
        ["", "", ""],
        ["msg_1", "", &good],
        ["msg_1", "abc", &good],
        ["msg_1", "9223372036854775808", &good],
        ["msg_1", "-9223372036854775808", &good],
        ["msg_1", "9223372036854775807", &good],
        ["msg_1", "1e9", &good],
        ["msg_2", &ts, &good],
        ["", &ts, &good],
        ["msg_1", &ts_before, &good],
        ["msg_1", &ts, "v1,"],
        ["msg_1", &ts, "v1,!!!!"],
        ["msg_1", &ts, "v1a,AAAA v2,AAAA"],
        ["msg_1", &ts, "     "],
        ["msg_1", &ts, &other_version],
    ];
    let ts_old = (t - 301).to_string();
    let stale = standard::sign(PARTNER, "msg_1", t - 301, body).unwrap();
    let mut all = standard_garbage;
    all.push(["msg_1", &ts_old, &stale]);
    for [id, ts, sig] in &all {
        for prefix in ["webhook", "svix"] {
            let mut h = HeaderMap::new();
            for (name, value) in [("id", id), ("timestamp", ts), ("signature", sig)] {
                if !value.is_empty() {
                    h.insert(
                        HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes()).unwrap(),
                        HeaderValue::from_str(value).unwrap(),
                    );
                }
            }
            let got = answer(
                s.http
                    .post(s.url("/webhooks/partner"))
                    .headers(h)
                    .body(body.to_vec())
                    .send()
                    .await,
            )
            .await;
            f.problem(&format!("partner {prefix} {id:?} {ts:?} {sig:.40?}"), &got, false);
        }
    }
    // Unknown sources are 404 whatever they carry; other methods 405.
    for path in [
        "/webhooks/nobody",
        "/webhooks/a-b_c",
        "/webhooks/STRIPE",
        &format!("/webhooks/{}", "n".repeat(300)),
    ] {
        let got = answer(
            s.http
                .post(s.url(path))
                .header("webhook-signature", good.as_str())
                .body(body.to_vec())
                .send()
                .await,
        )
        .await;
        f.problem(&format!("POST {path:.60}"), &got, false);
        if got.as_ref().is_ok_and(|a| a.status != 404) {
            f.0.push(format!(
                "POST {path:.60}: expected 404, got {:?}",
                got.map(|a| a.status)
            ));
        }
    }
    for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
        for path in ["/webhooks/stripe", "/webhooks/github", "/webhooks/partner"] {
            let got = answer(s.http.request(method.clone(), s.url(path)).send().await).await;
            f.problem(&format!("{method} {path}"), &got, false);
        }
    }
    // Nothing of the above was stored.
    assert_eq!(s.count("SELECT COUNT(*) FROM webhook_deliveries").await, 0);
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

/// Without secrets every receiver is 404, whatever is sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfigured_webhooks_are_404() {
    let s = TestService::start().await;
    let mut f = Findings::default();
    for path in [
        "/webhooks/stripe",
        "/webhooks/github",
        "/webhooks/partner",
        "/webhooks/x",
    ] {
        for (name, value) in [
            ("stripe-signature", "t=1,v1=00"),
            ("x-hub-signature-256", "sha256=00"),
            ("webhook-signature", "v1,AAAA"),
            ("x-nothing", "1"),
        ] {
            let got = answer(
                s.http
                    .post(s.url(path))
                    .header(name, value)
                    .body(r#"{"id":"evt_1"}"#)
                    .send()
                    .await,
            )
            .await;
            f.problem(&format!("unconfigured POST {path} {name}"), &got, false);
            if got.as_ref().is_ok_and(|a| a.status != 404) {
                f.0.push(format!(
                    "unconfigured POST {path}: expected 404, got {:?}",
                    got.map(|a| a.status)
                ));
            }
        }
    }
    still_healthy(s).await;
    f.assert_none();
}

// ---------------------------------------------------------------------------------------------
// Random requests
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct RandomRequest {
    method: Method,
    path: String,
    query: Option<String>,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

/// Percent-encode everything but unreserved characters, so any string can be a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| encode(&s)),
        "[a-z0-9_-]{0,20}",
        "%[0-9A-F]{2}(%[0-9A-F]{2}){0,4}",
        Just(uuid::Uuid::now_v7().to_string()),
        Just("stripe".to_owned()),
        Just("partner".to_owned()),
        (0usize..2000).prop_map(|n| "z".repeat(n)),
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "-1",
            "0",
            "1",
            "100",
            "101",
            "18446744073709551616",
            "99999999999999999999",
            "-9223372036854775809",
            "1e3",
            "NaN",
            "",
            "AQAAAAAAAAAq",
        ])
        .prop_map(str::to_owned),
        any::<String>().prop_map(|s| encode(&s)),
        "[a-zA-Z0-9%+=&-]{0,30}",
    ]
}

fn json_ish() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        any::<String>().prop_map(Value::from),
    ];
    let tree = leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec!["title", "customer_id", "description", "id", "type", "data"])
                        .prop_map(str::to_owned),
                    any::<String>(),
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        4 => tree.clone().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        2 => ("\\PC{1,30}", "\\PC{1,30}", prop::option::of("\\PC{0,50}")).prop_map(|(t, c, d)| {
            serde_json::to_vec(&json!({"title": t, "customer_id": c, "description": d})).unwrap()
        }),
        1 => (tree, any::<prop::sample::Index>()).prop_map(|(v, i)| {
            let b = serde_json::to_vec(&v).unwrap();
            b[..i.index(b.len() + 1)].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => (1usize..20_000).prop_map(|n| "[".repeat(n).into_bytes()),
    ]
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,60}".prop_map(String::into_bytes),
        any::<String>().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..60),
        Just(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec()),
        Just(b"application/json".to_vec()),
        any::<i64>().prop_map(|t| format!("t={t},v1={}", "ab".repeat(32)).into_bytes()),
    ]
    .prop_map(|b| {
        b.into_iter()
            .filter(|&c| c == b'\t' || (c >= 0x20 && c != 0x7f))
            .collect::<Vec<u8>>()
    })
}

fn random_request() -> impl Strategy<Value = RandomRequest> {
    let method = prop::sample::select(vec![
        Method::GET,
        Method::GET,
        Method::POST,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ]);
    let path = prop_oneof![
        Just("/cases".to_owned()),
        segment().prop_map(|s| format!("/cases/{s}")),
        segment().prop_map(|s| format!("/trace/{s}")),
        segment().prop_map(|s| format!("/webhooks/{s}")),
        prop::sample::select(vec![
            "/webhooks/stripe",
            "/webhooks/github",
            "/webhooks/partner",
            "/healthz"
        ])
        .prop_map(str::to_owned),
        (segment(), segment()).prop_map(|(a, b)| format!("/{a}/{b}")),
        segment().prop_map(|s| format!("/{s}")),
    ];
    let query = prop::option::of(
        prop::collection::vec(
            (
                prop_oneof![
                    prop::sample::select(vec!["page", "limit", "cursor"]).prop_map(str::to_owned),
                    value()
                ],
                value(),
            ),
            0..5,
        )
        .prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }),
    );
    let headers = prop::collection::vec(
        (
            prop::sample::select(vec![
                "idempotency-key",
                "x-idempotency-key",
                "x-correlation-id",
                "x-request-id",
                "x-causation-id",
                "traceparent",
                "x-client-id",
                "content-type",
                "stripe-signature",
                "x-hub-signature-256",
                "x-github-delivery",
                "x-github-event",
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
            ]),
            header_bytes(),
        ),
        0..5,
    );
    (method, path, query, headers, prop::option::of(json_ish())).prop_map(|(method, path, query, headers, body)| {
        RandomRequest {
            method,
            path,
            query,
            headers,
            body,
        }
    })
}

/// A few hundred random requests (seeded, so a failure reproduces): never a 5xx, never a
/// dropped connection, every 4xx a problem.
async fn random_requests_never_5xx(kind: Kind) {
    let s = service(kind).await;
    let client = one_shot();
    let mut f = Findings::default();
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let seed = *b"seaport hostile http requests 01";
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let strategy = random_request();
    for i in 0..400 {
        let r = strategy.new_tree(&mut runner).unwrap().current();
        let mut url = s.url(&r.path);
        if let Some(q) = &r.query {
            url = format!("{url}?{q}");
        }
        let mut req = client.request(r.method.clone(), &url);
        for (name, value) in &r.headers {
            req = req.header(*name, HeaderValue::from_bytes(value).unwrap());
        }
        if let Some(body) = &r.body {
            req = req.body(body.clone());
        }
        let got = answer(req.send().await).await;
        let what: String = format!("request {i}: {r:?}").chars().take(600).collect();
        match &got {
            // A HEAD answer has no body to be a problem.
            Ok(a) if r.method == Method::HEAD && a.status < 500 => {}
            _ => f.not_5xx(&what, &got),
        }
    }
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

// ---------------------------------------------------------------------------------------------
// Regressions: these FAIL until the service is fixed (see the report of "Prove the guarantees")
// ---------------------------------------------------------------------------------------------

async fn expect_problem(what: &str, got: Result<Answer, String>, status: u16) {
    let a = got.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (a.status, a.content_type.as_str()),
        (status, "application/problem+json"),
        "{what}: {:?}",
        String::from_utf8_lossy(&a.body)
    );
}

/// FAILS (bug): a webhook body over 2 MiB is refused by axum's `Bytes` extractor before the
/// handler runs, as `413 text/plain` ("Failed to buffer the request body: length limit
/// exceeded"), not the `application/problem+json` that the OpenAPI document promises for 413
/// (`POST /cases` gets it right: its idempotency layer reads the body itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_webhook_413_is_problem_json() {
    let s = service(Kind::Embedded).await;
    for path in ["/webhooks/stripe", "/webhooks/github", "/webhooks/partner"] {
        let got = answer(one_shot().post(s.url(path)).body(vec![b' '; 3 << 20]).send().await).await;
        expect_problem(&format!("POST {path} with 3 MiB"), got, 413).await;
    }
    still_healthy(s).await;
}

/// FAILS (bug): `POST /webhooks/%FF` (a `{source}` that is not UTF-8) is refused by axum's
/// `Path<String>` extractor as `400 text/plain` ("Invalid URL: Invalid UTF-8 in `source`"), not
/// problem+json (`/cases/%FF` and `/trace/%FF` take `Result<Path<_>, _>` and get it right).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_webhook_source_path_rejection_is_problem_json() {
    let s = service(Kind::Embedded).await;
    for path in ["/webhooks/%FF", "/webhooks/%C3%28", "/webhooks/a%ED%A0%80"] {
        let got = answer(s.http.post(s.url(path)).body("{}").send().await).await;
        expect_problem(&format!("POST {path}"), got, 400).await;
    }
    still_healthy(s).await;
}

/// FAILS on PostgreSQL (bug): U+0000 is valid JSON (`"\u0000"`) and passes validation, but
/// PostgreSQL `text` cannot hold it ("invalid byte sequence for encoding \"UTF8\": 0x00"), so
/// `POST /cases` with a NUL in `title` or `description` is a 500 (SQLite stores it: 201). The same
/// for a correctly signed Stripe event whose `id` or `data.object.id` holds a NUL (stored as
/// delivery id / event subject). Other control characters are fine on both backends.
async fn regression_nul_in_text_is_not_5xx(kind: Kind) {
    let s = service(kind).await;
    let mut f = Findings::default();
    for body in [
        json!({"title": "a\u{0}b", "customer_id": "C"}),
        json!({"title": "t", "customer_id": "C", "description": "d\u{0}"}),
        json!({"title": "\u{1}\u{1f}\u{7f}\u{85}\u{2028}\u{feff}", "customer_id": "C", "description": "\u{1b}[31m"}),
    ] {
        let got = answer(
            s.http
                .post(s.url("/cases"))
                .header("Idempotency-Key", key())
                .json(&body)
                .send()
                .await,
        )
        .await;
        f.not_5xx(&format!("POST /cases {body}"), &got);
    }
    let t = now();
    for body in [
        json!({"id": "evt_\u{0}", "type": "x", "data": {"object": {"id": "pi_1"}}}),
        json!({"id": "evt_2", "type": "x", "data": {"object": {"id": "pi_\u{0}"}}}),
        json!({"id": "evt_3", "type": "x\u{0}", "data": {"object": {"id": "pi_3", "n": "\u{0}"}}}),
    ] {
        let b = serde_json::to_vec(&body).unwrap();
        let got = answer(
            s.http
                .post(s.url("/webhooks/stripe"))
                .header("stripe-signature", stripe::sign(STRIPE, t, &b))
                .body(b)
                .send()
                .await,
        )
        .await;
        f.not_5xx(&format!("POST /webhooks/stripe (signed) {body}"), &got);
    }
    // Health first: a failed assertion must not leave the service (and its database) behind.
    still_healthy(s).await;
    f.assert_none();
}

/// KNOWN ISSUE (reported; a 4xx, but the wrong one): the idempotency layer answers every failure
/// to read the body as `413 request body exceeds 2097152 bytes`, also a malformed chunked body
/// of two bytes, which is a client framing error (400). Run with `--ignored` to see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_body_is_400_not_413() {
    let s = service(Kind::Embedded).await;
    let addr = s.running.as_ref().unwrap().addr;
    let request = format!(
        "POST /cases HTTP/1.1\r\nHost: {addr}\r\nIdempotency-Key: chunk-1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    assert_eq!(raw(addr, request.into_bytes(), false).await, Ok(Some(400)));
    still_healthy(s).await;
}
