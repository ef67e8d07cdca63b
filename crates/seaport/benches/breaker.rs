//! Circuit breaker overhead per call in the closed state (issue 8, item 5; target < 200 ns).
//!
//! The guarded operation is an immediately ready future, polled once with `now_or_never`, so
//! the figure is the breaker's own bookkeeping (admission check, outcome recording, window
//! update) and not an executor's. `bare` is the same operation without the breaker, measured in
//! the same run: overhead = `closed/*` - `bare`.
//!
//! Run: `cargo bench -p seaport --bench breaker`. `cargo test` runs each benchmark once.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use seaport::breaker::{CircuitBreaker, Window};

async fn op(i: u64) -> Result<u64, &'static str> {
    Ok(black_box(i))
}

fn breaker_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");
    let mut i = 0u64;
    group.bench_function("bare", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(op(i).now_or_never())
        })
    });
    let consecutive = CircuitBreaker::builder("bench-consecutive").build();
    group.bench_function("closed/consecutive", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(consecutive.call(|| op(i)).now_or_never())
        })
    });
    // The failure-rate rule over a time window does more bookkeeping per call.
    let rate = CircuitBreaker::builder("bench-rate")
        .failure_rate(0.5, Window::Time(Duration::from_secs(10)))
        .build();
    group.bench_function("closed/rate-over-time-window", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(rate.call(|| op(i)).now_or_never())
        })
    });
    group.finish();
}

criterion_group!(benches, breaker_overhead);
criterion_main!(benches);
