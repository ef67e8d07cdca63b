//! Webhook signature verification: the vectors published by GitHub, Standard Webhooks and
//! Stripe's SDK tests, plus tampering, wrong secrets, replay windows, malformed headers, rotation
//! and redaction. `now` is always passed explicitly, so nothing depends on the wall clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderName, HeaderValue};
use seaport::webhooks::{
    GitHubVerifier, Secret, StandardWebhooksVerifier, StripeVerifier, Verified, VerifyError, WebhookVerifier, github,
    standard, stripe,
};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            )
        })
        .collect()
}

fn at(unix: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(unix, 0).unwrap()
}

// ---------------------------------------------------------------------------------------------
// GitHub
// ---------------------------------------------------------------------------------------------

// Published test values, "Testing the webhook payload validation" in
// https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITHUB_BODY: &[u8] = b"Hello, World!";
const GITHUB_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
const GITHUB_DELIVERY: &str = "72d3162e-cc78-11e3-81ab-4c9367dc0958";

fn github_headers(signature: &str) -> HeaderMap {
    headers(&[
        ("X-Hub-Signature-256", signature),
        ("X-GitHub-Delivery", GITHUB_DELIVERY),
    ])
}

#[test]
fn github_published_vector_verifies() {
    assert_eq!(github::sign(GITHUB_SECRET, GITHUB_BODY), GITHUB_SIGNATURE);

    let verifier = GitHubVerifier::new(GITHUB_SECRET).unwrap();
    let verified = verifier
        .verify(&github_headers(GITHUB_SIGNATURE), GITHUB_BODY, at(0))
        .unwrap();
    assert_eq!(verified.id, GITHUB_DELIVERY);
    assert_eq!(verified.timestamp, None);
    // No timestamp is signed, so the wall clock is irrelevant.
    assert!(
        verifier
            .verify_now(&github_headers(GITHUB_SIGNATURE), GITHUB_BODY)
            .is_ok()
    );
}

