//! Recovery end to end: a mocker worker whose publisher drops batches on purpose, and a consumer
//! that detects the gap, asks for a replay or a dump, and ends with exactly the worker's state
//! (the state rebuilt from every event the worker published, dropped or not).
//!
//! The real [`KvIndex`] follows live and replayed events. A dump is applied to the naive index
//! only: `KvIndexWriter` has no entry point for a snapshot yet (its `apply` ignores events whose
//! id is not newer, and a dump's events all carry the same id).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::contract::events::{KvEvent, KvEventKind};
use crate::contract::{FinishReason, TokenId, WorkerId, WorkerOutput};
use crate::kv::hash::{BlockHasher, SeqHash};
use crate::kv::index::{KvIndex, KvIndexWriter};
use crate::planes::events::{self, EventPublisher, EventSubscriber, InProcessPublisher, InProcessSubscriber};
use crate::planes::request::WorkItem;
use crate::worker::engines::mocker::test_util::{config, request, NaiveIndex};
use crate::worker::engines::mocker::MockerConfig;
use crate::worker::ring::EventRing;
use crate::worker::{spawn, Mocker, Recovery, WorkerControl, WorkerGoneError, WorkerHandle};

const W: WorkerId = WorkerId(11);
const PAGE: u32 = 4;
const LIMIT: Duration = Duration::from_secs(20);

/// Publishes through the in-process plane unless `dropping`; logs every batch either way.
#[derive(Clone)]
struct LossyPublisher {
    inner: InProcessPublisher,
    log: Arc<Mutex<Vec<Vec<KvEvent>>>>,
    dropping: Arc<AtomicBool>,
}

impl EventPublisher for LossyPublisher {
    async fn publish(&self, batch: Vec<KvEvent>) {
        self.log.lock().unwrap().push(batch.clone());
        if !self.dropping.load(Ordering::SeqCst) {
            self.inner.publish(batch).await;
        }
    }
}

struct Harness {
    worker: WorkerHandle,
    control: WorkerControl,
    inbox: mpsc::Sender<WorkItem>,
    events: InProcessSubscriber,
    log: Arc<Mutex<Vec<Vec<KvEvent>>>>,
    dropping: Arc<AtomicBool>,
}

fn start(config: MockerConfig, ring: EventRing) -> Harness {
    let (tx, rx) = mpsc::channel(64);
    let (inner, events) = events::in_process();
    let publisher = LossyPublisher { inner, log: Arc::default(), dropping: Arc::default() };
    let (log, dropping) = (publisher.log.clone(), publisher.dropping.clone());
    let worker = spawn(W, Mocker::new(W, config, (0..500).collect()), rx, publisher, ring);
    Harness { control: worker.control(), worker, inbox: tx, events, log, dropping }
}

impl Harness {
    /// Runs requests concurrently to completion; returns each one's generated tokens.
    async fn run(&self, prompts: &[Vec<TokenId>], max_tokens: u32) -> Vec<Vec<TokenId>> {
        let mut streams = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            streams.push(self.send(i as u64, p.clone(), max_tokens).await);
        }
        let mut out = Vec::new();
        for rx in streams {
            out.push(finish(rx, Vec::new()).await);
        }
        out
    }

    async fn send(&self, id: u64, p: Vec<TokenId>, max: u32) -> mpsc::Receiver<WorkerOutput> {
        let (reply, rx) = mpsc::channel(8);
        let item = WorkItem { request: request(id, p, max), reply };
        self.inbox.send(item).await.unwrap();
        rx
    }

    /// The worker's last event id; every event up to it has been published when this returns.
    async fn barrier(&self) -> u64 {
        let answer = timeout(LIMIT, self.control.recover(u64::MAX)).await;
        match answer.expect("answered in time").unwrap() {
            Recovery::Dump { last_event_id, .. } => last_event_id,
            r => panic!("a future id must get a dump: {r:?}"),
        }
    }

    /// The worker's true state: every event it published up to `last`, dropped or not.
    fn truth(&self, last: u64) -> NaiveIndex {
        let mut t = NaiveIndex::default();
        for e in self.log.lock().unwrap().iter().flatten() {
            if e.event_id <= last {
                t.apply(&e.kind);
            }
        }
        t
    }
}

