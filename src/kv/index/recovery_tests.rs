//! Gap recovery (replay, dump, a worker first seen mid-stream) and memory accounting.

use super::tests::{ev, s, stored, w};
use super::*;
use crate::contract::events::{EngineHash, KvEvent, KvEventKind};

fn removed(seqs: &[u64]) -> KvEventKind {
    KvEventKind::Removed { engine_hashes: seqs.iter().map(|&x| EngineHash(x + 1000)).collect() }
}

/// A worker's events 1..=6, in which order matters: block 2 is removed then stored again, block
/// 3 stored then removed.
fn history() -> Vec<KvEvent> {
    [stored(&[1, 2]), stored(&[3]), removed(&[2]), stored(&[2, 4]), removed(&[3]), stored(&[5])]
        .into_iter()
        .enumerate()
        .map(|(i, kind)| ev(7, i as u64 + 1, kind))
        .collect()
}

/// The same lookups, counts and holders as an index fed every event in order.
fn assert_same(index: &KvIndex, truth: &KvIndex) {
    for q in [&[1, 2, 4, 5][..], &[1, 3], &[2], &[4, 5], &[5]] {
        let q: Vec<SeqHash> = q.iter().map(|&x| s(x)).collect();
        assert_eq!(index.find_matches(&q), truth.find_matches(&q), "{q:?}");
    }
    for b in 1..=5 {
        assert_eq!(index.holders(s(b)), truth.holders(s(b)), "block {b}");
    }
    assert_eq!(index.cached_blocks(w(7)), truth.cached_blocks(w(7)));
    assert_eq!(index.num_entries(), truth.num_entries());
    assert_eq!(index.num_blocks(), truth.num_blocks());
}

fn truth(events: &[KvEvent]) -> Arc<KvIndex> {
    let (index, mut writer) = KvIndex::new();
    events.iter().for_each(|e| writer.apply(e).unwrap());
    index
}

#[test]
fn a_gap_followed_by_a_replay_gives_exactly_the_workers_state() {
    let h = history();
    let (index, mut writer) = KvIndex::new();
    writer.apply(&h[0]).unwrap();
    writer.apply(&h[1]).unwrap();
    // Events 3 and 4 are lost; 5 reveals the gap and is not applied.
    let gap = Err(IndexError::Gap { worker: w(7), expected: 3, got: 5 });
    assert_eq!(writer.check_gap(&h[4]), Some(3));
    assert_eq!(writer.apply(&h[4]), gap);
    assert_eq!(writer.last_event_id(w(7)), Some(2));
    assert_same(&index, &truth(&h[..2]));
    // The worker replays since 2, up to its latest (5); overlap with applied ids is skipped.
    writer.apply_replay(w(7), &h[1..5]).unwrap();
    assert_eq!(writer.last_event_id(w(7)), Some(5));
    assert_same(&index, &truth(&h[..5]));
    // The held live event is now covered; the stream continues.
    assert!(matches!(writer.apply(&h[4]), Err(IndexError::Stale { .. })));
    writer.apply(&h[5]).unwrap();
    assert_same(&index, &truth(&h));
}

#[test]
fn a_replay_with_a_hole_stops_there() {
    let h = history();
    let (index, mut writer) = KvIndex::new();
    writer.apply(&h[0]).unwrap();
    let hole = writer.apply_replay(w(7), &[h[1].clone(), h[3].clone()]);
    assert_eq!(hole, Err(IndexError::Gap { worker: w(7), expected: 3, got: 4 }));
    assert_eq!(writer.last_event_id(w(7)), Some(2));
    assert_same(&index, &truth(&h[..2]));
}

#[test]
fn a_worker_first_seen_mid_stream_is_a_gap_from_one() {
    let h = history();
    let (index, mut writer) = KvIndex::new();
    assert_eq!(writer.last_event_id(w(7)), None);
    assert_eq!(writer.check_gap(&h[0]), None);
    assert_eq!(writer.check_gap(&h[3]), Some(1));
    let gap = writer.apply(&h[3]);
    assert_eq!(gap, Err(IndexError::Gap { worker: w(7), expected: 1, got: 4 }));
    // Pure: nothing recorded for the worker.
    assert_eq!(writer.last_event_id(w(7)), None);
    assert_eq!(index.num_entries(), 0);
    writer.apply_replay(w(7), &h[..4]).unwrap();
    assert_same(&index, &truth(&h[..4]));
}

