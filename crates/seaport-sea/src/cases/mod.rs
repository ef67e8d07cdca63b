//! The cases context: the domain type, its SQL, and its HTTP routes.

pub mod domain;
pub mod repo;
pub mod routes;

pub use domain::{Case, NewCase};

/// Event type (and broker subject) of a created case.
pub const CASE_CREATED: &str = "sea.cases.created";
/// A payment for the case was confirmed by a provider.
pub const CASE_PAID: &str = "sea.cases.paid";
/// CloudEvents `source` of events about cases.
pub const SOURCE: &str = "/sea/cases";
