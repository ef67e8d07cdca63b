//! # Seaport
//!
//! Reliable service integration for Rust services built on tokio, axum and sqlx: one module per
//! pattern of the Integration Patterns Catalog.
//!
//! | module | pattern |
//! |---|---|
//! | [`event`] | the envelope: CloudEvents 1.0 + `correlationid` / `causationid` |
//! | [`outbox`] (+ [`outbox::relay`]) | Outbox + Publish |
//! | [`inbox`] | Inbox + Idempotency |
//! | [`broker`] (`embedded`) | the transport behind Consumer Groups and Fan-out |
//! | [`consumer`] (+ [`consumer::middleware`]) | the runner; delivery policy as middleware: inbox dedupe, retry, dead letters, timeout, panics, correlation |
//! | [`dead_letters`], [`naming`], [`retention`] | dead letters and replay; group and fan-out names; bounded cleanup |
//! | [`http`] (`correlation`, `idempotency`, `pagination`, `problem`) | Correlation Tracking, Idempotency Key, Pagination |
//! | [`store`] (`sqlite`) | the SQL behind all of the above |
//! | [`breaker`] | Circuit Breaker |
//! | [`webhooks`] | Webhook Receiver: signature verification (Stripe, GitHub, Standard Webhooks) |

pub mod breaker;
pub mod broker;
pub mod consumer;
pub mod crash;
pub mod dead_letters;
pub mod event;
pub mod http;
pub mod inbox;
pub mod naming;
pub mod outbox;
pub mod retention;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod webhooks;

pub use event::Event;
