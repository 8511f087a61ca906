//! The engine-neutral worker runtime: what every worker owes a frontend, whatever its engine.
//!
//! [`spawn`] starts two tasks. The engine's ([`Engine::run`]) takes requests from the transport's
//! inbox and streams their outputs. The runtime's own task stamps the engine's KV events with ids
//! contiguous per worker (from 1), keeps the newest in the [`EventRing`] and the whole published
//! state in the [`Mirror`], publishes them in order, and answers [`WorkerControl`]: "replay since
//! N" from the ring, else a dump of the mirror stamped with the last id; resets go to the engine
//! and are answered once their events are published.
//!
//! An engine whose card says `kv_events: false` (the mocker with `--no-kv-events`) publishes
//! nothing: its batches are dropped here, so its ring and mirror stay empty and the frontend
//! predicts its cache (approximate mode, [`crate::kv::approx`]).
//!
//! Invariant: the ring, the mirror and the live stream agree on the last published id at every
//! answer, because one task does all three. Concurrency: the runtime task owns ring, mirror,
//! stamper and publisher; the engine reaches it only through its bounded [`EventSink`].
//! Shutdown: [`WorkerHandle::stop`] closes the intake, waits for the engine to drain, and the
//! runtime task ends when the engine drops its sink; dropping the handle aborts both tasks.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::contract::events::{KvEvent, KvEventKind};
use crate::contract::{LoadReport, WorkerId};
use crate::planes::events::EventPublisher;
use crate::planes::request::WorkItem;

use super::engine::{Engine, EngineCard, EngineIo, EventSink, Intake, SinkMsg};
use super::mirror::Mirror;
use super::ring::EventRing;
use crate::contract::control::{ControlMsg, Recovery, WorkerControl, CONTROL_QUEUE_DEPTH};

/// A running worker (its engine and its runtime). Dropping it aborts both; call
/// [`stop`](Self::stop) to drain.
#[must_use = "dropping a WorkerHandle aborts the worker"]
pub struct WorkerHandle {
    pub id: WorkerId,
    /// What the engine registered.
    pub card: EngineCard,
    /// The engine's own load, as it last reported it.
    pub load: watch::Receiver<LoadReport>,
    engine: Option<JoinHandle<()>>,
    runtime: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    control: WorkerControl,
}

