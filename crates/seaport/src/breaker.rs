//! Circuit Breaker: stop calling a dependency that keeps failing, so that callers fail fast (and
//! fall back) instead of queueing behind its timeouts, and the dependency gets room to recover.
//!
//! ```no_run
//! use std::time::Duration;
//! use seaport::breaker::{CircuitBreaker, CircuitBreakerLayer, Window};
//!
//! # async fn demo(client: reqwest::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let crm = CircuitBreaker::builder("crm")
//!     .failure_threshold(5)
//!     .failure_rate(0.5, Window::Time(Duration::from_secs(60)))
//!     .recovery_timeout(Duration::from_secs(30))
//!     .build();
//!
//! // Around any async call; `Err` counts as a failure.
//! let customer = crm.call_with_fallback(|| async { fetch(&client).await }, |_open| "cached".to_owned()).await?;
//!
//! // As a tower layer over an HTTP client: 5xx and transport errors count, 4xx do not.
//! let layer = CircuitBreakerLayer::http(crm.clone());
//! # let _ = (customer, layer); Ok(()) }
//! # async fn fetch(_: &reqwest::Client) -> Result<String, reqwest::Error> { Ok(String::new()) }
//! ```
//!
//! States: **closed** (calls pass; failures are counted) → **open** after `failure_threshold`
//! failures in a row, or once the failure rate over a sliding window reaches its threshold (calls
//! are rejected with [`CircuitOpen`] without reaching the dependency) → **half-open** once
//! `recovery_timeout` has passed (at most `half_open_max_calls` probes go through) → closed when
//! they all succeed, or open again (timer restarted) at the first probe failure.
//!
//! Open → half-open is taken lazily, by the first call, [`CircuitBreaker::state`] or
//! [`CircuitBreaker::snapshot`] after the timeout: no timer task runs, so a breaker costs nothing
//! while idle and needs no runtime to exist. All timing is `tokio::time::Instant`, so tests drive
//! it with tokio's paused clock.
//!
//! Every transition is logged (`tracing`) and recorded through the `metrics` facade: gauge
//! `seaport_circuit_breaker_state{name}` (0 closed, 1 open, 2 half-open), counters
//! `seaport_circuit_breaker_transitions_total{name,from,to}` and
//! `seaport_circuit_breaker_calls_total{name,outcome}` (`success`, `failure`, `rejected`).
//!
//! ## Why not a crate
//! `tower-resilience-circuitbreaker` (0.14, successor of `tower-circuitbreaker`) was the candidate.
//! It times everything with `std::time::Instant`, so tokio's paused clock cannot drive it and the
//! recovery tests would sleep for real; its failure model is consecutive failures *or* a rate, not
//! both; and it brings `tower-resilience-core`, `futures` and tower's `limit` feature for what is
//! one small state machine. `failsafe` has its own clock and no tower layer. So the breaker is
//! ours: one mutex-guarded state machine, never locked across an `.await`.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service};

