//! The OpenAPI document: valid OpenAPI 3.1 (openapi-spec-validator), and every response the
//! live service gives to generated requests matches it (schemathesis, all response checks).
//!
//! Excluded: schemathesis' `positive_data_acceptance`, which expects every schema-valid request
//! to succeed. Some refusals depend on state or secrets no schema can express: a reused
//! idempotency key with another body (422), a forged cursor (400), `page` with `cursor` (400).

mod common;

use common::TestService;

fn python() -> String {
    std::env::var("SEAPORT_INTEROP_PYTHON").unwrap_or_else(|_| {
        panic!("SEAPORT_INTEROP_PYTHON is not set: run the suite with `bash scripts/test` (it installs openapi-spec-validator and schemathesis)")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_valid_and_the_service_conforms_to_it() {
    let python = python();
    // With every webhook receiver configured, so their checks run too.
    let s = TestService::start_with(seaport::testing::Kind::Embedded, |c| {
        c.webhooks = seaport_sea::webhooks::Webhooks::configure(
            &["whsec_openapi".to_owned()],
            Some("github-secret"),
            &["partner=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()],
        )
        .unwrap();
    })
    .await;
    let doc: serde_json::Value = s
        .http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/cases",
        "/cases/{id}",
        "/trace/{correlation_id}",
        "/healthz",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    let spec = s.dir.path().join("openapi.json");
    std::fs::write(&spec, serde_json::to_vec(&doc).unwrap()).unwrap();
    let check = tokio::process::Command::new(&python)
        .args([
            "-c",
            "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))",
        ])
        .arg(&spec)
        .output()
        .await
        .unwrap();
    assert!(
        check.status.success(),
        "not valid OpenAPI 3.1: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    let run = tokio::process::Command::new(schemathesis)
        .args([
            "run",
            &s.url("/openapi.json"),
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "25", "--seed", "1", "--no-color"])
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "schemathesis found responses that do not match the document:\n{out}"
    );
    s.stop().await;
}
