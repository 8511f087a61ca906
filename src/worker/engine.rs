//! The [`Engine`] trait: the one seam between kvgate's engine-neutral worker runtime
//! ([`super::runtime`]) and whatever generates tokens (the simulated [`mocker`](super::engines::mocker),
//! or an adapter to a real engine over its own HTTP API and KV-event stream).
//!
//! What an engine does, and only that: take requests from its [`Intake`], stream each request's
//! outputs on its [`Reply`](super::reply::Reply) (cancelling the engine-side request when the
//! reply closes), send the KV-cache changes it observes to its [`EventSink`] *without ids*, and
//! keep its [`LoadReport`] current. Everything else a worker owes a frontend is the runtime's and
//! therefore the same for every engine: stop and drain, contiguous event ids, the replay ring
//! and the published mirror that answer "replay since N" and "dump" (so an engine that cannot
//! dump its cache is still recoverable), and the control channel.
//!
//! The shapes it was designed against (`../shared/ENGINES.md`): the mocker steps a simulated
//! batch in one task and reports events per step; SGLang and vLLM stream token ids over HTTP per
//! request (a task per request, cancellation by request id) while their KV events arrive from a
//! separate ZMQ stream — both fit [`Engine::run`] owning its own loop and feeding the sink from
//! wherever its events come from; llama.cpp and other OpenAI-API servers publish none (their card
//! says `kv_events: false`, an empty sink). Engine-specific bootstrap information (kvgate's transfer
//! address, SGLang's bootstrap host/port) is advertised through [`EngineCard::bootstrap`].
//!
//! Concurrency: the engine's task owns the engine; it reaches the runtime only through bounded
//! channels ([`EVENT_SINK_DEPTH`], the transport's inbox, each reply channel) and a `watch`.

use std::future::Future;

use tokio::sync::{mpsc, oneshot, watch};

use crate::contract::events::KvEventKind;
use crate::contract::{DisaggStyle, EngineKind, LoadReport};
use crate::planes::request::WorkItem;

/// Event batches an engine may send ahead of the runtime's publishing: a few steps of slack;
/// beyond it the engine waits (the event plane's backpressure reaches the engine).
pub const EVENT_SINK_DEPTH: usize = 64;

/// What a worker registers about its engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineCard {
    pub kind: EngineKind,
    /// KV capacity in blocks of the model's page size (0 when the engine does not say).
    pub kv_capacity_blocks: u64,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    /// How the legs of a disaggregated pair run with this engine.
    pub disagg: DisaggStyle,
    /// What a peer needs to reach this worker's KV (see [`crate::planes::discovery::WorkerInfo::bootstrap`]).
    pub bootstrap: Option<String>,
    /// Whether the frontend receives exact KV events for this worker.
    pub kv_events: bool,
}

/// An engine behind the worker runtime. Implementations: the mocker, and the real-engine adapters.
pub trait Engine: Send + 'static {
    /// Facts registered in discovery.
    fn card(&self) -> EngineCard;

    /// Serves until [`Intake::recv`] returns `None` and every request taken has finished (or its
    /// reply closed). Resets arrive on `io.resets`: clear the cache, send its events, then
    /// [`EventSink::ack`] the reset's reply so it is answered after they are published.
    fn run(self, io: EngineIo) -> impl Future<Output = ()> + Send;
}

/// What the runtime hands an engine (a parameter struct: it grows with the engine's duties).
pub struct EngineIo {
    pub intake: Intake,
    pub events: EventSink,
    pub load: watch::Sender<LoadReport>,
    /// Reset requests (a frontend's `reset`): answered through [`EventSink::ack`].
    pub resets: mpsc::Receiver<oneshot::Sender<()>>,
}

/// Requests for the engine: the transport's inbox, closed by a stop. Requests already queued
/// when the stop comes are still delivered; then `recv` returns `None`.
pub struct Intake {
    inbox: mpsc::Receiver<WorkItem>,
    stop: oneshot::Receiver<()>,
    stopping: bool,
    closed: bool,
}

impl Intake {
    pub(crate) fn new(inbox: mpsc::Receiver<WorkItem>, stop: oneshot::Receiver<()>) -> Self {
        Self { inbox, stop, stopping: false, closed: false }
    }

    /// The next request; `None` once the inbox is closed (by its senders or a stop) and empty.
    /// Cancel-safe (both halves are), so it can sit in a `select!`.
    pub async fn recv(&mut self) -> Option<WorkItem> {
        loop {
            if self.closed {
                return None;
            }
            tokio::select! {
                biased;
                _ = &mut self.stop, if !self.stopping => self.begin_stop(),
                item = self.inbox.recv() => match item {
                    Some(item) => return Some(item),
                    None => self.closed = true,
                },
            }
        }
    }

    /// A request if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<WorkItem> {
        if !self.stopping && !matches!(self.stop.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
            self.begin_stop();
        }
        match self.inbox.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.closed = true;
                None
            }
        }
    }

    /// Whether more requests may come.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        self.inbox.close();
    }
}

/// What an engine sends the runtime, in order.
#[derive(Debug)]
pub(crate) enum SinkMsg {
    Batch(Vec<KvEventKind>),
    /// Answer once everything before it is published.
    Ack(oneshot::Sender<()>),
}

/// Where an engine sends the KV-cache changes it observes; the runtime stamps, mirrors and
/// publishes them in order.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<SinkMsg>,
}

impl EventSink {
    pub(crate) fn channel() -> (Self, mpsc::Receiver<SinkMsg>) {
        let (tx, rx) = mpsc::channel(EVENT_SINK_DEPTH);
        (Self { tx }, rx)
    }

    /// Sends one batch (published as one event-plane batch). Waits while the runtime is
    /// [`EVENT_SINK_DEPTH`] batches behind; a runtime that is gone drops the batch (the worker
    /// is ending).
    pub async fn send(&self, batch: Vec<KvEventKind>) {
        if !batch.is_empty() {
            let _ = self.tx.send(SinkMsg::Batch(batch)).await;
        }
    }

    /// Answers `reply` once every batch sent before has been published.
    pub async fn ack(&self, reply: oneshot::Sender<()>) {
        let _ = self.tx.send(SinkMsg::Ack(reply)).await;
    }
}

/// Where a worker is and what it serves (the rest of its registration comes from the card).
#[derive(Debug, Clone)]
pub struct Placement {
    pub id: crate::contract::WorkerId,
    pub model: String,
    pub model_path: Option<String>,
    pub role: crate::contract::WorkerRole,
    pub page_size: u32,
    /// Request-plane address (None in-process).
    pub address: Option<String>,
}

impl EngineCard {
    /// The registration of a worker placed at `at` running this engine.
    pub fn worker_info(&self, at: Placement) -> crate::planes::discovery::WorkerInfo {
        let Placement { id, model, model_path, role, page_size, address } = at;
        crate::planes::discovery::WorkerInfo {
            id,
            model,
            model_path,
            role,
            page_size,
            kv_capacity_blocks: self.kv_capacity_blocks,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            address,
            engine: self.kind,
            disagg: self.disagg,
            bootstrap: self.bootstrap.clone(),
            kv_events: self.kv_events,
        }
    }
}