/// The catalog's default: five failures in a row open the circuit.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// How long the circuit stays open before probing.
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// One probe at a time: a dependency that is just recovering should not get a burst.
pub const DEFAULT_HALF_OPEN_MAX_CALLS: u32 = 1;
/// Calls needed in the window before the failure rate counts: 1 failure of 1 call is no rate.
pub const DEFAULT_MINIMUM_CALLS: u32 = 10;

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// The value of the `seaport_circuit_breaker_state` gauge.
    pub fn gauge_value(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The call was not made: the circuit is open (or half-open with all probes taken). Callers
/// match on it to serve a cached or default value instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker `{name}` is open; retry after {retry_after:?}")]
pub struct CircuitOpen {
    pub name: String,
    /// While open: the time left until a probe is let through. While half-open with every probe
    /// slot taken: the recovery timeout, the longest wait should the probe fail.
    pub retry_after: Duration,
}

/// The error of a guarded call: rejected by the breaker, or the call's own error.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    #[error(transparent)]
    Open(#[from] CircuitOpen),
    #[error(transparent)]
    Inner(E),
}

impl<E> BreakerError<E> {
    pub fn is_open(&self) -> bool {
        matches!(self, BreakerError::Open(_))
    }

    pub fn as_open(&self) -> Option<&CircuitOpen> {
        match self {
            BreakerError::Open(open) => Some(open),
            BreakerError::Inner(_) => None,
        }
    }

    pub fn into_inner(self) -> Option<E> {
        match self {
            BreakerError::Open(_) => None,
            BreakerError::Inner(e) => Some(e),
        }
    }
}

/// Decides whether an outcome says something about the dependency's health. Only failures it
/// reports count against the circuit; everything else counts as a success.
pub trait Classify<T, E> {
    fn is_failure(&self, outcome: Result<&T, &E>) -> bool;
}

/// The default for plain calls: every `Err` is a failure.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrIsFailure;

impl<T, E> Classify<T, E> for ErrIsFailure {
    fn is_failure(&self, outcome: Result<&T, &E>) -> bool {
        outcome.is_err()
    }
}

/// For HTTP clients and services: errors (timeouts, connection and transport errors) and 5xx
/// responses are failures; 4xx are not, as a bad request is the caller's fault and says nothing
/// about the dependency (this includes 429; use [`classify_fn`] to count it).
///
/// Works for any `Service` answering `http::Response<B>` (the error, whatever its type, counts)
/// and for `reqwest::Response` / `reqwest::Error`, where a builder error (a bad URL) or a 4xx
/// turned into an error by `error_for_status` does not count.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpClassifier;

impl<B, E> Classify<http::Response<B>, E> for HttpClassifier {
    fn is_failure(&self, outcome: Result<&http::Response<B>, &E>) -> bool {
        match outcome {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        }
    }
}

impl Classify<reqwest::Response, reqwest::Error> for HttpClassifier {
    fn is_failure(&self, outcome: Result<&reqwest::Response, &reqwest::Error>) -> bool {
        match outcome {
            Ok(response) => response.status().is_server_error(),
            Err(e) if e.is_builder() => false,
            Err(e) => e.status().is_none_or(|status| status.is_server_error()),
        }
    }
}

/// A classifier from a closure; see [`classify_fn`].
#[derive(Clone, Copy, Debug)]
pub struct FnClassifier<F>(F);

/// A classifier from a closure `Fn(Result<&T, &E>) -> bool` (true = failure).
pub fn classify_fn<T, E, F>(f: F) -> FnClassifier<F>
where
    F: Fn(Result<&T, &E>) -> bool,
{
    FnClassifier(f)
}

impl<T, E, F> Classify<T, E> for FnClassifier<F>
where
    F: Fn(Result<&T, &E>) -> bool,
{
    fn is_failure(&self, outcome: Result<&T, &E>) -> bool {
        (self.0)(outcome)
    }
}

/// The sliding window over which the failure rate is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last N completed calls: suits steady traffic.
    Count(u32),
    /// The calls completed in the last D (kept in D/20 buckets, so memory does not grow with
    /// traffic): suits bursty traffic, where old calls should stop counting.
    Time(Duration),
}

/// Open when at least `threshold` (a fraction in `(0, 1]`) of the calls in `window` failed, once
/// the window holds `minimum_calls` (capped at N for a count window).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    pub threshold: f64,
    pub window: Window,
    pub minimum_calls: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Failures in a row that open the circuit; 0 turns this rule off.
    pub failure_threshold: u32,
    /// A failure-rate rule, checked alongside the consecutive one.
    pub failure_rate: Option<FailureRate>,
    pub recovery_timeout: Duration,
    /// Probes allowed per half-open period; all of them must succeed to close.
    pub half_open_max_calls: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            failure_rate: None,
            recovery_timeout: DEFAULT_RECOVERY_TIMEOUT,
            half_open_max_calls: DEFAULT_HALF_OPEN_MAX_CALLS,
        }
    }
}

impl Config {
    fn validate(&self) {
        assert!(
            self.half_open_max_calls > 0,
            "circuit breaker: half_open_max_calls must be at least 1"
        );
        if let Some(rate) = &self.failure_rate {
            assert!(
                rate.threshold > 0.0 && rate.threshold <= 1.0,
                "circuit breaker: the failure-rate threshold is a fraction in (0, 1], got {}",
                rate.threshold
            );
            match rate.window {
                Window::Count(n) => assert!(n > 0, "circuit breaker: empty count window"),
                Window::Time(d) => assert!(!d.is_zero(), "circuit breaker: empty time window"),
            }
        }
    }
}