#[test]
fn a_dump_over_stale_state_gives_exactly_the_dumped_state() {
    let h = history();
    let (index, mut writer) = KvIndex::new();
    h[..3].iter().for_each(|e| writer.apply(e).unwrap());
    writer.apply(&ev(8, 1, stored(&[1, 9]))).unwrap(); // another worker, untouched by the dump
                                                       // The worker's state at id 9: blocks 1, 4 and 6 (2 and 3 evicted since); ids all 9.
    let dump = [ev(7, 9, KvEventKind::Cleared), ev(7, 9, stored(&[1])), ev(7, 9, stored(&[4, 6]))];
    writer.apply_dump(w(7), &dump, 9);
    assert_eq!(writer.last_event_id(w(7)), Some(9));
    let want = truth(&[ev(7, 1, stored(&[1, 4, 6])), ev(8, 1, stored(&[1, 9]))]);
    let q: Vec<SeqHash> = [1, 4, 6].iter().map(|&x| s(x)).collect();
    assert_eq!(index.find_matches(&q), want.find_matches(&q));
    for b in [1, 2, 3, 4, 6, 9] {
        assert_eq!(index.holders(s(b)), want.holders(s(b)), "block {b}");
    }
    assert_eq!(index.cached_blocks(w(7)), 3);
    assert_eq!(index.num_entries(), want.num_entries());
    // Live events resume after the dump's id; older ones are covered.
    assert!(matches!(writer.apply(&ev(7, 9, removed(&[1]))), Err(IndexError::Stale { .. })));
    writer.apply(&ev(7, 10, removed(&[4]))).unwrap();
    assert!(index.holders(s(4)).is_empty());
    // A dump's id may be lower than the last applied (the worker restarted its count): it wins.
    writer.apply_dump(w(7), &[ev(7, 2, KvEventKind::Cleared)], 2);
    assert_eq!(writer.last_event_id(w(7)), Some(2));
    assert_eq!(index.cached_blocks(w(7)), 0);
    assert_eq!(index.num_entries(), 2);
    writer.apply(&ev(7, 3, stored(&[5]))).unwrap();
    assert_eq!(index.holders(s(5)), vec![w(7)]);
}

#[test]
fn a_removed_worker_takes_no_replay_or_dump() {
    let h = history();
    let (index, mut writer) = KvIndex::new();
    writer.apply(&h[0]).unwrap();
    writer.remove_worker(w(7));
    assert_eq!(writer.check_gap(&h[3]), None);
    let refused = writer.apply_replay(w(7), &h[1..]);
    assert!(matches!(refused, Err(IndexError::RemovedWorker { .. })));
    writer.apply_dump(w(7), &[ev(7, 4, stored(&[1]))], 4);
    assert_eq!((index.num_entries(), writer.last_event_id(w(7))), (0, None));
}

#[test]
fn blocks_named_by_several_engine_hashes_stay_until_the_last_name_goes() {
    let (index, mut writer) = KvIndex::new();
    let named = |e: u64| KvEventKind::Stored {
        parent: None,
        blocks: vec![crate::contract::events::StoredBlock { seq_hash: s(1), engine_hash: EngineHash(e) }],
    };
    for (id, e) in [(1, 10), (2, 11), (3, 12)] {
        writer.apply(&ev(1, id, named(e))).unwrap();
    }
    assert_eq!((index.num_entries(), index.cached_blocks(w(1))), (1, 1));
    let gone = |e: u64| KvEventKind::Removed { engine_hashes: vec![EngineHash(e)] };
    writer.apply(&ev(1, 4, gone(11))).unwrap();
    writer.apply(&ev(1, 5, gone(10))).unwrap();
    assert_eq!(index.holders(s(1)), vec![w(1)]);
    // A clear drops the block once, whatever its names.
    writer.apply(&ev(1, 6, named(13))).unwrap();
    writer.apply(&ev(1, 7, KvEventKind::Cleared)).unwrap();
    assert_eq!((index.num_entries(), index.num_blocks()), (0, 0));
    assert_eq!(index.cached_blocks(w(1)), 0);
}

#[test]
fn memory_grows_with_pairs_and_is_sane_per_pair() {
    let (index, mut writer) = KvIndex::new();
    let empty = writer.memory_bytes();
    let mut last = empty;
    // 32 workers, each storing 64 blocks of 2,048, 8 times: up to 16k pairs, sets spill.
    for round in 0..8u64 {
        for worker in 0..32u64 {
            let start = (worker * 61 + round * 64) % 2048;
            let seqs: Vec<u64> = (start..start + 64).collect();
            writer.apply(&ev(worker, round + 1, stored(&seqs))).unwrap();
        }
        let now = writer.memory_bytes();
        assert!(now >= last, "memory shrank while only adding: {last} -> {now}");
        last = now;
    }
    let pairs = index.num_entries();
    assert!(pairs > 10_000);
    let per_pair = (last - empty) / pairs;
    // Entry + table slot share + two map entries: tens of bytes, not hundreds.
    assert!((16..=160).contains(&per_pair), "{per_pair} bytes per pair");
    assert!(index.memory_bytes() < last);
    assert!(index.counters.set_heap_bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // Dropping every worker returns the sets' heap bytes exactly.
    for worker in 0..32 {
        writer.remove_worker(w(worker));
    }
    assert_eq!(index.counters.set_heap_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(index.num_entries(), 0);
    assert!(writer.memory_bytes() < last);
}
