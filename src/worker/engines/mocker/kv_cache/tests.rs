use std::collections::HashSet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::kv::hash::BlockHasher;
use crate::worker::engines::mocker::test_util::NaiveIndex;

const PAGE: usize = 4;
const SALT: u64 = 0x5eed;

fn chain(tokens: &[u32]) -> Vec<SeqHash> {
    BlockHasher::new(PAGE).seq_hashes(tokens)
}

fn events(c: &mut KvCache) -> Vec<KvEventKind> {
    let mut out = Vec::new();
    c.drain_events(&mut out);
    out
}

/// Runs a sequence to `hashes.len()` full blocks and frees it.
fn fill(c: &mut KvCache, seq: u64, hashes: &[SeqHash]) {
    let id = SeqId(seq);
    let hits = c.prefix_hits(hashes);
    c.admit(id, &hashes[..hits], 0).unwrap();
    c.reserve(id, hashes.len() * PAGE).unwrap();
    c.commit(id, hashes);
    c.free(id);
}

fn removed(evs: &[KvEventKind], c: &KvCache) -> Vec<SeqHash> {
    evs.iter()
        .flat_map(|e| match e {
            KvEventKind::Removed { engine_hashes } => engine_hashes.clone(),
            _ => vec![],
        })
        .map(|e| SeqHash(e.0 ^ c.salt))
        .collect()
}

#[test]
fn stores_once_and_shares_prefixes() {
    let mut c = KvCache::new(PAGE, 16, SALT);
    let a = chain(&(0..12).collect::<Vec<_>>());
    fill(&mut c, 1, &a);
    let evs = events(&mut c);
    assert_eq!(evs.len(), 1, "one Stored for one contiguous run: {evs:?}");
    let KvEventKind::Stored { parent, blocks } = &evs[0] else { panic!("{evs:?}") };
    assert_eq!(*parent, None);
    assert_eq!(blocks.iter().map(|b| b.seq_hash).collect::<Vec<_>>(), a);
    assert!(blocks.iter().all(|b| b.engine_hash.0 != b.seq_hash.0));

    // Shares the first two blocks, adds one of its own: only that one is published.
    let mut t: Vec<u32> = (0..8).collect();
    t.extend([99, 98, 97, 96]);
    let b = chain(&t);
    assert_eq!(c.prefix_hits(&b), 2);
    fill(&mut c, 2, &b);
    let evs = events(&mut c);
    assert_eq!(
        evs,
        vec![KvEventKind::Stored {
            parent: Some(a[1]),
            blocks: vec![StoredBlock { seq_hash: b[2], engine_hash: c.engine_hash(b[2]) }],
        }]
    );
    assert_eq!(c.active_blocks(), 0);
    assert_eq!(c.evictable_blocks(), 4);
    c.check_invariants();
}

#[test]
fn evicts_lru_and_tails_before_prefixes() {
    let mut c = KvCache::new(PAGE, 5, SALT);
    let a = chain(&(0..12).collect::<Vec<_>>()); // a0 a1 a2, released first
    let b = chain(&(100..108).collect::<Vec<_>>()); // b0 b1, released later
    fill(&mut c, 1, &a);
    fill(&mut c, 2, &b);
    events(&mut c);
    c.admit(SeqId(3), &[], 4).unwrap();
    let evs = events(&mut c);
    assert_eq!(evs.len(), 1, "one Removed per allocation: {evs:?}");
    assert_eq!(removed(&evs, &c), vec![a[2], a[1], a[0], b[1]]);
    assert!(c.is_cached(b[0]));
    assert_eq!(c.reserve(SeqId(3), 6 * PAGE), Err(OutOfBlocks { needed: 2, available: 1 }));
    c.check_invariants();
}

#[test]
fn a_hit_is_no_longer_evictable() {
    let mut c = KvCache::new(PAGE, 3, SALT);
    let a = chain(&(0..12).collect::<Vec<_>>());
    fill(&mut c, 1, &a);
    // Holding a0 and a1 leaves only a2 to evict: asking for 2 fails and changes nothing.
    assert_eq!(c.admit(SeqId(2), &a[..2], 2), Err(OutOfBlocks { needed: 2, available: 1 }));
    assert_eq!(c.evictable_blocks(), 3);
    c.admit(SeqId(2), &a[..2], 1).unwrap();
    assert_eq!(removed(&events(&mut c), &c), vec![a[2]]);
    assert_eq!(c.active_blocks(), 3);
    c.check_invariants();
}

