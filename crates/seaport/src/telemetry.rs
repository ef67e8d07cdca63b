//! Metrics: every name Seaport records, in one place, following Prometheus conventions (`_total`
//! counters, base units, `_seconds`). They go through the `metrics` facade, so they cost nothing
//! until the application installs a recorder (the reference service exports them at
//! `/metrics`). Gauges that describe stored state (outbox backlog and lag, pending messages,
//! dead letters) are not kept here: the exporter reads them at scrape time, where they cannot
//! drift from the database.

use std::time::Duration;

use crate::consumer::Outcome;

/// Events the relay got confirmed by the broker.
pub const OUTBOX_PUBLISHED: &str = "seaport_outbox_published_total";
/// Events the broker refused (retried later).
pub const OUTBOX_PUBLISH_ERRORS: &str = "seaport_outbox_publish_errors_total";
/// Deliveries settled by a consumer, by `outcome`.
pub const CONSUMER_MESSAGES: &str = "seaport_consumer_messages_total";
/// Deliveries that were redeliveries (delivery count above 1).
pub const CONSUMER_REDELIVERED: &str = "seaport_consumer_redelivered_total";
/// Deliveries moved to the dead letters.
pub const CONSUMER_DEAD_LETTERED: &str = "seaport_consumer_dead_lettered_total";
/// Time from the start of the middleware chain to its verdict, per delivery.
pub const CONSUMER_HANDLER_SECONDS: &str = "seaport_consumer_handler_duration_seconds";
/// Deliveries acked without running the handler because the inbox had them.
pub const INBOX_DUPLICATES: &str = "seaport_inbox_duplicates_skipped_total";
/// Requests answered from a stored response (same key, same request).
pub const IDEMPOTENCY_REPLAYS: &str = "seaport_idempotency_replays_total";
/// Requests refused because of their key, by `reason` (`in_flight` 409, `reused` 422).
pub const IDEMPOTENCY_CONFLICTS: &str = "seaport_idempotency_conflicts_total";
/// Webhook signature checks, by `source` and `result` (`ok` or the reason of the rejection).
pub const WEBHOOK_VERIFICATIONS: &str = "seaport_webhook_verifications_total";

/// Buckets of [`CONSUMER_HANDLER_SECONDS`]: 0.5 ms to 10 s.
pub const HANDLER_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub(crate) fn published(confirmed: usize, failed: usize) {
    if confirmed > 0 {
        metrics::counter!(OUTBOX_PUBLISHED).increment(confirmed as u64);
    }
    if failed > 0 {
        metrics::counter!(OUTBOX_PUBLISH_ERRORS).increment(failed as u64);
    }
}

pub(crate) fn delivery(consumer: &str, outcome: &Outcome, delivery_count: u32, took: Duration) {
    let label = match outcome {
        Outcome::Processed => "processed",
        Outcome::Duplicate => "duplicate",
        Outcome::NotForThisConsumer => "not_for_this_consumer",
        Outcome::Retry { .. } => "retry",
        Outcome::DeadLettered { .. } => "dead_lettered",
    };
    metrics::counter!(CONSUMER_MESSAGES, "consumer" => consumer.to_owned(), "outcome" => label).increment(1);
    metrics::histogram!(CONSUMER_HANDLER_SECONDS, "consumer" => consumer.to_owned()).record(took.as_secs_f64());
    if delivery_count > 1 {
        metrics::counter!(CONSUMER_REDELIVERED, "consumer" => consumer.to_owned()).increment(1);
    }
    match outcome {
        Outcome::Duplicate => metrics::counter!(INBOX_DUPLICATES, "consumer" => consumer.to_owned()).increment(1),
        Outcome::DeadLettered { .. } => {
            metrics::counter!(CONSUMER_DEAD_LETTERED, "consumer" => consumer.to_owned()).increment(1)
        }
        _ => {}
    }
}

pub(crate) fn idempotency_replay() {
    metrics::counter!(IDEMPOTENCY_REPLAYS).increment(1);
}

pub(crate) fn idempotency_conflict(reason: &'static str) {
    metrics::counter!(IDEMPOTENCY_CONFLICTS, "reason" => reason).increment(1);
}

/// Record one webhook signature check (`result`: `ok`, or why it was rejected).
pub fn webhook_verification(source: &str, result: &'static str) {
    metrics::counter!(WEBHOOK_VERIFICATIONS, "source" => source.to_owned(), "result" => result).increment(1);
}
