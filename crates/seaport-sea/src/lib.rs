//! The reference "sea" cases service of Seaport, built only on the `seaport` library's public
//! API, as a user's service would be.
//!
//! - [`cases`]: the domain, its SQL and routes (`POST/GET /cases`, `GET /cases/{id}`)
//! - [`consumers`]: the fan-out consumers analytics, notifications and audit
//! - [`trace`]: `GET /trace/{correlation_id}`, the causal tree of one request
//! - [`admin`]: the admin console (`/admin`), HTML for operators
//! - [`app`]: wiring of storage, broker, relay, consumers and HTTP

pub mod admin;
pub mod app;
pub mod bench;
pub mod bench_backlog;
pub mod bench_http;
pub mod cases;
pub mod chaos;
pub mod consumers;
pub mod cpu;
pub mod crm;
pub mod logging;
pub mod observe;
pub mod openapi;
pub mod progress;
pub mod trace;
pub mod webhooks;
