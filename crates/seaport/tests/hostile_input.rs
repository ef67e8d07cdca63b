//! Hostile input against every parser of outside input: webhook signature headers and secrets,
//! pagination cursors and parameters, idempotency keys, correlation ids and `traceparent`, and the
//! event envelope. Property tests (proptest; cargo-fuzz needs a nightly toolchain): arbitrary
//! bytes, unicode, separators, huge lengths and numbers at the `i64` bounds never panic, and only
//! well-formed (for signatures: correctly signed) input is accepted. Valid inputs are generated
//! too, to check that they are accepted and that any one-byte change makes them fail.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use seaport::Event;
use seaport::http::correlation::{self, Correlation, TraceParent, valid_id};
use seaport::http::cursor::CursorCodec;
use seaport::http::idempotency::{IDEMPOTENCY_KEY, IdempotencyKey, MAX_KEY_LEN, X_IDEMPOTENCY_KEY};
use seaport::http::pagination::{ListRequest, MAX_LIMIT, MAX_PAGE, PageRequest};
use seaport::webhooks::{
    DEFAULT_TOLERANCE, GitHubVerifier, StandardWebhooksVerifier, StripeVerifier, VerifyError, github, standard, stripe,
};
use serde_json::{Value, json};

/// `cases` per property; no regression files are written into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Numbers at and around the edges of `i64`, of `DateTime<Utc>`, signs, zeros, non-integers.
fn edge_numbers() -> Vec<String> {
    let max_ts = DateTime::<Utc>::MAX_UTC.timestamp();
    let min_ts = DateTime::<Utc>::MIN_UTC.timestamp();
    let mut v: Vec<String> = [
        i64::MAX as i128,
        i64::MIN as i128,
        i64::MAX as i128 + 1,
        i64::MIN as i128 - 1,
        u64::MAX as i128,
        u64::MAX as i128 + 1,
        max_ts as i128,
        max_ts as i128 + 1,
        min_ts as i128,
        min_ts as i128 - 1,
        0,
        -1,
        1,
        1_700_000_000,
    ]
    .iter()
    .map(i128::to_string)
    .collect();
    v.extend(
        [
            "-0",
            "+0",
            "+1",
            "00000000001700000000",
            "1e3",
            "1.5",
            " 1",
            "1 ",
            "",
            "NaN",
            "0x10",
            "١٢٣",
            "99999999999999999999999999999999999999",
        ]
        .map(str::to_owned),
    );
    v
}

/// Strings a hostile sender might put in a header or a parameter.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        4 => "[tv01sha256whsec_=, \t\"\\\\:;a-fA-F0-9+/.%-]{0,80}",
        2 => "\\PC{0,40}",
        1 => (any::<char>(), 0usize..16_000).prop_map(|(c, n)| c.to_string().repeat(n)),
        2 => prop::sample::select(edge_numbers()),
    ]
}

/// Any bytes that `HeaderValue` can hold: visible ASCII, space, tab and obs-text (0x80-0xff).
/// Control characters are dropped, as hyper would never deliver them.
fn header_value(raw: &[u8]) -> HeaderValue {
    let clean: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        .collect();
    HeaderValue::from_bytes(&clean).expect("sanitised header value")
}

fn hostile_header() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        3 => hostile_text().prop_map(|s| header_value(s.as_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| header_value(&b)),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => prop::collection::vec(any::<u8>(), 0..300),
        6 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => (any::<u8>(), 0usize..100_000).prop_map(|(b, n)| vec![b; n]),
    ]
}

/// A JSON value of bounded depth (a deep tree of our own would overflow the stack in `Drop`).
fn json_value() -> impl Strategy<Value = Value> {
    json_value_with(any::<f64>().boxed())
}

/// JSON whose floats serde_json reads back exactly (few significant digits): without its
/// `float_roundtrip` feature serde_json may read a float 1 ULP off (see `float_data_round_trips`).
fn exact_json_value() -> impl Strategy<Value = Value> {
    json_value_with(
        (any::<i16>(), 0i32..8)
            .prop_map(|(n, k)| f64::from(n) / 2f64.powi(k))
            .boxed(),
    )
}

fn json_value_with(floats: BoxedStrategy<f64>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        floats.prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Any instant chrono can represent.
fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
    let (min, max) = (
        DateTime::<Utc>::MIN_UTC.timestamp(),
        DateTime::<Utc>::MAX_UTC.timestamp(),
    );
    prop_oneof![
        3 => (0i64..4_102_444_800).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
        1 => (min..=max).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
        1 => prop::sample::select(vec![DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC, DateTime::UNIX_EPOCH]),
    ]
}

/// The outcome the timestamp rules demand for a correctly signed delivery at `t` seen at `now`.
fn expected_timestamp_outcome(t: i64, now: DateTime<Utc>, tolerance: Duration) -> Result<(), &'static str> {
    let Some(_) = DateTime::from_timestamp(t, 0) else {
        return Err("malformed");
    };
    let age = now.timestamp() as i128 - t as i128;
    let tol = tolerance.as_secs() as i128;
    if age > tol {
        Err("too old")
    } else if age < -tol {
        Err("in future")
    } else {
        Ok(())
    }
}

fn classify(r: &Result<seaport::webhooks::Verified, VerifyError>) -> Result<(), &'static str> {
    match r {
        Ok(_) => Ok(()),
        Err(VerifyError::MalformedHeader(_)) => Err("malformed"),
        Err(VerifyError::TimestampTooOld { .. }) => Err("too old"),
        Err(VerifyError::TimestampInFuture { .. }) => Err("in future"),
        Err(VerifyError::NoMatchingSignature) => Err("no match"),
        Err(VerifyError::MissingHeader(_)) => Err("missing"),
        Err(VerifyError::MalformedPayload(_)) => Err("payload"),
        Err(_) => Err("other"),
    }
}

fn headers(pairs: &[(&str, HeaderValue)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.clone());
    }
    h
}

fn flip(bytes: &mut [u8], index: prop::sample::Index, mask: u8) {
    let i = index.index(bytes.len());
    bytes[i] ^= mask;
}

