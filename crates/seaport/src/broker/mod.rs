//! The transport behind Consumer Groups and Fan-out, with JetStream's semantics.
//!
//! A *stream* stores every message published to its subjects. A *durable consumer* (named) keeps
//! its own position in a stream: two durables with different names each get every message
//! (fan-out); several workers pulling from the same durable share its messages (consumer group),
//! each message handed to one of them at a time. Delivery is at least once: a message is handed
//! out again when its ack wait expires or it is nak'ed, with a delivery counter, up to
//! `max_deliver` times.

pub mod embedded;
pub mod jetstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// Header carrying the publish dedupe key, named as on NATS JetStream.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A message to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingMessage {
    /// Dedupe key: publishing the same id twice stores the message once.
    pub id: String,
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    /// Shared, not copied, on its way to the broker.
    pub payload: Bytes,
}

/// A message handed to the broker whose confirmation is still to come: awaiting it waits for
/// the broker's answer (see [`Broker::send`]).
pub type PendingPublish = Pin<Box<dyn Future<Output = Result<PublishAck, BrokerError>> + Send>>;

/// The broker's confirmation that a message is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishAck {
    pub stream: String,
    pub seq: u64,
    /// The id was already in the stream; nothing new was stored.
    pub duplicate: bool,
}

/// A message as delivered to a consumer.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub id: String,
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
    pub stream: String,
    pub stream_seq: u64,
}

/// How a durable consumer behaves.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The durable name: the same name shares messages, different names each get all.
    pub durable: String,
    /// NATS-style subject filter (`*` one token, `>` the rest).
    pub filter_subject: String,
    /// How long a handed-out message may stay unacknowledged before it is delivered again.
    pub ack_wait: Duration,
    /// After this many deliveries a message is not delivered again.
    pub max_deliver: u32,
}

impl ConsumerConfig {
    pub fn new(durable: impl Into<String>, filter_subject: impl Into<String>) -> Self {
        ConsumerConfig {
            durable: durable.into(),
            filter_subject: filter_subject.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no stream takes subject {0:?}")]
    NoStream(String),
    #[error("unknown stream {0:?}")]
    UnknownStream(String),
    #[error("invalid subject or filter {0:?}")]
    InvalidSubject(String),
    #[error("consumer {durable:?} already exists on stream {stream:?} with a different filter {existing:?}")]
    ConsumerMismatch {
        stream: String,
        durable: String,
        existing: String,
    },
    #[error("invalid durable name {0:?}: use 1-256 of A-Z a-z 0-9 _ -")]
    InvalidDurable(String),
    #[error("unknown consumer {0:?}")]
    UnknownConsumer(String),
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker storage: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("broker closed")]
    Closed,
}

/// A broker: embedded (SQLite log) or NATS JetStream.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Create the stream if it does not exist (idempotent).
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), BrokerError>;

    /// Publish messages in order. One result per message, in the same order; an `Ok` means the
    /// broker has durably stored the message (or already had it).
    async fn publish(&self, messages: &[OutgoingMessage]) -> Vec<Result<PublishAck, BrokerError>>;

    /// Hand messages to the broker, in order, without waiting for their confirmations: one
    /// pending confirmation per message, in the same order. A caller can keep a window of
    /// messages in flight across batches (the outbox relay does) instead of waiting for a whole
    /// batch to be confirmed before sending the next. A broker that cannot pipeline confirms
    /// them here (the default: [`Broker::publish`], then ready confirmations).
    async fn send(&self, messages: &[OutgoingMessage]) -> Vec<PendingPublish> {
        self.publish(messages)
            .await
            .into_iter()
            .map(|r| Box::pin(std::future::ready(r)) as PendingPublish)
            .collect()
    }

    /// Bind to (creating if needed) a durable consumer on `stream`.
    async fn subscribe(&self, stream: &str, config: ConsumerConfig) -> Result<Box<dyn Subscription>, BrokerError>;

    /// Where a durable consumer stands (for metrics and the admin console); `None` if it does not
    /// exist (yet).
    async fn consumer_state(&self, stream: &str, durable: &str) -> Result<Option<ConsumerState>, BrokerError>;
}

