//! `GET /metrics`: the Prometheus exposition of what Seaport counts (`seaport::telemetry`: publish
//! rate and errors, deliveries by outcome, redeliveries, dead-lettering, handler latency, inbox
//! duplicates, idempotency replays and conflicts, breaker states and transitions, webhook
//! verifications), plus gauges read at scrape time from the database and the broker, so they
//! can never drift from the truth: outbox backlog and lag, each consumer's pending and
//! unacknowledged messages, dead letters per consumer.
//!
//! Every process exports its own counters (api, relay and worker roles alike); gauges of shared
//! state are the same from every process.

use std::sync::OnceLock;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use seaport::http::Problem;
use seaport::on_pool;

use crate::app::AppState;
use crate::consumers::{ANALYTICS, AUDIT, CONTEXT, NOTIFICATIONS};

/// The consumers whose broker state is exported.
pub const CONSUMERS: [&str; 4] = [ANALYTICS, NOTIFICATIONS, AUDIT, CONTEXT];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder folds recorded histogram samples into its buckets. Until then each
/// sample is kept, and rendering `/metrics` is the only other thing that folds them: a process
/// nobody scrapes grew by 15 bytes per delivery (30 MiB after 2M deliveries in
/// `bench-backlog`).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The process's Prometheus recorder, installed on first use, with a thread that does its
/// upkeep (a thread, not a task: this may be called before or outside any runtime). The
/// `metrics` facade has one recorder per process; if the embedding application installed its
/// own first, ours still renders (without the facade's data) rather than failing.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(seaport::telemetry::CONSUMER_HANDLER_SECONDS.to_owned()),
                seaport::telemetry::HANDLER_BUCKETS,
            )
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histogram samples wait for /metrics scrapes");
        }
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows scrape-time gauges only");
        }
        handle
    })
}

pub async fn route(State(app): State<AppState>) -> Result<Response, Problem> {
    let handle = prometheus();
    let outbox = seaport::outbox::status(&app.store).await.map_err(Problem::internal)?;
    metrics::gauge!("seaport_outbox_backlog").set(outbox.unpublished as f64);
    metrics::gauge!("seaport_outbox_failing").set(outbox.failing as f64);
    metrics::gauge!("seaport_outbox_lag_seconds").set(outbox.oldest_unpublished_age_ms.unwrap_or(0) as f64 / 1000.0);
    for consumer in CONSUMERS {
        let Some(broker) = &app.broker else { break };
        match broker.consumer_state(&app.stream, consumer).await {
            Ok(Some(state)) => {
                metrics::gauge!("seaport_consumer_pending", "consumer" => consumer).set(state.pending as f64);
                metrics::gauge!("seaport_consumer_ack_pending", "consumer" => consumer).set(state.ack_pending as f64);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(consumer, error = %e, "cannot read the consumer's state for /metrics"),
        }
    }
    let dead: Vec<(String, i64)> = on_pool!(&app.store, p => sqlx::query_as(
        "SELECT consumer, COUNT(*) FROM seaport_dead_letters GROUP BY consumer",
    )
    .fetch_all(p)
    .await)
    .map_err(Problem::internal)?;
    for consumer in CONSUMERS {
        let n = dead.iter().find(|(c, _)| c == consumer).map_or(0, |(_, n)| *n);
        metrics::gauge!("seaport_dead_letters", "consumer" => consumer).set(n as f64);
    }
    Ok((
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle.render(),
    )
        .into_response())
}