#[test]
fn github_rejects_tampered_body_and_wrong_secret() {
    let verifier = GitHubVerifier::new(GITHUB_SECRET).unwrap();
    assert_eq!(
        verifier.verify(&github_headers(GITHUB_SIGNATURE), b"Hello, World?", at(0)),
        Err(VerifyError::NoMatchingSignature)
    );
    let wrong = GitHubVerifier::new("It's a Secret to Nobody").unwrap();
    assert_eq!(
        wrong.verify(&github_headers(GITHUB_SIGNATURE), GITHUB_BODY, at(0)),
        Err(VerifyError::NoMatchingSignature)
    );
    // A truncated tag is valid hex but cannot match.
    assert_eq!(
        verifier.verify(&github_headers("sha256=757107ea0eb2509f"), GITHUB_BODY, at(0)),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn github_missing_and_malformed_headers() {
    let verifier = GitHubVerifier::new(GITHUB_SECRET).unwrap();
    let only_delivery = headers(&[("X-GitHub-Delivery", GITHUB_DELIVERY)]);
    assert_eq!(
        verifier.verify(&only_delivery, GITHUB_BODY, at(0)),
        Err(VerifyError::MissingHeader("X-Hub-Signature-256"))
    );
    for bad in [
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", // no scheme prefix
        "sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        "sha256=not-hex",
    ] {
        assert_eq!(
            verifier.verify(&github_headers(bad), GITHUB_BODY, at(0)),
            Err(VerifyError::MalformedHeader("X-Hub-Signature-256")),
            "{bad}"
        );
    }

    // The dedupe key is required, but only checked once the signature holds.
    let no_delivery = headers(&[("X-Hub-Signature-256", GITHUB_SIGNATURE)]);
    assert_eq!(
        verifier.verify(&no_delivery, GITHUB_BODY, at(0)),
        Err(VerifyError::MissingHeader("X-GitHub-Delivery"))
    );
    assert_eq!(
        github::delivery_id(&no_delivery),
        Err(VerifyError::MissingHeader("X-GitHub-Delivery"))
    );
    assert_eq!(
        github::delivery_id(&github_headers(GITHUB_SIGNATURE)),
        Ok(GITHUB_DELIVERY)
    );
    let empty = headers(&[("X-GitHub-Delivery", "")]);
    assert_eq!(
        github::delivery_id(&empty),
        Err(VerifyError::MalformedHeader("X-GitHub-Delivery"))
    );
}

#[test]
fn github_rotation_accepts_either_secret() {
    let verifier = GitHubVerifier::with_secrets(["new-secret", GITHUB_SECRET]).unwrap();
    assert!(
        verifier
            .verify(&github_headers(GITHUB_SIGNATURE), GITHUB_BODY, at(0))
            .is_ok()
    );
    let signed_with_new = github::sign("new-secret", GITHUB_BODY);
    assert!(
        verifier
            .verify(&github_headers(&signed_with_new), GITHUB_BODY, at(0))
            .is_ok()
    );
}

#[test]
fn empty_secrets_are_refused() {
    assert_eq!(GitHubVerifier::new("").unwrap_err(), VerifyError::InvalidSecret);
    assert_eq!(
        GitHubVerifier::with_secrets(Vec::<String>::new()).unwrap_err(),
        VerifyError::InvalidSecret
    );
    assert_eq!(StripeVerifier::new([""]).unwrap_err(), VerifyError::InvalidSecret);
    assert_eq!(
        StripeVerifier::new(Vec::<&str>::new()).unwrap_err(),
        VerifyError::InvalidSecret
    );
    assert_eq!(
        StandardWebhooksVerifier::new(Vec::<&str>::new()).unwrap_err(),
        VerifyError::InvalidSecret
    );
    assert_eq!(
        StripeVerifier::new(["whsec_a", ""]).unwrap_err(),
        VerifyError::InvalidSecret
    );
    assert_eq!(
        StandardWebhooksVerifier::new(["whsec_"]).unwrap_err(),
        VerifyError::InvalidSecret
    );
}

// ---------------------------------------------------------------------------------------------
// Standard Webhooks
// ---------------------------------------------------------------------------------------------

// Published vector: standard-webhooks/standard-webhooks, libraries/javascript/src/webhook.test.ts
// ("sign function works"; the same values are in the PHP tests, libraries/php/tests/WebhookTest.php
// testSignFunctionWorks).
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_TIMESTAMP: i64 = 1614265330;
const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
const SW_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn sw_headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
    headers(&[
        ("webhook-id", id),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
    ])
}

fn sw_vector_headers() -> HeaderMap {
    sw_headers(SW_ID, &SW_TIMESTAMP.to_string(), SW_SIGNATURE)
}

#[test]
fn standard_published_vectors_verify() {
    assert_eq!(
        standard::sign(SW_SECRET, SW_ID, SW_TIMESTAMP, SW_BODY).unwrap(),
        SW_SIGNATURE
    );
    let verifier = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    let verified = verifier
        .verify(&sw_vector_headers(), SW_BODY, at(SW_TIMESTAMP))
        .unwrap();
    assert_eq!(verified.id, SW_ID);
    assert_eq!(verified.timestamp, Some(at(SW_TIMESTAMP)));

    // Second vector: standard-webhooks/standard-webhooks, libraries/rust/src/lib.rs (test_sign).
    let (secret, id, ts) = (
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        1649367553,
    );
    let body = br#"{"email":"test@example.com","username":"test_user"}"#;
    let expected = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
    assert_eq!(standard::sign(secret, id, ts, body).unwrap(), expected);
    let verifier = StandardWebhooksVerifier::new([secret]).unwrap();
    let verified = verifier
        .verify(&sw_headers(id, &ts.to_string(), expected), body, at(ts + 10))
        .unwrap();
    assert_eq!(verified.id, id);
}

#[test]
fn standard_secret_prefix_is_optional_and_must_be_base64() {
    let bare = StandardWebhooksVerifier::new(["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]).unwrap();
    assert!(bare.verify(&sw_vector_headers(), SW_BODY, at(SW_TIMESTAMP)).is_ok());
    assert_eq!(
        StandardWebhooksVerifier::new(["whsec_not base64!"]).unwrap_err(),
        VerifyError::InvalidSecret
    );
    assert_eq!(
        standard::sign("whsec_%%%", SW_ID, 0, b"").unwrap_err(),
        VerifyError::InvalidSecret
    );
}

#[test]
fn standard_multiple_signatures_one_valid() {
    // As in the reference "multi sig payload is valid" test: wrong v1 entries, other versions.
    let header = format!(
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= \
         v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg== \
         {SW_SIGNATURE} v1,not-base64!"
    );
    let verifier = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    let verified = verifier
        .verify(&sw_headers(SW_ID, "1614265330", &header), SW_BODY, at(SW_TIMESTAMP))
        .unwrap();
    assert_eq!(verified.id, SW_ID);

    // The same list without the valid entry fails; so does a version-only list.
    let without = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1a,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    for signatures in [without, "v1,", "", "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="] {
        assert_eq!(
            verifier.verify(&sw_headers(SW_ID, "1614265330", signatures), SW_BODY, at(SW_TIMESTAMP)),
            Err(VerifyError::NoMatchingSignature),
            "{signatures:?}"
        );
    }
}

#[test]
fn standard_rejects_tampering_and_wrong_secret() {
    let verifier = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    let now = at(SW_TIMESTAMP);
    assert_eq!(
        verifier.verify(&sw_vector_headers(), br#"{"test": 2432232315}"#, now),
        Err(VerifyError::NoMatchingSignature)
    );
    // id and timestamp are signed too: a replay cannot change the dedupe key or refresh the time.
    let other_id = sw_headers("msg_other", "1614265330", SW_SIGNATURE);
    assert_eq!(
        verifier.verify(&other_id, SW_BODY, now),
        Err(VerifyError::NoMatchingSignature)
    );
    let other_ts = sw_headers(SW_ID, "1614265331", SW_SIGNATURE);
    assert_eq!(
        verifier.verify(&other_ts, SW_BODY, at(1614265331)),
        Err(VerifyError::NoMatchingSignature)
    );

    let wrong = StandardWebhooksVerifier::new(["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]).unwrap();
    assert_eq!(
        wrong.verify(&sw_vector_headers(), SW_BODY, now),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn standard_timestamp_tolerance_both_ways() {
    let verifier = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    let h = sw_vector_headers();
    assert!(verifier.verify(&h, SW_BODY, at(SW_TIMESTAMP + 300)).is_ok());
    assert!(verifier.verify(&h, SW_BODY, at(SW_TIMESTAMP - 300)).is_ok());
    assert_eq!(
        verifier.verify(&h, SW_BODY, at(SW_TIMESTAMP + 301)),
        Err(VerifyError::TimestampTooOld { age_secs: 301 })
    );
    assert_eq!(
        verifier.verify(&h, SW_BODY, at(SW_TIMESTAMP - 301)),
        Err(VerifyError::TimestampInFuture { ahead_secs: 301 })
    );
    // Against the real clock, a 2021 delivery is long stale.
    assert!(matches!(
        verifier.verify_now(&h, SW_BODY),
        Err(VerifyError::TimestampTooOld { .. })
    ));

    let lenient = verifier.with_tolerance(Duration::from_secs(3600));
    assert!(lenient.verify(&h, SW_BODY, at(SW_TIMESTAMP + 3600)).is_ok());
}

#[test]
fn standard_missing_and_malformed_headers() {
    let verifier = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    let now = at(SW_TIMESTAMP);
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let mut h = sw_vector_headers();
        h.remove(name);
        assert_eq!(verifier.verify(&h, SW_BODY, now), Err(VerifyError::MissingHeader(name)));
    }
    for bad in ["hello", "1614265330.5", "", "99999999999999999999"] {
        assert_eq!(
            verifier.verify(&sw_headers(SW_ID, bad, SW_SIGNATURE), SW_BODY, now),
            Err(VerifyError::MalformedHeader("webhook-timestamp")),
            "{bad:?}"
        );
    }
    assert_eq!(
        verifier.verify(&sw_headers("", "1614265330", SW_SIGNATURE), SW_BODY, now),
        Err(VerifyError::MalformedHeader("webhook-id"))
    );
}

#[test]
fn standard_rotation_accepts_either_secret() {
    let old = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let verifier = StandardWebhooksVerifier::new([SW_SECRET, old]).unwrap();
    let now = at(SW_TIMESTAMP);
    assert!(verifier.verify(&sw_vector_headers(), SW_BODY, now).is_ok());
    let signed_with_old = standard::sign_headers(old, SW_ID, SW_TIMESTAMP, SW_BODY).unwrap();
    assert!(verifier.verify(&signed_with_old, SW_BODY, now).is_ok());
    // A sender mid-rotation signs with both keys; a receiver holding only the new one accepts.
    let both = format!(
        "{} {}",
        standard::sign(old, SW_ID, SW_TIMESTAMP, SW_BODY).unwrap(),
        SW_SIGNATURE
    );
    let only_new = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    assert!(
        only_new
            .verify(&sw_headers(SW_ID, "1614265330", &both), SW_BODY, now)
            .is_ok()
    );
}

#[test]
fn standard_accepts_svix_header_names() {
    let h = headers(&[
        ("svix-id", SW_ID),
        ("svix-timestamp", "1614265330"),
        ("svix-signature", SW_SIGNATURE),
    ]);
    let verifier = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    assert_eq!(verifier.verify(&h, SW_BODY, at(SW_TIMESTAMP)).unwrap().id, SW_ID);
}

// ---------------------------------------------------------------------------------------------
// Stripe
// ---------------------------------------------------------------------------------------------

// Known vector from Stripe's .NET SDK tests: stripe/stripe-dotnet,
// src/StripeTests/Services/Events/EventUtilityTest.cs (secret, timestamp and header) over the
// fixture src/StripeTests/Resources/event_test_signature.json (LF line endings, final newline).
const STRIPE_DOTNET_SECRET: &str = "webhook_secret";
const STRIPE_DOTNET_T: i64 = 1533204620;
const STRIPE_DOTNET_HEADER: &str = "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,\
                                    v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef";
const STRIPE_DOTNET_BODY: &str = r#"{
  "id": "evt_123",
  "object": "event",
  "account": "acct_123",
  "api_version": "2017-05-25",
  "created": 1533204620,
  "data": {
    "object": {
      "id": "cus_123",
      "object": "customer",
      "created": 123456789,
      "email": "test@stripe.com",
      "livemode": false,
      "metadata": {}
    }
  },
  "livemode": false,
  "pending_webhooks": 1,
  "request": {
    "id": "req_123",
    "idempotency_key": "idempotency-key-123"
  },
  "type": "customer.created"
}
"#;

const STRIPE_SECRET: &str = "whsec_test_secret";
const STRIPE_BODY: &[u8] = br#"{"id":"evt_test_webhook","object":"event"}"#;
const STRIPE_T: i64 = 1_700_000_000;

fn stripe_headers(value: &str) -> HeaderMap {
    headers(&[("Stripe-Signature", value)])
}

#[test]
fn stripe_sdk_vector_verifies() {
    let body = STRIPE_DOTNET_BODY.as_bytes();
    assert_eq!(
        stripe::sign(STRIPE_DOTNET_SECRET, STRIPE_DOTNET_T, body),
        "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7"
    );
    let verifier = StripeVerifier::new([STRIPE_DOTNET_SECRET]).unwrap();
    // As in the .NET test: received 100 s after signing, tolerance 300 s.
    let verified = verifier
        .verify(&stripe_headers(STRIPE_DOTNET_HEADER), body, at(STRIPE_DOTNET_T + 100))
        .unwrap();
    assert_eq!(verified.id, "evt_123");
    assert_eq!(verified.timestamp, Some(at(STRIPE_DOTNET_T)));
    // .NET's RejectOutdatedTimestamp: 400 s later.
    assert_eq!(
        verifier.verify(&stripe_headers(STRIPE_DOTNET_HEADER), body, at(STRIPE_DOTNET_T + 400)),
        Err(VerifyError::TimestampTooOld { age_secs: 400 })
    );
    // .NET's RejectIncorrectSignature: body changed.
    let changed = format!("{STRIPE_DOTNET_BODY}this_changes_the_json");
    assert_eq!(
        verifier.verify(
            &stripe_headers(STRIPE_DOTNET_HEADER),
            changed.as_bytes(),
            at(STRIPE_DOTNET_T)
        ),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn stripe_sign_helper_round_trips_with_whsec_secret() {
    // The whole `whsec_…` string is the key (not base64-decoded), as in Stripe's SDKs.
    let header = stripe::sign(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
    assert!(header.starts_with("t=1700000000,v1="));
    let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    let verified = verifier
        .verify(&stripe_headers(&header), STRIPE_BODY, at(STRIPE_T))
        .unwrap();
    assert_eq!(
        verified,
        verifier
            .verify(&stripe_headers(&header), STRIPE_BODY, at(STRIPE_T + 1))
            .unwrap()
    );
    assert_eq!(verified.id, "evt_test_webhook");
    let now = Utc::now().timestamp();
    let fresh = stripe::sign(STRIPE_SECRET, now, STRIPE_BODY);
    assert!(verifier.verify_now(&stripe_headers(&fresh), STRIPE_BODY).is_ok());
}

#[test]
fn stripe_rejects_tampering_and_wrong_secret() {
    let header = stripe::sign(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
    let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    let now = at(STRIPE_T);
    assert_eq!(
        verifier.verify(
            &stripe_headers(&header),
            br#"{"id":"evt_test_webhook","object":"evil"}"#,
            now
        ),
        Err(VerifyError::NoMatchingSignature)
    );
    // The timestamp is signed: moving it forward to dodge the tolerance breaks the signature.
    let moved = header.replace("t=1700000000", "t=1700000999");
    assert_eq!(
        verifier.verify(&stripe_headers(&moved), STRIPE_BODY, at(1700000999)),
        Err(VerifyError::NoMatchingSignature)
    );
    let wrong = StripeVerifier::new(["whsec_other"]).unwrap();
    assert_eq!(
        wrong.verify(&stripe_headers(&header), STRIPE_BODY, now),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn stripe_timestamp_tolerance_both_ways() {
    let header = stripe_headers(&stripe::sign(STRIPE_SECRET, STRIPE_T, STRIPE_BODY));
    let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    assert!(verifier.verify(&header, STRIPE_BODY, at(STRIPE_T + 300)).is_ok());
    assert!(verifier.verify(&header, STRIPE_BODY, at(STRIPE_T - 300)).is_ok());
    assert_eq!(
        verifier.verify(&header, STRIPE_BODY, at(STRIPE_T + 301)),
        Err(VerifyError::TimestampTooOld { age_secs: 301 })
    );
    assert_eq!(
        verifier.verify(&header, STRIPE_BODY, at(STRIPE_T - 301)),
        Err(VerifyError::TimestampInFuture { ahead_secs: 301 })
    );
    let strict = verifier.with_tolerance(Duration::from_secs(10));
    assert_eq!(
        strict.verify(&header, STRIPE_BODY, at(STRIPE_T + 15)),
        Err(VerifyError::TimestampTooOld { age_secs: 15 })
    );
}

#[test]
fn stripe_missing_and_malformed_headers() {
    let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    let now = at(STRIPE_T);
    assert_eq!(
        verifier.verify(&HeaderMap::new(), STRIPE_BODY, now),
        Err(VerifyError::MissingHeader("Stripe-Signature"))
    );

    let good = stripe::sign(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
    let v1 = good.split_once(",v1=").unwrap().1;
    for bad in [
        "i'm not even a real signature header".to_owned(), // stripe-python's malformed-header test
        format!("v1={v1}"),                                // no timestamp
        format!("t=,v1={v1}"),
        format!("t=abc,v1={v1}"),
        format!("t={STRIPE_T},t={STRIPE_T},v1={v1}"), // ambiguous timestamp
    ] {
        assert_eq!(
            verifier.verify(&stripe_headers(&bad), STRIPE_BODY, now),
            Err(VerifyError::MalformedHeader("Stripe-Signature")),
            "{bad}"
        );
    }
    // Well-formed, but no v1 signature: only v0 (legacy) or undecodable v1.
    for no_v1 in [
        format!("t={STRIPE_T},v0={v1}"),
        format!("t={STRIPE_T},v1=bad_signature"),
    ] {
        assert_eq!(
            verifier.verify(&stripe_headers(&no_v1), STRIPE_BODY, now),
            Err(VerifyError::NoMatchingSignature),
            "{no_v1}"
        );
    }
}

#[test]
fn stripe_several_v1_in_any_order_one_valid() {
    let good = stripe::sign(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
    let v1 = good.split_once(",v1=").unwrap().1;
    let other = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
    let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    for header in [
        format!("{good},v1=bad_signature"), // stripe-python's "header contains valid signature"
        format!("v1={other},t={STRIPE_T},v0={other},v1={v1}"),
        format!("v1={v1},v1={other},t={STRIPE_T},scheme2=whatever"),
    ] {
        assert!(
            verifier
                .verify(&stripe_headers(&header), STRIPE_BODY, at(STRIPE_T))
                .is_ok(),
            "{header}"
        );
    }
}

#[test]
fn stripe_rotation_accepts_either_secret() {
    let verifier = StripeVerifier::new(["whsec_new", STRIPE_SECRET]).unwrap();
    for secret in ["whsec_new", STRIPE_SECRET] {
        let header = stripe::sign(secret, STRIPE_T, STRIPE_BODY);
        assert!(
            verifier
                .verify(&stripe_headers(&header), STRIPE_BODY, at(STRIPE_T))
                .is_ok(),
            "{secret}"
        );
    }
    // Stripe rolling its secret sends one v1 per secret; we may hold only the new one.
    let old = stripe::sign("whsec_old", STRIPE_T, STRIPE_BODY);
    let new = stripe::sign("whsec_new", STRIPE_T, STRIPE_BODY);
    let both = format!("{old},v1={}", new.split_once(",v1=").unwrap().1);
    let only_new = StripeVerifier::new(["whsec_new"]).unwrap();
    assert!(
        only_new
            .verify(&stripe_headers(&both), STRIPE_BODY, at(STRIPE_T))
            .is_ok()
    );
}

#[test]
fn stripe_body_is_parsed_only_after_verification() {
    let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    // Not JSON and unsigned: the signature error wins, the body is never parsed.
    assert_eq!(
        verifier.verify(
            &stripe_headers(&format!("t={STRIPE_T},v1=00")),
            b"not json",
            at(STRIPE_T)
        ),
        Err(VerifyError::NoMatchingSignature)
    );
    // Signed, but no event id to dedupe on.
    let header = stripe::sign(STRIPE_SECRET, STRIPE_T, b"not json");
    assert!(matches!(
        verifier.verify(&stripe_headers(&header), b"not json", at(STRIPE_T)),
        Err(VerifyError::MalformedPayload(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// All schemes
// ---------------------------------------------------------------------------------------------

/// A verifier and a delivery it must accept at the given time.
type Delivery = (Box<dyn WebhookVerifier>, HeaderMap, &'static [u8], DateTime<Utc>);

#[test]
fn one_interface_for_all_schemes() {
    let verifiers: Vec<Delivery> = vec![
        (
            Box::new(GitHubVerifier::new(GITHUB_SECRET).unwrap()),
            github_headers(GITHUB_SIGNATURE),
            GITHUB_BODY,
            at(0),
        ),
        (
            Box::new(StandardWebhooksVerifier::new([SW_SECRET]).unwrap()),
            sw_vector_headers(),
            SW_BODY,
            at(SW_TIMESTAMP),
        ),
        (
            Box::new(StripeVerifier::new([STRIPE_DOTNET_SECRET]).unwrap()),
            stripe_headers(STRIPE_DOTNET_HEADER),
            STRIPE_DOTNET_BODY.as_bytes(),
            at(STRIPE_DOTNET_T),
        ),
    ];
    let ids: Vec<String> = verifiers
        .iter()
        .map(|(verifier, headers, body, now)| verifier.verify(headers, body, *now).map(|v: Verified| v.id).unwrap())
        .collect();
    assert_eq!(ids, [GITHUB_DELIVERY, SW_ID, "evt_123"]);
}

#[test]
fn secrets_and_signatures_never_leak_into_debug_or_errors() {
    let secret = Secret::from("super-secret-value");
    assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    assert_eq!(format!("{secret}"), "<redacted>");

    let stripe_v = StripeVerifier::new([STRIPE_SECRET, "whsec_second"]).unwrap();
    let github_v = GitHubVerifier::new(GITHUB_SECRET).unwrap();
    let standard_v = StandardWebhooksVerifier::new([SW_SECRET]).unwrap();
    let debug = format!("{stripe_v:?} {github_v:?} {standard_v:?} {stripe_v:#?}");
    assert!(debug.contains("<redacted>"), "{debug}");

    let signed = stripe::sign(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
    let stripe_tag = signed.split_once(",v1=").unwrap().1.to_owned();
    let errors = [
        stripe_v
            .verify(&stripe_headers(&signed), b"tampered", at(STRIPE_T))
            .unwrap_err(),
        stripe_v
            .verify(&stripe_headers(&signed), STRIPE_BODY, at(STRIPE_T + 999))
            .unwrap_err(),
        stripe_v
            .verify(&stripe_headers(&format!("v1={stripe_tag}")), STRIPE_BODY, at(STRIPE_T))
            .unwrap_err(),
        github_v
            .verify(&github_headers(GITHUB_SIGNATURE), b"tampered", at(0))
            .unwrap_err(),
        github_v
            .verify(&github_headers(&GITHUB_SIGNATURE[7..]), GITHUB_BODY, at(0))
            .unwrap_err(),
        standard_v
            .verify(&sw_vector_headers(), b"tampered", at(SW_TIMESTAMP))
            .unwrap_err(),
        standard_v
            .verify(&sw_headers(SW_ID, "x", SW_SIGNATURE), SW_BODY, at(SW_TIMESTAMP))
            .unwrap_err(),
        StandardWebhooksVerifier::new(["whsec_super-secret-value!"]).unwrap_err(),
    ];
    let rendered: String = errors.iter().map(|e| format!("{e} {e:?}\n")).collect();

    let forbidden = [
        STRIPE_SECRET,
        "whsec_second",
        "test_secret",
        GITHUB_SECRET,
        "Secret to Everybody",
        SW_SECRET,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "super-secret-value",
        &stripe_tag,
        &GITHUB_SIGNATURE[7..],
        &SW_SIGNATURE[3..],
    ];
    for needle in forbidden {
        assert!(!debug.contains(needle), "{needle} in {debug}");
        assert!(!rendered.contains(needle), "{needle} in {rendered}");
    }
}
