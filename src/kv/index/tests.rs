//! Index tests: unit cases, a property test against a naive model, and a reader/writer stress.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

fn w(n: u64) -> WorkerId {
    WorkerId(n)
}

fn s(n: u64) -> SeqHash {
    SeqHash(n)
}

/// Blocks `seqs` with engine hashes `seq + 1000`.
fn stored(seqs: &[u64]) -> KvEventKind {
    let blocks = seqs
        .iter()
        .map(|&x| StoredBlock {
            seq_hash: s(x),
            engine_hash: EngineHash(x + 1000),
        })
        .collect();
    KvEventKind::Stored {
        parent: None,
        blocks,
    }
}

fn ev(worker: u64, event_id: u64, kind: KvEventKind) -> KvEvent {
    KvEvent {
        worker: w(worker),
        event_id,
        timestamp_us: 0,
        kind,
    }
}

#[test]
fn overlap_is_leading_blocks_held() {
    let (index, mut writer) = KvIndex::new();
    writer.apply(&ev(1, 1, stored(&[1, 2, 3, 4]))).unwrap();
    writer.apply(&ev(2, 1, stored(&[1, 2]))).unwrap();
    writer.apply(&ev(3, 1, stored(&[2, 3, 4]))).unwrap(); // no first block: never matches
    writer.apply(&ev(2, 2, stored(&[4]))).unwrap(); // holds 4 but not 3: overlap stays 2
    let m = index.find_matches(&[s(1), s(2), s(3), s(4), s(5)]);
    assert_eq!(m.scores, vec![(w(1), 4), (w(2), 2)]);
    assert_eq!(m.cached_blocks, vec![4, 3]);
    assert_eq!(m.overlap(w(3)), 0);
    assert_eq!(m.cached(w(2)), Some(3));
    assert_eq!(index.cached_blocks(w(3)), 3);
    assert_eq!(index.num_entries(), 4 + 3 + 3);
    assert_eq!(index.find_matches(&[s(9), s(1)]), OverlapScores::default());
    assert_eq!(index.find_matches(&[]), OverlapScores::default());
}

#[test]
fn few_survivors_against_large_sets() {
    let (index, mut writer) = KvIndex::new();
    writer.apply(&ev(0, 1, stored(&[1, 2]))).unwrap();
    writer.apply(&ev(1, 1, stored(&[1, 2, 3, 4]))).unwrap();
    for worker in 2..30 {
        writer.apply(&ev(worker, 1, stored(&[2, 3, 4]))).unwrap();
    }
    let m = index.find_matches(&[s(1), s(2), s(3), s(4)]);
    assert_eq!(m.scores, vec![(w(0), 2), (w(1), 4)]);
    assert_eq!(index.holders(s(3)).len(), 29);
}

#[test]
fn removal_clear_and_worker_removal() {
    let (index, mut writer) = KvIndex::new();
    writer.apply(&ev(1, 1, stored(&[1, 2, 3]))).unwrap();
    writer.apply(&ev(2, 1, stored(&[1, 2, 3]))).unwrap();
    let removed = KvEventKind::Removed {
        engine_hashes: vec![EngineHash(1002), EngineHash(77)],
    };
    writer.apply(&ev(1, 2, removed)).unwrap();
    assert_eq!(writer.unknown_removals(), 1);
    let q = [s(1), s(2), s(3)];
    assert_eq!(index.find_matches(&q).scores, vec![(w(1), 1), (w(2), 3)]);
    writer.apply(&ev(2, 2, KvEventKind::Cleared)).unwrap();
    assert_eq!(index.find_matches(&q).scores, vec![(w(1), 1)]);
    assert_eq!(index.cached_blocks(w(2)), 0);
    writer.remove_worker(w(1));
    assert_eq!(index.find_matches(&q), OverlapScores::default());
    assert_eq!((index.num_entries(), index.num_blocks()), (0, 0));
    // A removed worker's late events are refused rather than resurrecting it.
    let late = writer.apply(&ev(1, 3, stored(&[1])));
    assert_eq!(
        late,
        Err(IndexError::RemovedWorker {
            worker: w(1),
            got: 3
        })
    );
    assert_eq!(index.num_entries(), 0);
}

