//! NATS JetStream behind the [`Broker`] trait: the real server, with the same semantics as the
//! embedded broker (durable pull consumers, explicit acks, nak with delay, ack wait, max deliver).
//!
//! Messages follow the CloudEvents NATS protocol binding in *structured* mode: the payload is the
//! event in JSON format and `content-type: application/cloudevents+json`, so any CloudEvents SDK
//! reads them, extensions (correlation and causation ids) included. `Nats-Msg-Id` = event id
//! makes the server drop re-publishes within the stream's duplicate window.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::{
    Acker, Broker, BrokerError, ConsumerConfig, ConsumerState, Delivery, MSG_ID_HEADER, Message, OutgoingMessage,
    PendingPublish, PublishAck, Subscription, valid_durable, valid_filter, valid_subject,
};

/// Window within which JetStream drops a message whose `Nats-Msg-Id` it has already stored.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct JetStreamBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Whether an ack waits for the server's confirmation (see [`JetStreamBroker::confirm_acks`]).
    confirm_acks: bool,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn refused(e: BrokerError) -> PendingPublish {
    Box::pin(std::future::ready(Err(e)))
}

impl JetStreamBroker {
    /// Connect to `nats://host:port`; the client reconnects on its own after a server restart.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let client = async_nats::ConnectOptions::new()
            .name("seaport")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(unavailable)?;
        // Fail fast with a clear message when the server is absent (retry_on_initial_connect
        // would otherwise hide it).
        // A raw `$JS.API.INFO` request works with every server version.
        let reply = tokio::time::timeout(Duration::from_secs(10), client.request("$JS.API.INFO", Bytes::new()))
            .await
            .map_err(|_| BrokerError::Unavailable(format!("no NATS server answering at {url}")))?
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "NATS at {url} has no JetStream (start nats-server with -js): {e}"
                ))
            })?;
        let text = String::from_utf8_lossy(&reply.payload);
        if !text.contains("account_info_response") || text.contains("\"error\"") {
            return Err(BrokerError::Unavailable(format!(
                "NATS at {url} has no usable JetStream: {text}"
            )));
        }
        let js = jetstream::new(client.clone());
        Ok(JetStreamBroker {
            client,
            js,
            confirm_acks: true,
        })
    }

    /// Whether a consumer's ack waits for the server's confirmation (`AckAck`, the default) or
    /// is only sent. Unconfirmed acks save the server a reply per message and the client a wait
    /// (+22% for the per-event consumer benchmark). An ack lost on the way (a crash, a dropped
    /// connection) makes the server deliver the message again after its ack wait, and the
    /// consumer's inbox then skips it: no second effect, only a redelivery. Use it only for
    /// consumers behind an inbox ([`ConsumerRunner`](crate::consumer::ConsumerRunner) always is).
    pub fn confirm_acks(mut self, confirm: bool) -> Self {
        self.confirm_acks = confirm;
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }
}

