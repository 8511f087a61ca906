//! The sequencing driver against a scripted in-process wire: gaps, duplicates, window overrun,
//! publisher restarts (seq going back, or only visible by replay after a reconnect), a dead
//! replay endpoint, and no replay endpoint at all. Each test checks the consumer's resulting
//! block set against the engine's true state converted directly.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::contract::events::{EngineHash, KvEventKind};
use crate::kv::hash::SeqHash;

use super::convert::RankState;
use super::decode::EngineEvent;
use super::driver::{Driver, Wire, WireEvent};
use super::subscriber::{Counters, SourcedEvent, Timeouts};
use super::test_wire::{encode_batch, Encoding};

const BS: u32 = 2;

type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

struct FakeWire {
    replay: bool,
    /// The replay endpoint accepts requests but never answers.
    silent: bool,
    /// Replies in the old shape `["", seq, payload]` (no topic frame).
    old_shape: bool,
    live: mpsc::Receiver<WireEvent>,
    buffer: Buffer,
    replies: VecDeque<Vec<Bytes>>,
}

impl Wire for FakeWire {
    fn has_replay(&self) -> bool {
        self.replay
    }

    async fn next(&mut self) -> WireEvent {
        match self.live.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    async fn replay_start(&mut self, from: u64) -> Result<(), String> {
        let buffer = self.buffer.lock().unwrap();
        let old_shape = self.old_shape;
        let frames = |seq: u64, payload: Bytes| {
            let seq = Bytes::copy_from_slice(&seq.to_be_bytes());
            if old_shape {
                vec![Bytes::new(), seq, payload]
            } else {
                vec![Bytes::new(), Bytes::from_static(b"kv"), seq, payload]
            }
        };
        self.replies = buffer.iter().filter(|(s, _)| *s >= from).map(|(s, p)| frames(*s, p.clone())).collect();
        self.replies.push_back(frames(u64::MAX, Bytes::new()));
        Ok(())
    }

    async fn replay_next(&mut self) -> Result<Vec<Bytes>, String> {
        if self.silent {
            std::future::pending::<()>().await;
        }
        self.replies.pop_front().ok_or_else(|| "closed".into())
    }

    fn replay_end(&mut self) {
        self.replies.clear();
    }
}

/// An engine publisher: seq from 0, a replay buffer of `cap` batches, and its true state.
struct FakePub {
    seq: u64,
    cap: usize,
    buffer: Buffer,
    live: mpsc::Sender<WireEvent>,
    truth: Vec<EngineEvent>,
}

impl FakePub {
    async fn publish(&mut self, events: Vec<EngineEvent>, live: bool) {
        let payload = Bytes::from(encode_batch(&events, Encoding::ALL[0]));
        {
            let mut b = self.buffer.lock().unwrap();
            b.push_back((self.seq, payload.clone()));
            while b.len() > self.cap {
                b.pop_front();
            }
        }
        if live {
            let frames = vec![Bytes::from_static(b"kv"), Bytes::copy_from_slice(&self.seq.to_be_bytes()), payload];
            self.live.send(WireEvent::Message(frames)).await.unwrap();
        }
        self.seq += 1;
        self.truth.extend(events);
    }

    fn restart(&mut self) {
        self.seq = 0;
        self.buffer.lock().unwrap().clear();
        self.truth = vec![EngineEvent::Cleared];
    }

    /// The engine's current blocks as kvgate would hash them.
    fn expected(&self) -> Vec<(EngineHash, SeqHash)> {
        let mut state = RankState::new(BS, 1 << 20).unwrap();
        self.truth.iter().for_each(|e| {
            state.convert(e.clone());
        });
        let mut v: Vec<_> = state.blocks().collect();
        v.sort();
        v
    }
}

fn store(hashes: &[u64], parent: Option<u64>) -> EngineEvent {
    let token_ids = hashes.iter().flat_map(|h| [*h as u32, (*h >> 32) as u32]).collect();
    EngineEvent::Stored {
        block_hashes: hashes.to_vec(),
        parent,
        token_ids,
        bigram: false,
        block_size: BS,
        lora_name: None,
        medium: None,
        group_idx: 0,
    }
}

struct Rig {
    engine: FakePub,
    out: mpsc::Receiver<SourcedEvent<u32>>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The consumer's view, built from the driver's output only.
    model: HashMap<EngineHash, SeqHash>,
    cleared: usize,
}

/// A driver on a fake wire, past its first output (the initial `Cleared`).
async fn rig(replay: bool, silent: bool, cap: usize) -> Rig {
    let (live_tx, live_rx) = mpsc::channel(64);
    let buffer: Buffer = Arc::default();
    // A small replay buffer stands for an old publisher: it also answers in the old shape.
    let old_shape = cap < 10;
    let wire = FakeWire { replay, silent, old_shape, live: live_rx, buffer: buffer.clone(), replies: VecDeque::new() };
    let (out_tx, out) = mpsc::channel(64);
    let counters = Arc::new(Counters::default());
    let (stop, stop_rx) = watch::channel(false);
    let timeouts = Timeouts { replay_reply: Duration::from_millis(50), ..Timeouts::default() };
    let state = RankState::new(BS, 1 << 20).unwrap();
    let driver = Driver::new(7u32, 0, wire, state, out_tx, counters.clone(), timeouts, stop_rx);
    let task = tokio::spawn(driver.run());
    let engine = FakePub { seq: 0, cap, buffer, live: live_tx, truth: Vec::new() };
    let mut rig = Rig { engine, out, counters, stop, task, model: HashMap::new(), cleared: 0 };
    let first = rig.out.recv().await.expect("the driver runs");
    assert_eq!((first.kind, first.engine_seq), (KvEventKind::Cleared, None));
    rig.cleared = 1;
    rig
}

impl Rig {
    /// Applies the driver's output until it has been quiet for a while.
    async fn settle(&mut self) {
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), self.out.recv()).await {
            assert_eq!(e.source, 7);
            match e.kind {
                KvEventKind::Stored { blocks, .. } => {
                    blocks.iter().for_each(|b| {
                        self.model.insert(b.engine_hash, b.seq_hash);
                    });
                }
                KvEventKind::Removed { engine_hashes } => engine_hashes.iter().for_each(|h| {
                    self.model.remove(h);
                }),
                KvEventKind::Cleared => {
                    self.cleared += 1;
                    self.model.clear();
                }
            }
        }
    }

    async fn check(&mut self) {
        self.settle().await;
        let mut got: Vec<_> = self.model.iter().map(|(&e, &s)| (e, s)).collect();
        got.sort();
        assert_eq!(got, self.engine.expected());
    }

    fn count(&self, name: &str) -> u64 {
        self.counters.snapshot().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v).unwrap()
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), self.task).await.expect("stops").unwrap();
    }
}

