//! The KV event plane over core NATS.
//!
//! Subject: `{namespace}.kv_events.{model}` ([`kv_events_subject`]), one per namespace and
//! model, each part sanitized into a single NATS token ('.', '*', '>' and whitespace become '_',
//! so `Qwen/Qwen3 0.6B` → `Qwen/Qwen3_0_6B`). A frontend serving every model subscribes to
//! `{namespace}.kv_events.*`. Payload: one [`crate::contract::codec`] batch (one worker's events in
//! event-id order) per message.
//!
//! Invariant: a subscriber never panics on what arrives: a payload that does not decode is
//! counted ([`NatsSubscriber::malformed_counter`]), logged and skipped. Core NATS is at-most-once:
//! a batch published while the subscriber is disconnected, or dropped because its queue is full
//! (a "slow consumer"), is lost; the router sees the gap in event ids and recovers it from the
//! worker (replay or dump), which is why nothing here retries.
//!
//! Concurrency and bounds: async-nats owns one connection task per client and reconnects it
//! forever with a delay capped at [`MAX_RECONNECT_DELAY`], re-subscribing by itself. Publishers
//! share the client's outgoing queue ([`PUBLISH_QUEUE_DEPTH`] commands; `publish` waits when it
//! is full, including while reconnecting). Each subscription buffers at most
//! [`SUBSCRIPTION_QUEUE_DEPTH`] messages; [`NatsSubscriber::next_batch`] decodes on the caller's
//! task, so there is no further queue.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, Subscriber};
use futures::StreamExt;

use super::{EventPublisher, EventSubscriber, EVENT_QUEUE_DEPTH};
use crate::contract::codec::{decode_batch, encode_batch, CodecError};
use crate::contract::events::KvEvent;

/// `NATS_SERVER` when unset.
pub const DEFAULT_NATS_SERVER: &str = "nats://127.0.0.1:4222";
/// Outgoing commands buffered in one client before `publish` waits: absorbs a burst, and a short
/// reconnect, without letting a stalled connection grow memory.
pub const PUBLISH_QUEUE_DEPTH: usize = 2048;
/// Messages buffered per subscription before NATS drops them (slow consumer): the same depth as
/// the in-process event plane.
pub const SUBSCRIPTION_QUEUE_DEPTH: usize = EVENT_QUEUE_DEPTH;
/// Longest wait between reconnect attempts: bounds how long events are lost after a restart.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// Initial connect attempt, so a wrong address fails start-up instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors at the NATS boundary. `retryable()` says whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(
        "cannot connect to NATS at {server}: {source} (is nats-server running there? \
         NATS_SERVER or the server flag say where)"
    )]
    Connect {
        server: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot encode a batch for {subject}: {source}")]
    Encode {
        subject: String,
        #[source]
        source: CodecError,
    },
    #[error("cannot publish to {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: async_nats::PublishError,
    },
}

impl NatsError {
    /// Whether the same call may succeed later (server down) rather than being our fault.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// One NATS subject token: '.', '*', '>' and whitespace become '_'; empty becomes '_'.
pub fn sanitize_token(s: &str) -> String {
    let t: String =
        s.chars().map(|c| if matches!(c, '.' | '*' | '>') || c.is_whitespace() { '_' } else { c }).collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

/// `{namespace}.kv_events.{model}` (each part sanitized); `None` = every model (`*`).
pub fn kv_events_subject(namespace: &str, model: Option<&str>) -> String {
    let model = model.map_or_else(|| "*".to_string(), sanitize_token);
    format!("{}.kv_events.{model}", sanitize_token(namespace))
}

/// Connects with kvgate's bounds and reconnect policy; connection changes are logged. A user
/// and password in the URL (`nats://user:password@host:4222`) authenticate the connection.
pub async fn connect(server: &str, name: &str) -> Result<Client, NatsError> {
    let mut options = ConnectOptions::new();
    let first = server.split(',').next().unwrap_or(server).trim();
    if let Ok(addr) = first.parse::<async_nats::ServerAddr>() {
        if let (Some(user), Some(password)) = (addr.username(), addr.password()) {
            options = options.user_and_password(user.to_string(), password.to_string());
        }
    }
    options
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .client_capacity(PUBLISH_QUEUE_DEPTH)
        .subscription_capacity(SUBSCRIPTION_QUEUE_DEPTH)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("NATS connected"),
                Event::SlowConsumer(sid) => {
                    tracing::warn!(sid, "NATS subscription full; events dropped (the router recovers the gap)")
                }
                other => tracing::warn!(event = %other, "NATS connection event"),
            }
        })
        .connect(server)
        .await
        .map_err(|source| NatsError::Connect { server: server.to_string(), source })
}

