//! The worker runtime: one task per engine worker, serving [`WorkItem`]s from its inbox and
//! publishing KV events and load, and answering [`control`] requests (replay / dump / reset).
//!
//! Invariant: a worker's engine state is owned by its task alone; the outside reaches it only
//! through the bounded inbox, each request's bounded reply channel, the event publisher, the
//! `watch` of [`LoadReport`] and the bounded control channel behind [`WorkerControl`]. Shutdown: the task ends by itself once its inbox is closed and
//! every request has finished; [`WorkerHandle::stop`] closes the inbox from the worker's side
//! and waits for in-flight requests to drain; dropping the handle aborts the task (in-flight
//! reply channels close, which the frontend sees as a failed stream).

pub mod control;
pub mod engine;
pub mod launch;
pub mod transfer;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::events::EventPublisher;
use crate::protocol::{LoadReport, TokenId, WorkerId};
use crate::transport::WorkItem;

use engine::mocker::engine::{Engine, EngineIo};
use engine::mocker::model::MockModel;
use engine::mocker::ring::EventRing;
use engine::mocker::scheduler::Scheduler;

pub use control::{Recovery, WorkerControl, WorkerGoneError, CONTROL_QUEUE_DEPTH};
pub use engine::mocker::disagg::DisaggIo;
pub use engine::mocker::ring::{EVENT_RING_CAPACITY, EVENT_RING_MAX_BLOCKS};
pub use engine::mocker::{MockerArgs, MockerConfig, MockerConfigError};

/// A running worker task. Dropping it aborts the task; call [`stop`](Self::stop) to drain.
#[must_use = "dropping a WorkerHandle aborts the worker"]
pub struct WorkerHandle {
    pub id: WorkerId,
    /// The engine's own load, updated every step.
    pub load: watch::Receiver<LoadReport>,
    task: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    control: WorkerControl,
}

impl WorkerHandle {
    /// A cloneable handle for replay / dump / reset requests; its calls fail with
    /// [`WorkerGoneError`] once the task has ended.
    pub fn control(&self) -> WorkerControl {
        self.control.clone()
    }

    /// Stops accepting requests (those already in the inbox are still served), waits for every
    /// in-flight request to finish, then for the task to end. A client that stops reading
    /// without dropping its stream holds this up; drop the handle instead to abort.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join_task().await;
    }

    /// Waits for the task to end by itself (its inbox closed and every request finished).
    pub async fn join(mut self) {
        self.join_task().await;
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    async fn join_task(&mut self) {
        if let Some(task) = self.task.as_mut() {
            if let Err(e) = task.await {
                if e.is_panic() {
                    tracing::error!(worker = %self.id, "worker task panicked");
                }
            }
            // Only now: if this future is dropped while waiting, Drop still aborts the task.
            self.task = None;
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs one mocker worker on the current tokio runtime until `inbox` closes or shutdown.
/// `output_tokens` is the text (as token ids) the mock model generates from.
pub fn spawn_mocker(
    id: WorkerId,
    config: MockerConfig,
    inbox: mpsc::Receiver<WorkItem>,
    publisher: impl EventPublisher + Clone,
    output_tokens: Arc<[TokenId]>,
) -> WorkerHandle {
    spawn_mocker_with_ring(id, config, inbox, publisher, output_tokens, EventRing::default(), DisaggIo::default())
}

/// [`spawn_mocker`] for a disaggregated role: a prefill worker gets a transfer sender, a decode
/// worker the arrivals of its transfer receiver.
pub fn spawn_mocker_disagg(
    id: WorkerId,
    config: MockerConfig,
    inbox: mpsc::Receiver<WorkItem>,
    publisher: impl EventPublisher + Clone,
    output_tokens: Arc<[TokenId]>,
    disagg: DisaggIo,
) -> WorkerHandle {
    spawn_mocker_with_ring(id, config, inbox, publisher, output_tokens, EventRing::default(), disagg)
}

/// [`spawn_mocker`] with a given replay ring (tests use small ones).
pub(crate) fn spawn_mocker_with_ring(
    id: WorkerId,
    config: MockerConfig,
    inbox: mpsc::Receiver<WorkItem>,
    publisher: impl EventPublisher + Clone,
    output_tokens: Arc<[TokenId]>,
    ring: EventRing,
    disagg: DisaggIo,
) -> WorkerHandle {
    log_capacity(id, &config);
    let sched = Scheduler::new(&config, engine_salt(id), MockModel::new(output_tokens));
    let (load_tx, load) = watch::channel(sched.load());
    let (stop_tx, stop_rx) = oneshot::channel();
    let (control, control_rx) = WorkerControl::channel(id);
    let io = EngineIo { inbox, stop: stop_rx, control: control_rx, publisher, load: load_tx, disagg };
    let engine = Engine::new(id, sched, config.speedup_ratio, ring, io);
    let task = tokio::spawn(engine.run());
    WorkerHandle { id, load, task: Some(task), stop: Some(stop_tx), control }
}

/// Logs the simulated KV capacity (bytes only when the model's size is known).
fn log_capacity(id: WorkerId, config: &MockerConfig) {
    tracing::info!(
        worker = %id,
        kv_blocks = config.num_gpu_blocks,
        kv_tokens = config.capacity_tokens(),
        page_size = config.page_size,
        kv_bytes = config.capacity_bytes(),
        kv_bytes_per_token = config.kv_bytes_per_token,
        kv_bytes_per_block = config.kv_bytes_per_block(),
        "mocker KV capacity"
    );
}

/// A per-worker non-zero salt: engine hashes are `seq_hash ^ salt` (splitmix64 of the id).
fn engine_salt(id: WorkerId) -> u64 {
    let mut z = id.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}
