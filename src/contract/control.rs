//! Control of a running worker from outside its task: recovering a consumer that missed KV
//! events ("replay since N" or "dump your whole cache"), and resetting the cache.
//!
//! Concurrency: a [`WorkerControl`] is a cloneable sender on one bounded channel
//! ([`CONTROL_QUEUE_DEPTH`]) into the worker's task; each call carries a oneshot for its answer.
//! The task answers between engine steps and while idle, after every event of the steps before
//! has been published, so an answer and the live event stream agree at `last_event_id`. A
//! consumer that awaits [`WorkerControl::recover`] while not draining the event plane can stall
//! a worker whose publish is waiting on a full plane; run recovery beside the drain loop (or
//! keep the plane's bound, which is far above what a recovering consumer leaves queued).
//!
//! ## Applying a [`Recovery`] (what a consumer does)
//!
//! A consumer tracks the last event id it applied per worker, `last`, and compares each event's
//! id *before* applying it: on `id > last + 1` it calls `recover(last)`.
//! - [`Recovery::Replay`]: apply the events in order (ids `last + 1 ..= L`, contiguous), set
//!   `last = L`, then drop live events with `id <= last` (already applied) and go on.
//! - [`Recovery::Dump`]: the events are a snapshot, not part of the live stream: every one has
//!   `event_id == last_event_id` (`L`), which no live event after them reuses. Apply all of them
//!   in order, whatever their ids: the leading `Cleared` wipes the worker's stale state and the
//!   `Stored` events (parents first) rebuild exactly the blocks it holds at `L`. Then set
//!   `last = L` (even if it was higher: the worker's word wins), drop live events `<= L` and
//!   expect `L + 1` next.

use std::future::Future;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::contract::events::KvEvent;
use crate::contract::WorkerId;

/// Control requests queued at one worker before callers wait: recoveries come from a handful of
/// routers, and each waits for its answer anyway.
pub const CONTROL_QUEUE_DEPTH: usize = 16;

/// How a consumer that missed events catches up; see the module doc for how to apply it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Every event after `since`, in order (empty when nothing was missed).
    Replay(Vec<KvEvent>),
    /// `since` was too old (or in the future): the whole cache state as one `Cleared` followed
    /// by `Stored` events that rebuild every cached full block (parents before children, each
    /// `parent` correct), every event stamped `event_id == last_event_id`; live events resume
    /// at `last_event_id + 1`.
    Dump { events: Vec<KvEvent>, last_event_id: u64 },
}

/// The worker's task has ended (stopped, aborted or panicked); nothing more comes from it. A
/// router should drop the worker's blocks (discovery will remove it too); a retry does not help.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("worker {0} is gone")]
pub struct WorkerGoneError(pub WorkerId);

/// One control request, as the worker's task receives it.
#[derive(Debug)]
pub enum ControlMsg {
    Recover {
        since_event_id: u64,
        reply: oneshot::Sender<Recovery>,
    },
    /// Answered once the reset's events are published.
    Reset {
        reply: oneshot::Sender<()>,
    },
}

/// A cloneable handle that controls one worker (see the module doc).
#[derive(Debug, Clone)]
pub struct WorkerControl {
    worker: WorkerId,
    tx: mpsc::Sender<ControlMsg>,
}

impl WorkerControl {
    /// A handle and the receiving end its worker's task owns.
    pub fn channel(worker: WorkerId) -> (Self, mpsc::Receiver<ControlMsg>) {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE_DEPTH);
        (Self { worker, tx }, rx)
    }

    pub fn worker(&self) -> WorkerId {
        self.worker
    }

    /// Every event after `since_event_id` if the worker still holds them, else a dump.
    pub async fn recover(&self, since_event_id: u64) -> Result<Recovery, WorkerGoneError> {
        self.call(|reply| ControlMsg::Recover { since_event_id, reply }).await
    }

    /// Clears the cache: publishes `Cleared`, and returns once it is published. Blocks held by
    /// requests in flight are not dropped (those requests keep working and stay shareable):
    /// they are republished as `Stored` right after the `Cleared`, in the same batch, so the
    /// events describe the cache exactly. An idle worker ends with an empty cache.
    pub async fn reset(&self) -> Result<(), WorkerGoneError> {
        self.call(|reply| ControlMsg::Reset { reply }).await
    }

    async fn call<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> ControlMsg) -> Result<T, WorkerGoneError> {
        let gone = WorkerGoneError(self.worker);
        let (reply, answer) = oneshot::channel();
        self.tx.send(msg(reply)).await.map_err(|_| gone)?;
        answer.await.map_err(|_| gone)
    }
}

/// Why a recovery could not be had.
#[derive(Debug, Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Gone(#[from] WorkerGoneError),
    #[error("no recovery path to worker {0}")]
    Unknown(WorkerId),
}

/// Asks a worker for the events after `since` (or a dump).
pub trait RecoverySource: Send + Sync + 'static {
    fn recover(&self, to: super::Target, since: u64) -> impl Future<Output = Result<Recovery, RecoveryError>> + Send;
}