#[test]
fn event_ids_gap_is_applied_stale_is_ignored() {
    let (index, mut writer) = KvIndex::new();
    writer.apply(&ev(1, 1, stored(&[1]))).unwrap();
    let gap = writer.apply(&ev(1, 5, stored(&[1, 2])));
    assert_eq!(
        gap,
        Err(IndexError::Gap {
            worker: w(1),
            expected: 2,
            got: 5
        })
    );
    assert_eq!(index.find_matches(&[s(1), s(2)]).scores, vec![(w(1), 2)]);
    let stale = writer.apply(&ev(1, 4, KvEventKind::Cleared));
    assert_eq!(
        stale,
        Err(IndexError::Stale {
            worker: w(1),
            last: 5,
            got: 4
        })
    );
    assert_eq!(index.cached_blocks(w(1)), 2);
    writer.apply(&ev(1, 6, KvEventKind::Cleared)).unwrap();
    assert_eq!(index.cached_blocks(w(1)), 0);
}

#[test]
fn engine_hashes_are_reference_counted_per_block() {
    let (index, mut writer) = KvIndex::new();
    let two_names = KvEventKind::Stored {
        parent: None,
        blocks: vec![
            StoredBlock {
                seq_hash: s(1),
                engine_hash: EngineHash(10),
            },
            StoredBlock {
                seq_hash: s(1),
                engine_hash: EngineHash(11),
            },
        ],
    };
    writer.apply(&ev(1, 1, two_names)).unwrap();
    assert_eq!(index.num_entries(), 1);
    writer
        .apply(&ev(
            1,
            2,
            KvEventKind::Removed {
                engine_hashes: vec![EngineHash(10)],
            },
        ))
        .unwrap();
    assert_eq!(index.holders(s(1)), vec![w(1)]);
    writer
        .apply(&ev(
            1,
            3,
            KvEventKind::Removed {
                engine_hashes: vec![EngineHash(11)],
            },
        ))
        .unwrap();
    assert!(index.holders(s(1)).is_empty());
}

// ---- property test against a naive model ----

/// The obvious model: per worker, engine hash → sequence hash; a worker holds the values.
#[derive(Default)]
struct Model {
    workers: BTreeMap<WorkerId, HashMap<EngineHash, SeqHash>>,
}

impl Model {
    fn held(&self, worker: WorkerId) -> HashSet<SeqHash> {
        self.workers
            .get(&worker)
            .map_or_else(HashSet::new, |m| m.values().copied().collect())
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
    SkipIds {
        slot: u8,
    },
}

const SLOTS: u8 = 4;
const CHAIN_LEN: usize = 8;
const ENGINE_IDS: u8 = 24;

/// Three chains: 1 shares 3 leading blocks with 0, 2 shares 1 with 0.
fn chains() -> [Vec<SeqHash>; 3] {
    let c0: Vec<_> = (0..CHAIN_LEN as u64).map(|i| s(100 + i)).collect();
    let c1 = (0..CHAIN_LEN as u64)
        .map(|i| if i < 3 { c0[i as usize] } else { s(200 + i) })
        .collect();
    let c2 = (0..CHAIN_LEN as u64)
        .map(|i| if i < 1 { c0[i as usize] } else { s(300 + i) })
        .collect();
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
        1 => slot.prop_map(|slot| Op::SkipIds { slot }),
    ]
}

/// Drives the index and the model; a removed worker's slot continues under a new id.
struct Harness {
    index: Arc<KvIndex>,
    writer: KvIndexWriter,
    model: Model,
    generation: [u64; SLOTS as usize],
    next_event: [u64; SLOTS as usize],
}

impl Harness {
    fn worker(&self, slot: u8) -> WorkerId {
        w(slot as u64 + 100 * self.generation[slot as usize])
    }

