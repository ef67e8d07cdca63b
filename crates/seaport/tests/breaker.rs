//! The circuit breaker on tokio's paused clock (no real sleeping), plus two tests against real
//! HTTP servers on loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use seaport::breaker::{
    BreakerError, CircuitBreaker, CircuitBreakerLayer, CircuitOpen, Classify, HttpClassifier, State, Window,
};
use tower::{Layer, Service, ServiceExt};

#[derive(Debug, PartialEq)]
struct Boom;

/// Runs one call that fails or succeeds, counting invocations of the inner call.
async fn run(breaker: &CircuitBreaker, calls: &AtomicUsize, fail: bool) -> Result<(), BreakerError<Boom>> {
    breaker
        .call(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            if fail { Err(Boom) } else { Ok(()) }
        })
        .await
}

async fn fail_times(breaker: &CircuitBreaker, n: usize) {
    let calls = AtomicUsize::new(0);
    for _ in 0..n {
        assert!(matches!(
            run(breaker, &calls, true).await,
            Err(BreakerError::Inner(Boom))
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn opens_at_the_consecutive_failure_threshold() {
    let breaker = CircuitBreaker::builder("dep").build();
    assert_eq!(breaker.config().failure_threshold, 5);
    let calls = AtomicUsize::new(0);

    // A success in between starts the count again.
    fail_times(&breaker, 4).await;
    run(&breaker, &calls, false).await.unwrap();
    assert_eq!(breaker.snapshot().consecutive_failures, 0);

    fail_times(&breaker, 4).await;
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().consecutive_failures, 4);
    fail_times(&breaker, 1).await;
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn rejects_while_open_without_calling_the_dependency() {
    let breaker = CircuitBreaker::builder("crm")
        .recovery_timeout(Duration::from_secs(30))
        .build();
    fail_times(&breaker, 5).await;

    let calls = AtomicUsize::new(0);
    let err = run(&breaker, &calls, false).await.unwrap_err();
    assert_eq!(
        err.as_open(),
        Some(&CircuitOpen {
            name: "crm".into(),
            retry_after: Duration::from_secs(30)
        })
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    match run(&breaker, &calls, false).await {
        Err(BreakerError::Open(open)) => assert_eq!(open.retry_after, Duration::from_secs(20)),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the dependency must not be called while open"
    );
    let snapshot = breaker.snapshot();
    assert_eq!((snapshot.rejected, snapshot.retry_after_ms), (2, Some(20_000)));
    assert_eq!(
        err.as_open().unwrap().to_string(),
        "circuit breaker `crm` is open; retry after 30s"
    );
}

#[tokio::test(start_paused = true)]
async fn half_opens_after_the_recovery_timeout_and_bounds_the_probes() {
    let breaker = CircuitBreaker::builder("dep")
        .recovery_timeout(Duration::from_secs(30))
        .half_open_max_calls(2)
        .build();
    fail_times(&breaker, 5).await;

    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(breaker.state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(breaker.state(), State::HalfOpen);

    // Two probes in flight, held open by channels; the third caller is turned away.
    let invoked = Arc::new(AtomicUsize::new(0));
    let mut releases = Vec::new();
    let mut probes = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        releases.push(tx);
        let (breaker, invoked) = (breaker.clone(), invoked.clone());
        probes.push(tokio::spawn(async move {
            breaker
                .call(|| async move {
                    invoked.fetch_add(1, Ordering::SeqCst);
                    rx.await.map_err(|_| Boom)
                })
                .await
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(invoked.load(Ordering::SeqCst), 2);
    assert_eq!(breaker.snapshot().half_open_calls, 2);

    let calls = AtomicUsize::new(0);
    assert!(run(&breaker, &calls, false).await.unwrap_err().is_open());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(breaker.try_acquire().is_err());

    // The probes succeed: closed again.
    for tx in releases {
        tx.send(()).unwrap();
    }
    for probe in probes {
        probe.await.unwrap().unwrap();
    }
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_frees_its_slot() {
    let breaker = CircuitBreaker::builder("dep").build();
    fail_times(&breaker, 5).await;
    tokio::time::advance(Duration::from_secs(30)).await;

    let probe = breaker.try_acquire().unwrap();
    assert!(probe.is_probe());
    assert!(breaker.try_acquire().is_err());
    drop(probe);
    assert_eq!(breaker.state(), State::HalfOpen);
    breaker.try_acquire().expect("the slot is free again").success();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn closes_when_the_probe_succeeds() {
    let breaker = CircuitBreaker::builder("dep").build();
    fail_times(&breaker, 5).await;
    tokio::time::advance(Duration::from_secs(30)).await;

    let calls = AtomicUsize::new(0);
    run(&breaker, &calls, false).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
    // Closed means a fresh count: four failures do not reopen it.
    fail_times(&breaker, 4).await;
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn reopens_when_the_probe_fails_and_restarts_the_timer() {
    let breaker = CircuitBreaker::builder("dep")
        .recovery_timeout(Duration::from_secs(30))
        .build();
    fail_times(&breaker, 5).await;
    tokio::time::advance(Duration::from_secs(45)).await;
    assert_eq!(breaker.state(), State::HalfOpen);

    fail_times(&breaker, 1).await;
    assert_eq!(breaker.state(), State::Open);
    let open = breaker.try_acquire().unwrap_err();
    assert_eq!(
        open.retry_after,
        Duration::from_secs(30),
        "the recovery timer starts again"
    );

    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(breaker.state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_from_before_the_opening_does_not_move_the_state() {
    let breaker = CircuitBreaker::builder("dep").build();
    let slow = breaker.try_acquire().unwrap();
    fail_times(&breaker, 5).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(breaker.state(), State::HalfOpen);
    // Its success is counted, but it is no probe: the circuit stays half-open.
    slow.success();
    assert_eq!(breaker.state(), State::HalfOpen);
    assert_eq!(breaker.snapshot().successes, 1);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_a_count_window_opens_without_consecutive_failures() {
    let breaker = CircuitBreaker::builder("dep")
        .failure_rate(0.5, Window::Count(10))
        .minimum_calls(10)
        .build();
    let calls = AtomicUsize::new(0);
    for i in 0..9 {
        let _ = run(&breaker, &calls, i % 2 == 1).await;
    }
    // 4 of 9: below the minimum number of calls.
    assert_eq!(breaker.state(), State::Closed);
    let _ = run(&breaker, &calls, true).await;
    assert_eq!(
        breaker.state(),
        State::Open,
        "5 of 10 calls failed: 50% reaches the threshold"
    );

    // The window slides: only the last N calls count.
    let breaker = CircuitBreaker::builder("dep")
        .failure_rate(0.75, Window::Count(4))
        .build();
    for fail in [true, true, false, false, false, false, true, true] {
        let _ = run(&breaker, &calls, fail).await;
    }
    let snapshot = breaker.snapshot();
    assert_eq!(
        (snapshot.state, snapshot.window_calls, snapshot.window_failures),
        (State::Closed, 4, 2)
    );
    let _ = run(&breaker, &calls, true).await;
    assert_eq!(breaker.state(), State::Open, "3 of the last 4 failed");
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_a_time_window_forgets_old_calls() {
    let window = Window::Time(Duration::from_secs(60));
    let calls = AtomicUsize::new(0);

    // Alternating success and failure at 50% opens it once the minimum is reached.
    let breaker = CircuitBreaker::builder("dep")
        .failure_rate(0.5, window)
        .minimum_calls(6)
        .build();
    for i in 0..6 {
        assert_eq!(breaker.state(), State::Closed);
        let _ = run(&breaker, &calls, i % 2 == 1).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(breaker.state(), State::Open);

    // Old failures fall out of the window.
    let breaker = CircuitBreaker::builder("dep")
        .failure_rate(0.5, window)
        .minimum_calls(4)
        .build();
    fail_times(&breaker, 3).await;
    assert_eq!(breaker.snapshot().window_failures, 3);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(breaker.snapshot().window_calls, 0);
    // Had the three failures still counted, this would be 3 of 5 (60%).
    for fail in [false, false, true, false] {
        let _ = run(&breaker, &calls, fail).await;
    }
    let snapshot = breaker.snapshot();
    assert_eq!(
        (snapshot.state, snapshot.window_calls, snapshot.window_failures),
        (State::Closed, 4, 1)
    );
    // 3 of 6 now: 50%.
    fail_times(&breaker, 2).await;
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn fallback_is_used_while_open() {
    let breaker = CircuitBreaker::builder("prices").failure_threshold(1).build();
    let invoked = AtomicUsize::new(0);
    let fetch = |fail: bool| {
        let invoked = &invoked;
        move || async move {
            invoked.fetch_add(1, Ordering::SeqCst);
            if fail { Err(Boom) } else { Ok("fresh") }
        }
    };

    assert_eq!(
        breaker.call_with_fallback(fetch(false), |_| "cached").await,
        Ok("fresh")
    );
    // The call's own error is not replaced by the fallback.
    assert_eq!(breaker.call_with_fallback(fetch(true), |_| "cached").await, Err(Boom));
    assert_eq!(breaker.state(), State::Open);

    let mut seen = None;
    let value = breaker
        .call_with_fallback(fetch(false), |open| {
            seen = Some(open);
            "cached"
        })
        .await;
    assert_eq!(value, Ok("cached"));
    assert_eq!(seen.map(|open| open.name), Some("prices".to_owned()));
    assert_eq!(invoked.load(Ordering::SeqCst), 2);
}

/// A fake HTTP dependency: answers with the status in the path (`/503`), or hangs on `/hang`
/// until the client-side timeout that a real HTTP client would apply.
async fn fake_http(req: http::Request<()>) -> Result<http::Response<()>, tokio::time::error::Elapsed> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    tokio::time::timeout(Duration::from_secs(5), async move {
        if path == "hang" {
            std::future::pending::<()>().await;
        }
        let status = StatusCode::from_u16(path.parse().unwrap()).unwrap();
        http::Response::builder().status(status).body(()).unwrap()
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn http_classification_4xx_do_not_count_5xx_and_timeouts_do() {
    let breaker = CircuitBreaker::builder("api").build();
    let mut svc = CircuitBreakerLayer::http(breaker.clone()).layer(tower::service_fn(fake_http));
    let mut send = async |path: &str| {
        let req = http::Request::get(path).body(()).unwrap();
        svc.ready().await.unwrap().call(req).await
    };

    for path in ["/400", "/404", "/409", "/422", "/429", "/404", "/200"] {
        assert!(send(path).await.is_ok());
    }
    let snapshot = breaker.snapshot();
    assert_eq!(
        (snapshot.state, snapshot.failures, snapshot.successes),
        (State::Closed, 0, 7)
    );

    for path in ["/500", "/503"] {
        assert_eq!(
            send(path).await.unwrap().status().as_u16(),
            path[1..].parse::<u16>().unwrap()
        );
    }
    // The paused clock runs the 5 s timeouts out at once.
    for _ in 0..2 {
        assert!(matches!(send("/hang").await, Err(BreakerError::Inner(_))));
    }
    assert_eq!(breaker.snapshot().consecutive_failures, 4);
    send("/502").await.unwrap();
    assert_eq!(breaker.state(), State::Open);
    assert!(send("/200").await.unwrap_err().is_open());
}

/// Starts an axum server on loopback answering `status` to every request; returns its address and
/// how many requests it saw.
async fn serve(status: StatusCode, delay: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let app = Router::new().route(
        "/{*path}",
        get(move || {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                (status, "dependency says no")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

#[tokio::test]
async fn layer_over_reqwest_stops_calling_a_failing_server() {
    let (addr, hits) = serve(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    let client = reqwest::Client::new();
    let http = tower::service_fn(move |req: reqwest::Request| {
        let client = client.clone();
        async move { client.execute(req).await }
    });
    let breaker = CircuitBreaker::builder("upstream")
        .failure_threshold(3)
        .recovery_timeout(Duration::from_millis(100))
        .build();
    let mut svc = CircuitBreakerLayer::http(breaker.clone()).layer(http);
    let url = reqwest::Url::parse(&format!("http://{addr}/orders")).unwrap();

    let mut responses = 0;
    let err = loop {
        let req = reqwest::Request::new(reqwest::Method::GET, url.clone());
        match svc.ready().await.unwrap().call(req).await {
            Ok(response) => {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                responses += 1;
                assert!(responses <= 3, "still closed after {responses} 503s");
            }
            Err(e) => break e,
        }
    };
    assert!(err.is_open(), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    for _ in 0..5 {
        let req = reqwest::Request::new(reqwest::Method::GET, url.clone());
        assert!(svc.ready().await.unwrap().call(req).await.unwrap_err().is_open());
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "no request reaches the server while open"
    );

    // After the recovery timeout a single probe goes through, still gets 503, and reopens.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(breaker.state(), State::HalfOpen);
    let req = reqwest::Request::new(reqwest::Method::GET, url.clone());
    assert_eq!(
        svc.ready().await.unwrap().call(req).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn reqwest_outcomes_are_classified() {
    let is_failure = |outcome: Result<&reqwest::Response, &reqwest::Error>| HttpClassifier.is_failure(outcome);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();

    let (not_found, _) = serve(StatusCode::NOT_FOUND, Duration::ZERO).await;
    let response = client.get(format!("http://{not_found}/x")).send().await;
    assert!(!is_failure(response.as_ref()));
    // A 4xx turned into an error is still the caller's problem.
    let status_error = response.unwrap().error_for_status();
    assert!(!is_failure(status_error.as_ref()));

    let (unavailable, _) = serve(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    let response = client.get(format!("http://{unavailable}/x")).send().await;
    assert!(is_failure(response.as_ref()));
    assert!(is_failure(response.unwrap().error_for_status().as_ref()));

    let (slow, _) = serve(StatusCode::OK, Duration::from_secs(30)).await;
    let timeout = client.get(format!("http://{slow}/x")).send().await;
    assert!(timeout.as_ref().unwrap_err().is_timeout());
    assert!(is_failure(timeout.as_ref()));

    // Nothing listens on a port just released: a transport error.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = client.get(format!("http://{port}/x")).send().await;
    assert!(is_failure(refused.as_ref()));

    // A request that could not even be built is the caller's bug.
    let bad = client.get("not a url").send().await;
    assert!(!is_failure(bad.as_ref()));
}

/// A minimal `metrics` recorder: every counter and gauge by name and sorted labels.
#[derive(Default)]
struct TestRecorder(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl TestRecorder {
    fn handle(&self, key: &metrics::Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        let id = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(id).or_default().clone()
    }

    fn counter(&self, id: &str) -> u64 {
        self.0.lock().unwrap().get(id).map_or(0, |v| v.load(Ordering::SeqCst))
    }

    fn gauge(&self, id: &str) -> f64 {
        f64::from_bits(self.counter(id))
    }
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.handle(key))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.handle(key))
    }

    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[tokio::test(start_paused = true)]
async fn transitions_are_observable_by_watch_snapshot_and_metrics() {
    let recorder = TestRecorder::default();
    // The local recorder covers synchronous code only, so the calls go through permits here.
    let breaker = metrics::with_local_recorder(&recorder, || {
        CircuitBreaker::builder("obs")
            .failure_threshold(2)
            .recovery_timeout(Duration::from_secs(5))
            .build()
    });
    let mut rx = breaker.watch();
    assert_eq!(*rx.borrow_and_update(), State::Closed);
    assert_eq!(recorder.gauge("seaport_circuit_breaker_state{name=obs}"), 0.0);

    metrics::with_local_recorder(&recorder, || {
        breaker.try_acquire().unwrap().success();
        breaker.try_acquire().unwrap().failure();
        breaker.try_acquire().unwrap().failure();
        assert!(breaker.try_acquire().is_err());
    });
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), State::Open);
    assert_eq!(recorder.gauge("seaport_circuit_breaker_state{name=obs}"), 1.0);

    let open = breaker.snapshot();
    assert_eq!(
        serde_json::to_value(&open).unwrap(),
        serde_json::json!({
            "name": "obs", "state": "open", "consecutive_failures": 0, "window_calls": 0, "window_failures": 0,
            "half_open_calls": 0, "retry_after_ms": 5000, "in_state_ms": 0,
            "successes": 1, "failures": 2, "rejected": 1, "transitions": 1
        })
    );

    tokio::time::advance(Duration::from_secs(5)).await;
    metrics::with_local_recorder(&recorder, || {
        assert_eq!(breaker.state(), State::HalfOpen);
    });
    assert_eq!(*rx.borrow_and_update(), State::HalfOpen);
    assert_eq!(recorder.gauge("seaport_circuit_breaker_state{name=obs}"), 2.0);

    metrics::with_local_recorder(&recorder, || breaker.try_acquire().unwrap().success());
    assert_eq!(*rx.borrow_and_update(), State::Closed);
    assert_eq!(recorder.gauge("seaport_circuit_breaker_state{name=obs}"), 0.0);

    let snapshot = breaker.snapshot();
    assert_eq!(
        (snapshot.state, snapshot.transitions, snapshot.successes),
        (State::Closed, 3, 2)
    );
    for (from, to) in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")] {
        let id = format!("seaport_circuit_breaker_transitions_total{{from={from},name=obs,to={to}}}");
        assert_eq!(recorder.counter(&id), 1, "{id}");
    }
    for (outcome, n) in [("success", 2), ("failure", 2), ("rejected", 1)] {
        assert_eq!(
            recorder.counter(&format!(
                "seaport_circuit_breaker_calls_total{{name=obs,outcome={outcome}}}"
            )),
            n
        );
    }
}

/// The breaker fits any `Service`; here a plain one whose error is `Infallible`.
#[tokio::test(start_paused = true)]
async fn layer_with_a_custom_classifier() {
    let breaker = CircuitBreaker::builder("custom").failure_threshold(2).build();
    let inner = tower::service_fn(|n: u32| async move { Ok::<u32, Infallible>(n) });
    // Odd answers count as failures.
    let classifier =
        seaport::breaker::classify_fn(|outcome: Result<&u32, &Infallible>| outcome.is_ok_and(|n| n % 2 == 1));
    let svc = breaker.layer().with_classifier(classifier).layer(inner);
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);
    assert_eq!(svc.clone().oneshot(5).await.unwrap(), 5);
    assert!(svc.clone().oneshot(4).await.unwrap_err().is_open());
}
