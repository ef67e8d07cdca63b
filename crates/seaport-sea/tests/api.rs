//! The sea service over real HTTP, on the embedded default and on PostgreSQL + NATS JetStream.

mod common;

use common::{FAN_OUT, TestService, wait_for};
use seaport::testing::Kind;
use serde_json::{Value, json};

on_both_backends!(
    case_is_created_listed_fetched_and_traced_through_all_consumers,
    same_idempotency_key_replays_and_creates_nothing_new,
    concurrent_retries_with_one_key_create_one_case,
    bad_requests_get_problem_details,
    pagination_edges,
    invalid_correlation_ids_are_replaced_not_echoed,
    empty_collection_and_link_headers,
    cursor_paging_is_stable_under_inserts_and_tamper_evident,
);

async fn post_case(s: &TestService, key: &str, body: &Value) -> reqwest::Response {
    s.http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["status"], status);
    assert!(p["title"].is_string() && p["type"].is_string());
    p
}

async fn case_is_created_listed_fetched_and_traced_through_all_consumers(kind: Kind) {
    let s = TestService::start_on(kind).await;
    let res = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "create-1")
        .header("X-Correlation-Id", "corr-e2e-1")
        .json(&json!({"title": "Broken pump", "customer_id": "C-42", "description": "leaks"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["x-correlation-id"], "corr-e2e-1");
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let case: Value = res.json().await.unwrap();
    assert_eq!(location, format!("/cases/{}", case["id"].as_str().unwrap()));
    assert_eq!(
        (
            case["title"].as_str(),
            case["status"].as_str(),
            case["customer_id"].as_str()
        ),
        (Some("Broken pump"), Some("open"), Some("C-42"))
    );

    let fetched: Value = s.http.get(s.url(&location)).send().await.unwrap().json().await.unwrap();
    assert_eq!(fetched, case);
    let list: Value = s.http.get(s.url("/cases")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0], case);
    assert_eq!(
        list["pagination"],
        json!({"page": 1, "limit": 20, "total": 1, "totalPages": 1})
    );

    // The event, stamped with the request's correlation id, reaches all three consumers.
    let mut trace = Value::Null;
    wait_for("the trace to show all consumers", async || {
        let res = s.http.get(s.url("/trace/corr-e2e-1")).send().await.unwrap();
        if res.status() != 200 {
            return false;
        }
        trace = res.json().await.unwrap();
        trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["consumers"].as_array().unwrap().len() == 3)
            && trace["events"].as_array().unwrap().len() == 2
    })
    .await;
    let events = trace["events"].as_array().unwrap();
    assert_eq!(events[0]["type"], "sea.cases.created");
    assert_eq!(events[0]["subject"], case["id"]);
    assert_eq!(events[0]["depth"], 0);
    let mut seen: Vec<&str> = events[0]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["consumer"].as_str().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, FAN_OUT);
    // The notification it caused is the next level of the causal tree.
    assert_eq!(events[1]["type"], "sea.notifications.queued");
    assert_eq!(events[1]["causation_id"], events[0]["id"]);
    assert_eq!(events[1]["depth"], 1);

    // The stored event itself carries correlation and causation (the request id).
    let e = s.published("sea.cases.created").await.remove(0);
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["correlationid"], "corr-e2e-1");
    assert!(e["causationid"].is_string());
    s.stop().await;
}

async fn same_idempotency_key_replays_and_creates_nothing_new(kind: Kind) {
    let s = TestService::start_on(kind).await;
    let body = json!({"title": "t", "customer_id": "c"});
    let first = post_case(&s, "k-1", &body).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();

    // Both header names, and the IETF sf-string form, name the same key.
    let again = s
        .http
        .post(s.url("/cases"))
        .header("Idempotency-Key", "\"k-1\"")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.headers()["location"],
        format!("/cases/{}", first_body["id"].as_str().unwrap())
    );
    assert_eq!(again.json::<Value>().await.unwrap(), first_body);

    // Same key, different request: refused.
    let p = problem(
        post_case(&s, "k-1", &json!({"title": "other", "customer_id": "c"})).await,
        422,
    )
    .await;
    assert_eq!(p["type"], "/problems/idempotency-key-reused");

    // Another caller's identical key is a different key.
    let other = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "k-1")
        .header("X-Client-Id", "tenant-b")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 201);
    assert!(other.headers().get("idempotent-replayed").is_none());
    assert_ne!(other.json::<Value>().await.unwrap()["id"], first_body["id"]);

    let cases = s.count("SELECT COUNT(*) FROM cases").await;
    let events = s.published("sea.cases.created").await.len();
    assert_eq!((cases, events), (2, 2));
    s.stop().await;
}