#[test]
fn concurrent_duplicate_blocks_are_shared() {
    let mut c = KvCache::new(PAGE, 8, SALT);
    let a = chain(&(0..8).collect::<Vec<_>>());
    for s in [1, 2] {
        c.admit(SeqId(s), &[], 2).unwrap();
    }
    c.commit(SeqId(1), &a);
    c.commit(SeqId(2), &a);
    assert_eq!(events(&mut c).len(), 1);
    assert_eq!(c.used_blocks(), 2, "the duplicate's blocks were freed");
    c.check_invariants();
    c.free(SeqId(1));
    assert_eq!(c.evictable_blocks(), 0);
    c.free(SeqId(2));
    assert_eq!(c.evictable_blocks(), 2);
}

#[test]
fn reset_keeps_and_republishes_held_blocks() {
    let mut c = KvCache::new(PAGE, 8, SALT);
    fill(&mut c, 1, &chain(&[1, 2, 3, 4]));
    let held = chain(&(10..22).collect::<Vec<_>>());
    c.admit(SeqId(2), &[], 4).unwrap();
    c.commit(SeqId(2), &held);
    events(&mut c);
    c.reset();
    let stored: Vec<StoredBlock> =
        held.iter().map(|&h| StoredBlock { seq_hash: h, engine_hash: c.engine_hash(h) }).collect();
    let want = vec![KvEventKind::Cleared, KvEventKind::Stored { parent: None, blocks: stored }];
    assert_eq!(events(&mut c), want);
    assert_eq!(c.used_blocks(), 4, "3 held full blocks and 1 partial");
    c.check_invariants();
    c.free(SeqId(2));
    c.reset();
    assert_eq!(events(&mut c), vec![KvEventKind::Cleared]);
    assert_eq!(c.used_blocks(), 0);
}

#[test]
fn a_snapshot_rebuilds_a_branching_cache() {
    let mut c = KvCache::new(PAGE, 64, SALT);
    let root: Vec<u32> = (0..8).collect();
    for (i, tail) in [[1u32; 8], [2; 8], [3; 8]].iter().enumerate() {
        let mut t = root.clone();
        t.extend(tail);
        fill(&mut c, i as u64, &chain(&t));
    }
    fill(&mut c, 9, &chain(&(100..104).collect::<Vec<_>>()));
    // Knows every block's parent from the live events, plus a block the cache never had.
    let mut stale = NaiveIndex::default();
    events(&mut c).iter().for_each(|e| stale.apply(e));
    stale.apply(&KvEventKind::Stored {
        parent: None,
        blocks: vec![StoredBlock { seq_hash: SeqHash(5), engine_hash: EngineHash(6) }],
    });
    let snap = c.snapshot();
    // Cleared, the root's run (root + first tail), two more tails, the other root.
    assert_eq!(snap.len(), 5, "{snap:?}");
    snap.iter().for_each(|e| stale.apply(e));
    assert_eq!(stale.cached, c.cached_hashes().collect::<HashSet<_>>());
    assert_eq!(KvCache::new(PAGE, 4, SALT).snapshot(), vec![KvEventKind::Cleared]);
}

#[test]
fn events_reproduce_the_cache_under_random_workload() {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut c = KvCache::new(PAGE, 24, SALT);
    let mut index = NaiveIndex::default();
    // A few shared prefixes, each extended with random tails.
    let roots: Vec<Vec<u32>> = (0..4).map(|r| (0..8).map(|i| r * 1000 + i).collect()).collect();
    let mut live: Vec<(SeqId, Vec<SeqHash>)> = Vec::new();
    let mut resets = 0;
    for step in 0..4000u64 {
        match rng.random_range(0..10) {
            0..=3 if live.len() < 6 => {
                let mut t = roots[rng.random_range(0..roots.len())].clone();
                let extra = rng.random_range(0..12);
                t.extend((0..extra).map(|_| rng.random_range(0..3u32)));
                let h = chain(&t);
                let hits = c.prefix_hits(&h);
                let id = SeqId(step);
                let need = (h.len() - hits) as u64;
                if c.admit(id, &h[..hits], need).is_ok() {
                    c.commit(id, &h);
                    live.push((id, h));
                }
            }
            4..=7 if !live.is_empty() => {
                let (id, _) = live.swap_remove(rng.random_range(0..live.len()));
                c.free(id);
            }
            8 if rng.random_bool(0.05) => {
                c.reset();
                resets += 1;
            }
            _ => {}
        }
        let mut evs = Vec::new();
        c.drain_events(&mut evs);
        evs.iter().for_each(|e| index.apply(e));
        c.check_invariants();
        let want: HashSet<SeqHash> = c.cached_hashes().collect();
        assert_eq!(index.cached, want, "after step {step}");
    }
    assert!(resets > 0, "the workload should exercise reset");
}
