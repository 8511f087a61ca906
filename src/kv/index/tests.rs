//! Index tests: unit cases, and a reader/writer stress. The property test against a naive model
//! is in `model_tests.rs`, gap recovery and memory accounting in `recovery_tests.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;
use crate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};

pub(super) fn w(n: u64) -> WorkerId {
    WorkerId(n)
}

pub(super) fn s(n: u64) -> SeqHash {
    SeqHash(n)
}

/// Blocks `seqs` with engine hashes `seq + 1000`.
pub(super) fn stored(seqs: &[u64]) -> KvEventKind {
    let blocks = seqs.iter().map(|&x| StoredBlock { seq_hash: s(x), engine_hash: EngineHash(x + 1000) }).collect();
    KvEventKind::Stored { parent: None, blocks }
}

pub(super) fn ev(worker: u64, event_id: u64, kind: KvEventKind) -> KvEvent {
    KvEvent { worker: w(worker), event_id, timestamp_us: 0, kind }
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
    let removed = KvEventKind::Removed { engine_hashes: vec![EngineHash(1002), EngineHash(77)] };
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
    assert_eq!(late, Err(IndexError::RemovedWorker { worker: w(1), got: 3 }));
    assert_eq!(index.num_entries(), 0);
}

#[test]
fn event_ids_gap_is_refused_stale_is_ignored() {
    let (index, mut writer) = KvIndex::new();
    writer.apply(&ev(1, 1, stored(&[1]))).unwrap();
    let gap = writer.apply(&ev(1, 5, stored(&[1, 2])));
    assert_eq!(gap, Err(IndexError::Gap { worker: w(1), expected: 2, got: 5 }));
    // Not applied: the worker still holds only block 1, and its last id is still 1.
    assert_eq!(index.find_matches(&[s(1), s(2)]).scores, vec![(w(1), 1)]);
    assert_eq!(writer.last_event_id(w(1)), Some(1));
    writer.apply(&ev(1, 2, stored(&[2]))).unwrap();
    let stale = writer.apply(&ev(1, 2, KvEventKind::Cleared));
    assert_eq!(stale, Err(IndexError::Stale { worker: w(1), last: 2, got: 2 }));
    assert_eq!(index.cached_blocks(w(1)), 2);
    writer.apply(&ev(1, 3, KvEventKind::Cleared)).unwrap();
    assert_eq!(index.cached_blocks(w(1)), 0);
}

#[test]
fn engine_hashes_are_reference_counted_per_block() {
    let (index, mut writer) = KvIndex::new();
    let two_names = KvEventKind::Stored {
        parent: None,
        blocks: vec![
            StoredBlock { seq_hash: s(1), engine_hash: EngineHash(10) },
            StoredBlock { seq_hash: s(1), engine_hash: EngineHash(11) },
        ],
    };
    writer.apply(&ev(1, 1, two_names)).unwrap();
    assert_eq!(index.num_entries(), 1);
    writer.apply(&ev(1, 2, KvEventKind::Removed { engine_hashes: vec![EngineHash(10)] })).unwrap();
    assert_eq!(index.holders(s(1)), vec![w(1)]);
    writer.apply(&ev(1, 3, KvEventKind::Removed { engine_hashes: vec![EngineHash(11)] })).unwrap();
    assert!(index.holders(s(1)).is_empty());
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
            let seqs: Vec<u64> = (start..BLOCKS.min(start + 64)).filter(|&b| allowed(b, worker)).collect();
            let kind = match round % 10 {
                9 if worker == round % WORKERS => KvEventKind::Cleared,
                r if r % 2 == 0 => stored(&seqs),
                _ => KvEventKind::Removed { engine_hashes: seqs.iter().map(|&x| EngineHash(x + 1000)).collect() },
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

/// A hot first block held by many workers, later blocks by shrinking, irregular subsets: every
/// branch of the walk (small set against many survivors, merge, binary search) against a naive
/// count of leading blocks held.
#[test]
fn hot_first_block_walk_matches_naive_counts() {
    let (index, mut writer) = KvIndex::new();
    const WORKERS: u64 = 100;
    let holds = |worker: u64, block: u64| block == 0 || (worker * 7 + block * 13) % (block + 2) != 0;
    let mut held: Vec<Vec<u64>> = Vec::new();
    for worker in 0..WORKERS {
        let blocks: Vec<u64> = (0..12).filter(|&b| holds(worker, b)).collect();
        writer.apply(&ev(worker, 1, stored(&blocks))).unwrap();
        held.push(blocks);
    }
    // A few workers hold a long run, so the survivors outlast the first blocks.
    writer.apply(&ev(3, 2, stored(&(0..12).collect::<Vec<_>>()))).unwrap();
    held[3] = (0..12).collect();
    let q: Vec<SeqHash> = (0..12).map(s).collect();
    for len in [1, 2, 3, 12] {
        let got = index.find_matches(&q[..len]);
        let want: Vec<(WorkerId, u32)> = (0..WORKERS)
            .map(|x| {
                let n = (0..len as u64).take_while(|b| held[x as usize].contains(b)).count();
                (w(x), n as u32)
            })
            .collect();
        assert_eq!(got.scores, want, "prefix of {len}");
        let counts: Vec<u64> = (0..WORKERS).map(|x| held[x as usize].len() as u64).collect();
        assert_eq!(got.cached_blocks, counts);
    }
}

/// Blocks 0 and 1 held by 100 workers, block 2 by five of them, block 3 by two: the small-set
/// path records depth 2 for the 95 that drop out at block 2.
#[test]
fn many_drop_out_after_a_shared_prefix() {
    let (index, mut writer) = KvIndex::new();
    for worker in 0..100u64 {
        let held: &[u64] = match worker {
            10 | 20 => &[0, 1, 2, 3],
            30 | 40 | 50 => &[0, 1, 2],
            _ => &[0, 1],
        };
        writer.apply(&ev(worker, 1, stored(held))).unwrap();
    }
    let m = index.find_matches(&[s(0), s(1), s(2), s(3), s(4)]);
    let want: Vec<(WorkerId, u32)> = (0..100)
        .map(|x| match x {
            10 | 20 => (w(x), 4),
            30 | 40 | 50 => (w(x), 3),
            _ => (w(x), 2),
        })
        .collect();
    assert_eq!(m.scores, want);
}
