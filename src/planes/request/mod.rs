//! The request plane: how a frontend hands a [`GenerateRequest`] to a worker and gets its
//! response stream back.
//!
//! Invariant: every queue is bounded ([`WORKER_QUEUE_DEPTH`], [`RESPONSE_STREAM_DEPTH`]); a
//! frontend that drops its [`ResponseStream`] cancels the request (the worker sees its reply
//! channel closed and frees what the request held). The in-process implementation is what
//! `kvgate serve` and the hermetic tests use; the TCP one implements the same trait.

pub mod in_process;
pub mod tcp;

use std::future::Future;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::contract::{GenerateRequest, Target, WorkerId, WorkerOutput};

pub use crate::contract::WorkItem;
pub use in_process::InProcessRequestPlane;

/// Requests queued at one worker before senders wait: a worker's own scheduler holds the rest.
pub const WORKER_QUEUE_DEPTH: usize = 1024;
/// Outputs buffered per response stream: a slow client pauses its worker's stream after this.
pub const RESPONSE_STREAM_DEPTH: usize = 256;

/// The receiving half of one request's response stream. Dropping it cancels the request.
pub type ResponseStream = mpsc::Receiver<WorkerOutput>;

/// Failures of the request plane itself (not of the engine).
#[derive(Debug, Error)]
pub enum TransportError {
    /// The worker is not (or no longer) reachable; another worker may serve the request.
    #[error("worker {0} is not reachable")]
    WorkerGone(WorkerId),
}

/// One seam: send a request to a worker, get its stream.
pub trait RequestPlane: Send + Sync + 'static {
    /// Sends `request` to `to.worker` (at `to.endpoint`, for a plane that dials).
    fn generate(
        &self,
        to: Target,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<ResponseStream, TransportError>>;
}
