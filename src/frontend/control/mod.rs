//! The control plane: turns discovery snapshots into worker groups, KV events into index
//! updates, and event-id gaps into recoveries.
//!
//! Concurrency: one task on the control-plane runtime owns the [`KvIndexWriter`] (the index's
//! only writer) and is the only caller of [`Frontend::set_workers`]. It is never on the request
//! path: shards read what it publishes. Recoveries run as separate tasks and hand their result
//! back over a bounded channel, so the event loop keeps draining the event plane meanwhile.
//!
//! Gaps: before applying an event, its id is checked against the worker's last applied id
//! ([`KvIndexWriter::check_gap`]). On a gap (including a worker first seen mid-stream) the
//! worker's later events are held in a bounded buffer while a recovery asks the worker for a
//! replay or a dump (see [`crate::contract::control`] for how each is applied); then the held
//! events past the recovered id are applied. A buffer that overflows is dropped: the next live
//! event shows a gap again and triggers another recovery. A worker is also synced (replay since
//! its last applied id) when it joins, so a frontend started late is exact without waiting for
//! the worker's next event, and every [`KV_SYNC_INTERVAL`].
//!
//! Load reports are reconciled by a task of their own ([`load`]).
//!
//! Approximate mode ([`crate::kv::approx`]): the loop also owns the [`Predictions`] of workers
//! without events. Shards queue what they dispatched to such workers ([`Frontend::predict`]);
//! here it becomes their predicted blocks in the index, expired every
//! [`APPROX_EXPIRY_INTERVAL`]. Approximate workers are not asked for replays. When events
//! arrive for a worker that was approximate, its predictions are dropped and it turns exact
//! (logged once at info) before the event is applied; with `--no-kv-events` every event is
//! ignored instead.
//!
//! Router replica sync ([`crate::frontend::replica`]): the loop also owns the
//! [`ReplicaPredictions`] of other frontends' decisions on exact workers. Each applied event
//! confirms (drops) the predicted blocks it stores; they expire every
//! [`REPLICA_EXPIRY_INTERVAL`]; a decision for a worker routed approximately becomes its
//! predicted blocks like this frontend's own.
//!
//! Index states ([`crate::frontend::index_state`]): the loop is the only writer of each worker's
//! state. A gap or a join makes it `recovering` until the recovery answers (`exact`) or fails
//! (`blind`); every [`CHECK_INTERVAL`] a worker busy and silent for [`SILENT_BOUND`] is probed
//! (a replay since its last applied event): events it published that never arrived, or no
//! answer, turn it `blind` (logged once, at warn); a blind worker is routed on predictions until a full resync
//! (its next event, or the periodic sync) brings it back through `recovering` to `exact`.

pub mod load;
pub mod recovery;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::contract::control::Recovery;
use crate::contract::control::{RecoveryError, RecoverySource};
use crate::contract::events::KvEvent;
use crate::contract::WorkerId;
use crate::frontend::index_state::{Silence, CHECK_INTERVAL, SILENT_BOUND};
use crate::frontend::{Frontend, IndexState, KvTracking, Prediction};
use crate::kv::approx::{Changed, Predictions};
use crate::kv::index::KvIndexWriter;
use crate::kv::replica::ReplicaPredictions;
use crate::planes::discovery::WorkerSnapshot;
use crate::planes::events::EventSubscriber;
use crate::planes::replica::DecisionBatch;
use crate::router::WorkerLoad;

/// Events held per worker while its recovery is in flight (a recovery takes one round trip; a
/// worker publishes one batch per engine step).
const RECOVERY_BUFFER_EVENTS: usize = 8192;
/// Recoveries whose results wait to be applied (one per worker at most is in flight).
const RECOVERY_RESULTS_DEPTH: usize = 64;
/// Every live worker is asked this often for the events after the last one applied. A worker
/// whose last events were lost (a NATS restart, say) and that then goes idle shows no gap until
/// it publishes again; this bounds how long the index can stay behind it. One small replay
/// (usually empty) per worker per period.
const KV_SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed recovery, a worker's events are applied as they come for this long before
/// another recovery is tried (no storm of recoveries against a worker that cannot answer).
const RECOVERY_BACKOFF: Duration = Duration::from_secs(1);
/// How often predicted blocks past their TTL are dropped: a block outlives its TTL by at most
/// this (small against Dynamo's 120 s default), and each pass is bounded
/// ([`crate::kv::approx::MAX_EXPIRED_PER_TICK`]).
const APPROX_EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often other frontends' unconfirmed decisions past [`crate::kv::replica::REPLICA_TTL`]
/// are dropped: a tenth of it.
const REPLICA_EXPIRY_INTERVAL: Duration = Duration::from_millis(500);
const _: () = assert!(APPROX_EXPIRY_INTERVAL.as_millis() == CHECK_INTERVAL.as_millis(), "one tick serves both");