/// Where a durable consumer stands.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ConsumerState {
    /// Messages of its subjects not yet handed out.
    pub pending: u64,
    /// Handed out, not yet acknowledged (in a worker's hands, or waiting for redelivery).
    pub ack_pending: u64,
    /// Of those, how many were delivered more than once.
    pub redelivered: u64,
}

/// A worker's handle on a durable consumer.
#[async_trait]
pub trait Subscription: Send {
    /// Wait until at least one message is available (or `max_wait` passed) and take up to `max`.
    async fn fetch(&mut self, max: usize, max_wait: Duration) -> Result<Vec<Delivery>, BrokerError>;
}

/// One delivery of a message; settle it with `ack` or `nak`, or let its ack wait expire.
pub struct Delivery {
    pub message: Message,
    /// 1 on the first delivery, 2 on the first redelivery, ...
    pub delivery_count: u32,
    /// The consumer's `max_deliver`, so policy code can tell the last attempt.
    pub max_deliver: u32,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

/// Settles deliveries on the broker that made them.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self, message: &Message) -> Result<(), BrokerError>;
    async fn nak(&self, message: &Message, delay: Duration) -> Result<(), BrokerError>;
}

impl Delivery {
    pub fn new(message: Message, delivery_count: u32, max_deliver: u32, acker: Box<dyn Acker>) -> Self {
        Delivery {
            message,
            delivery_count,
            max_deliver,
            acker,
        }
    }

    /// Done with it: never deliver it to this durable again.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker.ack(&self.message).await
    }

    /// Not now: deliver it again after `delay` (while deliveries remain).
    pub async fn nak(&self, delay: Duration) -> Result<(), BrokerError> {
        self.acker.nak(&self.message, delay).await
    }

    pub fn is_last_attempt(&self) -> bool {
        self.delivery_count >= self.max_deliver
    }
}

/// Is `subject` a valid concrete subject (dot-separated non-empty tokens, no wildcards)?
pub fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.contains(char::is_whitespace))
}

/// Is `name` a valid durable consumer name (as on JetStream: no dots, wildcards or spaces)?
pub fn valid_durable(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Is `filter` a valid NATS subject filter (`*` as a whole token, `>` only as the last token)?
pub fn valid_filter(filter: &str) -> bool {
    let tokens: Vec<&str> = filter.split('.').collect();
    !filter.is_empty()
        && tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && !t.contains(char::is_whitespace)
                && (*t == "*" || *t == ">" || !(t.contains('*') || t.contains('>')))
                && (*t != ">" || i == tokens.len() - 1)
        })
}

/// NATS subject matching: `*` matches one token, a final `>` matches one or more tokens.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_matching_follows_nats() {
        assert!(subject_matches("sea.>", "sea.cases.created"));
        assert!(subject_matches("sea.>", "sea.x"));
        assert!(!subject_matches("sea.>", "sea"));
        assert!(subject_matches("sea.*.created", "sea.cases.created"));
        assert!(!subject_matches("sea.*.created", "sea.cases.closed"));
        assert!(!subject_matches("sea.*", "sea.cases.created"));
        assert!(subject_matches("sea.cases.created", "sea.cases.created"));
        assert!(!subject_matches("sea.cases", "sea.cases.created"));
        assert!(!subject_matches("other.>", "sea.cases.created"));
    }

    #[test]
    fn validates_subjects_and_filters() {
        assert!(valid_subject("sea.cases.created"));
        assert!(!valid_subject("sea..x"));
        assert!(!valid_subject("sea.*"));
        assert!(!valid_subject(""));
        assert!(valid_filter("sea.>"));
        assert!(valid_filter("sea.*.created"));
        assert!(!valid_filter("sea.>.x"));
        assert!(!valid_filter("sea.ca*"));
        assert!(!valid_filter(""));
    }
}
