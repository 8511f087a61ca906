//! The mocker's task: takes requests from its intake, runs the [`Scheduler`] step by step in
//! simulated time, streams each request's outputs, sends each step's KV events to the runtime's
//! sink, reports load.
//!
//! Loop: when nothing is scheduled it awaits the inbox (no busy-waiting); when busy it drains
//! the inbox with `try_recv` between steps, plans a step, sleeps until the step's deadline (a
//! running deadline, so simulated time does not drift), then emits the step's tokens, publishes
//! the step's KV events in one batch and updates the load report. Resets are taken between
//! steps and while idle; their events go out before their answer. Disaggregated legs
//! ([`disagg`](super::disagg)): landed KV transfers and finished transfers' block releases are
//! taken between steps and while idle; when only blocks held for transfers stand in the way
//! of the next step, the loop waits for a release.
//!
//! Concurrency: this task owns all engine state (scheduler, cache, replies, rooms);
//! nothing is locked. It reaches the outside only by bounded channels: the intake (bounded by the
//! transport), the resets, each reply channel (`try_send` only, see
//! [`reply`](crate::worker::reply)), the runtime's event sink (awaited once per step), a `watch`
//! for load, the transfer arrivals and releases; transfer tasks run in its `JoinSet`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::contract::control::CONTROL_QUEUE_DEPTH;
use crate::contract::{DisaggLeg, FinishReason, GenerateRequest, LoadReport, WorkerError, WorkerId, WorkerOutput};
use crate::planes::request::WorkItem;
use crate::planes::transfer::{Arrival, TransferSender};
use crate::worker::engine::{EngineIo, EventSink, Intake};

use super::disagg::{self, DisaggIo, Matched, PrefillLeg, Release, Rooms, MAX_CONCURRENT_TRANSFERS};
use super::kv_cache::SeqId;
use super::scheduler::{Rejected, Scheduler, StepOutput, StepPlan};
use super::timing;
use crate::worker::reply::{Flush, Reply};

/// Requests one worker holds (queued, running, or finishing their replies); beyond it new work
/// stays in the transport's bounded inbox, which pushes back on the frontend.
pub const MAX_INFLIGHT_REQUESTS: usize = 4096;
/// Lag after which the step clock restarts instead of catching up: a stall (e.g. event-plane
/// backpressure) shortens at most this much of the following steps.
pub const MAX_CATCH_UP: Duration = Duration::from_millis(100);

/// The engine's disaggregation state (see [`disagg`]).
struct Disagg {
    sender: Option<TransferSender>,
    permits: Arc<Semaphore>,
    arrivals: Option<mpsc::Receiver<Arrival>>,
    bytes_per_block: u64,
    /// Prefill legs the scheduler holds.
    legs: HashMap<SeqId, PrefillLeg>,
    rooms: Rooms,
    /// Running transfer tasks (aborted if the engine task is).
    tasks: JoinSet<()>,
    /// Unregisters the in-process receiver when the engine ends.
    _in_process: Option<crate::planes::transfer::InProcessReceiverGuard>,
    /// Prefill legs whose transfer ended: their blocks can be freed.
    released_tx: mpsc::Sender<SeqId>,
    released: mpsc::Receiver<SeqId>,
}

/// One mocker worker's engine state and the channels it serves.
pub struct MockerTask {
    worker: WorkerId,
    sched: Scheduler,
    speedup_ratio: f64,
    intake: Intake,
    resets: mpsc::Receiver<oneshot::Sender<()>>,
    resets_open: bool,
    /// Replies of requests the scheduler holds.
    replies: HashMap<SeqId, Reply>,
    /// Replies of finished (or refused) requests still sending their last outputs.
    draining: Vec<Reply>,
    events: EventSink,
    load: watch::Sender<LoadReport>,
    deadline: Instant,
    outputs: Vec<StepOutput>,
    disagg: Disagg,
}

