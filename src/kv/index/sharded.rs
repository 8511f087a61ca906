//! [`ShardedIndex`]: the block map partitioned by sequence hash into N [`KvIndex`]es, each with
//! its own [`KvIndexWriter`] (one writer thread per partition), read lock-free by a lookup that
//! walks the partitions by hash. The layer the issue sketches ("partitioned by hash across the
//! data-plane shards; each partition has exactly one writer"), kept beside the single index so
//! both can be measured; the frontend runs the single index.
//!
//! Invariant: partition `p` holds exactly the blocks with `partition_of(s) == p`, and the union
//! of the partitions equals the single index fed the same events, with two exceptions that are
//! this layer's limits: a removal names engine hashes, which do not say which partition holds
//! them, so [`ShardedIndex::split`] sends every removal (and clear) to every partition, each
//! ignoring the hashes it does not know (so per-partition `unknown_removals` are meaningless);
//! and an engine hash re-stored under a sequence hash in another partition keeps its old name
//! in the old partition until removed or cleared (the single writer moves it).
//!
//! Concurrency: each partition's writer is `&mut` and owned by one thread; events reach it as
//! that partition's part of every event (same id, so each partition tracks gaps alone). A
//! lookup pins every partition once. Bounded by [`MAX_PARTITIONS`].
//!
//! Measured on this 2-core machine (Mooncake replay, 1,024 workers, `perf/RESULTS.md`; medians
//! of three invocations): two partition writers alone apply the stored blocks 1.4–2.5× as fast
//! as one (6.3–8.6 vs 3.0–4.5 M blocks/s), but beside a reader, which is the deployment, three
//! threads share two cores and the whole replay is slower (4.8–7.1 vs 7.3–8.5 M block ops/s),
//! with slower lookups (p50 3.5–4.9 vs 1.8–2.5 µs: every lookup pins both maps and reads both
//! directories). Splitting also copies every event once per partition and probes removals in
//! every partition. So the frontend keeps one writer; this layer pays only where the writers
//! have cores the readers do not need.

use std::sync::Arc;

use super::{walk, KvIndex, KvIndexWriter, OverlapScores};
use crate::contract::events::{KvEvent, KvEventKind};
use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;

/// Most partitions: one per data-plane shard (core), and a lookup pins each one.
pub const MAX_PARTITIONS: usize = 64;

/// N partitions of the index by sequence hash; see the module doc.
pub struct ShardedIndex {
    parts: Box<[Arc<KvIndex>]>,
}

impl ShardedIndex {
    /// `partitions` empty partitions (`1..=MAX_PARTITIONS`) and their writers, in order.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(partitions: usize) -> (Arc<ShardedIndex>, Vec<KvIndexWriter>) {
        assert!(
            (1..=MAX_PARTITIONS).contains(&partitions),
            "partitions {partitions} out of range 1..={MAX_PARTITIONS}"
        );
        let (parts, writers): (Vec<_>, Vec<_>) = (0..partitions).map(|_| KvIndex::new()).unzip();
        let index = ShardedIndex { parts: parts.into() };
        (Arc::new(index), writers)
    }

    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// The partition owning `seq` (its high bits scaled to N: uniform for hash outputs).
    #[inline]
    pub fn partition_of(&self, seq: SeqHash) -> usize {
        ((seq.0 as u128 * self.parts.len() as u128) >> 64) as usize
    }

    /// Each partition's part of `event` (index = partition): its own stored blocks, every
    /// removal and clear. Every part keeps the event's id.
    pub fn split(&self, event: &KvEvent) -> Vec<KvEvent> {
        let part =
            |kind| KvEvent { worker: event.worker, event_id: event.event_id, timestamp_us: event.timestamp_us, kind };
        match &event.kind {
            KvEventKind::Stored { parent, blocks } => (0..self.parts.len())
                .map(|p| {
                    let own = blocks.iter().filter(|b| self.partition_of(b.seq_hash) == p).copied().collect();
                    part(KvEventKind::Stored { parent: *parent, blocks: own })
                })
                .collect(),
            kind => (0..self.parts.len()).map(|_| part(kind.clone())).collect(),
        }
    }

    /// As [`KvIndex::find_matches`], across the partitions.
    pub fn find_matches(&self, seq: &[SeqHash]) -> OverlapScores {
        let pins: Vec<_> = self.parts.iter().map(|p| p.blocks.pin()).collect();
        let scores = walk(seq, |s| pins[self.partition_of(*s)].get(s));
        drop(pins);
        let mut cached_blocks = vec![0; scores.len()];
        for p in self.parts.iter() {
            for (sum, n) in cached_blocks.iter_mut().zip(p.cached.load().counts_of(&scores)) {
                *sum += n;
            }
        }
        OverlapScores { scores, cached_blocks }
    }

    /// Blocks `worker` holds across the partitions.
    pub fn cached_blocks(&self, worker: WorkerId) -> u64 {
        self.parts.iter().map(|p| p.cached_blocks(worker)).sum()
    }

    /// Block-holder pairs across the partitions.
    pub fn num_entries(&self) -> usize {
        self.parts.iter().map(|p| p.num_entries()).sum()
    }

    /// Estimated bytes of the partitions' read sides ([`KvIndex::memory_bytes`]).
    pub fn memory_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.memory_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::events::{EngineHash, StoredBlock};

    fn mix(x: u64) -> u64 {
        let z = (x ^ (x >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z ^ (z >> 29)
    }

    /// Random stores, removals and clears from 6 workers over 3 chains: the partitions together
    /// answer every lookup exactly as the single index does.
    #[test]
    fn partitions_agree_with_the_single_index() {
        let (single, mut writer) = KvIndex::new();
        let (sharded, mut writers) = ShardedIndex::new(3);
        let chains: Vec<Vec<SeqHash>> =
            (0..3u64).map(|c| (0..40).map(|i| SeqHash(mix(if i < 10 { i } else { c * 1000 + i }))).collect()).collect();
        let mut ids = [0u64; 6];
        let mut rng = 7u64;
        for step in 0..600u64 {
            rng = mix(rng + step);
            let w = (rng % 6) as usize;
            let chain = &chains[(rng >> 8) as usize % 3];
            let (a, b) = ((rng >> 16) as usize % 40, (rng >> 24) as usize % 40);
            let range = &chain[a.min(b)..=a.max(b)];
            let kind = match (rng >> 32) % 10 {
                0 => KvEventKind::Cleared,
                1..=3 => {
                    KvEventKind::Removed { engine_hashes: range.iter().map(|s| EngineHash(s.0 ^ w as u64)).collect() }
                }
                _ => KvEventKind::Stored {
                    parent: None,
                    blocks: range
                        .iter()
                        .map(|&s| StoredBlock { seq_hash: s, engine_hash: EngineHash(s.0 ^ w as u64) })
                        .collect(),
                },
            };
            ids[w] += 1;
            let event = KvEvent { worker: WorkerId(w as u64), event_id: ids[w], timestamp_us: 0, kind };
            writer.apply(&event).unwrap();
            for (part, wr) in sharded.split(&event).iter().zip(&mut writers) {
                wr.apply(part).unwrap();
            }
            for chain in &chains {
                for len in [1, 7, 40] {
                    assert_eq!(sharded.find_matches(&chain[..len]), single.find_matches(&chain[..len]));
                }
            }
        }
        assert_eq!(sharded.num_entries(), single.num_entries());
        assert!(single.num_entries() > 0);
        for w in 0..6 {
            let w = WorkerId(w);
            assert_eq!(sharded.cached_blocks(w), single.cached_blocks(w));
        }
    }
}
