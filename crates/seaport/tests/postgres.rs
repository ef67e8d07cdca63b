//! What only the PostgreSQL backend has to prove: a late commit is never skipped, and relay
//! partitions are shared between relays and taken over when one dies.

use std::time::Duration;

use seaport::outbox::relay::{Relay, RelayConfig};
use seaport::outbox::{Outbox, PARTITIONS};
use seaport::store::Db;
use seaport::testing::{Fixture, Kind};
use seaport::{Event, on_pool};

async fn published(f: &Fixture) -> Vec<String> {
    on_pool!(&f.db, p => sqlx::query_scalar("SELECT event_id FROM seaport_outbox WHERE published_at IS NOT NULL ORDER BY published_at, seq")
        .fetch_all(p)
        .await
        .unwrap())
}

/// Sequence 1 is assigned in a transaction that commits *after* the one holding sequence 2.
/// A relay that tracked "the last published seq" would move past 1 and lose it.
#[tokio::test]
async fn a_row_committed_out_of_sequence_order_is_not_skipped() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let outbox = Outbox::new();
    let slow_event = Event::new(f.subject("x.slow"), "/t", serde_json::json!({})).with_subject("k");
    let fast_event = Event::new(f.subject("x.fast"), "/t", serde_json::json!({})).with_subject("k");

    let mut slow = pg.begin_write().await.unwrap();
    let slow_seq = outbox.insert(&mut slow, &slow_event).await.unwrap();
    let mut fast = pg.begin_write().await.unwrap();
    let fast_seq = outbox.insert(&mut fast, &fast_event).await.unwrap();
    assert!(slow_seq < fast_seq);
    fast.commit().await.unwrap();

    let mut relay = Relay::new(f.db.clone(), f.broker.clone(), RelayConfig::default());
    relay.run_once().await.unwrap();
    assert_eq!(
        published(&f).await,
        vec![fast_event.id.clone()],
        "only the committed row is visible"
    );

    slow.commit().await.unwrap(); // the lower sequence commits last
    relay.run_once().await.unwrap();
    assert_eq!(
        published(&f).await,
        vec![fast_event.id.clone(), slow_event.id.clone()],
        "the late row is published, not skipped"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn relays_share_partitions_and_take_over_from_a_dead_one() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let config = RelayConfig {
        rebalance_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut a = Relay::new(f.another_db().await, f.broker.clone(), config.clone());
    let mut b = Relay::new(f.another_db().await, f.broker.clone(), config.clone());
    let all: Vec<i64> = (0..PARTITIONS).collect();

    a.run_once().await.unwrap();
    assert_eq!(a.owned_partitions(), all, "a lone relay owns every partition");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(120)).await;
        a.run_once().await.unwrap();
        b.run_once().await.unwrap();
        let (pa, pb) = (a.owned_partitions(), b.owned_partitions());
        assert!(
            pa.iter().all(|p| !pb.contains(p)),
            "a partition is never owned twice: {pa:?} {pb:?}"
        );
        if pa.len() == 8 && pb.len() == 8 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relays did not split the partitions: {pa:?} {pb:?}"
        );
    }

    drop(a); // the process dies: its lock connection goes away, and its locks with it
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(120)).await;
        b.run_once().await.unwrap();
        if b.owned_partitions() == all {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the survivor did not take over: {:?}",
            b.owned_partitions()
        );
    }
    f.cleanup().await;
}

/// Only one instance sweeps at a time: while another holds the sweeper lock, a round is skipped.
#[tokio::test]
async fn one_retention_sweeper_at_a_time() {
    let f = Fixture::new(Kind::PgJetStream).await;
    let Db::Postgres(pg) = &f.db else { unreachable!() };
    let mut holder = pg.begin_write().await.unwrap();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 1000)")
        .bind(seaport::outbox::relay::LOCK_NAMESPACE)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(got);
    let other = f.another_db().await;
    let swept = seaport::retention::sweep_once(&other, &Default::default())
        .await
        .unwrap();
    assert!(swept.skipped);
    holder.rollback().await.unwrap();
    let swept = seaport::retention::sweep_once(&other, &Default::default())
        .await
        .unwrap();
    assert!(!swept.skipped);
    other.close().await;
    f.cleanup().await;
}
