//! The KV index: sequence hash → the set of workers holding that block.
//!
//! Split in two halves that share one [`KvIndex`]:
//!
//! - [`KvIndex`] (`Arc`, `Send + Sync`) is the read side: a `papaya` map `SeqHash → WorkerSet`,
//!   a directory of per-worker cached-block counts (sorted, swapped whole on join/leave), and the
//!   number of block-holder pairs. Every shard reads it without locks
//!   ([`KvIndex::find_matches`]).
//! - [`KvIndexWriter`] (exactly one per index, `&mut self`) is the only writer. It owns each
//!   worker's private state: engine hash → sequence hash, the rare blocks named by several engine
//!   hashes, and the last event id applied.
//!
//! Invariants:
//! - A worker is in the set of `s` iff at least one engine hash it stored, not since removed or
//!   cleared, maps to `s`; `cached_blocks(w)` is the number of such `s`; `num_entries()` is the
//!   sum over workers. (A worker may hold a block whose parent it no longer has: the index
//!   records what the worker says.)
//! - A [`WorkerSet`] is immutable once published; the writer replaces it whole (clone-on-write
//!   through papaya's `compute`) or removes the key when it would become empty. Readers pinned
//!   on the map see the old or the new set, never a torn one; papaya frees retired sets once no
//!   reader holds a guard. Each key is atomic on its own; a lookup walking many keys while the
//!   writer applies an event may see part of that event (a best-effort view, as any router's).
//! - A worker's state is exactly the result of its events `1..=last_event_id` applied in order
//!   (or of a dump stamped `last_event_id`): [`KvIndexWriter::apply`] never applies an event out
//!   of order.
//!
//! ## Gaps and recovery (see `src/worker/control.rs` for the worker's side)
//!
//! [`KvIndexWriter::apply`] applies an event only when its id is `last + 1` (`last` is 0 for a
//! worker never seen). A larger id is `Err(Gap { expected: last + 1 })` and is **not applied**:
//! applying it and then replaying the older events would reorder them (a replayed `Stored` after
//! a newer `Removed` would resurrect the block), so the exact design is to refuse and let the
//! consumer recover first. A worker first seen at an id above 1 (the frontend started after it)
//! is a gap with `expected == 1`. The consumer then:
//! 1. asks the worker to `recover(expected - 1)`, holding that worker's later live events;
//! 2. applies a `Replay` with [`KvIndexWriter::apply_replay`] (ids `<= last` are skipped, the
//!    rest must be contiguous) or a `Dump` with [`KvIndexWriter::apply_dump`] (wipes the worker,
//!    applies the snapshot whatever its ids, sets `last` to the dump's id even if lower);
//! 3. re-applies the held events: those `<= last` are `Err(Stale)` (already covered), the next
//!    ones apply in order.
//!
//! [`KvIndexWriter::check_gap`] is the same test as a pure query.
//!
//! ## Memory
//!
//! [`KvIndexWriter::memory_bytes`] (everything) and [`KvIndex::memory_bytes`] (the shared read
//! side) are estimates computed from lengths and capacities, not allocator queries; the `memory`
//! module says how. Measured on the Mooncake replay: see `perf/RESULTS.md`.
//!
//! ## Resizing and reclamation
//!
//! Retired sets are freed in batches of `RETIRE_BATCH` (papaya's `seize` collector): each
//! batch costs one `membarrier`, an IPI to every core running a thread of the process, so the
//! default batch of 32 made a writer beside a busy reader twice as slow and interrupted readers
//! as often (see `RETIRE_BATCH`).
//!
//! Resizing is papaya's `Blocking` mode: the writer finishes a table migration in the write that
//! starts it (a pause on the control plane, never on a reader). The default incremental mode
//! advances a migration only on later writes, and a read-mostly table left mid-migration made
//! every lookup search both tables through copied slots (measured: a miss in a 1M-entry index
//! took ~2 µs instead of ~50 ns).
//!
//! ## Partitioning
//!
//! [`ShardedIndex`] partitions the map by hash into N indexes, each with its own writer, and a
//! lookup walks them by hash. It is a measured alternative, not what the frontend runs: on this
//! 2-core machine one writer beside a reader does more block operations per second than two
//! partition writers beside a reader (the three threads share two cores, every event is split
//! and every lookup pins two maps), and its lookups are faster (numbers in the `sharded` module
//! doc and `perf/RESULTS.md`). So the control plane keeps the single [`KvIndexWriter`]; the
//! layer pays only where writers have cores of their own.
//!
//! Bounds: entries are bounded by the workers' cache capacities (engines evict, and their
//! removals reach the index); a departed worker's blocks are dropped by
//! [`KvIndexWriter::remove_worker`], and its late events are refused (the last
//! [`MAX_TOMBSTONES`] removed ids are remembered).