#[async_trait]
impl Broker for JetStreamBroker {
    async fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<(), BrokerError> {
        if let Some(bad) = subjects.iter().find(|s| !valid_filter(s)) {
            return Err(BrokerError::InvalidSubject(bad.to_string()));
        }
        self.js
            .get_or_create_stream(stream::Config {
                name: name.to_owned(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                duplicate_window: DUPLICATE_WINDOW,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Pipelined: every message is sent before the first confirmation is awaited.
    async fn publish(&self, messages: &[OutgoingMessage]) -> Vec<Result<PublishAck, BrokerError>> {
        let mut results = Vec::with_capacity(messages.len());
        for pending in self.send(messages).await {
            results.push(pending.await);
        }
        results
    }

    /// Each message goes to the connection as soon as it is built; its confirmation is the
    /// server's publish ack, awaited later.
    async fn send(&self, messages: &[OutgoingMessage]) -> Vec<PendingPublish> {
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            if !valid_subject(&m.subject) {
                pending.push(refused(BrokerError::InvalidSubject(m.subject.clone())));
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in &m.headers {
                if k != MSG_ID_HEADER {
                    headers.insert(k.as_str(), v.as_str());
                }
            }
            headers.insert(MSG_ID_HEADER, m.id.as_str());
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload.clone())
                .headers(headers);
            pending.push(match self.js.send_publish(m.subject.clone(), publish).await {
                Ok(ack) => Box::pin(async move {
                    ack.await.map_err(unavailable).map(|a| PublishAck {
                        stream: a.stream,
                        seq: a.sequence,
                        duplicate: a.duplicate,
                    })
                }),
                Err(e) => refused(unavailable(e)),
            });
        }
        pending
    }

    async fn consumer_state(&self, stream: &str, durable: &str) -> Result<Option<ConsumerState>, BrokerError> {
        let Ok(s) = self.js.get_stream(stream).await else {
            return Ok(None);
        };
        let Ok(mut c) = s.get_consumer::<consumer::pull::Config>(durable).await else {
            return Ok(None);
        };
        let info = c.info().await.map_err(unavailable)?;
        Ok(Some(ConsumerState {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        }))
    }

    async fn subscribe(&self, stream: &str, config: ConsumerConfig) -> Result<Box<dyn Subscription>, BrokerError> {
        if !valid_filter(&config.filter_subject) {
            return Err(BrokerError::InvalidSubject(config.filter_subject));
        }
        if !valid_durable(&config.durable) {
            return Err(BrokerError::InvalidDurable(config.durable));
        }
        let s = self
            .js
            .get_stream(stream)
            .await
            .map_err(|_| BrokerError::UnknownStream(stream.to_owned()))?;
        let wanted = consumer::pull::Config {
            durable_name: Some(config.durable.clone()),
            filter_subject: config.filter_subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver as i64,
            ..Default::default()
        };
        let c: consumer::PullConsumer = s
            .get_or_create_consumer(&config.durable, wanted.clone())
            .await
            .map_err(unavailable)?;
        let existing = &c.cached_info().config;
        if existing.filter_subject != config.filter_subject {
            return Err(BrokerError::ConsumerMismatch {
                stream: stream.to_owned(),
                durable: config.durable,
                existing: existing.filter_subject.clone(),
            });
        }
        let c: consumer::PullConsumer =
            if existing.ack_wait != config.ack_wait || existing.max_deliver != config.max_deliver as i64 {
                // Timing settings follow the latest binding, as on the embedded broker.
                s.update_consumer(wanted).await.map_err(unavailable)?;
                s.get_consumer(&config.durable).await.map_err(unavailable)?
            } else {
                c
            };
        Ok(Box::new(JetStreamSubscription {
            consumer: c,
            messages: None,
            max_deliver: config.max_deliver,
            confirm_acks: self.confirm_acks,
        }))
    }
}

struct JetStreamSubscription {
    consumer: consumer::PullConsumer,
    messages: Option<consumer::pull::Stream>,
    max_deliver: u32,
    confirm_acks: bool,
}

#[async_trait]
impl Subscription for JetStreamSubscription {
    async fn fetch(&mut self, max: usize, max_wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if self.messages.is_none() {
            // A continuous pull with a small buffer: buffered messages' ack wait is ticking.
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(max.clamp(1, 256))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(unavailable)?;
            self.messages = Some(stream);
        }
        let messages = self.messages.as_mut().expect("set above");
        let mut out = Vec::new();
        let first = match tokio::time::timeout(max_wait, messages.next()).await {
            Err(_) => {
                if self.pull_lost().await {
                    tracing::warn!(
                        consumer = %self.consumer.cached_info().name,
                        "messages are pending but the server holds no pull of this consumer; starting a fresh pull"
                    );
                    self.messages = None;
                }
                return Ok(out);
            }
            Ok(None) => {
                self.messages = None;
                return Err(BrokerError::Closed);
            }
            Ok(Some(Err(e))) => {
                // e.g. missed heartbeats during a server restart; start a fresh pull next time.
                self.messages = None;
                return Err(unavailable(e));
            }
            Ok(Some(Ok(m))) => m,
        };
        out.push(to_delivery(first, self.max_deliver, self.confirm_acks)?);
        while out.len() < max {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => out.push(to_delivery(m, self.max_deliver, self.confirm_acks)?),
                _ => break,
            }
        }
        Ok(out)
    }
}

impl JetStreamSubscription {
    /// After a wait that brought nothing: does the server hold messages for this consumer but
    /// no pull request to deliver them to? Then the continuous pull is stuck: async-nats
    /// believes a request outstanding that the server no longer has (seen with nats-server
    /// 2.9; BENCHMARKS.md, ninth round), and would only notice after two missed idle
    /// heartbeats, ten seconds. Asking costs one request per idle `max_wait`.
    async fn pull_lost(&mut self) -> bool {
        match self.consumer.info().await {
            Ok(info) => stuck(info.num_pending, info.num_waiting),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the consumer's state");
                false
            }
        }
    }
}

/// Messages pending, and no pull request waiting for them, from any subscriber of the durable
/// (a pull waiting elsewhere will take them). While the consumer is at its `max_ack_pending`, a
/// pull still waits, so that is not a stuck pull.
fn stuck(num_pending: u64, num_waiting: usize) -> bool {
    num_pending > 0 && num_waiting == 0
}

fn to_delivery(m: jetstream::Message, max_deliver: u32, confirm_acks: bool) -> Result<Delivery, BrokerError> {
    let info = m.info().map_err(unavailable)?;
    let (stream, stream_seq, delivered) = (info.stream.to_owned(), info.stream_sequence, info.delivered);
    let (msg, acker) = m.split();
    let mut headers = BTreeMap::new();
    if let Some(h) = &msg.headers {
        for (name, values) in h.iter() {
            if let Some(v) = values.first() {
                headers.insert(name.to_string(), v.as_str().to_owned());
            }
        }
    }
    let id = headers
        .get(MSG_ID_HEADER)
        .cloned()
        .unwrap_or_else(|| format!("{stream}:{stream_seq}"));
    let message = Message {
        id,
        subject: msg.subject.to_string(),
        headers,
        payload: msg.payload.to_vec(),
        stream,
        stream_seq,
    };
    Ok(Delivery::new(
        message,
        delivered.max(1) as u32,
        max_deliver,
        Box::new(JsAcker { acker, confirm_acks }),
    ))
}

struct JsAcker {
    acker: jetstream::message::Acker,
    confirm_acks: bool,
}

#[async_trait]
impl Acker for JsAcker {
    /// By default acks are confirmed by the server (`AckAck`), so "acked" means the server knows;
    /// unconfirmed, it means the ack was handed to the connection.
    async fn ack(&self, _: &Message) -> Result<(), BrokerError> {
        if self.confirm_acks {
            self.acker.double_ack().await.map_err(unavailable)
        } else {
            self.acker.ack().await.map_err(unavailable)
        }
    }

