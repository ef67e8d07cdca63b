//! The embedded durable broker: a message log and durable consumers kept in the same SQLite
//! database as everything else, so the embedded default needs no server at all.
//!
//! Every state change (publish, claim, ack, nak) is one SQLite write transaction, so a crash at
//! any point leaves either the old or the new state. Workers in this process are woken on
//! publish; workers in other processes sharing the file notice within the poll interval.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Row, SqliteConnection};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Acker, Broker, BrokerError, ConsumerConfig, ConsumerState, Delivery, Message, OutgoingMessage, PublishAck,
    Subscription, subject_matches, valid_filter, valid_subject,
};
use crate::store::now_ms;
use crate::store::sqlite::SqliteStore;

/// How often an idle subscription looks for messages published by other processes.
const CROSS_PROCESS_POLL: Duration = Duration::from_millis(250);

/// The embedded broker. Cheap to clone; clones share the publish signal.
#[derive(Clone)]
pub struct EmbeddedBroker {
    store: SqliteStore,
    published: watch::Sender<u64>,
}

impl EmbeddedBroker {
    pub fn new(store: &SqliteStore) -> Self {
        EmbeddedBroker {
            store: store.clone(),
            published: watch::channel(0).0,
        }
    }

    fn signal(&self) {
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn publish_all(
        &self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Result<PublishAck, BrokerError>>, sqlx::Error> {
        let mut tx = self.store.begin_write().await?;
        let streams: Vec<(String, Vec<String>)> =
            sqlx::query("SELECT name, subjects FROM seaport_broker_streams ORDER BY name")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| {
                    let subjects: String = r.get(1);
                    (r.get(0), serde_json::from_str(&subjects).unwrap_or_default())
                })
                .collect();
        let now = now_ms();
        let mut results = Vec::with_capacity(messages.len());
        for m in messages {
            if !valid_subject(&m.subject) {
                results.push(Err(BrokerError::InvalidSubject(m.subject.clone())));
                continue;
            }
            let Some((stream, _)) = streams
                .iter()
                .find(|(_, subs)| subs.iter().any(|f| subject_matches(f, &m.subject)))
            else {
                results.push(Err(BrokerError::NoStream(m.subject.clone())));
                continue;
            };
            let headers = serde_json::to_string(&m.headers).expect("string map serialises");
            let inserted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO seaport_broker_messages (stream, msg_id, subject, headers, payload, published_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (stream, msg_id) DO NOTHING
                 RETURNING seq",
            )
            .bind(stream)
            .bind(&m.id)
            .bind(&m.subject)
            .bind(headers)
            .bind(m.payload.as_ref())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let (seq, duplicate) = match inserted {
                Some(seq) => (seq, false),
                None => {
                    let seq: i64 =
                        sqlx::query_scalar("SELECT seq FROM seaport_broker_messages WHERE stream = $1 AND msg_id = $2")
                            .bind(stream)
                            .bind(&m.id)
                            .fetch_one(&mut *tx)
                            .await?;
                    (seq, true)
                }
            };
            results.push(Ok(PublishAck {
                stream: stream.clone(),
                seq: seq as u64,
                duplicate,
            }));
        }
        tx.commit().await?;
        Ok(results)
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn consumer_state(&self, stream: &str, durable: &str) -> Result<Option<ConsumerState>, BrokerError> {
        let pool = self.store.pool();
        let Some((filter, delivered_seq)): Option<(String, i64)> = sqlx::query_as(
            "SELECT filter_subject, delivered_seq FROM seaport_broker_consumers WHERE stream = $1 AND name = $2",
        )
        .bind(stream)
        .bind(durable)
        .fetch_optional(pool)
        .await?
        else {
            return Ok(None);
        };
        // Per subject, so the filter is applied in one place (`subject_matches`), not in SQL.
        let ahead: Vec<(String, i64)> = sqlx::query_as(
            "SELECT subject, COUNT(*) FROM seaport_broker_messages WHERE stream = $1 AND seq > $2 GROUP BY subject",
        )
        .bind(stream)
        .bind(delivered_seq)
        .fetch_all(pool)
        .await?;
        let (ack_pending, redelivered): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE delivery_count > 1) FROM seaport_broker_pending
             WHERE stream = $1 AND consumer = $2 AND state = 'pending'",
        )
        .bind(stream)
        .bind(durable)
        .fetch_one(pool)
        .await?;
        Ok(Some(ConsumerState {
            pending: ahead
                .iter()
                .filter(|(subject, _)| subject_matches(&filter, subject))
                .map(|(_, n)| *n as u64)
                .sum(),
            ack_pending: ack_pending as u64,
            redelivered: redelivered as u64,
        }))
    }

    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), BrokerError> {
        if let Some(bad) = subjects.iter().find(|s| !valid_filter(s)) {
            return Err(BrokerError::InvalidSubject(bad.to_string()));
        }
        let subjects = serde_json::to_string(subjects).expect("strings serialise");
        sqlx::query(
            "INSERT INTO seaport_broker_streams (name, subjects) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET subjects = excluded.subjects",
        )
        .bind(name)
        .bind(subjects)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    async fn publish(&self, messages: &[OutgoingMessage]) -> Vec<Result<PublishAck, BrokerError>> {
        match self.publish_all(messages).await {
            Ok(results) => {
                if results.iter().any(|r| matches!(r, Ok(ack) if !ack.duplicate)) {
                    self.signal();
                }
                results
            }
            // The whole batch is one transaction: nothing of it is stored.
            Err(e) => {
                let e = e.to_string();
                messages
                    .iter()
                    .map(|_| Err(BrokerError::Unavailable(e.clone())))
                    .collect()
            }
        }
    }

    async fn subscribe(&self, stream: &str, config: ConsumerConfig) -> Result<Box<dyn Subscription>, BrokerError> {
        if !valid_filter(&config.filter_subject) {
            return Err(BrokerError::InvalidSubject(config.filter_subject));
        }
        if !super::valid_durable(&config.durable) {
            return Err(BrokerError::InvalidDurable(config.durable));
        }
        let mut tx = self.store.begin_write().await?;
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM seaport_broker_streams WHERE name = $1")
            .bind(stream)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            // Ended before answering, here and below: the write lock goes at once.
            let _ = tx.rollback().await;
            return Err(BrokerError::UnknownStream(stream.to_owned()));
        }
        let existing: Option<String> =
            sqlx::query_scalar("SELECT filter_subject FROM seaport_broker_consumers WHERE stream = $1 AND name = $2")
                .bind(stream)
                .bind(&config.durable)
                .fetch_optional(&mut *tx)
                .await?;
        match existing {
            Some(filter) if filter != config.filter_subject => {
                let _ = tx.rollback().await;
                return Err(BrokerError::ConsumerMismatch {
                    stream: stream.to_owned(),
                    durable: config.durable,
                    existing: filter,
                });
            }
            Some(_) => {
                // Like a JetStream consumer update: timing settings follow the latest binding.
                sqlx::query("UPDATE seaport_broker_consumers SET ack_wait_ms = $1, max_deliver = $2 WHERE stream = $3 AND name = $4")
                    .bind(config.ack_wait.as_millis() as i64)
                    .bind(config.max_deliver as i64)
                    .bind(stream)
                    .bind(&config.durable)
                    .execute(&mut *tx)
                    .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO seaport_broker_consumers (stream, name, filter_subject, ack_wait_ms, max_deliver, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(stream)
                .bind(&config.durable)
                .bind(&config.filter_subject)
                .bind(config.ack_wait.as_millis() as i64)
                .bind(config.max_deliver as i64)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(Box::new(EmbeddedSubscription {
            broker: self.clone(),
            stream: stream.to_owned(),
            config,
            published: self.published.subscribe(),
        }))
    }
}

struct EmbeddedSubscription {
    broker: EmbeddedBroker,
    stream: String,
    config: ConsumerConfig,
    published: watch::Receiver<u64>,
}

/// A message claimed by one fetch: stream seq and the delivery number it gets now.
struct Claim {
    seq: i64,
    delivery_count: u32,
}

impl EmbeddedSubscription {
    /// Claim up to `max` messages in one write transaction: first those due for redelivery, then
    /// new ones past the consumer's position. The transaction is what makes a consumer group
    /// safe: two workers can never claim the same message at the same time.
    async fn claim(&self, max: usize) -> Result<(Vec<Delivery>, Option<i64>), BrokerError> {
        let mut tx = self.broker.store.begin_write().await?;
        let now = now_ms();
        let row = sqlx::query(
            "SELECT filter_subject, ack_wait_ms, max_deliver, delivered_seq FROM seaport_broker_consumers
             WHERE stream = $1 AND name = $2",
        )
        .bind(&self.stream)
        .bind(&self.config.durable)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let _ = tx.rollback().await;
            return Err(BrokerError::UnknownConsumer(self.config.durable.clone()));
        };
        let filter: String = row.get(0);
        let ack_wait_ms: i64 = row.get(1);
        let max_deliver: i64 = row.get(2);
        let mut delivered_seq: i64 = row.get(3);

        let mut claims = Vec::new();
        let due = sqlx::query(
            "SELECT seq, delivery_count FROM seaport_broker_pending
             WHERE stream = $1 AND consumer = $2 AND state = 'pending' AND visible_at <= $3
             ORDER BY seq LIMIT $4",
        )
        .bind(&self.stream)
        .bind(&self.config.durable)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await?;
        for r in due {
            let seq: i64 = r.get(0);
            let count: i64 = r.get(1);
            if count >= max_deliver {
                // Deliveries exhausted (the last attempt was never settled, e.g. the worker died).
                // Kept, not dropped: the row stays as 'exhausted' for operators to see.
                tracing::warn!(stream = %self.stream, consumer = %self.config.durable, seq, "message exhausted its deliveries");
                sqlx::query("UPDATE seaport_broker_pending SET state = 'exhausted' WHERE stream = $1 AND consumer = $2 AND seq = $3")
                    .bind(&self.stream)
                    .bind(&self.config.durable)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                continue;
            }
            sqlx::query(
                "UPDATE seaport_broker_pending SET delivery_count = delivery_count + 1, visible_at = $1
                 WHERE stream = $2 AND consumer = $3 AND seq = $4",
            )
            .bind(now + ack_wait_ms)
            .bind(&self.stream)
            .bind(&self.config.durable)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            claims.push(Claim {
                seq,
                delivery_count: count as u32 + 1,
            });
        }

        // New messages, in stream order, skipping subjects outside the filter.
        let scan_page = (max as i64).max(64);
        while claims.len() < max {
            let rows = sqlx::query(
                "SELECT seq, subject FROM seaport_broker_messages WHERE stream = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(&self.stream)
            .bind(delivered_seq)
            .bind(scan_page)
            .fetch_all(&mut *tx)
            .await?;
            let full_page = rows.len() as i64 == scan_page;
            for r in rows {
                let seq: i64 = r.get(0);
                let subject: String = r.get(1);
                delivered_seq = seq;
                if subject_matches(&filter, &subject) {
                    sqlx::query(
                        "INSERT INTO seaport_broker_pending (stream, consumer, seq, delivery_count, visible_at, state)
                         VALUES ($1, $2, $3, 1, $4, 'pending')",
                    )
                    .bind(&self.stream)
                    .bind(&self.config.durable)
                    .bind(seq)
                    .bind(now + ack_wait_ms)
                    .execute(&mut *tx)
                    .await?;
                    claims.push(Claim { seq, delivery_count: 1 });
                    if claims.len() == max {
                        break;
                    }
                }
            }
            if !full_page {
                break;
            }
        }
        sqlx::query("UPDATE seaport_broker_consumers SET delivered_seq = $1 WHERE stream = $2 AND name = $3")
            .bind(delivered_seq)
            .bind(&self.stream)
            .bind(&self.config.durable)
            .execute(&mut *tx)
            .await?;

        claims.sort_by_key(|c| c.seq);
        let mut deliveries = Vec::with_capacity(claims.len());
        for c in claims {
            let message = load_message(&mut tx, c.seq).await?;
            let acker = EmbeddedAcker {
                broker: self.broker.clone(),
                stream: self.stream.clone(),
                consumer: self.config.durable.clone(),
            };
            deliveries.push(Delivery::new(
                message,
                c.delivery_count,
                max_deliver as u32,
                Box::new(acker),
            ));
        }
        let next_due: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(visible_at) FROM seaport_broker_pending WHERE stream = $1 AND consumer = $2 AND state = 'pending'",
        )
        .bind(&self.stream)
        .bind(&self.config.durable)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((deliveries, next_due))
    }
}

async fn load_message(conn: &mut SqliteConnection, seq: i64) -> Result<Message, sqlx::Error> {
    let r = sqlx::query("SELECT stream, msg_id, subject, headers, payload FROM seaport_broker_messages WHERE seq = $1")
        .bind(seq)
        .fetch_one(conn)
        .await?;
    let headers: String = r.get(3);
    Ok(Message {
        stream: r.get(0),
        id: r.get(1),
        subject: r.get(2),
        headers: serde_json::from_str::<BTreeMap<String, String>>(&headers).unwrap_or_default(),
        payload: r.get(4),
        stream_seq: seq as u64,
    })
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn fetch(&mut self, max: usize, max_wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = Instant::now() + max_wait;
        loop {
            // Mark the signal seen *before* looking, so a publish during the claim is not missed.
            self.published.borrow_and_update();
            let (deliveries, next_due) = self.claim(max.max(1)).await?;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut wait = (deadline - now).min(CROSS_PROCESS_POLL);
            if let Some(due) = next_due {
                let until_due = Duration::from_millis((due - now_ms()).max(1) as u64);
                wait = wait.min(until_due);
            }
            tokio::select! {
                changed = self.published.changed() => { if changed.is_err() { return Err(BrokerError::Closed); } }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

struct EmbeddedAcker {
    broker: EmbeddedBroker,
    stream: String,
    consumer: String,
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self, message: &Message) -> Result<(), BrokerError> {
        let _turn = self.broker.store.writer_turn().await;
        sqlx::query("DELETE FROM seaport_broker_pending WHERE stream = $1 AND consumer = $2 AND seq = $3")
            .bind(&self.stream)
            .bind(&self.consumer)
            .bind(message.stream_seq as i64)
            .execute(self.broker.store.pool())
            .await?;
        Ok(())
    }

    async fn nak(&self, message: &Message, delay: Duration) -> Result<(), BrokerError> {
        let turn = self.broker.store.writer_turn().await;
        sqlx::query(
            "UPDATE seaport_broker_pending SET visible_at = $1 WHERE stream = $2 AND consumer = $3 AND seq = $4 AND state = 'pending'",
        )
        .bind(now_ms() + delay.as_millis() as i64)
        .bind(&self.stream)
        .bind(&self.consumer)
        .bind(message.stream_seq as i64)
        .execute(self.broker.store.pool())
        .await?;
        drop(turn);
        if delay.is_zero() {
            self.broker.signal();
        }
        Ok(())
    }
}