/// A worker as approximate mode and the index states see it: its state cell (shared with the
/// shards), its KV capacity in blocks (its registration's; 0 if unknown), its load cell (is it
/// busy?), when it was first tracked and its last event arrived, and its silence watch.
struct Tracked {
    kv: Arc<KvTracking>,
    capacity_blocks: u64,
    load: Arc<WorkerLoad>,
    first_seen: Instant,
    last_event: Option<Instant>,
    silence: Silence,
}

#[derive(Default)]
struct Stream {
    recovering: bool,
    /// The recovery in flight is a probe of a busy, silent worker ([`State::check_silence`]).
    probe: bool,
    held: Vec<KvEvent>,
    overflowed: bool,
    no_recovery_until: Option<Instant>,
}

struct State<'a, P, R> {
    frontend: &'a Frontend<P>,
    writer: KvIndexWriter,
    recovery: Arc<R>,
    streams: HashMap<WorkerId, Stream>,
    results: mpsc::Sender<(WorkerId, Result<Recovery, RecoveryError>)>,
    predictions: Predictions,
    tracked: HashMap<WorkerId, Tracked>,
    /// `--no-kv-events` and an event was seen (logged once).
    ignoring_logged: bool,
    /// Router replica sync: other frontends' decisions on exact workers.
    replica: Option<ReplicaPredictions>,
}

/// Runs until both the discovery watch and the event plane are closed.
pub async fn run<P: Send + Sync + 'static, R: RecoverySource>(
    frontend: Arc<Frontend<P>>,
    writer: KvIndexWriter,
    mut discovery: watch::Receiver<WorkerSnapshot>,
    mut events: impl EventSubscriber,
    recovery: Arc<R>,
) {
    let (results, mut results_rx) = mpsc::channel(RECOVERY_RESULTS_DEPTH);
    let predictions = Predictions::new(frontend.approx.ttl);
    let mut st = State {
        frontend: &frontend,
        writer,
        recovery,
        streams: HashMap::new(),
        results,
        predictions,
        tracked: HashMap::new(),
        ignoring_logged: false,
        replica: None,
    };
    let mut decisions = match frontend.replica.as_ref().and_then(|r| r.take_control()) {
        Some(c) => {
            st.replica = Some(c.predictions);
            Some(c.incoming)
        }
        None => None,
    };
    let mut replica_expiry = tokio::time::interval(REPLICA_EXPIRY_INTERVAL);
    replica_expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `None` only if a second control loop runs for this frontend: it then takes no predictions.
    let mut predicted = frontend.take_predictions();
    let mut expiry = tokio::time::interval(APPROX_EXPIRY_INTERVAL);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: HashSet<WorkerId> = HashSet::new();
    let first = discovery.borrow_and_update().clone();
    st.apply_snapshot(&mut known, &first);
    let mut discovery_open = true;
    let mut sync = tokio::time::interval(KV_SYNC_INTERVAL);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sync.tick().await;
    loop {
        tokio::select! {
            _ = sync.tick() => {
                for w in known.iter().copied().collect::<Vec<_>>() {
                    st.sync(w);
                }
            }
            changed = discovery.changed(), if discovery_open => {
                if changed.is_err() {
                    discovery_open = false;
                    continue;
                }
                let snap = discovery.borrow_and_update().clone();
                st.apply_snapshot(&mut known, &snap);
            }
            Some((worker, result)) = results_rx.recv() => st.on_recovered(worker, result),
            Some(p) = async { predicted.as_mut()?.recv().await }, if predicted.is_some() => st.on_prediction(p),
            Some(b) = async { decisions.as_mut()?.recv().await }, if decisions.is_some() => st.on_decisions(b),
            _ = replica_expiry.tick(), if decisions.is_some() => st.expire_replica(Instant::now()),
            _ = expiry.tick() => {
                let changed = st.predictions.expire(&mut st.writer, Instant::now());
                st.count(changed);
                st.check_silence(Instant::now());
            }
            batch = events.next_batch() => {
                let Some(batch) = batch else { break };
                for event in batch {
                    st.on_event(event);
                }
            }
        }
    }
}

