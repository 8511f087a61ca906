//! The load plane: workers publish their [`LoadReport`]s; every frontend reconciles them with its
//! own bookings ([`crate::router::load`], [`crate::frontend::control::load`]).
//!
//! A message is one worker's whole report ([`LoadMessage`], in [`crate::contract::codec`]'s
//! encoding over NATS), so losing one costs nothing but staleness: the next one supersedes it.
//! Hence nothing here waits or retries: the in-process publisher drops a report when the
//! frontend is [`LOAD_QUEUE_DEPTH`] behind (counted), and NATS is at-most-once.
//!
//! Subject over NATS: `{namespace}.kv_metrics.{model}` ([`load_subject`], Dynamo's
//! `kv_metrics` naming; each part one NATS token as in [`crate::planes::events::nats`]). Every
//! frontend subscribes to `{namespace}.kv_metrics.*`: each sees every worker's load.
//!
//! Rate: bounded by the publisher ([`crate::worker::load`]): at most one message per worker per
//! `LOAD_PUBLISH_MIN_INTERVAL`, and at least one per `LOAD_HEARTBEAT` so a frontend started late
//! learns an idle worker's load too.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use async_nats::{Client, Subscriber};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::contract::codec::{decode_load, encode_load, LoadMessage};
use crate::planes::events::nats::{sanitize_token, NatsError};

/// Load messages queued in process before new ones are dropped: a frontend that far behind
/// reads superseded reports anyway (a few per worker of a large fleet).
pub const LOAD_QUEUE_DEPTH: usize = 1024;

/// Worker side of the load plane. Never waits on a slow reader.
pub trait LoadPublisher: Send + Sync + 'static {
    fn publish(&self, msg: LoadMessage) -> impl Future<Output = ()> + Send;
}

/// Frontend side of the load plane.
pub trait LoadSubscriber: Send + 'static {
    /// The next report; `None` once the plane is closed.
    fn next_report(&mut self) -> impl Future<Output = Option<LoadMessage>> + Send;
}

/// In-process publisher (cloned into every embedded worker).
#[derive(Clone)]
pub struct InProcessLoadPublisher {
    tx: mpsc::Sender<LoadMessage>,
    dropped: Arc<AtomicU64>,
}

impl InProcessLoadPublisher {
    /// Reports dropped because the frontend was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// In-process subscriber (the frontend's load task).
pub struct InProcessLoadSubscriber(mpsc::Receiver<LoadMessage>);

/// A connected in-process publisher/subscriber pair.
pub fn in_process() -> (InProcessLoadPublisher, InProcessLoadSubscriber) {
    let (tx, rx) = mpsc::channel(LOAD_QUEUE_DEPTH);
    (InProcessLoadPublisher { tx, dropped: Arc::default() }, InProcessLoadSubscriber(rx))
}

impl LoadPublisher for InProcessLoadPublisher {
    async fn publish(&self, msg: LoadMessage) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(msg) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

impl LoadSubscriber for InProcessLoadSubscriber {
    async fn next_report(&mut self) -> Option<LoadMessage> {
        self.0.recv().await
    }
}

/// `{namespace}.kv_metrics.{model}` (each part sanitized); `None` = every model (`*`).
pub fn load_subject(namespace: &str, model: Option<&str>) -> String {
    let model = model.map_or_else(|| "*".to_string(), sanitize_token);
    format!("{}.kv_metrics.{model}", sanitize_token(namespace))
}

/// Worker side over NATS.
#[derive(Clone)]
pub struct NatsLoadPublisher {
    client: Client,
    subject: String,
    errors: Arc<AtomicU64>,
}

impl NatsLoadPublisher {
    pub fn new(client: Client, namespace: &str, model: &str) -> Self {
        Self { client, subject: load_subject(namespace, Some(model)), errors: Arc::default() }
    }

    /// Reports not handed to the client.
    pub fn publish_errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }
}

impl LoadPublisher for NatsLoadPublisher {
    async fn publish(&self, msg: LoadMessage) {
        let payload = match encode_load(&msg) {
            Ok(aligned) => bytes::Bytes::copy_from_slice(&aligned),
            Err(e) => {
                self.errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "load report not encoded");
                return;
            }
        };
        if let Err(e) = self.client.publish(self.subject.clone(), payload).await {
            self.errors.fetch_add(1, Relaxed);
            tracing::debug!(error = %e, subject = %self.subject, "load report not published");
        }
    }
}

/// Frontend side over NATS: every model's reports.
pub struct NatsLoadSubscriber {
    sub: Subscriber,
    malformed: Arc<AtomicU64>,
}

impl NatsLoadSubscriber {
    pub async fn subscribe(client: &Client, namespace: &str) -> Result<Self, NatsError> {
        let subject = load_subject(namespace, None);
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| NatsError::Subscribe { subject: subject.clone(), source })?;
        Ok(Self { sub, malformed: Arc::default() })
    }

    /// Payloads that did not decode.
    pub fn malformed_counter(&self) -> Arc<AtomicU64> {
        self.malformed.clone()
    }
}

impl LoadSubscriber for NatsLoadSubscriber {
    async fn next_report(&mut self) -> Option<LoadMessage> {
        loop {
            let msg = self.sub.next().await?;
            match decode_load(&msg.payload) {
                Ok(m) => return Some(m),
                Err(e) => {
                    self.malformed.fetch_add(1, Relaxed);
                    tracing::warn!(subject = %msg.subject, reason = e.label(), error = %e, "skipping malformed load report");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{LoadReport, WorkerId};

    #[test]
    fn subjects() {
        assert_eq!(load_subject("dynamo", Some("Qwen/Qwen3 0.6B")), "dynamo.kv_metrics.Qwen/Qwen3_0_6B");
        assert_eq!(load_subject("my.ns", None), "my_ns.kv_metrics.*");
    }

    #[tokio::test]
    async fn in_process_drops_when_full_and_never_waits() {
        let (p, mut s) = in_process();
        let msg = |seq| LoadMessage { worker: WorkerId(1), seq, issued_at_us: 0, report: LoadReport::default() };
        for seq in 0..(LOAD_QUEUE_DEPTH as u64 + 5) {
            p.publish(msg(seq)).await;
        }
        assert_eq!(p.dropped(), 5);
        assert_eq!(s.next_report().await.unwrap().seq, 0);
    }
}