impl MockerTask {
    pub fn new(worker: WorkerId, sched: Scheduler, speedup_ratio: f64, disagg: DisaggIo, io: EngineIo) -> Self {
        let EngineIo { intake, events, load, resets } = io;
        let (released_tx, released) = mpsc::channel(MAX_INFLIGHT_REQUESTS);
        let disagg = Disagg {
            sender: disagg.sender,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_TRANSFERS)),
            arrivals: disagg.arrivals,
            bytes_per_block: disagg.bytes_per_block,
            legs: HashMap::new(),
            rooms: Rooms::new(disagg.timeout),
            tasks: JoinSet::new(),
            _in_process: disagg.in_process,
            released_tx,
            released,
        };
        Self {
            worker,
            sched,
            speedup_ratio,
            intake,
            resets,
            resets_open: true,
            replies: HashMap::new(),
            draining: Vec::new(),
            events,
            load,
            deadline: Instant::now(),
            outputs: Vec::new(),
            disagg,
        }
    }

    /// Runs until the inbox is closed (or a stop is requested) and every request has finished.
    pub async fn run(mut self) {
        while self.intake().await {
            self.drop_cancelled();
            let plan = self.sched.schedule();
            // A scheduler holding sequences always plans something (see its invariants), unless
            // blocks held for transfers are in the way: wait for one to end.
            debug_assert!(!plan.is_empty() || self.sched.is_idle() || self.sched.held() > 0);
            if plan.is_empty() && !self.sched.is_idle() && self.sched.held() > 0 {
                if let Some(seq) = self.disagg.released.recv().await {
                    self.sched.release(seq);
                }
            }
            if !plan.is_empty() {
                self.wait_step(&plan).await;
                self.outputs.clear();
                self.sched.complete(&plan, &mut self.outputs);
                self.deliver();
            }
            self.flush_all();
            self.publish().await;
            self.report();
            while self.disagg.tasks.try_join_next().is_some() {}
        }
        // A stopping prefill worker finishes the transfers it started.
        while self.disagg.tasks.join_next().await.is_some() {}
        tracing::debug!(worker = %self.worker, "mocker worker stopped");
    }

    /// Takes new work: waits while the scheduler is idle, else drains without waiting.
    /// Returns false when the worker is done.
    async fn intake(&mut self) -> bool {
        let mut waited = false;
        while self.sched.is_idle() {
            self.report();
            if !self.intake.is_open() && self.draining.is_empty() && self.disagg.rooms.no_waiting() {
                return false;
            }
            waited = true;
            let room = self.draining.len() < MAX_INFLIGHT_REQUESTS;
            let writable = any_writable(&self.draining);
            let expiry = self.disagg.rooms.next_deadline();
            let arrivals = self.disagg.arrivals.as_mut();
            let has_arrivals = arrivals.is_some();
            let arrival = async move {
                match arrivals {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(seq) = self.disagg.released.recv(), if self.sched.held() > 0 => self.sched.release(seq),
                a = arrival, if has_arrivals => match a {
                    Some(a) => self.on_arrival(a),
                    None => self.disagg.arrivals = None,
                },
                () = sleep_until_opt(expiry), if expiry.is_some() => self.expire_rooms(),
                item = self.intake.recv(), if self.intake.is_open() && room => {
                    if let Some(item) = item {
                        self.accept(item);
                    }
                }
                () = writable, if !self.draining.is_empty() => self.flush_all(),
                msg = self.resets.recv(), if self.resets_open => match msg {
                    Some(reply) => self.reset(reply).await,
                    None => self.resets_open = false,
                },
            }
        }
        if waited {
            // Simulated time restarts when work arrives after idling.
            self.deadline = Instant::now();
        }
        while self.replies.len() + self.draining.len() < MAX_INFLIGHT_REQUESTS {
            match self.intake.try_recv() {
                Some(item) => self.accept(item),
                None => break,
            }
        }
        while let Ok(seq) = self.disagg.released.try_recv() {
            self.sched.release(seq);
        }
        while let Some(a) = self.disagg.arrivals.as_mut().and_then(|rx| rx.try_recv().ok()) {
            self.on_arrival(a);
        }
        if self.disagg.rooms.next_deadline().is_some_and(|d| d <= Instant::now()) {
            self.expire_rooms();
        }
        // Bounded so a flood of resets cannot starve the steps.
        for _ in 0..CONTROL_QUEUE_DEPTH {
            match self.resets.try_recv() {
                Ok(reply) => self.reset(reply).await,
                Err(_) => break,
            }
        }
        true
    }

    /// Clears the cache (blocks held by requests in flight are republished at once) and answers
    /// once the runtime has published the reset's events.
    async fn reset(&mut self, reply: oneshot::Sender<()>) {
        self.sched.cache_mut().reset();
        self.publish().await;
        self.report();
        tracing::info!(worker = %self.worker, "mocker KV cache reset");
        self.events.ack(reply).await;
    }

    fn accept(&mut self, item: WorkItem) {
        let WorkItem { mut request, reply } = item;
        if reply.is_closed() {
            return;
        }
        let reply = Reply::new(reply);
        match request.disagg.take() {
            None => self.add(request, reply, None),
            Some(DisaggLeg::Prefill { room, peer: decode_worker, skip_blocks, bootstrap }) => {
                if self.disagg.sender.is_none() {
                    return self.refuse(reply, "this worker is not a prefill worker (no KV transfer sender)");
                }
                let Some(transfer_address) = bootstrap else {
                    return self
                        .refuse(reply, "a prefill leg for the mocker needs the decode worker's transfer address");
                };
                let leg = PrefillLeg {
                    room,
                    skip_blocks,
                    request_id: request.request_id,
                    decode_worker,
                    transfer_address,
                    prompt_tokens: request.token_ids.len(),
                };
                // The prefill leg computes the prompt and samples the first token only.
                request.sampling.max_tokens = 1;
                self.add(request, reply, Some(leg));
            }
            Some(DisaggLeg::Decode { room, skip_blocks, .. }) => {
                if self.disagg.arrivals.is_none() {
                    return self.refuse(reply, "this worker is not a decode worker (no KV transfer receiver)");
                }
                match self.disagg.rooms.wait(room, skip_blocks, request, reply) {
                    Ok(Some(m)) => self.import(m),
                    Ok(None) => {}
                    Err(reply) => self.draining.push(reply),
                }
            }
        }
    }

    fn refuse(&mut self, mut reply: Reply, message: &str) {
        reply.finish(WorkerOutput::Error(WorkerError::worker(message)));
        self.draining.push(reply);
    }

    /// A transfer landed (the transfer plane logged it).
    fn on_arrival(&mut self, a: Arrival) {
        if let Some(m) = self.disagg.rooms.land(a) {
            self.import(m);
        }
    }

    fn expire_rooms(&mut self) {
        let expired = self.disagg.rooms.expire(Instant::now());
        self.draining.extend(expired);
    }

    /// Starts a decode leg whose KV landed: its first token goes out at once.
    fn import(&mut self, m: Matched) {
        let Matched { skip_blocks, request, mut reply, arrival } = m;
        if reply.is_closed() {
            return;
        }
        let page = self.sched.cache().page_size();
        let expected = (request.token_ids.len().div_ceil(page) as u32).saturating_sub(skip_blocks);
        if arrival.header.num_blocks != expected {
            let message = format!(
                "the KV transfer carried {} blocks; this prompt needs {expected} after the {skip_blocks} cached ones",
                arrival.header.num_blocks
            );
            reply.finish(WorkerOutput::Error(WorkerError::worker(message)));
            self.draining.push(reply);
            return;
        }
        match self.sched.add_imported(request, skip_blocks as usize * page) {
            Ok(imported) => {
                if imported.token != arrival.header.first_token {
                    tracing::debug!(ours = ?imported.token, theirs = ?arrival.header.first_token, "first token differs from the prefill worker's");
                }
                reply.start(0, 0);
                if let Some(t) = imported.token {
                    reply.token(t);
                }
                match (imported.seq, imported.finish) {
                    (Some(seq), _) => {
                        reply.flush();
                        self.replies.insert(seq, reply);
                    }
                    (None, reason) => {
                        reply.finish(WorkerOutput::Finished { reason: reason.unwrap_or(FinishReason::Length) });
                        self.draining.push(reply);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "mocker refused an imported request");
                reply.finish(WorkerOutput::Error(e.into()));
                self.draining.push(reply);
            }
        }
    }

    fn add(&mut self, request: GenerateRequest, mut reply: Reply, leg: Option<PrefillLeg>) {
        let request_id = request.request_id;
        match self.sched.add(request) {
            Ok(seq) => {
                self.replies.insert(seq, reply);
                if let Some(leg) = leg {
                    self.disagg.legs.insert(seq, leg);
                    self.sched.hold_on_finish(seq);
                }
                return;
            }
            Err(Rejected::NothingToGenerate) => {
                reply.start(0, 0);
                reply.finish(WorkerOutput::Finished { reason: FinishReason::Length });
            }
            Err(e) => {
                tracing::warn!(request_id, error = %e, "mocker refused a request");
                reply.finish(WorkerOutput::Error(e.into()));
            }
        }
        self.draining.push(reply);
    }

    /// Cancels requests whose client is gone: their blocks are freed at once (still cached).
    fn drop_cancelled(&mut self) {
        let sched = &mut self.sched;
        self.replies.retain(|seq, r| {
            let closed = r.is_closed();
            if closed {
                sched.cancel(*seq);
            }
            !closed
        });
        self.draining.retain(|r| !r.is_closed());
        self.disagg.rooms.drop_cancelled();
        self.forget_dropped_legs();
    }

    fn forget_dropped_legs(&mut self) {
        if !self.disagg.legs.is_empty() {
            let replies = &self.replies;
            self.disagg.legs.retain(|seq, _| replies.contains_key(seq));
        }
    }

    async fn wait_step(&mut self, plan: &StepPlan) {
        let now = Instant::now();
        if self.deadline + MAX_CATCH_UP < now {
            self.deadline = now;
        }
        self.deadline += timing::step_duration(&plan.work, self.speedup_ratio);
        if self.deadline > now {
            tokio::time::sleep_until(self.deadline).await;
        } else {
            tokio::task::yield_now().await;
        }
    }

    /// Queues the step's outputs on their replies; finished requests move to `draining`.
    fn deliver(&mut self) {
        let outputs = std::mem::take(&mut self.outputs);
        for o in &outputs {
            if let Some(leg) = self.disagg.legs.get(&o.seq) {
                if o.finish.is_some() {
                    let leg = leg.clone();
                    self.start_transfer(o, leg);
                }
                continue;
            }
            let Some(reply) = self.replies.get_mut(&o.seq) else {
                continue;
            };
            reply.start(o.cached_tokens, o.computed_tokens);
            if let Some(t) = o.token {
                reply.token(t);
            }
            if let Some(reason) = o.finish {
                let mut reply = self.replies.remove(&o.seq).expect("looked up above");
                reply.finish(WorkerOutput::Finished { reason });
                self.draining.push(reply);
            }
        }
        self.outputs = outputs;
    }

    /// A prefill leg sampled its first token: its transfer task takes over its stream.
    fn start_transfer(&mut self, o: &StepOutput, leg: PrefillLeg) {
        self.disagg.legs.remove(&o.seq);
        let release = Release { tx: self.disagg.released_tx.clone(), seq: o.seq };
        let (Some(reply), Some(sender)) = (self.replies.remove(&o.seq), self.disagg.sender.clone()) else {
            return; // `release` drops here: the blocks are freed on the next intake
        };
        let page = self.sched.cache().page_size();
        let header = disagg::header(&leg, page, self.disagg.bytes_per_block, o.token);
        let started = WorkerOutput::Started { cached_tokens: o.cached_tokens, computed_tokens: o.computed_tokens };
        let permits = self.disagg.permits.clone();
        let tasks = &mut self.disagg.tasks;
        disagg::spawn_transfer(tasks, release, sender, permits, leg, header, reply.sender(), started);
    }

    /// Sends what every reply has pending; a closed reply cancels its request.
    fn flush_all(&mut self) {
        let sched = &mut self.sched;
        self.replies.retain(|seq, r| {
            if r.has_pending() && r.flush() == Flush::Closed {
                sched.cancel(*seq);
                return false;
            }
            true
        });
        self.draining.retain_mut(|r| r.flush() == Flush::Blocked);
        self.forget_dropped_legs();
    }

    async fn publish(&mut self) {
        let mut kinds = Vec::new();
        self.sched.cache_mut().drain_events(&mut kinds);
        self.events.send(kinds).await;
    }

    fn report(&self) {
        let now = self.sched.load();
        self.load.send_if_modified(|cur| {
            let changed = *cur != now;
            *cur = now;
            changed
        });
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves when any of `replies` can take a message (or is closed).
fn any_writable(replies: &[Reply]) -> impl Future<Output = ()> {
    let waits: Vec<_> = replies.iter().map(|r| Box::pin(r.sender().reserve_owned())).collect();
    async move {
        if !waits.is_empty() {
            // The permit is dropped at once: the capacity it proves is used by the next flush.
            let _ = futures::future::select_all(waits).await;
        }
    }
}

#[cfg(test)]
mod tests;
