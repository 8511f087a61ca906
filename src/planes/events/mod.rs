//! The KV event plane: workers publish batches of [`KvEvent`]s; the frontend consumes them into
//! its index.
//!
//! Invariant: bounded ([`EVENT_QUEUE_DEPTH`] batches). In process, a publisher waits when the
//! consumer is behind; over NATS, batches can be lost (a restart, a slow consumer), and the
//! frontend's control plane recovers them by event-id gap checks and replay/dump requests
//! (`frontend::control`). The in-process implementation is a bounded channel; NATS implements
//! the same seam.

pub mod nats;

use std::future::Future;

use tokio::sync::mpsc;

use crate::contract::events::KvEvent;

/// Batches in flight between all workers and the index before publishers wait.
pub const EVENT_QUEUE_DEPTH: usize = 4096;

/// Worker side of the event plane.
pub trait EventPublisher: Send + Sync + 'static {
    /// Publishes one batch (events of one worker, in event-id order).
    fn publish(&self, batch: Vec<KvEvent>) -> impl Future<Output = ()> + Send;
}

/// Frontend side of the event plane.
pub trait EventSubscriber: Send + 'static {
    /// The next batch; `None` once every publisher is gone.
    fn next_batch(&mut self) -> impl Future<Output = Option<Vec<KvEvent>>> + Send;
}

/// In-process publisher (cloned into every embedded worker).
#[derive(Clone)]
pub struct InProcessPublisher(mpsc::Sender<Vec<KvEvent>>);

/// In-process subscriber (owned by the frontend's index applier).
pub struct InProcessSubscriber(mpsc::Receiver<Vec<KvEvent>>);

/// A connected in-process publisher/subscriber pair.
pub fn in_process() -> (InProcessPublisher, InProcessSubscriber) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE_DEPTH);
    (InProcessPublisher(tx), InProcessSubscriber(rx))
}

impl EventPublisher for InProcessPublisher {
    async fn publish(&self, batch: Vec<KvEvent>) {
        if batch.is_empty() {
            return;
        }
        // A closed channel means the frontend is shutting down; the events have no reader.
        let _ = self.0.send(batch).await;
    }
}

impl EventSubscriber for InProcessSubscriber {
    async fn next_batch(&mut self) -> Option<Vec<KvEvent>> {
        self.0.recv().await
    }
}