impl<P, R: RecoverySource> State<'_, P, R> {
    fn apply_snapshot(&mut self, known: &mut HashSet<WorkerId>, snap: &WorkerSnapshot) {
        let now: HashSet<WorkerId> = snap.iter().map(|w| w.id).collect();
        for gone in known.difference(&now) {
            tracing::info!(worker = %gone, "worker left; dropping its blocks from the index");
            self.writer.remove_worker(*gone);
            self.streams.remove(gone);
            self.predictions.remove(*gone);
            if let Some(r) = self.replica.as_mut() {
                r.remove_worker(*gone);
            }
        }
        let joined: Vec<WorkerId> = now.difference(known).copied().collect();
        for new in &joined {
            tracing::info!(worker = %new, "worker joined");
        }
        *known = now;
        self.frontend.set_workers(snap);
        self.track(snap);
        // Sync each new worker at once: a frontend started beside a warm, idle fleet is exact
        // within one round trip, not at its first event or the next periodic sync.
        for w in joined {
            self.sync(w);
        }
    }

    /// Refreshes each worker's mode cell and capacity from the groups just published.
    fn track(&mut self, snap: &WorkerSnapshot) {
        let mut tracked = HashMap::with_capacity(snap.len());
        for model in self.frontend.models() {
            let group = model.workers.load();
            for info in snap.iter().filter(|w| w.model == model.name) {
                let Some(e) = group.entries.get(&info.id) else { continue };
                let old = self.tracked.remove(&info.id);
                if old.is_none() && e.kv.get() == IndexState::Approximate {
                    let why = if self.frontend.approx.all { "--no-kv-events" } else { "it publishes no KV events" };
                    tracing::info!(worker = %info.id, engine = info.engine.as_str(), capacity_blocks = info.kv_capacity_blocks, "routing approximately to this worker ({why})");
                }
                let (first_seen, last_event, silence) =
                    old.map_or((Instant::now(), None, Silence::default()), |t| (t.first_seen, t.last_event, t.silence));
                let (kv, load) = (e.kv.clone(), e.load.clone());
                let capacity_blocks = info.kv_capacity_blocks;
                tracked.insert(info.id, Tracked { kv, capacity_blocks, load, first_seen, last_event, silence });
            }
        }
        self.tracked = tracked;
    }

    /// `w`'s index state (`None`: not tracked).
    fn state_of(&self, w: WorkerId) -> Option<IndexState> {
        self.tracked.get(&w).map(|t| t.kv.get())
    }

    /// Moves `w` to `to`; returns whether it changed.
    fn set_state(&self, w: WorkerId, to: IndexState) -> bool {
        self.tracked.get(&w).is_some_and(|t| t.kv.set(to))
    }

    /// `w` turns blind (logged once per transition): routed on predictions from now on.
    fn turn_blind(&self, w: WorkerId, why: &str) {
        if self.set_state(w, IndexState::Blind) {
            let silent_s = self.tracked.get(&w).and_then(|t| t.kv.since_event()).map(|d| d.as_secs_f64());
            tracing::warn!(worker = %w, silent_s, "index blind ({why}): routing this worker approximately until its events resume");
        }
    }

    /// The periodic look for exact workers that are busy and silent ([`Silence`]).
    fn check_silence(&mut self, now: Instant) {
        if self.frontend.approx.all {
            return;
        }
        let mut silent = Vec::new();
        for (&w, t) in self.tracked.iter_mut() {
            if t.kv.get() != IndexState::Exact {
                t.silence = Silence::default();
                continue;
            }
            let busy = t.load.view().requests > 0;
            if t.silence.check(now, busy, t.last_event.unwrap_or(t.first_seen), SILENT_BOUND) {
                silent.push(w);
            }
        }
        for w in silent {
            self.probe(w);
        }
    }

    /// Asks a busy, silent worker for the events after the last one applied: none means it is
    /// just quiet (it stays exact, and the silence is timed anew); some, or no answer, means its
    /// event stream is losing them: blind ([`Self::on_recovered`]).
    fn probe(&mut self, w: WorkerId) {
        let stream = self.streams.entry(w).or_default();
        if stream.recovering || stream.no_recovery_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        stream.probe = true;
        let since = self.writer.last_event_id(w).unwrap_or(0);
        tracing::debug!(worker = %w, since, "busy and silent: asking the worker what it published");
        self.start_recovery(w, since);
    }

    /// Brings a blind worker back: drops its predictions and blocks (they may mix guesses with
    /// facts) and asks for everything from event 0 (a replay from its first event, or a dump).
    fn resync_blind(&mut self, w: WorkerId) {
        let predicted = self.predictions.len_of(w);
        self.predictions.remove(w);
        self.writer.apply_dump(w, &[], 0);
        self.set_state(w, IndexState::Recovering);
        tracing::info!(worker = %w, predicted_blocks_dropped = predicted, "resyncing a blind worker's index from its first event");
        self.start_recovery(w, 0);
    }

    /// A shard dispatched a prompt to an approximate worker: record its blocks there. Ignored
    /// once the worker turned exact (or left).
    fn on_prediction(&mut self, p: Prediction) {
        let Some(t) = self.tracked.get(&p.worker).filter(|t| t.kv.is_approximate()) else { return };
        let capacity = t.capacity_blocks;
        let changed = self.predictions.store(&mut self.writer, p.worker, capacity, &p.blocks, Instant::now());
        self.count(changed);
    }

    /// Other frontends' decisions: predictions on exact workers until their events confirm
    /// them; a worker routed approximately gets them as predicted blocks. Workers not known
    /// here (not yet discovered, or of a model this frontend does not serve) are skipped.
    fn on_decisions(&mut self, batch: DecisionBatch) {
        let Some(sync) = self.frontend.replica.clone() else { return };
        let now = Instant::now();
        for d in &batch.decisions {
            let Some(t) = self.tracked.get(&d.worker) else {
                sync.stats.ignored.fetch_add(1, Relaxed);
                continue;
            };
            let capacity = t.capacity_blocks;
            if t.kv.is_approximate() {
                let changed = self.predictions.store(&mut self.writer, d.worker, capacity, &d.blocks, now);
                self.count(changed);
            } else if let Some(r) = self.replica.as_mut() {
                r.apply(&self.frontend.index, d.worker, capacity, &d.blocks, now);
            }
            sync.stats.applied.fetch_add(1, Relaxed);
        }
    }

    /// Router replica sync: `event` is applied, so the blocks it stores are no longer predicted.
    fn confirm(&mut self, event: &KvEvent) {
        if let (Some(r), Some(sync)) = (self.replica.as_mut(), self.frontend.replica.as_ref()) {
            let n = r.confirm(event);
            if n > 0 {
                sync.stats.blocks_confirmed.fetch_add(n, Relaxed);
            }
        }
    }

    fn expire_replica(&mut self, now: Instant) {
        if let (Some(r), Some(sync)) = (self.replica.as_mut(), self.frontend.replica.as_ref()) {
            sync.stats.blocks_expired.fetch_add(r.expire(now).expired, Relaxed);
        }
    }

    fn count(&self, c: Changed) {
        let m = &self.frontend.metrics.control;
        for (counter, n) in [
            (&m.kv_predicted_blocks_stored, c.stored),
            (&m.kv_predicted_blocks_evicted, c.evicted),
            (&m.kv_predicted_blocks_expired, c.expired),
        ] {
            if n > 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
    }

    /// Whether `event` is to be dropped: `--no-kv-events` ignores every event. Otherwise, the
    /// first event of a worker that was approximate turns it exact (its predictions dropped).
    fn approximate_event(&mut self, event: &KvEvent) -> bool {
        if self.frontend.approx.all {
            if !self.ignoring_logged {
                self.ignoring_logged = true;
                tracing::info!(worker = %event.worker, "ignoring KV events (--no-kv-events): every worker is routed approximately");
            }
            return true;
        }
        let w = event.worker;
        if let Some(t) = self.tracked.get(&w).filter(|t| t.kv.get() == IndexState::Approximate) {
            t.kv.set_exact();
            let predicted = self.predictions.len_of(w);
            self.predictions.forget(&mut self.writer, w);
            tracing::info!(worker = %w, event_id = event.event_id, predicted_blocks_dropped = predicted, "KV events arrived: worker switches from approximate to exact");
        }
        false
    }

    fn apply(&mut self, event: &KvEvent) {
        let frontend = self.frontend;
        let m = &frontend.metrics.control;
        match self.writer.apply(event) {
            Ok(()) => {
                self.confirm(event);
                m.kv_events_applied.fetch_add(1, Relaxed)
            }
            Err(e) => {
                tracing::debug!(worker = %event.worker, error = %e, "kv event not applied");
                m.kv_event_errors.fetch_add(1, Relaxed)
            }
        };
    }

    fn on_event(&mut self, event: KvEvent) {
        if self.approximate_event(&event) {
            return;
        }
        let w = event.worker;
        let now = Instant::now();
        if let Some(t) = self.tracked.get_mut(&w) {
            t.kv.event_at(now);
            t.last_event = Some(now);
        }
        let blind = self.state_of(w) == Some(IndexState::Blind);
        let stream = self.streams.entry(w).or_default();
        if blind && !stream.recovering && stream.no_recovery_until.is_none_or(|t| now >= t) {
            // Its events are back: resync, holding this one until the recovery answers.
            self.resync_blind(w);
            self.streams.entry(w).or_default().held.push(event);
            return;
        }
        if stream.recovering {
            if stream.held.len() < RECOVERY_BUFFER_EVENTS {
                stream.held.push(event);
            } else {
                stream.overflowed = true;
            }
            return;
        }
        let Some(expected) = self.writer.check_gap(&event) else {
            return self.apply(&event);
        };
        if stream.no_recovery_until.is_some_and(|t| Instant::now() < t) {
            return self.apply(&event);
        }
        let since = self.writer.last_event_id(w).unwrap_or(0);
        tracing::info!(worker = %w, expected, got = event.event_id, since, "kv event gap; asking the worker to replay");
        stream.held.push(event);
        self.set_state(w, IndexState::Recovering);
        self.start_recovery(w, since);
    }

    /// The periodic check of one worker: replay whatever came after the last event applied.
    fn sync(&mut self, w: WorkerId) {
        if self.frontend.approx.all || self.state_of(w) == Some(IndexState::Approximate) {
            return;
        }
        let stream = self.streams.entry(w).or_default();
        if stream.recovering || stream.no_recovery_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if self.state_of(w) == Some(IndexState::Blind) {
            return self.resync_blind(w);
        }
        let since = self.writer.last_event_id(w).unwrap_or(0);
        self.start_recovery(w, since);
    }

    /// Holds `w`'s events from now on and asks it for everything after `since`.
    fn start_recovery(&mut self, w: WorkerId, since: u64) {
        self.streams.entry(w).or_default().recovering = true;
        let recovery = self.recovery.clone();
        let results = self.results.clone();
        let to = self.frontend.target(w);
        tokio::spawn(async move {
            let r = recovery.recover(to, since).await;
            let _ = results.send((w, r)).await;
        });
    }

    fn on_recovered(&mut self, worker: WorkerId, result: Result<Recovery, RecoveryError>) {
        let Some(stream) = self.streams.get_mut(&worker) else { return };
        stream.recovering = false;
        let held = std::mem::take(&mut stream.held);
        let overflowed = std::mem::replace(&mut stream.overflowed, false);
        let probe = std::mem::take(&mut stream.probe);
        let answered = result.is_ok();
        let lost = match &result {
            Ok(Recovery::Replay(events)) => events.len(),
            Ok(Recovery::Dump { events, .. }) => events.len().max(1),
            Err(_) => 0,
        };
        match result {
            Ok(Recovery::Replay(events)) if events.is_empty() => {}
            Ok(Recovery::Replay(events)) => {
                tracing::info!(worker = %worker, events = events.len(), "recovered by replay");
                self.frontend.metrics.control.kv_recoveries_replay.fetch_add(1, Relaxed);
                if let Err(e) = self.writer.apply_replay(worker, &events) {
                    tracing::warn!(worker = %worker, error = %e, "replay did not apply cleanly");
                }
                events.iter().for_each(|e| self.confirm(e));
            }
            Ok(Recovery::Dump { events, last_event_id }) => {
                tracing::info!(worker = %worker, events = events.len(), last_event_id, "recovered from a cache dump");
                self.frontend.metrics.control.kv_recoveries_dump.fetch_add(1, Relaxed);
                self.writer.apply_dump(worker, &events, last_event_id);
                events.iter().for_each(|e| self.confirm(e));
            }
            Err(e) => {
                tracing::warn!(worker = %worker, error = %e, "recovery failed; applying its events as they come");
                self.frontend.metrics.control.kv_recoveries_failed.fetch_add(1, Relaxed);
                stream.no_recovery_until = Some(Instant::now() + RECOVERY_BACKOFF);
            }
        }
        if overflowed {
            tracing::warn!(worker = %worker, "events overflowed while recovering; the next event will recover again");
        }
        if !answered {
            self.turn_blind(worker, "its recovery failed");
        } else if probe && lost > 0 {
            let why = format!("busy, no KV event for {}s, and {lost} were never received", SILENT_BOUND.as_secs());
            self.turn_blind(worker, &why);
        } else if probe {
            // Quiet, nothing lost: time the silence anew.
            if let Some(t) = self.tracked.get_mut(&worker) {
                t.silence = Silence::default();
            }
        } else if self.set_state(worker, IndexState::Exact) {
            tracing::debug!(worker = %worker, "index exact");
        }
        let last = self.writer.last_event_id(worker).unwrap_or(0);
        for event in held.into_iter().filter(|e| e.event_id > last) {
            self.on_event(event);
        }
    }
}