async fn concurrent_retries_with_one_key_create_one_case(kind: Kind) {
    let s = TestService::start_on(kind).await;
    let body = json!({"title": "race", "customer_id": "c"});
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (http, url, body) = (s.http.clone(), s.url("/cases"), body.clone());
        handles.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("X-Idempotency-Key", "same")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").is_some();
            (status, retry_after, r.json::<Value>().await.unwrap())
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            (201, _, case) => ids.push(case["id"].clone()),
            (409, retry_after, problem) => {
                assert!(retry_after, "409 says when to retry");
                assert_eq!(problem["type"], "/problems/idempotency-key-in-flight");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!ids.is_empty());
    ids.dedup();
    assert_eq!(ids.len(), 1, "every 201 (original or replay) is the same case");
    assert_eq!(s.count("SELECT COUNT(*) FROM cases").await, 1);
    // After the first completed, a retry replays.
    let again = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "same")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], ids[0]);
    s.stop().await;
}

async fn bad_requests_get_problem_details(kind: Kind) {
    let s = TestService::start_on(kind).await;
    let ok = json!({"title": "t", "customer_id": "c"});
    let missing = s.http.post(s.url("/cases")).json(&ok).send().await.unwrap();
    assert_eq!(problem(missing, 400).await["type"], "/problems/idempotency-key-missing");
    let long_key = "k".repeat(300);
    problem(post_case(&s, &long_key, &ok).await, 400).await;
    let syntax = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "a")
        .header("content-type", "application/json")
        .body("{\"title\": ")
        .send()
        .await
        .unwrap();
    problem(syntax, 400).await;
    let p = problem(post_case(&s, "b", &json!({"title": "t"})).await, 422).await;
    assert!(p["detail"].as_str().unwrap().contains("customer_id"));
    let p = problem(
        post_case(&s, "c", &json!({"title": "  ", "customer_id": ""})).await,
        422,
    )
    .await;
    let names: Vec<&str> = p["invalid-params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["title", "customer_id"]);
    problem(post_case(&s, "d", &json!({"title": 5, "customer_id": "c"})).await, 422).await;
    problem(post_case(&s, "e", &json!([1, 2])).await, 422).await;
    let xml = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "f")
        .header("content-type", "text/xml")
        .body("<a/>")
        .send()
        .await
        .unwrap();
    problem(xml, 415).await;
    // The server answers 413 without reading the whole body and closes that connection; use a
    // client that does not pool it for the next request.
    let one_shot = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let huge = one_shot
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "g")
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .unwrap();
    problem(huge, 413).await;

    problem(
        s.http
            .get(s.url("/cases/0190b7a2-0000-7000-8000-000000000000"))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    problem(s.http.get(s.url("/cases/not-a-uuid")).send().await.unwrap(), 400).await;
    problem(s.http.get(s.url("/nowhere")).send().await.unwrap(), 404).await;
    problem(s.http.get(s.url("/cases/%FF%FE")).send().await.unwrap(), 400).await;
    problem(s.http.get(s.url("/trace/%FF")).send().await.unwrap(), 400).await;
    problem(s.http.delete(s.url("/cases")).send().await.unwrap(), 405).await;
    problem(
        s.http.get(s.url("/trace/unknown-correlation")).send().await.unwrap(),
        404,
    )
    .await;
    for q in [
        "page=0",
        "page=-1",
        "limit=0",
        "limit=101",
        "page=abc",
        "limit=1.5",
        "page=99999999999999999999999",
    ] {
        let p = problem(s.http.get(s.url(&format!("/cases?{q}"))).send().await.unwrap(), 400).await;
        assert!(p["invalid-params"].is_array(), "{q}");
    }
    // Nothing was created by any of these.
    let cases = s.count("SELECT COUNT(*) FROM cases").await;
    assert_eq!(cases, 0);
    s.stop().await;
}

