//! In-process request plane: bounded channels from frontend shards to worker tasks.
//!
//! Concurrency: the worker table is published whole by one atomic swap (written on the control
//! plane when workers come and go, read lock-free by every shard).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::{RequestPlane, ResponseStream, TransportError, RESPONSE_STREAM_DEPTH, WORKER_QUEUE_DEPTH};
use crate::contract::{GenerateRequest, Target, WorkItem, WorkerId};

/// Frontend side: worker id → that worker's inbox.
#[derive(Default, Clone)]
pub struct InProcessRequestPlane {
    inboxes: Arc<ArcSwap<HashMap<WorkerId, mpsc::Sender<WorkItem>>>>,
}

impl InProcessRequestPlane {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a worker and returns the receiving end of its inbox (owned by the worker's task).
    pub fn attach(&self, worker: WorkerId) -> mpsc::Receiver<WorkItem> {
        let (tx, rx) = mpsc::channel(WORKER_QUEUE_DEPTH);
        self.inboxes.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(worker, tx.clone());
            m
        });
        rx
    }

    /// Removes a worker: new requests to it fail with [`TransportError::WorkerGone`].
    pub fn detach(&self, worker: WorkerId) {
        self.inboxes.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(&worker);
            m
        });
    }
}

impl RequestPlane for InProcessRequestPlane {
    async fn generate(&self, to: Target, request: GenerateRequest) -> Result<ResponseStream, TransportError> {
        let worker = to.worker;
        let inbox = self.inboxes.load().get(&worker).cloned().ok_or(TransportError::WorkerGone(worker))?;
        let (reply, stream) = mpsc::channel(RESPONSE_STREAM_DEPTH);
        inbox.send(WorkItem { request, reply }).await.map_err(|_| TransportError::WorkerGone(worker))?;
        Ok(stream)
    }
}
