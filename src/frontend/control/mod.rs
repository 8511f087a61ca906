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
//! event shows a gap again and triggers another recovery.

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
use crate::frontend::Frontend;
use crate::kv::index::KvIndexWriter;
use crate::planes::discovery::WorkerSnapshot;
use crate::planes::events::EventSubscriber;

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

#[derive(Default)]
struct Stream {
    recovering: bool,
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
    let mut st = State { frontend: &frontend, writer, recovery, streams: HashMap::new(), results };
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
        }
        for new in now.difference(known) {
            tracing::info!(worker = %new, "worker joined");
        }
        *known = now;
        self.frontend.set_workers(snap);
    }

    fn apply(&mut self, event: &KvEvent) {
        let m = &self.frontend.metrics.control;
        match self.writer.apply(event) {
            Ok(()) => m.kv_events_applied.fetch_add(1, Relaxed),
            Err(e) => {
                tracing::debug!(worker = %event.worker, error = %e, "kv event not applied");
                m.kv_event_errors.fetch_add(1, Relaxed)
            }
        };
    }

    fn on_event(&mut self, event: KvEvent) {
        let w = event.worker;
        let stream = self.streams.entry(w).or_default();
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
        self.start_recovery(w, since);
    }

    /// The periodic check of one worker: replay whatever came after the last event applied.
    fn sync(&mut self, w: WorkerId) {
        let stream = self.streams.entry(w).or_default();
        if stream.recovering || stream.no_recovery_until.is_some_and(|t| Instant::now() < t) {
            return;
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
        match result {
            Ok(Recovery::Replay(events)) if events.is_empty() => {}
            Ok(Recovery::Replay(events)) => {
                tracing::info!(worker = %worker, events = events.len(), "recovered by replay");
                self.frontend.metrics.control.kv_recoveries_replay.fetch_add(1, Relaxed);
                if let Err(e) = self.writer.apply_replay(worker, &events) {
                    tracing::warn!(worker = %worker, error = %e, "replay did not apply cleanly");
                }
            }
            Ok(Recovery::Dump { events, last_event_id }) => {
                tracing::info!(worker = %worker, events = events.len(), last_event_id, "recovered from a cache dump");
                self.frontend.metrics.control.kv_recoveries_dump.fetch_add(1, Relaxed);
                self.writer.apply_dump(worker, &events, last_event_id);
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
        let last = self.writer.last_event_id(worker).unwrap_or(0);
        for event in held.into_iter().filter(|e| e.event_id > last) {
            self.on_event(event);
        }
    }
}