async fn pagination_edges(kind: Kind) {
    let s = TestService::start_on(kind).await;
    for i in 0..45 {
        assert_eq!(
            post_case(
                &s,
                &format!("p{i}"),
                &json!({"title": format!("case {i}"), "customer_id": "c"})
            )
            .await
            .status(),
            201
        );
    }
    let page = async |q: &str| -> Value {
        s.http
            .get(s.url(&format!("/cases?{q}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let p1 = page("").await;
    assert_eq!(
        p1["pagination"],
        json!({"page": 1, "limit": 20, "total": 45, "totalPages": 3})
    );
    assert_eq!(p1["data"].as_array().unwrap().len(), 20);
    assert_eq!(p1["data"][0]["title"], "case 0");
    let p3 = page("page=3").await;
    assert_eq!(p3["data"].as_array().unwrap().len(), 5);
    assert_eq!(p3["data"][4]["title"], "case 44");
    let p4 = page("page=4").await;
    assert_eq!(p4["data"], json!([]));
    assert_eq!(p4["pagination"]["totalPages"], 3);
    let all = page("limit=100").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 45);
    assert_eq!(all["pagination"]["totalPages"], 1);
    let one = page("limit=1&page=45").await;
    assert_eq!(one["data"][0]["title"], "case 44");
    assert_eq!(one["pagination"]["totalPages"], 45);
    s.stop().await;
}

async fn invalid_correlation_ids_are_replaced_not_echoed(kind: Kind) {
    let s = TestService::start_on(kind).await;
    let res = s
        .http
        .post(s.url("/cases"))
        .header("X-Idempotency-Key", "corr")
        .header("X-Correlation-Id", "evil\"id<script>")
        .json(&json!({"title": "t", "customer_id": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let echoed = res.headers()["x-correlation-id"].to_str().unwrap().to_owned();
    assert!(
        uuid::Uuid::parse_str(&echoed).is_ok(),
        "a fresh id replaced the invalid one"
    );
    let case: Value = res.json().await.unwrap();
    assert_eq!(case["correlation_id"], echoed);
    assert_eq!(
        s.published("sea.cases.created").await[0]["correlationid"],
        echoed.as_str()
    );
    let health: Value = s
        .http
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    s.stop().await;
}

async fn empty_collection_and_link_headers(kind: Kind) {
    let s = TestService::start_on(kind).await;
    let res = s.http.get(s.url("/cases")).send().await.unwrap();
    assert_eq!(
        res.headers()["link"],
        "</cases?page=1&limit=20>; rel=\"first\", </cases?page=1&limit=20>; rel=\"last\""
    );
    let empty: Value = res.json().await.unwrap();
    assert_eq!(
        empty,
        json!({"data": [], "pagination": {"page": 1, "limit": 20, "total": 0, "totalPages": 0}})
    );
    for i in 0..5 {
        assert_eq!(
            post_case(
                &s,
                &format!("l{i}"),
                &json!({"title": format!("c{i}"), "customer_id": "c"})
            )
            .await
            .status(),
            201
        );
    }
    let res = s.http.get(s.url("/cases?page=2&limit=2")).send().await.unwrap();
    assert_eq!(
        res.headers()["link"],
        "</cases?page=1&limit=2>; rel=\"first\", </cases?page=1&limit=2>; rel=\"prev\", </cases?page=3&limit=2>; rel=\"next\", </cases?page=3&limit=2>; rel=\"last\""
    );
    let last = s.http.get(s.url("/cases?page=3&limit=2")).send().await.unwrap();
    assert!(
        !last.headers()["link"].to_str().unwrap().contains("rel=\"next\""),
        "no next on the last page"
    );
    let last: Value = last.json().await.unwrap();
    assert_eq!(last["data"].as_array().unwrap().len(), 1);
    s.stop().await;
}

async fn cursor_paging_is_stable_under_inserts_and_tamper_evident(kind: Kind) {
    let s = TestService::start_on(kind).await;
    for i in 0..7 {
        assert_eq!(
            post_case(
                &s,
                &format!("c{i}"),
                &json!({"title": format!("case {i}"), "customer_id": "c"})
            )
            .await
            .status(),
            201
        );
    }
    let get =
        async |q: String| -> reqwest::Response { s.http.get(s.url(&format!("/cases?{q}"))).send().await.unwrap() };
    let first: Value = get("cursor=&limit=3".into()).await.json().await.unwrap();
    let titles = |v: &Value| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["title"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(titles(&first), ["case 0", "case 1", "case 2"]);
    let next = first["next_cursor"].as_str().unwrap().to_owned();
    // Rows inserted meanwhile do not shift the next page (they come at the end).
    for i in 7..10 {
        assert_eq!(
            post_case(
                &s,
                &format!("c{i}"),
                &json!({"title": format!("case {i}"), "customer_id": "c"})
            )
            .await
            .status(),
            201
        );
    }
    let mut seen = titles(&first);
    let mut cursor = next;
    loop {
        let page: Value = get(format!("cursor={cursor}&limit=3")).await.json().await.unwrap();
        seen.extend(titles(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let want: Vec<String> = (0..10).map(|i| format!("case {i}")).collect();
    assert_eq!(seen, want, "every case exactly once, in order");
    // A forged or garbled cursor is a 400 problem.
    let mut forged = first["next_cursor"].as_str().unwrap().to_owned().into_bytes();
    forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
    for bad in [String::from_utf8(forged).unwrap(), "garbage".into(), "%FF%FE".into()] {
        let res = get(format!("cursor={bad}&limit=3")).await;
        let p = problem(res, 400).await;
        assert_eq!(p["type"], "/problems/invalid-cursor");
    }
    problem(get("cursor=&page=2".into()).await, 400).await;
    s.stop().await;
}