/// Reads a stream to its end (after `tokens` already read); it must finish by length.
async fn finish(mut rx: mpsc::Receiver<WorkerOutput>, mut tokens: Vec<TokenId>) -> Vec<TokenId> {
    let read = async {
        loop {
            match rx.recv().await {
                Some(WorkerOutput::Started { .. }) => {}
                Some(WorkerOutput::Tokens(t)) => tokens.extend(t),
                Some(WorkerOutput::Finished { reason }) => {
                    assert_eq!(reason, FinishReason::Length);
                    return tokens;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    timeout(LIMIT, read).await.expect("stream finished in time")
}

/// A router's view of one worker: applies events in order and recovers on a gap.
struct Consumer {
    last: u64,
    naive: NaiveIndex,
    /// The real index; `None` where dumps are expected (see the module doc).
    real: Option<(Arc<KvIndex>, KvIndexWriter)>,
    replays: usize,
    /// Removal events among the replayed ones.
    replayed_removals: usize,
    dumps: usize,
}

impl Consumer {
    fn new(with_real_index: bool) -> Self {
        Self {
            last: 0,
            naive: NaiveIndex::default(),
            real: with_real_index.then(KvIndex::new),
            replays: 0,
            replayed_removals: 0,
            dumps: 0,
        }
    }

    /// Consumes live batches until event `target` is applied.
    async fn sync(&mut self, h: &mut Harness, target: u64) {
        while self.last < target {
            let next = timeout(LIMIT, h.events.next_batch()).await;
            for e in next.expect("events in time").expect("plane open") {
                // The id is checked before applying: a replay must start right after `last`.
                if e.event_id > self.last + 1 {
                    self.recover(&h.control).await;
                }
                if e.event_id > self.last {
                    self.apply(&e);
                }
            }
        }
    }

    fn apply(&mut self, e: &KvEvent) {
        assert_eq!((e.worker, e.event_id), (W, self.last + 1));
        if let Some((_, writer)) = &mut self.real {
            writer.apply(e).expect("in order");
        }
        self.naive.apply(&e.kind);
        self.last = e.event_id;
    }

    async fn recover(&mut self, control: &WorkerControl) {
        match control.recover(self.last).await.unwrap() {
            Recovery::Replay(events) => {
                assert!(!events.is_empty(), "a gap was seen");
                events.iter().for_each(|e| self.apply(e));
                self.replayed_removals +=
                    events.iter().filter(|e| matches!(e.kind, KvEventKind::Removed { .. })).count();
                self.replays += 1;
            }
            Recovery::Dump { events, last_event_id } => {
                assert!(self.real.is_none(), "the real index cannot take a dump yet");
                assert_eq!(events[0].kind, KvEventKind::Cleared);
                for e in &events {
                    assert_eq!((e.worker, e.event_id), (W, last_event_id));
                    self.naive.apply(&e.kind);
                }
                self.last = last_event_id;
                self.dumps += 1;
            }
        }
    }

    /// The consumer's view equals `truth`, also through the real index's lookups.
    fn check(&self, truth: &NaiveIndex, prompts: &[Vec<TokenId>]) {
        assert!(!truth.cached.is_empty());
        assert_eq!(self.naive.cached, truth.cached);
        let Some((index, _)) = &self.real else {
            return;
        };
        assert_eq!(index.cached_blocks(W), truth.cached.len() as u64);
        for h in &truth.cached {
            assert_eq!(index.holders(*h), vec![W]);
        }
        for p in prompts {
            let hashes = hashes(p);
            let want = hashes.iter().take_while(|h| truth.cached.contains(h)).count();
            assert_eq!(index.find_matches(&hashes).overlap(W) as usize, want);
        }
    }
}

fn hashes(tokens: &[TokenId]) -> Vec<SeqHash> {
    BlockHasher::new(PAGE as usize).seq_hashes(tokens)
}

/// Distinct 24-token prompts (6 blocks each); those of equal parity share their first 2
/// blocks, so the cache branches.
fn prompts(from: u32, n: u32) -> Vec<Vec<TokenId>> {
    (from..from + n)
        .map(|i| {
            let shared = (0..8).map(|t| 900 + (i % 2) * 10 + t);
            shared.chain((8..24).map(|t| 1000 + i * 100 + t)).collect()
        })
        .collect()
}

/// Runs the scenario: clean phase, a phase whose batches are dropped, then a phase whose first
/// event reveals the gap, then a clean phase; checks the consumer after each recovered phase.
async fn lose_and_recover(h: &mut Harness, c: &mut Consumer) {
    let mut used = prompts(0, 3);
    h.run(&used, 12).await;
    let l1 = h.barrier().await;
    c.sync(h, l1).await;
    assert_eq!((c.replays, c.dumps), (0, 0));

    h.dropping.store(true, Ordering::SeqCst);
    let lost = prompts(3, 2);
    h.run(&lost, 12).await;
    let l2 = h.barrier().await;
    h.dropping.store(false, Ordering::SeqCst);
    assert!(l2 > l1 + 4, "more events lost than a 4-event ring holds");
    used.extend(lost);

    for phase in [prompts(5, 2), prompts(7, 1)] {
        h.run(&phase, 12).await;
        used.extend(phase);
        let l = h.barrier().await;
        c.sync(h, l).await;
        c.check(&h.truth(l), &used);
    }
}

#[tokio::test]
async fn a_replay_recovers_a_consumer_that_missed_batches() {
    // 32 blocks: the workload evicts, so the replay carries removals too.
    let mut h = start(config(PAGE, 32, 8192, 8), EventRing::default());
    let mut c = Consumer::new(true);
    lose_and_recover(&mut h, &mut c).await;
    assert_eq!((c.replays, c.dumps), (1, 0));
    assert!(c.replayed_removals > 0, "the replay carries evictions");
}

#[tokio::test]
async fn a_dump_recovers_a_consumer_whose_gap_left_the_ring() {
    let mut h = start(config(PAGE, 32, 8192, 8), EventRing::new(4, usize::MAX));
    let mut c = Consumer::new(false);
    lose_and_recover(&mut h, &mut c).await;
    assert_eq!((c.replays, c.dumps), (0, 1), "one dump, then live events in order");
}

#[tokio::test]
async fn a_dump_is_the_exact_state_and_a_recent_id_replays() {
    let h = start(config(PAGE, 32, 8192, 8), EventRing::new(4, usize::MAX));
    h.run(&prompts(0, 6), 12).await;
    let last = h.barrier().await;
    let Recovery::Dump { events, .. } = h.control.recover(0).await.unwrap() else {
        panic!("event 1 left a 4-event ring")
    };
    let truth = h.truth(last);
    assert!(!truth.cached.is_empty());
    // Over stale state, and over the true state (which checks every parent it announces).
    for mut index in [h.truth(last / 2), truth.clone()] {
        events.iter().for_each(|e| index.apply(&e.kind));
        assert_eq!(index.cached, truth.cached);
    }
    let Recovery::Replay(tail) = h.control.recover(last - 2).await.unwrap() else {
        panic!("the last 4 events are in the ring")
    };
    let ids: Vec<u64> = tail.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, vec![last - 1, last]);
    assert_eq!(h.control.recover(last).await.unwrap(), Recovery::Replay(vec![]));
}

#[tokio::test]
async fn reset_clears_and_in_flight_requests_complete() {
    let h = start(MockerConfig { speedup_ratio: 20.0, ..config(PAGE, 256, 8192, 8) }, EventRing::default());
    let done = prompts(0, 1);
    h.run(&done, 8).await;
    let before = h.barrier().await;

    // A long request in flight: it holds its prompt's blocks when the reset comes.
    let long: Vec<TokenId> = (0..20).map(|t| 3000 + t).collect();
    let mut rx = h.send(9, long.clone(), 400).await;
    let mut first = Vec::new();
    while first.len() < 8 {
        match timeout(LIMIT, rx.recv()).await.unwrap() {
            Some(WorkerOutput::Tokens(t)) => first.extend(t),
            Some(WorkerOutput::Started { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    h.control.reset().await.unwrap();
    let out = finish(rx, first).await;
    assert_eq!(out.len(), 400, "the request in flight completes");

    // Replaying every event: the Cleared's batch leaves only the long request's held blocks.
    let mut all: Vec<u64> = Vec::new();
    let mut state = NaiveIndex::default();
    let mut at_reset = None;
    for batch in h.log.lock().unwrap().iter() {
        batch.iter().for_each(|e| state.apply(&e.kind));
        all.extend(batch.iter().map(|e| e.event_id));
        if batch.iter().any(|e| e.kind == KvEventKind::Cleared) {
            assert!(batch[0].event_id > before, "one Cleared, from the reset");
            assert!(at_reset.replace(state.cached.clone()).is_none());
        }
    }
    let mut seq = long.clone();
    seq.extend(&out);
    let held: HashSet<SeqHash> = hashes(&seq).into_iter().collect();
    let at_reset = at_reset.expect("reset emits Cleared");
    assert!(!at_reset.is_empty() && at_reset.is_subset(&held), "{at_reset:?}");
    assert!(hashes(&done[0]).iter().all(|h| !state.cached.contains(h)));
    // The last sampled token's KV is never computed: the cache ends one token short.
    let computed: HashSet<SeqHash> = hashes(&seq[..seq.len() - 1]).into_iter().collect();
    assert_eq!(state.cached, computed);
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());

    // Idle: a reset leaves nothing.
    h.control.reset().await.unwrap();
    let last = h.barrier().await;
    assert!(h.truth(last).cached.is_empty());
}

#[tokio::test]
async fn control_fails_once_the_worker_is_gone() {
    let h = start(config(PAGE, 32, 8192, 8), EventRing::default());
    assert_eq!(h.control.recover(0).await, Ok(Recovery::Replay(vec![])));
    let control = h.worker.control();
    timeout(LIMIT, h.worker.stop()).await.unwrap();
    assert_eq!(control.reset().await, Err(WorkerGoneError(W)));
    assert_eq!(control.recover(0).await, Err(WorkerGoneError(W)));
}