/// Doubling from 50 ms, capped at [`MAX_RECONNECT_DELAY`]; the first retry is immediate.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(16) as u32;
    (Duration::from_millis(50) * 2u32.pow(exp)).min(MAX_RECONNECT_DELAY)
}

/// One batch as it goes on the wire ([`crate::contract::codec`]'s rkyv format).
fn encode(events: &[KvEvent]) -> Result<bytes::Bytes, CodecError> {
    encode_batch(events).map(|aligned| bytes::Bytes::copy_from_slice(&aligned))
}

/// Worker side: publishes each batch on its model's subject.
#[derive(Clone)]
pub struct NatsPublisher {
    client: Client,
    subject: String,
    errors: Arc<AtomicU64>,
}

impl NatsPublisher {
    pub fn new(client: Client, namespace: &str, model: &str) -> Self {
        Self { client, subject: kv_events_subject(namespace, Some(model)), errors: Arc::default() }
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Batches not handed to the client: refused by the codec (mixed workers, over
    /// `MAX_BATCH_BYTES`), larger than the server's max_payload, or the client was closed.
    pub fn publish_errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    /// Publishes one batch, reporting failure (the trait's `publish` logs and counts it instead).
    pub async fn try_publish(&self, batch: &[KvEvent]) -> Result<(), NatsError> {
        let payload = encode(batch).map_err(|source| NatsError::Encode { subject: self.subject.clone(), source })?;
        self.client
            .publish(self.subject.clone(), payload)
            .await
            .map_err(|source| NatsError::Publish { subject: self.subject.clone(), source })
    }
}

impl EventPublisher for NatsPublisher {
    async fn publish(&self, batch: Vec<KvEvent>) {
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.try_publish(&batch).await {
            self.errors.fetch_add(1, Relaxed);
            tracing::warn!(error = %e, events = batch.len(), "KV event batch not published");
        }
    }
}

/// Frontend side: the decoded batches of one subject (one model, or every model).
pub struct NatsSubscriber {
    sub: Subscriber,
    subject: String,
    malformed: Arc<AtomicU64>,
}

impl NatsSubscriber {
    /// Subscribes to `model`'s events, or every model's with `None`. Subscribe before reading
    /// discovery, so no worker's first events fall between the two.
    pub async fn subscribe(client: &Client, namespace: &str, model: Option<&str>) -> Result<Self, NatsError> {
        let subject = kv_events_subject(namespace, model);
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| NatsError::Subscribe { subject: subject.clone(), source })?;
        Ok(Self { sub, subject, malformed: Arc::default() })
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Payloads that did not decode (shared, so it can be read after the subscriber moves).
    pub fn malformed_counter(&self) -> Arc<AtomicU64> {
        self.malformed.clone()
    }
}

impl EventSubscriber for NatsSubscriber {
    /// The next decodable, non-empty batch; `None` once the client is closed.
    async fn next_batch(&mut self) -> Option<Vec<KvEvent>> {
        loop {
            let msg = self.sub.next().await?;
            match decode_batch(&msg.payload) {
                Ok(batch) if batch.is_empty() => continue,
                Ok(batch) => return Some(batch),
                Err(e) => {
                    self.malformed.fetch_add(1, Relaxed);
                    tracing::warn!(subject = %msg.subject, bytes = msg.payload.len(), reason = e.label(),
                        error = %e, "skipping malformed KV event batch");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_part() {
        assert_eq!(kv_events_subject("dynamo", Some("Qwen/Qwen3 0.6B")), "dynamo.kv_events.Qwen/Qwen3_0_6B");
        assert_eq!(kv_events_subject("dynamo", Some("a.*>\tb")), "dynamo.kv_events.a____b");
        assert_eq!(kv_events_subject("my.ns", None), "my_ns.kv_events.*");
        assert_eq!(kv_events_subject("", Some("")), "_.kv_events._");
    }

    #[test]
    fn reconnect_delay_is_bounded() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(50));
        assert_eq!(reconnect_delay(usize::MAX), MAX_RECONNECT_DELAY);
        assert!((1..100).all(|n| reconnect_delay(n) <= MAX_RECONNECT_DELAY));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(decode_batch(b"\x00\xffnot a batch").is_err());
    }
}
