//! Histogram samples wait in the Prometheus recorder until something folds them into buckets.
//! Nobody may ever scrape `/metrics`, so the recorder must do that itself, or a worker grows
//! with every delivery (it did: 15 bytes per delivery, 30 MiB after 2M deliveries in
//! `seaport bench-backlog`). Its own test binary: it measures the process's memory.

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[test]
fn histogram_samples_do_not_pile_up_when_nobody_scrapes() {
    let _ = seaport_sea::observe::prometheus();
    let histogram = metrics::histogram!(seaport::telemetry::CONSUMER_HANDLER_SECONDS, "consumer" => "memory-test");
    const ROUNDS: usize = 5;
    const SAMPLES: usize = 1_000_000; // about 15 MiB while they wait
    let mut after_round = Vec::new();
    for _ in 0..ROUNDS {
        for _ in 0..SAMPLES {
            histogram.record(0.001);
        }
        std::thread::sleep(seaport_sea::observe::UPKEEP_INTERVAL * 2);
        after_round.push(rss_bytes());
    }
    // The first round sets the level (the samples waiting between two upkeeps); after it, memory
    // must stay there, not grow by a round's worth of samples each time.
    let grown = after_round[ROUNDS - 1].saturating_sub(after_round[0]);
    assert!(
        grown < 4 << 20,
        "{} MiB more over {} rounds of {SAMPLES} samples that nobody scraped (RSS after each round: {:?} MiB)",
        grown >> 20,
        ROUNDS - 1,
        after_round.iter().map(|b| b >> 20).collect::<Vec<_>>()
    );
}