/// Builds a [`CircuitBreaker`]; every setting defaults to the catalog's value.
#[derive(Clone, Debug)]
pub struct Builder {
    name: String,
    config: Config,
    minimum_calls: u32,
}

impl Builder {
    pub fn failure_threshold(mut self, failures_in_a_row: u32) -> Self {
        self.config.failure_threshold = failures_in_a_row;
        self
    }

    /// Also open when `threshold` (fraction, e.g. `0.5`) of the calls in `window` failed.
    pub fn failure_rate(mut self, threshold: f64, window: Window) -> Self {
        self.config.failure_rate = Some(FailureRate {
            threshold,
            window,
            minimum_calls: self.minimum_calls,
        });
        self
    }

    /// Calls the window must hold before the rate applies (default 10).
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = calls;
        if let Some(rate) = &mut self.config.failure_rate {
            rate.minimum_calls = calls;
        }
        self
    }

    pub fn recovery_timeout(mut self, timeout: Duration) -> Self {
        self.config.recovery_timeout = timeout;
        self
    }

    pub fn half_open_max_calls(mut self, probes: u32) -> Self {
        self.config.half_open_max_calls = probes;
        self
    }

    /// # Panics
    /// On a setting that cannot work: no probes, a rate outside `(0, 1]`, an empty window.
    pub fn build(self) -> CircuitBreaker {
        CircuitBreaker::new(self.name, self.config)
    }
}

/// Counts for dashboards and health endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub state: State,
    /// Failures in a row while closed (compared with `failure_threshold`).
    pub consecutive_failures: u32,
    /// Calls and failures in the failure-rate window (0 without a rate rule).
    pub window_calls: u32,
    pub window_failures: u32,
    /// Probes let through in this half-open period (in flight or succeeded).
    pub half_open_calls: u32,
    /// While open: milliseconds until a probe is let through.
    pub retry_after_ms: Option<u64>,
    /// Milliseconds since the last transition (or since creation).
    pub in_state_ms: u64,
    /// Totals since creation.
    pub successes: u64,
    pub failures: u64,
    pub rejected: u64,
    pub transitions: u64,
}

/// A circuit breaker; clones share one state, so clone it into every caller of a dependency.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: Arc<str>,
    config: Config,
    core: Mutex<Core>,
    tx: watch::Sender<State>,
}

struct Core {
    state: State,
    /// Bumped at every transition: a call admitted under an earlier state reports its outcome,
    /// but that outcome no longer moves the state (a slow call from before the circuit opened
    /// must not close it again).
    epoch: u64,
    changed_at: Instant,
    consecutive_failures: u32,
    window: Option<RateWindow>,
    probes_admitted: u32,
    probes_succeeded: u32,
    successes: u64,
    failures: u64,
    rejected: u64,
    transitions: u64,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &&*self.shared.name)
            .field("state", &self.shared.lock().state)
            .finish_non_exhaustive()
    }
}

impl CircuitBreaker {
    pub fn builder(name: impl Into<String>) -> Builder {
        Builder {
            name: name.into(),
            config: Config::default(),
            minimum_calls: DEFAULT_MINIMUM_CALLS,
        }
    }

