//! The index against a naive model: random stores, removals, clears, worker removals and lost
//! events (recovered by replay or dump, as a consumer does), checked after every step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::tests::{s, w};
use super::*;
use crate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};

/// The obvious model: per worker, engine hash → sequence hash; a worker holds the values.
#[derive(Default)]
struct Model {
    workers: BTreeMap<WorkerId, HashMap<EngineHash, SeqHash>>,
}

impl Model {
    fn apply(&mut self, worker: WorkerId, kind: &KvEventKind) {
        let m = self.workers.entry(worker).or_default();
        match kind {
            KvEventKind::Stored { blocks, .. } => {
                for b in blocks {
                    m.insert(b.engine_hash, b.seq_hash);
                }
            }
            KvEventKind::Removed { engine_hashes } => {
                for h in engine_hashes {
                    m.remove(h);
                }
            }
            KvEventKind::Cleared => m.clear(),
        }
    }

    fn held(&self, worker: WorkerId) -> HashSet<SeqHash> {
        self.workers.get(&worker).map_or_else(HashSet::new, |m| m.values().copied().collect())
    }

    fn find_matches(&self, q: &[SeqHash]) -> Vec<(WorkerId, u32)> {
        let mut out = Vec::new();
        for &worker in self.workers.keys() {
            let held = self.held(worker);
            let n = q.iter().take_while(|x| held.contains(x)).count() as u32;
            if n > 0 {
                out.push((worker, n));
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    Store {
        slot: u8,
        chain: u8,
        start: u8,
        engine_ids: Vec<u8>,
    },
    Remove {
        slot: u8,
        engine_ids: Vec<u8>,
    },
    Clear {
        slot: u8,
    },
    RemoveWorker {
        slot: u8,
    },
    /// The next `n` events of the slot are lost on the way (the worker still made them).
    Lose {
        slot: u8,
        n: u8,
        dump: bool,
    },
}

const SLOTS: u8 = 4;
const CHAIN_LEN: usize = 8;
const ENGINE_IDS: u8 = 24;

/// Three chains: 1 shares 3 leading blocks with 0, 2 shares 1 with 0.
fn chains() -> [Vec<SeqHash>; 3] {
    let c0: Vec<_> = (0..CHAIN_LEN as u64).map(|i| s(100 + i)).collect();
    let c1 = (0..CHAIN_LEN as u64).map(|i| if i < 3 { c0[i as usize] } else { s(200 + i) }).collect();
    let c2 = (0..CHAIN_LEN as u64).map(|i| if i < 1 { c0[i as usize] } else { s(300 + i) }).collect();
    [c0, c1, c2]
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let ids = |n| proptest::collection::vec(0..ENGINE_IDS, 1..n);
    prop_oneof![
        6 => (slot.clone(), 0..3u8, 0..3u8, ids(7)).prop_map(|(slot, chain, start, engine_ids)| {
            Op::Store { slot, chain, start, engine_ids }
        }),
        3 => (slot.clone(), ids(5)).prop_map(|(slot, engine_ids)| Op::Remove { slot, engine_ids }),
        1 => slot.clone().prop_map(|slot| Op::Clear { slot }),
        1 => slot.clone().prop_map(|slot| Op::RemoveWorker { slot }),
        1 => (slot, 1..4u8, any::<bool>()).prop_map(|(slot, n, dump)| Op::Lose { slot, n, dump }),
    ]
}

/// Drives the index; a removed worker's slot continues under a new id. Each slot logs every
/// event its worker made; lost events leave a gap that the next delivered one reveals, and the
/// harness recovers as a consumer would (replay from the log, or a dump of the worker's state).
/// The expected view is the model of each worker's log up to the index's last id.
struct Harness {
    index: Arc<KvIndex>,
    writer: KvIndexWriter,
    generation: [u64; SLOTS as usize],
    log: [Vec<KvEvent>; SLOTS as usize],
    /// Events still to lose, and whether the recovery after them uses a dump.
    lose: [(u8, bool); SLOTS as usize],
    recoveries: usize,
}

impl Harness {
    fn new() -> Self {
        let (index, writer) = KvIndex::new();
        Self {
            index,
            writer,
            generation: [0; SLOTS as usize],
            log: Default::default(),
            lose: [(0, false); SLOTS as usize],
            recoveries: 0,
        }
    }

    fn worker(&self, slot: u8) -> WorkerId {
        w(slot as u64 + 100 * self.generation[slot as usize])
    }

    /// The worker's state as of event `last` (the model of its log prefix).
    fn truth(&self, slot: u8, last: u64) -> Model {
        let mut m = Model::default();
        for e in &self.log[slot as usize][..last as usize] {
            m.apply(e.worker, &e.kind);
        }
        m
    }

    fn send(&mut self, slot: u8, kind: KvEventKind) {
        let worker = self.worker(slot);
        let log = &mut self.log[slot as usize];
        let event = KvEvent { worker, event_id: log.len() as u64 + 1, timestamp_us: 0, kind };
        log.push(event.clone());
        let (lose, dump) = &mut self.lose[slot as usize];
        if *lose > 0 {
            *lose -= 1;
            return;
        }
        let dump = *dump;
        match self.writer.apply(&event) {
            Ok(()) => {}
            Err(IndexError::Gap { expected, got, .. }) => {
                assert_eq!(self.writer.check_gap(&event), Some(expected));
                assert!(expected < got);
                self.recover(slot, dump);
                self.recoveries += 1;
                // Covered by the recovery, which answered up to the worker's latest id.
                assert!(matches!(self.writer.apply(&event), Err(IndexError::Stale { .. })));
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    fn recover(&mut self, slot: u8, dump: bool) {
        let worker = self.worker(slot);
        let log = &self.log[slot as usize];
        let last = log.len() as u64;
        if dump {
            let held = &self.truth(slot, last).workers;
            let blocks = held
                .get(&worker)
                .into_iter()
                .flatten()
                .map(|(&engine_hash, &seq_hash)| StoredBlock { seq_hash, engine_hash })
                .collect();
            let events = [
                KvEvent { worker, event_id: last, timestamp_us: 0, kind: KvEventKind::Cleared },
                KvEvent { worker, event_id: last, timestamp_us: 0, kind: KvEventKind::Stored { parent: None, blocks } },
            ];
            self.writer.apply_dump(worker, &events, last);
        } else {
            let from = self.writer.last_event_id(worker).unwrap_or(0) as usize;
            self.writer.apply_replay(worker, &log[from..]).unwrap();
        }
        assert_eq!(self.writer.last_event_id(worker), Some(last));
    }

    fn run(&mut self, op: Op, chains: &[Vec<SeqHash>; 3]) {
        match op {
            Op::Store { slot, chain, start, engine_ids } => {
                let seqs = &chains[chain as usize][start as usize..];
                let blocks: Vec<_> = seqs
                    .iter()
                    .zip(&engine_ids)
                    .map(|(&seq_hash, &e)| StoredBlock { seq_hash, engine_hash: EngineHash(e as u64) })
                    .collect();
                let parent = None;
                self.send(slot, KvEventKind::Stored { parent, blocks });
            }
            Op::Remove { slot, engine_ids } => {
                let engine_hashes = engine_ids.iter().map(|&e| EngineHash(e as u64)).collect();
                self.send(slot, KvEventKind::Removed { engine_hashes });
            }
            Op::Clear { slot } => self.send(slot, KvEventKind::Cleared),
            Op::RemoveWorker { slot } => {
                self.writer.remove_worker(self.worker(slot));
                self.generation[slot as usize] += 1;
                self.log[slot as usize].clear();
                self.lose[slot as usize] = (0, false);
            }
            Op::Lose { slot, n, dump } => self.lose[slot as usize] = (n, dump),
        }
    }

    fn check(&self, chains: &[Vec<SeqHash>; 3]) {
        let mut model = Model::default();
        for slot in 0..SLOTS {
            let worker = self.worker(slot);
            let last = self.writer.last_event_id(worker).unwrap_or(0);
            assert!(last <= self.log[slot as usize].len() as u64);
            if let Some(m) = self.truth(slot, last).workers.remove(&worker) {
                model.workers.insert(worker, m);
            }
        }
        let mixed: Vec<SeqHash> = chains[0][..2].iter().chain(&chains[2][2..]).copied().collect();
        for q in chains.iter().chain([&mixed]) {
            for len in [1, 3, CHAIN_LEN] {
                let got = self.index.find_matches(&q[..len]);
                assert_eq!(got.scores, model.find_matches(&q[..len]), "query {:?}", &q[..len]);
                let want_cached: Vec<u64> = got.scores.iter().map(|(w, _)| model.held(*w).len() as u64).collect();
                assert_eq!(got.cached_blocks, want_cached);
            }
        }
        let mut total = 0;
        for slot in 0..SLOTS {
            let worker = self.worker(slot);
            let n = model.held(worker).len();
            assert_eq!(self.index.cached_blocks(worker), n as u64);
            total += n;
        }
        assert_eq!(self.index.num_entries(), total);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn index_agrees_with_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        let chains = chains();
        for op in ops {
            h.run(op, &chains);
            h.check(&chains);
        }
    }
}

/// The property test above does reach its recovery paths.
#[test]
fn harness_recovers_by_replay_and_dump() {
    let chains = chains();
    for dump in [false, true] {
        let mut h = Harness::new();
        let store = |slot, chain| Op::Store { slot, chain, start: 0, engine_ids: vec![1, 2, 3] };
        h.run(store(0, 0), &chains);
        h.run(Op::Lose { slot: 0, n: 2, dump }, &chains);
        h.run(Op::Remove { slot: 0, engine_ids: vec![2] }, &chains);
        h.run(store(0, 1), &chains);
        h.run(Op::Clear { slot: 1 }, &chains);
        h.run(store(0, 2), &chains);
        h.check(&chains);
        assert_eq!(h.recoveries, 1);
    }
}

/// The case proptest once shrank a failure to (`proptest-regressions/kv/index/model_tests.txt`
/// replays its seed, but the strategy has grown since, so the seed no longer generates it): one
/// store of two blocks under the same engine hash.
#[test]
fn recorded_regression_two_blocks_one_engine_hash() {
    let chains = chains();
    let mut h = Harness::new();
    h.run(Op::Store { slot: 0, chain: 0, start: 0, engine_ids: vec![5, 5] }, &chains);
    h.check(&chains);
}
