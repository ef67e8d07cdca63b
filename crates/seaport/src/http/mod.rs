//! The API-side patterns as axum/tower pieces: RFC 9457 problems, correlation tracking,
//! Idempotency-Key and pagination.

pub mod correlation;
pub mod cursor;
pub mod idempotency;
pub mod idempotency_layer;
pub mod pagination;
pub mod problem;

pub use correlation::{Correlation, CorrelationLayer};
pub use idempotency_layer::{IdempotencyLayer, IdempotentTx};
pub use problem::Problem;