    /// # Panics
    /// On a config that cannot work (see [`Builder::build`]).
    pub fn new(name: impl Into<String>, config: Config) -> Self {
        config.validate();
        let name: Arc<str> = Arc::from(name.into());
        let window = config.failure_rate.as_ref().map(|rate| RateWindow::new(rate.window));
        let core = Core {
            state: State::Closed,
            epoch: 0,
            changed_at: Instant::now(),
            consecutive_failures: 0,
            window,
            probes_admitted: 0,
            probes_succeeded: 0,
            successes: 0,
            failures: 0,
            rejected: 0,
            transitions: 0,
        };
        metrics::gauge!("seaport_circuit_breaker_state", "name" => name.clone()).set(State::Closed.gauge_value());
        let (tx, _) = watch::channel(State::Closed);
        CircuitBreaker {
            shared: Arc::new(Shared {
                name,
                config,
                core: Mutex::new(core),
                tx,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn state(&self) -> State {
        let mut core = self.shared.lock();
        self.shared.tick(&mut core, Instant::now());
        core.state
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let mut core = self.shared.lock();
        self.shared.tick(&mut core, now);
        let (window_calls, window_failures) = match &mut core.window {
            Some(window) => window.counts(now),
            None => (0, 0),
        };
        let retry_after_ms = match core.state {
            State::Open => Some(millis(self.shared.retry_after(&core, now))),
            _ => None,
        };
        Snapshot {
            name: self.shared.name.to_string(),
            state: core.state,
            consecutive_failures: core.consecutive_failures,
            window_calls,
            window_failures,
            half_open_calls: core.probes_admitted,
            retry_after_ms,
            in_state_ms: millis(now.saturating_duration_since(core.changed_at)),
            successes: core.successes,
            failures: core.failures,
            rejected: core.rejected,
            transitions: core.transitions,
        }
    }

    /// Every transition, as it happens. A watch keeps only the latest state: a receiver that
    /// looks rarely may skip one (the transitions counter in metrics misses none).
    pub fn watch(&self) -> watch::Receiver<State> {
        self.shared.tx.subscribe()
    }

    /// Ask to make one call. The [`Permit`] says how it went; for code that cannot use
    /// [`call`](Self::call) (streams, callbacks).
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        let now = Instant::now();
        let mut core = self.shared.lock();
        self.shared.tick(&mut core, now);
        let probe = match core.state {
            State::Closed => false,
            State::HalfOpen if core.probes_admitted < self.shared.config.half_open_max_calls => {
                core.probes_admitted += 1;
                true
            }
            State::Open | State::HalfOpen => {
                core.rejected += 1;
                self.shared.count_call("rejected");
                let retry_after = self.shared.retry_after(&core, now);
                return Err(CircuitOpen {
                    name: self.shared.name.to_string(),
                    retry_after,
                });
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            epoch: core.epoch,
            probe,
            recorded: false,
        })
    }

    /// Run `f` unless the circuit is open; an `Err` counts as a failure.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(&ErrIsFailure, f).await
    }

    /// Run `f` unless the circuit is open; `classifier` decides what counts as a failure.
    pub async fn call_classified<C, F, Fut, T, E>(&self, classifier: &C, f: F) -> Result<T, BreakerError<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        permit.record(classifier.is_failure(result.as_ref()));
        result.map_err(BreakerError::Inner)
    }

    /// Run `f`, or answer with `fallback` (a cached or default value) while the circuit is open.
    /// The call's own errors are returned as they are.
    pub async fn call_with_fallback<F, Fut, T, E, FB>(&self, f: F, fallback: FB) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        FB: FnOnce(CircuitOpen) -> T,
    {
        match self.call(f).await {
            Ok(value) => Ok(value),
            Err(BreakerError::Open(open)) => Ok(fallback(open)),
            Err(BreakerError::Inner(e)) => Err(e),
        }
    }

    /// A tower layer sharing this breaker; `Err` counts as a failure.
    pub fn layer(&self) -> CircuitBreakerLayer {
        CircuitBreakerLayer::new(self.clone())
    }
}

/// Leave to make one call; report its outcome with [`success`](Self::success) /
/// [`failure`](Self::failure). Dropped unreported (a cancelled call), it counts as neither, and a
/// half-open probe slot is freed for another caller.
#[must_use = "report the outcome with success() or failure()"]
pub struct Permit {
    breaker: CircuitBreaker,
    epoch: u64,
    probe: bool,
    recorded: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &&*self.breaker.shared.name)
            .field("probe", &self.probe)
            .finish()
    }
}