#[tokio::test]
async fn gap_is_repaired_by_replay_and_live_copies_are_skipped() {
    let mut r = rig(true, false, 100).await;
    r.engine.publish(vec![store(&[1, 2], None)], true).await;
    r.check().await;
    r.engine.publish(vec![store(&[3], Some(2))], false).await;
    r.engine.publish(vec![EngineEvent::Removed { block_hashes: vec![1], medium: None, group_idx: 0 }], false).await;
    r.engine.publish(vec![store(&[4], Some(3))], true).await;
    r.check().await;
    assert_eq!((r.count("gaps"), r.count("duplicates"), r.count("history_lost")), (1, 1, 0));
    assert_eq!(r.cleared, 1, "only the initial Cleared");
    r.stop().await;
}

#[tokio::test]
async fn window_overrun_clears_and_rebuilds_from_what_is_left() {
    let mut r = rig(true, false, 2).await;
    r.engine.publish(vec![store(&[1], None)], true).await;
    r.check().await;
    r.engine.publish(vec![store(&[2], Some(1))], false).await;
    r.engine.publish(vec![EngineEvent::Cleared], false).await;
    r.engine.publish(vec![store(&[5], None)], false).await;
    r.engine.publish(vec![store(&[6], Some(5))], true).await;
    r.check().await;
    assert_eq!((r.count("overruns"), r.count("history_lost"), r.count("replays")), (1, 1, 2));
    r.stop().await;
}

#[tokio::test]
async fn restart_is_detected_when_seq_goes_back() {
    let mut r = rig(true, false, 100).await;
    for h in 1..=4 {
        r.engine.publish(vec![store(&[h], None)], true).await;
    }
    r.check().await;
    r.engine.restart();
    r.engine.publish(vec![store(&[9], None)], true).await;
    r.check().await;
    assert_eq!(r.count("restarts"), 1);
    assert_eq!(r.cleared, 2);
    r.stop().await;
}

#[tokio::test]
async fn restart_behind_a_reconnect_is_found_by_replay() {
    let mut r = rig(true, false, 100).await;
    r.engine.publish(vec![store(&[1], None)], true).await;
    r.engine.publish(vec![store(&[2], None)], true).await;
    r.check().await;
    // Same publisher: the replayed copy of the last batch matches, nothing is reset.
    r.engine.live.send(WireEvent::Disconnected).await.unwrap();
    r.engine.live.send(WireEvent::Connected).await.unwrap();
    r.check().await;
    assert_eq!((r.count("restarts"), r.cleared), (0, 1));
    // A restarted publisher whose new batches were all lost to the slow joiner.
    r.engine.live.send(WireEvent::Disconnected).await.unwrap();
    r.engine.restart();
    for h in 10..14 {
        r.engine.publish(vec![store(&[h], None)], false).await;
    }
    r.engine.live.send(WireEvent::Connected).await.unwrap();
    r.check().await;
    assert_eq!(r.count("restarts"), 1);
    r.stop().await;
}

#[tokio::test]
async fn without_replay_a_gap_loses_history() {
    let mut r = rig(false, false, 100).await;
    r.engine.publish(vec![store(&[1], None)], true).await;
    r.engine.publish(vec![store(&[2], Some(1))], false).await;
    r.engine.truth.clear(); // what the consumer can know from here on
    r.engine.publish(vec![store(&[3], None)], true).await;
    r.engine.publish(vec![store(&[4], Some(2))], true).await;
    r.check().await;
    assert_eq!((r.count("history_lost"), r.count("dropped_missing_parent"), r.cleared), (1, 1, 2));
    r.stop().await;
}

#[tokio::test]
async fn a_dead_replay_endpoint_never_hangs_the_task() {
    let mut r = rig(true, true, 100).await;
    r.engine.publish(vec![store(&[1], None)], true).await;
    r.engine.publish(vec![store(&[2], None)], false).await;
    r.engine.truth.clear();
    r.engine.publish(vec![store(&[3], None)], true).await;
    r.check().await;
    assert_eq!(r.count("replay_failures"), 4, "the first replay, then 3 tries for the gap");
    assert_eq!(r.count("history_lost"), 1);
    r.stop().await;
}

#[tokio::test]
async fn stop_ends_the_task_even_when_the_consumer_stalls() {
    let r = rig(true, false, 100).await;
    let mut engine = r.engine;
    for h in 0..100 {
        engine.publish(vec![store(&[h + 1], None)], true).await;
    }
    r.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), r.task).await.expect("stops").unwrap();
    assert!(r.counters.events_emitted.load(Relaxed) >= 64, "filled the output channel");
}