    fn send(&mut self, slot: u8, kind: KvEventKind) {
        let worker = self.worker(slot);
        self.next_event[slot as usize] += 1;
        let event = KvEvent {
            worker,
            event_id: self.next_event[slot as usize],
            timestamp_us: 0,
            kind,
        };
        match self.writer.apply(&event) {
            Ok(()) | Err(IndexError::Gap { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }

    fn run(&mut self, op: Op, chains: &[Vec<SeqHash>; 3]) {
        match op {
            Op::Store {
                slot,
                chain,
                start,
                engine_ids,
            } => {
                let seqs = &chains[chain as usize][start as usize..];
                let blocks: Vec<_> = seqs
                    .iter()
                    .zip(&engine_ids)
                    .map(|(&seq_hash, &e)| StoredBlock {
                        seq_hash,
                        engine_hash: EngineHash(e as u64),
                    })
                    .collect();
                let m = self.model.workers.entry(self.worker(slot)).or_default();
                for b in &blocks {
                    m.insert(b.engine_hash, b.seq_hash);
                }
                self.send(
                    slot,
                    KvEventKind::Stored {
                        parent: None,
                        blocks,
                    },
                );
            }
            Op::Remove { slot, engine_ids } => {
                let engine_hashes: Vec<_> =
                    engine_ids.iter().map(|&e| EngineHash(e as u64)).collect();
                if let Some(m) = self.model.workers.get_mut(&self.worker(slot)) {
                    for h in &engine_hashes {
                        m.remove(h);
                    }
                }
                self.send(slot, KvEventKind::Removed { engine_hashes });
            }
            Op::Clear { slot } => {
                self.model.workers.remove(&self.worker(slot));
                self.send(slot, KvEventKind::Cleared);
            }
            Op::RemoveWorker { slot } => {
                self.model.workers.remove(&self.worker(slot));
                self.writer.remove_worker(self.worker(slot));
                self.generation[slot as usize] += 1;
                self.next_event[slot as usize] = 0;
            }
            Op::SkipIds { slot } => self.next_event[slot as usize] += 2,
        }
    }

    fn check(&self, chains: &[Vec<SeqHash>; 3]) {
        let mixed: Vec<SeqHash> = chains[0][..2]
            .iter()
            .chain(&chains[2][2..])
            .copied()
            .collect();
        for q in chains.iter().chain([&mixed]) {
            for len in [1, 3, CHAIN_LEN] {
                let got = self.index.find_matches(&q[..len]);
                assert_eq!(
                    got.scores,
                    self.model.find_matches(&q[..len]),
                    "query {:?}",
                    &q[..len]
                );
                let want_cached: Vec<u64> = got
                    .scores
                    .iter()
                    .map(|(w, _)| self.model.held(*w).len() as u64)
                    .collect();
                assert_eq!(got.cached_blocks, want_cached);
            }
        }
        let mut total = 0;
        for slot in 0..SLOTS {
            let worker = self.worker(slot);
            let n = self.model.held(worker).len();
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
        let (index, writer) = KvIndex::new();
        let mut h = Harness {
            index,
            writer,
            model: Model::default(),
            generation: [0; SLOTS as usize],
            next_event: [0; SLOTS as usize],
        };
        let chains = chains();
        for op in ops {
            h.run(op, &chains);
            h.check(&chains);
        }
    }
}

// ---- concurrent readers while the writer mutates ----

/// Block `i` (seq hash `i`) may only ever be stored by workers whose bit is set in `i & 0xff`;
/// readers check every set they see against that rule, and that it is sorted and non-empty.
#[test]
fn readers_never_see_invalid_sets() {
    const WORKERS: u64 = 8;
    const BLOCKS: u64 = 512;
    let allowed = |block: u64, worker: u64| (block & 0xff) >> worker & 1 == 1;
    let (index, mut writer) = KvIndex::new();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (index, stop) = (index.clone(), stop.clone());
            std::thread::spawn(move || {
                let query: Vec<SeqHash> = (0..BLOCKS).map(s).collect();
                let mut lookups = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for b in (r..BLOCKS).step_by(7) {
                        let set = index.holders(s(b));
                        assert!(set.windows(2).all(|p| p[0] < p[1]), "unsorted {set:?}");
                        assert!(set.iter().all(|x| allowed(b, x.0)), "block {b}: {set:?}");
                    }
                    let m = index.find_matches(&query[r as usize..]);
                    for &(worker, n) in &m.scores {
                        assert!(n >= 1 && n as u64 <= BLOCKS);
                        for b in r..r + n as u64 {
                            assert!(allowed(b, worker.0), "worker {worker} matched block {b}");
                        }
                    }
                    lookups += 1;
                }
                lookups
            })
        })
        .collect();
    let mut ids = [0u64; WORKERS as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..300u64 {
        for worker in 0..WORKERS {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let start = rng % BLOCKS;
            let seqs: Vec<u64> = (start..BLOCKS.min(start + 64))
                .filter(|&b| allowed(b, worker))
                .collect();
            let kind = match round % 10 {
                9 if worker == round % WORKERS => KvEventKind::Cleared,
                r if r % 2 == 0 => stored(&seqs),
                _ => KvEventKind::Removed {
                    engine_hashes: seqs.iter().map(|&x| EngineHash(x + 1000)).collect(),
                },
            };
            ids[worker as usize] += 1;
            let _ = writer.apply(&ev(worker, ids[worker as usize], kind));
        }
        if round == 150 {
            writer.remove_worker(w(3));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader panicked") > 0);
    }
    let total: u64 = (0..WORKERS).map(|x| index.cached_blocks(w(x))).sum();
    assert_eq!(total as usize, index.num_entries());
}