impl Permit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(self) {
        self.record(false)
    }

    pub fn failure(self) {
        self.record(true)
    }

    pub fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.shared.record(self.epoch, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded && self.probe {
            let shared = &self.breaker.shared;
            let mut core = shared.lock();
            if core.epoch == self.epoch && core.state == State::HalfOpen {
                core.probes_admitted -= 1;
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // The state stays consistent at every step, so a panic elsewhere leaves nothing to repair.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open → half-open once the recovery timeout has passed.
    fn tick(&self, core: &mut Core, now: Instant) {
        if core.state == State::Open && now.saturating_duration_since(core.changed_at) >= self.config.recovery_timeout {
            self.transition(core, State::HalfOpen, now, "recovery timeout elapsed".into());
        }
    }

    fn retry_after(&self, core: &Core, now: Instant) -> Duration {
        match core.state {
            State::Open => (core.changed_at + self.config.recovery_timeout).saturating_duration_since(now),
            _ => self.config.recovery_timeout,
        }
    }

    fn record(&self, epoch: u64, failed: bool) {
        let now = Instant::now();
        let mut core = self.lock();
        if failed {
            core.failures += 1;
            self.count_call("failure");
        } else {
            core.successes += 1;
            self.count_call("success");
        }
        if core.epoch != epoch {
            return;
        }
        match core.state {
            State::Closed => {
                core.consecutive_failures = if failed { core.consecutive_failures + 1 } else { 0 };
                let threshold = self.config.failure_threshold;
                if threshold > 0 && core.consecutive_failures >= threshold {
                    let reason = format!("{} consecutive failures", core.consecutive_failures);
                    self.transition(&mut core, State::Open, now, reason);
                    return;
                }
                if let (Some(rate), Some(window)) = (&self.config.failure_rate, &mut core.window) {
                    window.record(now, failed);
                    let (calls, failures) = window.counts(now);
                    let minimum = match rate.window {
                        Window::Count(n) => rate.minimum_calls.min(n),
                        Window::Time(_) => rate.minimum_calls,
                    };
                    if calls >= minimum.max(1) && f64::from(failures) / f64::from(calls) >= rate.threshold {
                        let reason = format!("{failures} of the last {calls} calls failed");
                        self.transition(&mut core, State::Open, now, reason);
                    }
                }
            }
            State::HalfOpen if failed => self.transition(&mut core, State::Open, now, "probe failed".into()),
            State::HalfOpen => {
                core.probes_succeeded += 1;
                if core.probes_succeeded >= self.config.half_open_max_calls {
                    self.transition(&mut core, State::Closed, now, "probes succeeded".into());
                }
            }
            // No permit is handed out under an open epoch.
            State::Open => {}
        }
    }

    /// Called under the lock, so that the log, the gauge and the watch see transitions in order.
    fn transition(&self, core: &mut Core, to: State, now: Instant, reason: String) {
        let from = core.state;
        core.state = to;
        core.epoch += 1;
        core.changed_at = now;
        core.transitions += 1;
        core.consecutive_failures = 0;
        core.probes_admitted = 0;
        core.probes_succeeded = 0;
        if let Some(window) = &mut core.window {
            window.clear();
        }
        let name = &*self.name;
        if to == State::Open {
            tracing::warn!(breaker = name, %from, %to, %reason, "circuit breaker opened");
        } else {
            tracing::info!(breaker = name, %from, %to, %reason, "circuit breaker {to}");
        }
        metrics::gauge!("seaport_circuit_breaker_state", "name" => self.name.clone()).set(to.gauge_value());
        metrics::counter!(
            "seaport_circuit_breaker_transitions_total",
            "name" => self.name.clone(),
            "from" => from.as_str(),
            "to" => to.as_str()
        )
        .increment(1);
        self.tx.send_replace(to);
    }

    fn count_call(&self, outcome: &'static str) {
        metrics::counter!("seaport_circuit_breaker_calls_total", "name" => self.name.clone(), "outcome" => outcome)
            .increment(1);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The failure-rate window.
enum RateWindow {
    Count {
        size: usize,
        outcomes: VecDeque<bool>,
        failures: u32,
    },
    Time {
        span: Duration,
        resolution: Duration,
        buckets: VecDeque<Bucket>,
        calls: u32,
        failures: u32,
    },
}

struct Bucket {
    start: Instant,
    calls: u32,
    failures: u32,
}

impl RateWindow {
    fn new(window: Window) -> Self {
        match window {
            Window::Count(n) => RateWindow::Count {
                size: n as usize,
                outcomes: VecDeque::new(),
                failures: 0,
            },
            Window::Time(span) => RateWindow::Time {
                span,
                resolution: (span / 20).max(Duration::from_millis(1)).min(span),
                buckets: VecDeque::new(),
                calls: 0,
                failures: 0,
            },
        }
    }

    fn record(&mut self, now: Instant, failed: bool) {
        match self {
            RateWindow::Count {
                size,
                outcomes,
                failures,
            } => {
                if outcomes.len() == *size && outcomes.pop_front() == Some(true) {
                    *failures -= 1;
                }
                outcomes.push_back(failed);
                *failures += u32::from(failed);
            }
            RateWindow::Time {
                resolution,
                buckets,
                calls,
                failures,
                ..
            } => {
                let resolution = *resolution;
                match buckets.back_mut() {
                    Some(bucket) if now.saturating_duration_since(bucket.start) < resolution => {
                        bucket.calls += 1;
                        bucket.failures += u32::from(failed);
                    }
                    _ => buckets.push_back(Bucket {
                        start: now,
                        calls: 1,
                        failures: u32::from(failed),
                    }),
                }
                *calls += 1;
                *failures += u32::from(failed);
                self.prune(now);
            }
        }
    }

    /// Calls and failures still inside the window at `now`.
    fn counts(&mut self, now: Instant) -> (u32, u32) {
        self.prune(now);
        match self {
            RateWindow::Count { outcomes, failures, .. } => (outcomes.len() as u32, *failures),
            RateWindow::Time { calls, failures, .. } => (*calls, *failures),
        }
    }

    /// A bucket leaves once its first call is `span` old: no call counts for longer than `span`.
    fn prune(&mut self, now: Instant) {
        if let RateWindow::Time {
            span,
            buckets,
            calls,
            failures,
            ..
        } = self
        {
            while let Some(bucket) = buckets.front() {
                if now.saturating_duration_since(bucket.start) < *span {
                    break;
                }
                *calls -= bucket.calls;
                *failures -= bucket.failures;
                buckets.pop_front();
            }
        }
    }

    fn clear(&mut self) {
        match self {
            RateWindow::Count { outcomes, failures, .. } => {
                outcomes.clear();
                *failures = 0;
            }
            RateWindow::Time {
                buckets,
                calls,
                failures,
                ..
            } => {
                buckets.clear();
                *calls = 0;
                *failures = 0;
            }
        }
    }
}

/// Puts a [`CircuitBreaker`] in front of a tower service. `C` classifies the service's outcomes:
/// [`ErrIsFailure`] by default, [`HttpClassifier`] via [`CircuitBreakerLayer::http`].
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer<C = ErrIsFailure> {
    breaker: CircuitBreaker,
    classifier: C,
}

impl CircuitBreakerLayer {
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: ErrIsFailure,
        }
    }
}

impl CircuitBreakerLayer<HttpClassifier> {
    /// For HTTP services: errors and 5xx count as failures, 4xx do not.
    pub fn http(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: HttpClassifier,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    pub fn with_classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// The service made by [`CircuitBreakerLayer`]: rejected calls fail with [`BreakerError::Open`]
/// without reaching the inner service.
#[derive(Clone, Debug)]
pub struct CircuitBreakerService<S, C = ErrIsFailure> {
    inner: S,
    breaker: CircuitBreaker,
    classifier: C,
}

impl<S, C> CircuitBreakerService<S, C> {
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    C: Classify<S::Response, S::Error> + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BreakerError<S::Error>>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.breaker.try_acquire() {
            Ok(permit) => permit,
            Err(open) => return Box::pin(std::future::ready(Err(BreakerError::Open(open)))),
        };
        let future = self.inner.call(req);
        let classifier = self.classifier.clone();
        Box::pin(async move {
            let result = future.await;
            permit.record(classifier.is_failure(result.as_ref()));
            result.map_err(BreakerError::Inner)
        })
    }
}