    async fn nak(&self, _: &Message, delay: Duration) -> Result<(), BrokerError> {
        self.acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn nats_url() -> String {
        std::env::var("SEAPORT_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    #[test]
    fn a_pull_is_stuck_only_with_messages_pending_and_no_pull_waiting() {
        assert!(stuck(3, 0));
        assert!(!stuck(0, 0), "nothing to deliver: an idle pull");
        assert!(
            !stuck(3, 1),
            "a pull waits (at max_ack_pending, or another subscriber's)"
        );
    }

    /// A continuous pull that the server does not hold for this consumer (here: another
    /// consumer's, which never gets these messages) is replaced after one empty wait, instead
    /// of after two missed idle heartbeats (ten seconds).
    #[tokio::test]
    async fn a_pull_the_server_does_not_hold_is_replaced_after_one_empty_wait() {
        let broker = JetStreamBroker::connect(&nats_url())
            .await
            .expect("NATS with JetStream must run for this test (bash scripts/services)");
        let name = format!("T_STUCK_{}", uuid::Uuid::now_v7().simple());
        let root = name.to_lowercase();
        broker.ensure_stream(&name, &[&format!("{root}.>")]).await.unwrap();
        let stream = broker.js.get_stream(&name).await.unwrap();
        let config = |durable: &str, filter: String| consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            filter_subject: filter,
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        };
        let other: consumer::PullConsumer = stream
            .get_or_create_consumer("other", config("other", format!("{root}.nothing")))
            .await
            .unwrap();
        let real: consumer::PullConsumer = stream
            .get_or_create_consumer("real", config("real", format!("{root}.events.>")))
            .await
            .unwrap();
        let not_ours = other
            .stream()
            .max_messages_per_batch(10)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .unwrap();
        let mut sub = JetStreamSubscription {
            consumer: real,
            messages: Some(not_ours),
            max_deliver: 5,
            confirm_acks: true,
        };
        let sent: Vec<OutgoingMessage> = (0..3)
            .map(|i| OutgoingMessage {
                id: format!("m{i}"),
                subject: format!("{root}.events.x"),
                headers: BTreeMap::new(),
                payload: Bytes::from_static(b"{}"),
            })
            .collect();
        for r in broker.publish(&sent).await {
            r.unwrap();
        }

        let first = sub.fetch(10, Duration::from_millis(300)).await.unwrap();
        assert!(first.is_empty(), "the pull held is another consumer's");
        let started = Instant::now();
        let mut got = Vec::new();
        while got.len() < sent.len() && started.elapsed() < Duration::from_secs(4) {
            got.extend(sub.fetch(10, Duration::from_millis(300)).await.unwrap());
        }
        let result = got.len();
        for d in &got {
            d.ack().await.unwrap();
        }
        broker.js.delete_stream(&name).await.unwrap();
        assert_eq!(result, sent.len(), "the pull the server does not hold was not replaced");
    }
}
