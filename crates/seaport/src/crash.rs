//! Crash points for fault-injection tests.
//!
//! Setting `SEAPORT_CRASH_AT=<name>` makes the process abort (like `kill -9`: no destructors, no
//! flush) the first time it reaches the named point. Tests use it to stop a real process at the
//! worst moment, e.g. `relay.after_publish` (broker has the event, outbox row not yet deleted).
//! Unset, a crash point costs one relaxed atomic load.

use std::sync::OnceLock;

/// Names of the points compiled into the library, for documentation and validation.
pub const POINTS: &[&str] = &[
    "relay.before_publish",
    "relay.after_publish",
    "consumer.before_commit",
    "consumer.after_commit",
];

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

/// Abort the process if `SEAPORT_CRASH_AT` names this point.
pub fn crash_point(name: &str) {
    let target = CRASH_AT.get_or_init(|| std::env::var("SEAPORT_CRASH_AT").ok().filter(|s| !s.is_empty()));
    if target.as_deref() == Some(name) {
        eprintln!("seaport: crash point {name} reached (SEAPORT_CRASH_AT), aborting");
        std::process::abort();
    }
}