/// A Stripe-like header: `key=value` items of the kinds a parser must tell apart, joined oddly.
fn stripe_like_header() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        prop::sample::select(edge_numbers()).prop_map(|n| format!("t={n}")),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| format!("v1={}", hex::encode(b))),
        prop::collection::vec(any::<u8>(), 32..=32).prop_map(|b| format!("v1={}", hex::encode(b))),
        hostile_text().prop_map(|s| format!("v1={s}")),
        hostile_text().prop_map(|s| format!("v0={s}")),
        hostile_text(),
        Just(String::new()),
        Just("=".to_owned()),
        Just("t=".to_owned()),
    ];
    (
        prop::collection::vec(item, 0..6),
        prop::sample::select(vec![",", ", ", ",,", " , "]),
    )
        .prop_map(|(items, sep)| items.join(sep))
}

// ---------------------------------------------------------------------------------------------
// Stripe
// ---------------------------------------------------------------------------------------------

const STRIPE_SECRET: &str = "whsec_hostile_test_secret";

proptest! {
    #![proptest_config(config(2000))]

    /// Garbage `Stripe-Signature` headers and bodies are rejected, never accepted, never a panic.
    #[test]
    fn stripe_rejects_garbage(
        sig in prop_oneof![hostile_header(), stripe_like_header().prop_map(|s| header_value(s.as_bytes()))],
        extra in prop::option::of(hostile_header()),
        body in body(),
        now in any_instant(),
    ) {
        let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
        let mut h = headers(&[(stripe::SIGNATURE_HEADER, sig)]);
        if let Some(extra) = extra {
            h.append(stripe::SIGNATURE_HEADER, extra);
        }
        prop_assert!(verifier.verify(&h, &body, now).is_err());
        prop_assert!(matches!(
            verifier.verify(&HeaderMap::new(), &body, now),
            Err(VerifyError::MissingHeader(_))
        ));
    }

}

proptest! {
    #![proptest_config(config(1000))]

    /// A correctly signed event verifies (under any of the rotated secrets, among junk items),
    /// and flipping any byte of the body or of the tag, or changing `t`, makes it fail.
    #[test]
    fn stripe_signed_events_verify_and_tampering_fails(
        secret in prop::collection::vec(any::<u8>(), 1..64),
        other in prop::collection::vec(any::<u8>(), 1..64),
        id in "\\PC{1,40}",
        payload in json_value(),
        now in 0i64..4_102_444_800,
        skew in -300i64..=300,
        junk in prop::collection::vec("(v0|v2|x|t0)=[a-z0-9]{0,20}", 0..3),
        body_flip in (any::<prop::sample::Index>(), 1u8..=255),
        tag_flip in (any::<prop::sample::Index>(), 1u8..=255),
    ) {
        prop_assume!(secret != other);
        let now = DateTime::from_timestamp(now, 0).unwrap();
        let t = now.timestamp() + skew;
        let body = serde_json::to_vec(&json!({"id": id, "object": "event", "data": payload})).unwrap();
        let signed = stripe::sign(&secret, t, &body);
        let mut items: Vec<String> = signed.split(',').map(str::to_owned).collect();
        items.extend(junk);
        let header = items.join(",");
        let h = headers(&[(stripe::SIGNATURE_HEADER, HeaderValue::from_str(&header).unwrap())]);

        let verified = StripeVerifier::new([&other, &secret]).unwrap().verify(&h, &body, now).unwrap();
        prop_assert_eq!(&verified.id, &id);
        prop_assert_eq!(verified.timestamp, DateTime::from_timestamp(t, 0));
        let verifier = StripeVerifier::new([&secret]).unwrap();
        prop_assert!(verifier.verify(&h, &body, now).is_ok());
        prop_assert_eq!(
            StripeVerifier::new([&other]).unwrap().verify(&h, &body, now),
            Err(VerifyError::NoMatchingSignature)
        );

        let mut tampered = body.clone();
        flip(&mut tampered, body_flip.0, body_flip.1);
        prop_assert_eq!(verifier.verify(&h, &tampered, now), Err(VerifyError::NoMatchingSignature));

        let mut tag = hex::decode(signed.split_once(",v1=").unwrap().1).unwrap();
        flip(&mut tag, tag_flip.0, tag_flip.1);
        let forged = format!("t={t},v1={}", hex::encode(&tag));
        let h2 = headers(&[(stripe::SIGNATURE_HEADER, HeaderValue::from_str(&forged).unwrap())]);
        prop_assert_eq!(verifier.verify(&h2, &body, now), Err(VerifyError::NoMatchingSignature));

        let moved = signed.replacen(&format!("t={t}"), &format!("t={}", t + 1), 1);
        let h3 = headers(&[(stripe::SIGNATURE_HEADER, HeaderValue::from_str(&moved).unwrap())]);
        prop_assert_eq!(verifier.verify(&h3, &body, now), Err(VerifyError::NoMatchingSignature));
    }

}

proptest! {
    #![proptest_config(config(2000))]

    /// Correctly signed at any `t` (including the `i64` bounds), seen at any `now`, with any
    /// tolerance: accepted exactly when `t` is representable and within the tolerance.
    #[test]
    fn stripe_timestamps_follow_the_tolerance(
        t in prop_oneof![any::<i64>(), -400_000i64..400_000, prop::sample::select(vec![i64::MIN, i64::MAX, 0])],
        now in prop_oneof![any_instant(), (-200_000i64..200_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())],
        tolerance in prop_oneof![Just(DEFAULT_TOLERANCE), any::<u64>().prop_map(Duration::from_secs), Just(Duration::MAX)],
    ) {
        let body = br#"{"id":"evt_1"}"#;
        let h = headers(&[(stripe::SIGNATURE_HEADER, HeaderValue::from_str(&stripe::sign(STRIPE_SECRET, t, body)).unwrap())]);
        let verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap().with_tolerance(tolerance);
        prop_assert_eq!(classify(&verifier.verify(&h, body, now)), expected_timestamp_outcome(t, now, tolerance));
    }

    /// A correctly signed body that is not a JSON object with a string `id` is a payload error.
    #[test]
    fn stripe_signed_garbage_bodies_are_payload_errors(
        body in prop_oneof![
            4 => body(),
            1 => (json_value(), any::<String>()).prop_map(|(v, id)| {
                let mut v = json!({"id": id, "more": v});
                if id.len() % 2 == 0 { v["id"] = json!(1) }
                serde_json::to_vec(&v).unwrap()
            }),
            1 => prop::collection::vec(json_value(), 0..3).prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => any::<String>().prop_map(|id| serde_json::to_vec(&json!([id])).unwrap()),
        ],
    ) {
        let now = Utc::now();
        let h = headers(&[(
            stripe::SIGNATURE_HEADER,
            HeaderValue::from_str(&stripe::sign(STRIPE_SECRET, now.timestamp(), &body)).unwrap(),
        )]);
        let parsed = serde_json::from_slice::<Value>(&body).ok();
        let has_id = parsed.is_some_and(|v| v.is_object() && v.get("id").is_some_and(Value::is_string));
        match StripeVerifier::new([STRIPE_SECRET]).unwrap().verify(&h, &body, now) {
            Ok(_) => prop_assert!(has_id),
            Err(e) => {
                prop_assert!(!has_id, "{e}");
                prop_assert!(matches!(e, VerifyError::MalformedPayload(_)), "{e}");
            }
        }
    }
}