mod directory;
mod hasher;
mod memory;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod recovery_tests;
mod sharded;
#[cfg(test)]
mod tests;
mod worker_set;
mod writer;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use thiserror::Error;

use directory::Directory;

use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;

pub use hasher::{KeyedHasher, KeyedState};
pub use sharded::{ShardedIndex, MAX_PARTITIONS};
pub use worker_set::WorkerSet;
pub use writer::KvIndexWriter;

/// Removed workers whose late events are still refused: enough to cover events in flight when a
/// lease expires, small enough to be a fixed few hundred KiB.
pub const MAX_TOMBSTONES: usize = 4096;

/// Retired entries the writer batches before reclaiming them. Each batch costs one process-wide
/// memory barrier (seize's `membarrier`, an IPI to every core running one of our threads, i.e.
/// to every reading shard). At seize's default of 32 those barriers took more than half the
/// writer's time once a reader ran beside it (Mooncake replay under KVM: 3.3 M block ops/s, 9 M
/// with 1,024) and interrupted the reader as often. 4,096 makes them rare enough that a lookup
/// is delayed by one in well under 1% of cases (p99); the cost is up to 4,096 retired sets
/// (~200 KiB plus spilled ids) awaiting reclamation, freed in one burst by the last thread to
/// leave its guard.
const RETIRE_BATCH: usize = 4096;

/// Blocks looked up ahead of the walk: a lookup in a large index is a few dependent cache
/// misses, and issuing several independent ones at once overlaps them. Costs at most this many
/// wasted lookups past the end of the match.
const LOOKAHEAD_BLOCKS: usize = 8;

/// An event the writer could not apply as a clean, in-order update. Never fatal, and a retry of
/// the same event alone does not help: a gap needs a recovery first (see the module doc).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// Events `expected..got` are missing; the event was **not** applied. The event plane dropped
    /// them (or the frontend started after the worker: `expected == 1`). Recover from the worker
    /// (replay since `expected - 1`, or a dump), then re-apply the event.
    #[error("worker {worker}: event gap, expected id {expected}, got {got} (not applied)")]
    Gap { worker: WorkerId, expected: u64, got: u64 },
    /// The event is not newer than the last one applied (a duplicate, a reordering, or already
    /// covered by a replay or dump); ignored.
    #[error("worker {worker}: stale event id {got}, last applied {last} (ignored)")]
    Stale { worker: WorkerId, last: u64, got: u64 },
    /// The worker was removed; its late events are ignored so it cannot reappear as a ghost.
    #[error("worker {worker}: event {got} after the worker was removed (ignored)")]
    RemovedWorker { worker: WorkerId, got: u64 },
}

/// The result of one lookup.
///
/// `scores` holds every worker holding the first block, with its overlap (leading blocks held,
/// `>= 1`), sorted by worker id. `cached_blocks[i]` is the cached-block count of `scores[i].0`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapScores {
    pub scores: Vec<(WorkerId, u32)>,
    pub cached_blocks: Vec<u64>,
}

impl OverlapScores {
    /// Leading blocks `w` holds (0 when it holds none).
    #[inline]
    pub fn overlap(&self, w: WorkerId) -> u32 {
        self.position(w).map_or(0, |i| self.scores[i].1)
    }