/// Starts `engine` as worker `id` on the current tokio runtime, serving `inbox` and publishing
/// its KV events to `publisher`; `ring` bounds how far back it can replay.
pub fn spawn<E: Engine>(
    id: WorkerId,
    engine: E,
    inbox: mpsc::Receiver<WorkItem>,
    publisher: impl EventPublisher,
    ring: EventRing,
) -> WorkerHandle {
    let card = engine.card();
    let (load_tx, load) = watch::channel(LoadReport::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let (control, control_rx) = WorkerControl::channel(id);
    let (events, events_rx) = EventSink::channel();
    let (resets_tx, resets) = mpsc::channel(CONTROL_QUEUE_DEPTH);
    let io = EngineIo { intake: Intake::new(inbox, stop_rx), events, load: load_tx, resets };
    let engine = tokio::spawn(engine.run(io));
    let publishing = card.kv_events;
    let rt =
        Runtime { worker: id, next_id: 1, ring, mirror: Mirror::default(), publisher, resets: resets_tx, publishing };
    let runtime = tokio::spawn(rt.run(events_rx, control_rx));
    WorkerHandle { id, card, load, engine: Some(engine), runtime: Some(runtime), stop: Some(stop_tx), control }
}

impl WorkerHandle {
    /// A cloneable handle for replay / dump / reset requests; its calls fail with
    /// [`WorkerGoneError`](super::WorkerGoneError) once the worker has ended.
    pub fn control(&self) -> WorkerControl {
        self.control.clone()
    }

    /// Stops accepting requests (those already in the inbox are still served), waits for every
    /// in-flight request to finish and the last events to be published. A client that stops
    /// reading without dropping its stream holds this up; drop the handle instead to abort.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join_tasks().await;
    }

    /// Waits for the worker to end by itself (its inbox closed and every request finished).
    pub async fn join(mut self) {
        self.join_tasks().await;
    }

    /// Whether the engine has ended.
    pub fn is_finished(&self) -> bool {
        self.engine.as_ref().is_none_or(JoinHandle::is_finished)
    }

    async fn join_tasks(&mut self) {
        for task in [&mut self.engine, &mut self.runtime] {
            if let Some(t) = task.as_mut() {
                if let Err(e) = t.await {
                    if e.is_panic() {
                        tracing::error!(worker = %self.id, "worker task panicked");
                    }
                }
                // Only now: if this future is dropped while waiting, Drop still aborts the task.
                *task = None;
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        for task in [self.engine.take(), self.runtime.take()].into_iter().flatten() {
            task.abort();
        }
    }
}

/// The runtime task's state.
struct Runtime<P> {
    worker: WorkerId,
    next_id: u64,
    ring: EventRing,
    mirror: Mirror,
    publisher: P,
    resets: mpsc::Sender<oneshot::Sender<()>>,
    /// The card's `kv_events`: false drops every batch.
    publishing: bool,
}

impl<P: EventPublisher> Runtime<P> {
    async fn run(mut self, mut events: mpsc::Receiver<SinkMsg>, mut control: mpsc::Receiver<ControlMsg>) {
        let mut control_open = true;
        loop {
            tokio::select! {
                biased;
                msg = events.recv() => match msg {
                    Some(msg) => self.on_sink(msg).await,
                    None => break,
                },
                msg = control.recv(), if control_open => match msg {
                    Some(msg) => {
                        // Everything the engine sent before the question is part of the answer.
                        while let Ok(m) = events.try_recv() {
                            self.on_sink(m).await;
                        }
                        self.on_control(msg);
                    }
                    None => control_open = false,
                },
            }
        }
        tracing::debug!(worker = %self.worker, last_event_id = self.ring.last_event_id(), "worker runtime stopped");
    }

    async fn on_sink(&mut self, msg: SinkMsg) {
        match msg {
            SinkMsg::Batch(kinds) if self.publishing => self.publish(kinds).await,
            SinkMsg::Batch(_) => {}
            SinkMsg::Ack(reply) => {
                let _ = reply.send(());
            }
        }
    }

    fn on_control(&mut self, msg: ControlMsg) {
        match msg {
            ControlMsg::Recover { since_event_id, reply } => {
                let _ = reply.send(self.recovery(since_event_id));
            }
            // The engine answers through its sink, after the reset's events.
            ControlMsg::Reset { reply } => {
                if let Err(mpsc::error::TrySendError::Full(reply)) = self.resets.try_send(reply) {
                    // A reset is already pending: this one is answered with it (same effect).
                    tracing::debug!(worker = %self.worker, "reset requests coalesced");
                    let _ = reply.send(());
                }
            }
        }
    }

    /// Replay from the ring, or a dump of the mirror stamped with the last event id.
    fn recovery(&self, since: u64) -> Recovery {
        if let Some(events) = self.ring.since(since) {
            return Recovery::Replay(events);
        }
        let last_event_id = self.ring.last_event_id();
        let stamp = now_us();
        let events = self
            .mirror
            .dump()
            .into_iter()
            .map(|kind| KvEvent { worker: self.worker, event_id: last_event_id, timestamp_us: stamp, kind })
            .collect();
        tracing::info!(worker = %self.worker, since, last_event_id, blocks = self.mirror.len(), "replay not possible: dumping the published KV state");
        Recovery::Dump { events, last_event_id }
    }

    async fn publish(&mut self, kinds: Vec<KvEventKind>) {
        let stamp = now_us();
        let mut batch = Vec::with_capacity(kinds.len());
        for kind in kinds {
            self.mirror.apply(&kind);
            let event = KvEvent { worker: self.worker, event_id: self.next_id, timestamp_us: stamp, kind };
            self.next_id += 1;
            self.ring.push(event.clone());
            batch.push(event);
        }
        self.publisher.publish(batch).await;
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