/// KNOWN ISSUE (reported, not a panic): `StripeVerifier::verify` reads the event id with a
/// derived `Deserialize`, which also takes the struct as a sequence, so a correctly signed
/// `["evt_1"]` is accepted with id `evt_1`, against its documented "a JSON object with a string
/// `id`". (The service then refuses the body itself, 400.) Run with `--ignored` to see it.
#[test]
fn stripe_array_payload_is_refused() {
    let now = Utc::now();
    let body = br#"["evt_1"]"#;
    let h = headers(&[(
        stripe::SIGNATURE_HEADER,
        HeaderValue::from_str(&stripe::sign(STRIPE_SECRET, now.timestamp(), body)).unwrap(),
    )]);
    assert!(matches!(
        StripeVerifier::new([STRIPE_SECRET]).unwrap().verify(&h, body, now),
        Err(VerifyError::MalformedPayload(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// GitHub
// ---------------------------------------------------------------------------------------------

const GITHUB_SECRET: &str = "It's a Secret to Everybody";

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn github_rejects_garbage(
        sig in prop_oneof![
            hostile_header(),
            hostile_text().prop_map(|s| header_value(format!("sha256={s}").as_bytes())),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| header_value(format!("sha256={}", hex::encode(b)).as_bytes())),
        ],
        delivery in prop::option::of(hostile_header()),
        body in body(),
        now in any_instant(),
    ) {
        let verifier = GitHubVerifier::new(GITHUB_SECRET).unwrap();
        let mut h = headers(&[(github::SIGNATURE_HEADER, sig)]);
        if let Some(d) = delivery {
            h.insert(github::DELIVERY_HEADER, d);
        }
        prop_assert!(verifier.verify(&h, &body, now).is_err());
    }

}

proptest! {
    #![proptest_config(config(1000))]

    /// Signed deliveries verify (the delivery id is the trimmed header, which must be a
    /// non-empty str); any flipped body or tag byte fails.
    #[test]
    fn github_signed_deliveries_verify_and_tampering_fails(
        secret in prop::collection::vec(any::<u8>(), 1..64),
        body in body(),
        delivery in prop::option::of(hostile_header()),
        uppercase in any::<bool>(),
        body_flip in (any::<prop::sample::Index>(), 1u8..=255),
        tag_flip in (any::<prop::sample::Index>(), 1u8..=255),
    ) {
        let verifier = GitHubVerifier::new(&secret).unwrap();
        let signed = github::sign(&secret, &body);
        let sig = if uppercase { format!("sha256={}", signed["sha256=".len()..].to_uppercase()) } else { signed.clone() };
        let mut h = headers(&[(github::SIGNATURE_HEADER, HeaderValue::from_str(&sig).unwrap())]);
        if let Some(d) = &delivery {
            h.insert(github::DELIVERY_HEADER, d.clone());
        }
        let result = verifier.verify(&h, &body, Utc::now());
        match delivery.as_ref().map(|d| d.to_str().map(str::trim)) {
            None => prop_assert_eq!(result, Err(VerifyError::MissingHeader("X-GitHub-Delivery"))),
            Some(Err(_)) | Some(Ok("")) => prop_assert_eq!(result, Err(VerifyError::MalformedHeader("X-GitHub-Delivery"))),
            Some(Ok(id)) => {
                let verified = result.unwrap();
                prop_assert_eq!(verified.id.as_str(), id);
                prop_assert_eq!(verified.timestamp, None);
            }
        }

        h.insert(github::DELIVERY_HEADER, HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        if !body.is_empty() {
            let mut tampered = body.clone();
            flip(&mut tampered, body_flip.0, body_flip.1);
            prop_assert_eq!(verifier.verify(&h, &tampered, Utc::now()), Err(VerifyError::NoMatchingSignature));
        }
        let mut tag = hex::decode(&signed["sha256=".len()..]).unwrap();
        flip(&mut tag, tag_flip.0, tag_flip.1);
        h.insert(github::SIGNATURE_HEADER, HeaderValue::from_str(&format!("sha256={}", hex::encode(tag))).unwrap());
        prop_assert_eq!(verifier.verify(&h, &body, Utc::now()), Err(VerifyError::NoMatchingSignature));
    }
}

// ---------------------------------------------------------------------------------------------
// Standard Webhooks
// ---------------------------------------------------------------------------------------------

const PARTNER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn whsec() -> impl Strategy<Value = String> {
    (prop::collection::vec(any::<u8>(), 1..64), any::<bool>()).prop_map(|(key, prefixed)| {
        let encoded = BASE64.encode(key);
        if prefixed { format!("whsec_{encoded}") } else { encoded }
    })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Any secret string: `new` never panics and accepts exactly the (optionally `whsec_`
    /// prefixed) standard base64 of a non-empty key.
    #[test]
    fn standard_secrets_are_base64_keys(
        secrets in prop::collection::vec(prop_oneof![hostile_text(), whsec(), hostile_text().prop_map(|s| format!("whsec_{s}"))], 0..4),
    ) {
        let valid = |s: &str| BASE64.decode(s.strip_prefix("whsec_").unwrap_or(s)).is_ok_and(|k| !k.is_empty());
        let expected = !secrets.is_empty() && secrets.iter().all(|s| valid(s));
        match StandardWebhooksVerifier::new(&secrets) {
            Ok(_) => prop_assert!(expected),
            Err(e) => {
                prop_assert!(!expected);
                prop_assert_eq!(e, VerifyError::InvalidSecret);
            }
        }
    }

    /// Garbage `webhook-*` (or `svix-*`) headers are rejected; signing helpers never panic.
    #[test]
    fn standard_rejects_garbage(
        id in prop::option::of(hostile_header()),
        ts in prop::option::of(prop_oneof![hostile_header(), prop::sample::select(edge_numbers()).prop_map(|n| header_value(n.as_bytes()))]),
        sig in prop::option::of(prop_oneof![
            hostile_header(),
            prop::collection::vec(
                prop_oneof![hostile_text(), prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| format!("v1,{}", BASE64.encode(b)))],
                0..4,
            ).prop_map(|v| header_value(v.join(" ").as_bytes())),
        ]),
        svix in any::<bool>(),
        body in body(),
        now in any_instant(),
        secret in hostile_text(),
        msg_id in hostile_text(),
        t in any::<i64>(),
    ) {
        let verifier = StandardWebhooksVerifier::new([PARTNER_SECRET]).unwrap();
        let prefix = if svix { "svix" } else { "webhook" };
        let mut h = HeaderMap::new();
        for (name, value) in [("id", id), ("timestamp", ts), ("signature", sig)] {
            if let Some(v) = value {
                h.insert(HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes()).unwrap(), v);
            }
        }
        prop_assert!(verifier.verify(&h, &body, now).is_err());
        let _ = standard::sign(&secret, &msg_id, t, &body);
        let _ = standard::sign_headers(&secret, &msg_id, t, &body);
        let _ = standard::sign_headers(PARTNER_SECRET, &msg_id, t, &body);
    }

}

proptest! {
    #![proptest_config(config(1000))]

    /// Signed messages verify (also under Svix names, beside other versions' signatures, under a
    /// rotated secret); changing the body, the tag, the id or the timestamp fails.
    #[test]
    fn standard_signed_messages_verify_and_tampering_fails(
        secret in whsec(),
        other in whsec(),
        msg_id in "[!-~]{1,64}",
        body in body(),
        now in 0i64..4_102_444_800,
        skew in -300i64..=300,
        svix in any::<bool>(),
        junk in prop::collection::vec("(v1a|v2|v1),[A-Za-z0-9+/=]{0,50}", 0..3),
        body_flip in (any::<prop::sample::Index>(), 1u8..=255),
        tag_flip in (any::<prop::sample::Index>(), 1u8..=255),
    ) {
        let decoded = |s: &str| BASE64.decode(s.strip_prefix("whsec_").unwrap_or(s)).unwrap();
        prop_assume!(decoded(&secret) != decoded(&other));
        let now = DateTime::from_timestamp(now, 0).unwrap();
        let t = now.timestamp() + skew;
        let signature = standard::sign(&secret, &msg_id, t, &body).unwrap();
        let mut entries = junk.clone();
        entries.push(signature.clone());
        entries.rotate_left(junk.len() / 2);
        let prefix = if svix { "svix" } else { "webhook" };
        let make = |id: &str, ts: &str, sig: &str| {
            let mut h = HeaderMap::new();
            for (name, value) in [("id", id), ("timestamp", ts), ("signature", sig)] {
                h.insert(
                    HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            h
        };
        let h = make(&msg_id, &t.to_string(), &entries.join(" "));
        let verified = StandardWebhooksVerifier::new([&other, &secret]).unwrap().verify(&h, &body, now).unwrap();
        prop_assert_eq!(&verified.id, &msg_id);
        prop_assert_eq!(verified.timestamp, DateTime::from_timestamp(t, 0));
        let verifier = StandardWebhooksVerifier::new([&secret]).unwrap();
        prop_assert!(verifier.verify(&h, &body, now).is_ok());
        prop_assert_eq!(
            StandardWebhooksVerifier::new([&other]).unwrap().verify(&h, &body, now),
            Err(VerifyError::NoMatchingSignature)
        );
        if !svix {
            prop_assert_eq!(standard::sign_headers(&secret, &msg_id, t, &body).unwrap(), make(&msg_id, &t.to_string(), &signature));
        }

        if !body.is_empty() {
            let mut tampered = body.clone();
            flip(&mut tampered, body_flip.0, body_flip.1);
            prop_assert_eq!(verifier.verify(&h, &tampered, now), Err(VerifyError::NoMatchingSignature));
        }
        let mut tag = BASE64.decode(&signature[3..]).unwrap();
        flip(&mut tag, tag_flip.0, tag_flip.1);
        let forged = make(&msg_id, &t.to_string(), &format!("v1,{}", BASE64.encode(tag)));
        prop_assert_eq!(verifier.verify(&forged, &body, now), Err(VerifyError::NoMatchingSignature));
        let other_id = make(&format!("{msg_id}x"), &t.to_string(), &signature);
        prop_assert_eq!(verifier.verify(&other_id, &body, now), Err(VerifyError::NoMatchingSignature));
        let other_t = make(&msg_id, &(t - 1).to_string(), &signature);
        prop_assert_eq!(verifier.verify(&other_t, &body, now), Err(VerifyError::NoMatchingSignature));
    }

}

proptest! {
    #![proptest_config(config(2000))]

    /// Correctly signed at any `webhook-timestamp`, including the `i64` bounds.
    #[test]
    fn standard_timestamps_follow_the_tolerance(
        t in prop_oneof![any::<i64>(), -400_000i64..400_000, prop::sample::select(vec![i64::MIN, i64::MAX, 0])],
        now in prop_oneof![any_instant(), (-200_000i64..200_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())],
        tolerance in prop_oneof![Just(DEFAULT_TOLERANCE), any::<u64>().prop_map(Duration::from_secs), Just(Duration::MAX)],
    ) {
        let h = standard::sign_headers(PARTNER_SECRET, "msg_1", t, b"{}").unwrap();
        let verifier = StandardWebhooksVerifier::new([PARTNER_SECRET]).unwrap().with_tolerance(tolerance);
        prop_assert_eq!(classify(&verifier.verify(&h, b"{}", now)), expected_timestamp_outcome(t, now, tolerance));
    }
}

/// Megabyte headers, thousands of signature entries, multi-megabyte bodies: rejected, no panic.
#[test]
fn huge_inputs_are_rejected() {
    let now = Utc::now();
    let mib = "a".repeat(1 << 20);
    let body = vec![b'{'; 4 << 20];
    let entries = |item: &str, n: usize| vec![item; n].join(",");
    let tag = hex::encode([7u8; 32]);
    let stripe_verifier = StripeVerifier::new([STRIPE_SECRET]).unwrap();
    for sig in [
        format!("t={},v1={mib}", now.timestamp()),
        format!("t={mib}"),
        format!("t={},{}", now.timestamp(), entries(&format!("v1={tag}"), 10_000)),
        entries("t=1", 10_000),
        ",".repeat(1 << 20),
    ] {
        let h = headers(&[(stripe::SIGNATURE_HEADER, HeaderValue::from_str(&sig).unwrap())]);
        assert!(stripe_verifier.verify(&h, &body, now).is_err());
    }
    let github_verifier = GitHubVerifier::new(GITHUB_SECRET).unwrap();
    for sig in [
        format!("sha256={mib}"),
        format!("sha256={}", "ab".repeat(1 << 19)),
        mib.clone(),
    ] {
        let h = headers(&[
            (github::SIGNATURE_HEADER, HeaderValue::from_str(&sig).unwrap()),
            (github::DELIVERY_HEADER, HeaderValue::from_str(&mib).unwrap()),
        ]);
        assert!(github_verifier.verify(&h, &body, now).is_err());
    }
    let standard_verifier = StandardWebhooksVerifier::new([PARTNER_SECRET]).unwrap();
    let b64 = BASE64.encode([7u8; 32]);
    for (id, ts, sig) in [
        (mib.as_str(), "1", format!("v1,{b64}")),
        ("m", mib.as_str(), format!("v1,{b64}")),
        ("m", "1", vec![format!("v1,{b64}"); 10_000].join(" ")),
        ("m", "1", format!("v1,{mib}")),
        ("m", "1", " ".repeat(1 << 20)),
    ] {
        let h = headers(&[
            (standard::ID_HEADER, HeaderValue::from_str(id).unwrap()),
            (standard::TIMESTAMP_HEADER, HeaderValue::from_str(ts).unwrap()),
            (standard::SIGNATURE_HEADER, HeaderValue::from_str(&sig).unwrap()),
        ]);
        assert!(standard_verifier.verify(&h, &body, now).is_err());
    }
    assert!(StandardWebhooksVerifier::new([format!("whsec_{mib}!")]).is_err());
    let _ = StandardWebhooksVerifier::new([format!("whsec_{}", BASE64.encode(&body))]).unwrap();

    assert_eq!(CursorCodec::new(b"k".to_vec()).decode(&mib).unwrap_err().status, 400);
    assert!(IdempotencyKey::parse(mib.as_bytes()).is_err());
    assert!(IdempotencyKey::parse(format!("\"{mib}\"").as_bytes()).is_err());
    assert!(!valid_id(&mib));
    assert!(TraceParent::parse(&mib).is_none());
    assert!(TraceParent::parse(&format!("01-{}-{}-01-{mib}", "a".repeat(32), "b".repeat(16))).is_some());
    assert!(PageRequest::from_query(Some(&format!("page={mib}"))).is_err());
    assert!(PageRequest::from_query(Some(&"page=1&".repeat(100_000))).is_err());
    assert!(ListRequest::from_query(Some(&format!("cursor={mib}&limit={mib}"))).is_err());
    assert!(Event::from_json(&body).is_err());
}

// ---------------------------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn cursors_round_trip(key in prop::collection::vec(any::<u8>(), 0..80), position in any::<i64>()) {
        let codec = CursorCodec::new(key);
        let cursor = codec.encode(position);
        prop_assert!(cursor.len() <= 64);
        prop_assert_eq!(codec.decode(&cursor).unwrap(), position);
    }

    /// Decoding arbitrary strings never panics; anything accepted is exactly an `encode` output.
    #[test]
    fn cursors_accept_only_encoder_output(
        text in prop_oneof![
            hostile_text(),
            "[A-Za-z0-9_=+/-]{0,70}",
            prop::collection::vec(any::<u8>(), 0..60).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
            (0u8..=255, any::<i64>(), prop::collection::vec(any::<u8>(), 16..=16)).prop_map(|(v, p, tag)| {
                let mut b = vec![v];
                b.extend_from_slice(&p.to_be_bytes());
                b.extend(tag);
                URL_SAFE_NO_PAD.encode(b)
            }),
        ],
    ) {
        let codec = CursorCodec::new(b"hostile cursor key".to_vec());
        match codec.decode(&text) {
            Ok(p) => prop_assert_eq!(codec.encode(p), text),
            Err(problem) => prop_assert_eq!(problem.status, 400),
        }
    }

    /// Any one-character change, truncation, extension or other key turns a cursor into a 400.
    #[test]
    fn tampered_cursors_are_refused(
        position in any::<i64>(),
        at in any::<prop::sample::Index>(),
        replacement in prop_oneof![any::<char>(), prop::sample::select(URL_ALPHABET.chars().collect::<Vec<_>>())],
        cut in 1usize..34,
        suffix in "[A-Za-z0-9_=-]{1,8}",
    ) {
        let codec = CursorCodec::new(b"k1".to_vec());
        let good = codec.encode(position);
        let chars: Vec<char> = good.chars().collect();
        let i = at.index(chars.len());
        prop_assume!(chars[i] != replacement);
        let mut changed = chars.clone();
        changed[i] = replacement;
        let changed: String = changed.into_iter().collect();
        for bad in [
            changed,
            good[..good.len().saturating_sub(cut)].to_owned(),
            format!("{good}{suffix}"),
            format!("{suffix}{good}"),
            CursorCodec::new(b"k2".to_vec()).encode(position),
        ] {
            prop_assert_eq!(codec.decode(&bad).map_err(|p| p.status), Err(400), "{}", bad);
        }
    }
}

const URL_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Codecs of one database share the key: a cursor of one "instance" is valid on another.
#[tokio::test]
async fn cursor_codecs_of_one_database_agree() {
    let dir = tempfile::tempdir().unwrap();
    let db = seaport::store::Db::from(
        seaport::store::SqliteStore::open(dir.path().join("c.db"))
            .await
            .unwrap(),
    );
    let (a, b) = (
        CursorCodec::from_db(&db).await.unwrap(),
        CursorCodec::from_db(&db).await.unwrap(),
    );
    for p in [0, 1, -1, i64::MIN, i64::MAX] {
        assert_eq!(b.decode(&a.encode(p)).unwrap(), p);
    }
    assert_eq!(b.decode("AQAAAAAAAAAq").unwrap_err().status, 400);
}

// ---------------------------------------------------------------------------------------------
// Pagination parameters
// ---------------------------------------------------------------------------------------------

fn query() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        prop::sample::select(edge_numbers()),
        hostile_text(),
        "[-+ 0-9%]{0,25}",
        Just("%F0%9F%92%A9".to_owned()),
        Just("%00".to_owned()),
        Just("%".to_owned()),
        Just("%ZZ".to_owned()),
    ];
    let pair = (
        prop_oneof![
            4 => prop::sample::select(vec!["page", "limit", "cursor", "pa%67e", "limit+", "", "x"]).prop_map(str::to_owned),
            1 => hostile_text(),
        ],
        value,
        any::<bool>(),
    )
        .prop_map(|(k, v, eq)| if eq { format!("{k}={v}") } else { k });
    prop::collection::vec(pair, 0..6).prop_map(|p| p.join("&"))
}

proptest! {
    #![proptest_config(config(2000))]

    /// `?page=&limit=&cursor=` never panics; accepted values are within the documented bounds,
    /// so `offset()` cannot overflow; refusals are 400 problems.
    #[test]
    fn paging_parameters_are_bounded(q in query(), none in any::<bool>()) {
        let q = if none { None } else { Some(q.as_str()) };
        match PageRequest::from_query(q) {
            Ok(r) => {
                prop_assert!((1..=MAX_PAGE).contains(&r.page) && (1..=MAX_LIMIT).contains(&r.limit), "{:?}", r);
                prop_assert!(r.offset() < MAX_PAGE * MAX_LIMIT);
            }
            Err(p) => prop_assert_eq!(p.status, 400),
        }
        match ListRequest::from_query(q) {
            Ok(ListRequest::Offset(r)) => prop_assert!((1..=MAX_PAGE).contains(&r.page) && (1..=MAX_LIMIT).contains(&r.limit)),
            Ok(ListRequest::Cursor { cursor, limit }) => {
                prop_assert!((1..=MAX_LIMIT).contains(&limit));
                prop_assert!(cursor.is_none_or(|c| !c.is_empty()));
            }
            Err(p) => prop_assert_eq!(p.status, 400),
        }
    }

    #[test]
    fn valid_paging_parameters_are_read(page in 1..=MAX_PAGE, limit in 1..=MAX_LIMIT, pad in " {0,2}") {
        let q = format!("limit={pad}{limit}{pad}&page={page}");
        prop_assert_eq!(PageRequest::from_query(Some(&q)).unwrap(), PageRequest { page, limit });
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------------

fn is_valid_key(k: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&k.len()) && k.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The RFC 8941 sf-string form of `key`.
fn sf_string(key: &str) -> String {
    format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

fn key_header() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        3 => hostile_header(),
        2 => "[ -~]{0,260}".prop_map(|s| header_value(s.as_bytes())),
        2 => "[ -~]{0,260}".prop_map(|s| header_value(sf_string(&s).as_bytes())),
        1 => "[\"\\\\a \t]{0,12}".prop_map(|s| header_value(s.as_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| header_value(&b)),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    /// Any header bytes: never a panic; an accepted key is 1-255 printable ASCII.
    #[test]
    fn idempotency_keys_accepted_only_when_well_formed(raw in prop::collection::vec(any::<u8>(), 0..300), text in hostile_text()) {
        for bytes in [&raw[..], text.as_bytes()] {
            if let Ok(k) = IdempotencyKey::parse(bytes) {
                prop_assert!(is_valid_key(k.as_str()), "{:?}", k);
            }
        }
    }

    /// Every valid key survives the sf-string form exactly, and the bare form when it has no
    /// quote and no surrounding blanks.
    #[test]
    fn idempotency_keys_round_trip(key in "[ -~]{1,255}") {
        let quoted = IdempotencyKey::parse(sf_string(&key).as_bytes()).unwrap();
        prop_assert_eq!(quoted.as_str(), key.as_str());
        if !key.contains('"') && key.trim() == key {
            let bare = IdempotencyKey::parse(key.as_bytes()).unwrap();
            prop_assert_eq!(bare.as_str(), key.as_str());
        }
    }

    /// `from_headers` / `required` over either header, repeated, disagreeing or absent.
    #[test]
    fn idempotency_key_headers(
        ietf in prop::collection::vec(key_header(), 0..3),
        catalog in prop::collection::vec(key_header(), 0..3),
    ) {
        let mut h = HeaderMap::new();
        for v in &ietf {
            h.append(IDEMPOTENCY_KEY, v.clone());
        }
        for v in &catalog {
            h.append(X_IDEMPOTENCY_KEY, v.clone());
        }
        let parse = |v: &HeaderValue| IdempotencyKey::parse(v.as_bytes()).ok();
        let from = IdempotencyKey::from_headers(&h);
        let required = IdempotencyKey::required(&h);
        match &from {
            Ok(Some(k)) => {
                prop_assert!(is_valid_key(k.as_str()));
                prop_assert!(ietf.len() <= 1 && catalog.len() <= 1);
                for v in ietf.iter().chain(&catalog) {
                    prop_assert_eq!(parse(v), Some(k.clone()));
                }
                prop_assert_eq!(required.as_ref().ok(), Some(k));
            }
            Ok(None) => {
                prop_assert!(ietf.is_empty() && catalog.is_empty());
                prop_assert_eq!(required.map_err(|p| p.status), Err(400));
            }
            Err(p) => {
                prop_assert_eq!(p.status, 400);
                prop_assert_eq!(required.map_err(|p| p.status), Err(400));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Correlation ids and traceparent
// ---------------------------------------------------------------------------------------------

fn id_oracle(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@/+=".contains(c))
}

fn nonzero_hex(len: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<u8>(), len)
        .prop_filter("non-zero id", |b| b.iter().any(|x| *x != 0))
        .prop_map(hex::encode)
}

fn traceparent() -> impl Strategy<Value = TraceParent> {
    (nonzero_hex(16), nonzero_hex(8), any::<u8>()).prop_map(|(trace_id, span_id, flags)| TraceParent {
        trace_id,
        span_id,
        flags,
    })
}

fn traceparent_like() -> impl Strategy<Value = String> {
    prop_oneof![
        hostile_text(),
        "[0-9a-fA-Fx-]{50,60}",
        "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.{0,10})?",
        (traceparent(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(t, i, c)| {
            let mut chars: Vec<char> = t.to_string().chars().collect();
            let i = i.index(chars.len());
            chars[i] = c;
            chars.into_iter().collect()
        }),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn correlation_ids_follow_the_documented_rule(v in prop_oneof![hostile_text(), "[A-Za-z0-9._:@/+=; -]{0,140}"]) {
        prop_assert_eq!(valid_id(&v), id_oracle(&v));
    }

    /// Arbitrary strings: never a panic; whatever is accepted is well-formed and prints back to
    /// a `traceparent` that parses to the same value.
    #[test]
    fn traceparent_parse_is_total(v in traceparent_like()) {
        if let Some(t) = TraceParent::parse(&v) {
            let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            prop_assert!(t.trace_id.len() == 32 && lower_hex(&t.trace_id) && t.trace_id != "0".repeat(32));
            prop_assert!(t.span_id.len() == 16 && lower_hex(&t.span_id) && t.span_id != "0".repeat(16));
            prop_assert!(!v.trim_matches([' ', '\t']).starts_with("ff"));
            prop_assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        }
    }

    /// W3C Trace Context: valid ones round-trip (also with blanks around, or as a later version
    /// with more fields); `ff`, zero ids, uppercase, and version 00 with extra fields do not.
    #[test]
    fn traceparent_follows_w3c(
        t in traceparent(),
        version in (1u8..=0xfe).prop_map(|v| format!("{v:02x}")),
        extra in "-[ -~]{0,20}",
        blanks in "[ \t]{0,3}",
    ) {
        let s = t.to_string();
        prop_assert_eq!(TraceParent::parse(&s), Some(t.clone()));
        prop_assert_eq!(TraceParent::parse(&format!("{blanks}{s}{blanks}")), Some(t.clone()));
        let later = format!("{version}{}", &s[2..]);
        prop_assert_eq!(TraceParent::parse(&later), Some(t.clone()));
        prop_assert_eq!(TraceParent::parse(&format!("{later}{extra}")), Some(t.clone()));
        prop_assert_eq!(TraceParent::parse(&format!("ff{}", &s[2..])), None);
        prop_assert_eq!(TraceParent::parse(&format!("{s}{extra}")), None);
        prop_assert_eq!(TraceParent::parse(&format!("00-{}-{}-01", "0".repeat(32), t.span_id)), None);
        prop_assert_eq!(TraceParent::parse(&format!("00-{}-{}-01", t.trace_id, "0".repeat(16))), None);
        if s.bytes().any(|b| b.is_ascii_lowercase()) {
            prop_assert_eq!(TraceParent::parse(&s.to_uppercase()), None);
        }
        prop_assert_eq!(TraceParent::parse(&format!("{later}x")), None);
    }

    /// The request headers: never a panic; kept ids are valid, others replaced by fresh UUIDs;
    /// the trace continues a valid caller trace, else starts fresh.
    #[test]
    fn correlation_headers_are_sanitised(
        corr in prop::option::of(hostile_header()),
        req in prop::option::of(hostile_header()),
        cause in prop::option::of(hostile_header()),
        trace in prop::option::of(prop_oneof![
            traceparent_like().prop_map(|s| header_value(s.as_bytes())),
            traceparent().prop_map(|t| HeaderValue::from_str(&t.to_string()).unwrap()),
        ]),
    ) {
        let mut h = HeaderMap::new();
        for (name, v) in [
            (correlation::CORRELATION_ID, &corr),
            (correlation::REQUEST_ID, &req),
            (correlation::CAUSATION_ID, &cause),
            (correlation::TRACEPARENT, &trace),
        ] {
            if let Some(v) = v {
                h.insert(name, v.clone());
            }
        }
        let c = Correlation::from_headers(&h);
        fn kept(v: &Option<HeaderValue>) -> Option<&str> {
            v.as_ref().and_then(|v| v.to_str().ok()).filter(|s| valid_id(s))
        }
        for (got, sent) in [(&c.correlation_id, &corr), (&c.request_id, &req)] {
            prop_assert!(valid_id(got));
            match kept(sent) {
                Some(s) => prop_assert_eq!(got.as_str(), s),
                None => prop_assert!(uuid::Uuid::parse_str(got).is_ok()),
            }
        }
        prop_assert_eq!(c.caused_by.as_deref(), kept(&cause));
        prop_assert_eq!(TraceParent::parse(&c.trace.to_string()), Some(c.trace.clone()));
        if let Some(parent) = trace.as_ref().and_then(|v| v.to_str().ok()).and_then(TraceParent::parse) {
            prop_assert_eq!(&c.trace.trace_id, &parent.trace_id);
        }
        for (name, value) in c.outgoing_headers() {
            prop_assert!(HeaderValue::from_str(&value).is_ok(), "{}: {:?}", name, value);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The event envelope
// ---------------------------------------------------------------------------------------------

const ATTRIBUTES: [&str; 10] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "correlationid",
    "causationid",
];

/// Objects that look like envelopes: the attribute names with values of every kind.
fn envelope_like() -> impl Strategy<Value = Value> {
    let value = prop_oneof![
        Just(json!("1.0")),
        Just(json!("")),
        Just(json!("2026-01-01T00:00:00Z")),
        Just(json!("+275760-09-13T00:00:00Z")),
        any::<String>().prop_map(Value::String),
        json_value(),
    ];
    let key = prop_oneof![
        4 => prop::sample::select(ATTRIBUTES.to_vec()).prop_map(str::to_owned),
        1 => any::<String>(),
    ];
    prop::collection::btree_map(key, value, 0..12).prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Well-formed events. `data` is never a top-level `null` (see `null_data_round_trips`).
fn event() -> impl Strategy<Value = Event> {
    let text = || any::<String>();
    let non_empty = || "\\PC{1,40}";
    let time = (
        prop_oneof![
            0i64..4_102_444_800,
            DateTime::<Utc>::MIN_UTC.timestamp()..DateTime::<Utc>::MAX_UTC.timestamp()
        ],
        0u32..1_000_000_000,
    )
        .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap());
    let extension_key = any::<String>().prop_filter("not an attribute", |k| !ATTRIBUTES.contains(&k.as_str()));
    (
        (non_empty(), non_empty(), non_empty(), prop::option::of(text())),
        prop::option::of(time),
        prop::option::of(text()),
        prop::option::of(exact_json_value().prop_filter("not null", |v| !v.is_null())),
        (prop::option::of(text()), prop::option::of(text())),
        prop::collection::btree_map(extension_key, exact_json_value(), 0..4),
    )
        .prop_map(
            |((id, source, ty, subject), time, datacontenttype, data, (correlationid, causationid), extensions)| {
                Event {
                    specversion: "1.0".to_owned(),
                    id,
                    source,
                    ty,
                    subject,
                    time,
                    datacontenttype,
                    data,
                    correlationid,
                    causationid,
                    extensions,
                }
            },
        )
}

proptest! {
    #![proptest_config(config(2000))]

    /// Arbitrary bytes and arbitrary JSON: never a panic; anything accepted is a valid event.
    #[test]
    fn events_from_arbitrary_json(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        value in prop_oneof![json_value(), envelope_like()],
        cut in any::<prop::sample::Index>(),
    ) {
        let encoded = serde_json::to_vec(&value).unwrap();
        let truncated = &encoded[..cut.index(encoded.len() + 1)];
        for input in [&bytes[..], &encoded, truncated] {
            if let Ok(e) = Event::from_json(input) {
                prop_assert_eq!(e.specversion.as_str(), "1.0");
                prop_assert!(!e.id.is_empty() && !e.source.is_empty() && !e.ty.is_empty());
                prop_assert!(e.validate().is_ok());
            }
        }
    }

    #[test]
    fn events_round_trip(e in event()) {
        let json = e.to_json();
        let back = Event::from_json(&json).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(back.to_json(), json);
    }
}

/// Nesting far beyond serde_json's recursion limit (128) is an error, not a stack overflow,
/// wherever it is: at the top, in `data`, in an extension attribute, in objects.
#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let head = r#"{"specversion":"1.0","id":"1","source":"s","type":"t","#;
    for depth in [129, 10_000, 100_000, 1_000_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        let unclosed = "[".repeat(depth);
        for doc in [
            arrays.clone(),
            objects.clone(),
            unclosed.clone(),
            format!(r#"{head}"data":{arrays}}}"#),
            format!(r#"{head}"data":{objects}}}"#),
            format!(r#"{head}"ext":{arrays}}}"#),
            format!(r#"{head}"ext":{unclosed}"#),
        ] {
            assert!(Event::from_json(doc.as_bytes()).is_err(), "depth {depth}");
        }
    }
    // Nesting within the limit is fine.
    let ok = format!(r#"{head}"data":{}{}}}"#, "[".repeat(100), "]".repeat(100));
    assert!(Event::from_json(ok.as_bytes()).is_ok());
}

#[test]
fn malformed_envelopes_are_errors() {
    let head = r#"{"specversion":"1.0","id":"1","source":"s","type":"t""#;
    for doc in [
        &b""[..],
        b"\xff\xfe",
        b"null",
        b"[]",
        b"\"1.0\"",
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t""#,
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":NaN}"#,
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"+275760-09-13T00:00:00Z"}"#,
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-13-01T00:00:00Z"}"#,
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":1e999}"#,
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","id":"2"}"#,
        br#"{"specversion":"1.0","id":1,"source":"s","type":"t"}"#,
        br#"{"specversion":"1.0","id":"\ud800","source":"s","type":"t"}"#,
        br#"{"specversion":"1.0","id":"\u0000","source":"","type":"t"}"#,
        "{\"specversion\":\"1.0\",\"id\":\"caf\u{e9}\",\"source\":\"s\",\"type\":\"t\"} trailing".as_bytes(),
    ] {
        assert!(Event::from_json(doc).is_err(), "{}", String::from_utf8_lossy(doc));
    }
    // Huge numbers are kept as floats or rejected, never a panic.
    for n in ["1e308", "-1e308", "18446744073709551616", &"9".repeat(10_000)] {
        let _ = Event::from_json(format!(r#"{head},"data":{n}}}"#).as_bytes());
    }
}

/// KNOWN ISSUE (not a panic, reported): serde_json without its `float_roundtrip` feature may
/// read a float back 1 ULP off, so an event whose data holds such a float does not round-trip
/// through its own JSON (the outbox changes the payload). Run with `--ignored` to see it.
#[test]
fn float_data_round_trips() {
    let e = Event::new("t", "s", json!({"x": -4.9575210564148274e45}));
    assert_eq!(Event::from_json(&e.to_json()).unwrap(), e);
}

/// KNOWN ISSUE (not a panic, reported): an event made with `data: null`
/// (`Event::new(ty, source, Value::Null)`) comes back from its own JSON with `data: None`,
/// because `Option<Value>` reads `null` as `None`. Run with `--ignored` to see it.
#[test]
fn null_data_round_trips() {
    let e = Event::new("t", "s", Value::Null);
    assert_eq!(Event::from_json(&e.to_json()).unwrap(), e);
}