    /// `w`'s cached-block count if `w` matched, else `None`.
    #[inline]
    pub fn cached(&self, w: WorkerId) -> Option<u64> {
        self.position(w).map(|i| self.cached_blocks[i])
    }

    fn position(&self, w: WorkerId) -> Option<usize> {
        self.scores.binary_search_by_key(&w, |&(id, _)| id).ok()
    }
}

/// The read side; see the module doc.
pub struct KvIndex {
    blocks: papaya::HashMap<SeqHash, WorkerSet, KeyedState>,
    /// Per-worker cached-block counts; swapped by the writer on join/leave, counts stored in
    /// place between swaps.
    cached: ArcSwap<Directory>,
    /// On their own cache line: the writer stores them per block, and sharing a line with the
    /// map's root (which every lookup reads) made the reader miss on every write.
    counters: CachePadded<Counters>,
}

/// Written only by the writer (a load and a store, no read-modify-write: there is one writer),
/// read by anyone.
#[derive(Default)]
struct Counters {
    /// Block-holder pairs.
    entries: AtomicUsize,
    /// Keys in `blocks`, and the most it has held: papaya's table does not shrink until it is
    /// 1/8 full, so its size follows the peak, not the current length (memory accounting).
    keys: AtomicUsize,
    peak_keys: AtomicUsize,
    /// Bytes of the heap-allocated (spilled) worker sets in `blocks`.
    set_heap_bytes: AtomicUsize,
}

impl KvIndex {
    /// An empty index and its one writer.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> (Arc<KvIndex>, KvIndexWriter) {
        // papaya takes a `seize::Collector`, which it does not re-export: build the default one
        // through the builder method's own signature, then set its batch size.
        fn default_arg<B, C: Default>(_: fn(B, C) -> B) -> C {
            C::default()
        }
        type Builder = papaya::HashMapBuilder<SeqHash, WorkerSet, KeyedState>;
        let collector = default_arg(Builder::collector).batch_size(RETIRE_BATCH);
        let index = Arc::new(KvIndex {
            blocks: papaya::HashMap::builder()
                .hasher(KeyedState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .collector(collector)
                .build(),
            cached: ArcSwap::from_pointee(Directory::default()),
            counters: CachePadded::default(),
        });
        let writer = KvIndexWriter::new(index.clone());
        (index, writer)
    }

    /// For each worker holding `seq[0]`: how many leading blocks of `seq` it holds, and its
    /// cached-block count. Stops at the first block no remaining worker holds.
    pub fn find_matches(&self, seq: &[SeqHash]) -> OverlapScores {
        let blocks = self.blocks.pin();
        let scores = walk(seq, |s| blocks.get(s));
        drop(blocks);
        let cached_blocks = self.cached.load().counts_of(&scores);
        OverlapScores { scores, cached_blocks }
    }

    /// Blocks `worker` holds, per the index (0 for an unknown worker).
    pub fn cached_blocks(&self, worker: WorkerId) -> u64 {
        self.cached.load().get(worker)
    }

    /// Block-holder pairs in the index.
    pub fn num_entries(&self) -> usize {
        self.counters.entries.load(Relaxed)
    }

    /// Distinct blocks in the index.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Estimated bytes of the shared read side: the block table, its entries and spilled worker
    /// sets, and the per-worker counts (see the `memory` module). Excludes the writer's
    /// per-worker maps ([`KvIndexWriter::memory_bytes`] includes them).
    pub fn memory_bytes(&self) -> usize {
        memory::read_side_bytes(self)
    }

    /// The holders of one block, ascending (empty if none). Allocates; for tests and debugging.
    pub fn holders(&self, seq: SeqHash) -> Vec<WorkerId> {
        self.blocks.pin().get(&seq).map_or_else(Vec::new, |s| s.as_slice().to_vec())
    }
}

/// The overlap walk: every worker holding `seq[0]` with the number of leading blocks it holds,
/// sorted by worker id (the first block's set order, so no sort). `get` resolves one block (one
/// map, or a partition by hash). Depths are written only when a worker drops out after block 1
/// or survives to the end, so a hot first block held by every worker costs one pass over its
/// set, and a run of blocks held by the same workers costs one slice compare per block.
#[inline]
fn walk<'a>(seq: &[SeqHash], get: impl Fn(&SeqHash) -> Option<&'a WorkerSet>) -> Vec<(WorkerId, u32)> {
    let Some(first) = seq.first().and_then(&get) else {
        return Vec::new();
    };
    // Every holder of the first block, at depth 1 until it is seen to hold more.
    let mut scores: Vec<(WorkerId, u32)> = first.as_slice().iter().map(|&w| (w, 1)).collect();
    // Workers that held every block so far (ascending), and those dropping out at this block.
    let mut active: Vec<WorkerId> = first.as_slice().to_vec();
    let mut gone: Vec<WorkerId> = Vec::new();
    let mut depth = 1u32;
    'walk: for chunk in seq[1..].chunks(LOOKAHEAD_BLOCKS) {
        // Independent lookups first, so their cache misses overlap; then the dependent walk.
        let mut sets: [Option<&WorkerSet>; LOOKAHEAD_BLOCKS] = [None; LOOKAHEAD_BLOCKS];
        for (set, s) in sets.iter_mut().zip(chunk) {
            *set = get(s);
        }
        for set in &sets[..chunk.len()] {
            let Some(set) = set else { break 'walk };
            let set = set.as_slice();
            if active.as_slice() != set {
                // Those dropping out hold exactly `depth` blocks (depth 1 is already recorded).
                let track = depth > 1;
                retain_holders(&mut active, set, track.then_some(&mut gone));
                if track {
                    set_depth(&mut scores, &gone, depth);
                    gone.clear();
                }
                if active.is_empty() {
                    return scores;
                }
            }
            depth += 1;
        }
    }
    if depth > 1 {
        set_depth(&mut scores, &active, depth);
    }
    scores
}

/// Keeps the `active` workers that are in `set` (both ascending), pushing the others to `gone`.
#[inline]
fn retain_holders(active: &mut Vec<WorkerId>, set: &[WorkerId], mut gone: Option<&mut Vec<WorkerId>>) {
    let mut out = |w: &[WorkerId]| {
        if let Some(g) = gone.as_deref_mut() {
            g.extend_from_slice(w);
        }
    };
    if set.len() * 8 < active.len() {
        // A small set against many survivors (a hot first block): search the survivors, and
        // compact the kept ones in place (the write index never passes the read index).
        let (mut kept, mut lo) = (0, 0);
        for w in set {
            match active[lo..].binary_search(w) {
                Ok(at) => {
                    out(&active[lo..lo + at]);
                    active[kept] = *w;
                    kept += 1;
                    lo += at + 1;
                }
                Err(at) => {
                    out(&active[lo..lo + at]);
                    lo += at;
                }
            }
        }
        out(&active[lo..]);
        active.truncate(kept);
        return;
    }
    let mut keep = |w: &WorkerId, held: bool| {
        if !held {
            out(std::slice::from_ref(w));
        }
        held
    };
    if active.len() * 8 < set.len() {
        // Few survivors against a large set: binary search each.
        active.retain(|w| keep(w, set.binary_search(w).is_ok()));
        return;
    }
    let mut j = 0;
    active.retain(|w| {
        while j < set.len() && set[j] < *w {
            j += 1;
        }
        keep(w, j < set.len() && set[j] == *w)
    });
}

/// Sets the depth of `ids` (ascending, all present in `scores`) to `depth`.
#[inline]
fn set_depth(scores: &mut [(WorkerId, u32)], ids: &[WorkerId], depth: u32) {
    if ids.len() * 8 < scores.len() {
        let mut lo = 0;
        for w in ids {
            if let Ok(at) = scores[lo..].binary_search_by_key(w, |s| s.0) {
                scores[lo + at].1 = depth;
                lo += at + 1;
            }
        }
        return;
    }
    let mut j = 0;
    for w in ids {
        while scores[j].0 < *w {
            j += 1;
        }
        debug_assert_eq!(scores[j].0, *w);
        scores[j].1 = depth;
        j += 1;
    }
}
