//! The KV index: sequence hash → the set of workers holding that block.
//!
//! Split in two halves that share one [`KvIndex`]:
//!
//! - [`KvIndex`] (`Arc`, `Send + Sync`) is the read side: a `papaya` map `SeqHash → WorkerSet`,
//!   per-worker cached-block counts, and the number of block-holder pairs. Every shard reads it
//!   without locks ([`KvIndex::find_matches`]).
//! - [`KvIndexWriter`] (exactly one per index, `&mut self`) is the only writer. It owns each
//!   worker's private state: engine hash → sequence hash, how many engine blocks name each
//!   sequence hash, and the last event id seen.
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
//!
//! Resizing is papaya's `Blocking` mode: the writer finishes a table migration in the write that
//! starts it (a pause on the control plane, never on a reader). The default incremental mode
//! advances a migration only on later writes, and a read-mostly table left mid-migration made
//! every lookup search both tables through copied slots (measured: a miss in a 1M-entry index
//! took ~2 µs instead of ~50 ns).
//!
//! Bounds: entries are bounded by the workers' cache capacities (engines evict, and their
//! removals reach the index); a departed worker's blocks are dropped by
//! [`KvIndexWriter::remove_worker`], and its late events are refused (the last
//! [`MAX_TOMBSTONES`] removed ids are remembered).

mod hasher;
#[cfg(test)]
mod tests;
mod worker_set;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use papaya::{Compute, Operation};
use thiserror::Error;

use crate::kv::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use crate::kv::hash::SeqHash;
use crate::protocol::WorkerId;

pub use hasher::KeyedState;
pub use worker_set::WorkerSet;

/// Removed workers whose late events are still refused: enough to cover events in flight when a
/// lease expires, small enough to be a fixed few hundred KiB.
pub const MAX_TOMBSTONES: usize = 4096;

/// Blocks looked up ahead of the walk: a lookup in a large index is a few dependent cache
/// misses, and issuing several independent ones at once overlaps them. Costs at most this many
/// wasted lookups past the end of the match.
const LOOKAHEAD_BLOCKS: usize = 8;

/// An event the writer could not apply as a clean, in-order update. Never fatal: the caller
/// counts it and may ask the worker to replay or dump (a retry of the same event does not help).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// Events `expected..got` were missed; the event itself was applied. The worker is at fault
    /// or the event plane dropped them; the index may lack blocks until a dump.
    #[error("worker {worker}: event gap, expected id {expected}, got {got} (applied)")]
    Gap {
        worker: WorkerId,
        expected: u64,
        got: u64,
    },
    /// The event is not newer than the last one applied (a duplicate or a reordering); ignored.
    #[error("worker {worker}: stale event id {got}, last applied {last} (ignored)")]
    Stale {
        worker: WorkerId,
        last: u64,
        got: u64,
    },
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
    /// Written only by the writer (store of its own count), read by anyone.
    cached: papaya::HashMap<WorkerId, AtomicU64, KeyedState>,
    entries: AtomicUsize,
}

impl KvIndex {
    /// An empty index and its one writer.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> (Arc<KvIndex>, KvIndexWriter) {
        let index = Arc::new(KvIndex {
            blocks: papaya::HashMap::builder()
                .hasher(KeyedState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            cached: papaya::HashMap::builder()
                .hasher(KeyedState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            entries: AtomicUsize::new(0),
        });
        let writer = KvIndexWriter {
            index: index.clone(),
            workers: HashMap::default(),
            tombstones: Tombstones::default(),
            unknown_removals: 0,
        };
        (index, writer)
    }

    /// For each worker holding `seq[0]`: how many leading blocks of `seq` it holds, and its
    /// cached-block count. Stops at the first block no remaining worker holds.
    pub fn find_matches(&self, seq: &[SeqHash]) -> OverlapScores {
        let blocks = self.blocks.pin();
        let Some(first) = seq.first().and_then(|s| blocks.get(s)) else {
            return OverlapScores::default();
        };
        // Workers that held every block so far (ascending), and those that dropped out.
        let mut active: Vec<WorkerId> = first.as_slice().to_vec();
        let mut scores: Vec<(WorkerId, u32)> = Vec::with_capacity(active.len());
        let mut depth = 1u32;
        'walk: for chunk in seq[1..].chunks(LOOKAHEAD_BLOCKS) {
            // Independent lookups first, so their cache misses overlap; then the dependent walk.
            let mut sets: [Option<&WorkerSet>; LOOKAHEAD_BLOCKS] = [None; LOOKAHEAD_BLOCKS];
            for (set, s) in sets.iter_mut().zip(chunk) {
                *set = blocks.get(s);
            }
            for set in &sets[..chunk.len()] {
                let Some(set) = set else { break 'walk };
                retain_holders(&mut active, &mut scores, set.as_slice(), depth);
                if active.is_empty() {
                    break 'walk;
                }
                depth += 1;
            }
        }
        drop(blocks);
        scores.extend(active.iter().map(|&w| (w, depth)));
        scores.sort_unstable_by_key(|&(w, _)| w);
        let cached = self.cached.pin();
        let cached_blocks = scores
            .iter()
            .map(|(w, _)| cached.get(w).map_or(0, |c| c.load(Relaxed)))
            .collect();
        OverlapScores {
            scores,
            cached_blocks,
        }
    }

    /// Blocks `worker` holds, per the index (0 for an unknown worker).
    pub fn cached_blocks(&self, worker: WorkerId) -> u64 {
        self.cached
            .pin()
            .get(&worker)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Block-holder pairs in the index.
    pub fn num_entries(&self) -> usize {
        self.entries.load(Relaxed)
    }

    /// Distinct blocks in the index.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The holders of one block, ascending (empty if none). Allocates; for tests and debugging.
    pub fn holders(&self, seq: SeqHash) -> Vec<WorkerId> {
        self.blocks
            .pin()
            .get(&seq)
            .map_or_else(Vec::new, |s| s.as_slice().to_vec())
    }
}

/// Keeps the `active` workers found in `set` (both ascending); a worker dropped here held
/// exactly `depth` leading blocks and moves to `dropped`.
#[inline]
fn retain_holders(
    active: &mut Vec<WorkerId>,
    dropped: &mut Vec<(WorkerId, u32)>,
    set: &[WorkerId],
    depth: u32,
) {
    if active.as_slice() == set {
        // The common case: the same workers hold this block as the previous one.
        return;
    }
    let mut keep = |w: &WorkerId, held: bool| {
        if !held {
            dropped.push((*w, depth));
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

/// One worker's private state, owned by the writer.
#[derive(Default)]
struct WorkerState {
    last_event_id: u64,
    engine_to_seq: HashMap<EngineHash, SeqHash, KeyedState>,
    /// Engine blocks naming each sequence hash; its keys are the blocks the worker holds.
    seq_refs: HashMap<SeqHash, u32, KeyedState>,
}

/// Recently removed workers, bounded by [`MAX_TOMBSTONES`] (oldest forgotten first).
#[derive(Default)]
struct Tombstones {
    set: HashSet<WorkerId>,
    order: VecDeque<WorkerId>,
}

impl Tombstones {
    fn insert(&mut self, w: WorkerId) {
        if self.set.insert(w) {
            self.order.push_back(w);
            if self.order.len() > MAX_TOMBSTONES {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// The write side; see the module doc. Not `Clone`: exactly one per index.
pub struct KvIndexWriter {
    index: Arc<KvIndex>,
    workers: HashMap<WorkerId, WorkerState>,
    tombstones: Tombstones,
    unknown_removals: u64,
}

impl KvIndexWriter {
    /// The index this writer updates.
    pub fn index(&self) -> &Arc<KvIndex> {
        &self.index
    }

    /// Removals of engine hashes the worker never stored (or already removed) so far: counted,
    /// not fatal (an engine may evict a block whose store event predates this frontend).
    pub fn unknown_removals(&self) -> u64 {
        self.unknown_removals
    }

    /// Applies one event. `Err(Gap)` means it was applied after missed events; `Err(Stale)` and
    /// `Err(RemovedWorker)` mean it was ignored.
    pub fn apply(&mut self, event: &KvEvent) -> Result<(), IndexError> {
        let worker = event.worker;
        let got = event.event_id;
        if self.tombstones.set.contains(&worker) {
            return Err(IndexError::RemovedWorker { worker, got });
        }
        let state = self.workers.entry(worker).or_default();
        let expected = state.last_event_id + 1;
        if got < expected {
            return Err(IndexError::Stale {
                worker,
                last: state.last_event_id,
                got,
            });
        }
        state.last_event_id = got;
        let index = &*self.index;
        match &event.kind {
            KvEventKind::Stored { parent: _, blocks } => store(index, worker, state, blocks),
            KvEventKind::Removed { engine_hashes } => {
                self.unknown_removals += remove(index, worker, state, engine_hashes);
            }
            KvEventKind::Cleared => clear(index, worker, state),
        }
        publish_count(index, worker, state.seq_refs.len() as u64);
        if got > expected {
            return Err(IndexError::Gap {
                worker,
                expected,
                got,
            });
        }
        Ok(())
    }

    /// Drops every block of `worker` and refuses its later events.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        if let Some(mut state) = self.workers.remove(&worker) {
            clear(&self.index, worker, &mut state);
        }
        self.index.cached.pin().remove(&worker);
        self.tombstones.insert(worker);
    }
}

fn store(index: &KvIndex, worker: WorkerId, state: &mut WorkerState, blocks: &[StoredBlock]) {
    for b in blocks {
        match state.engine_to_seq.insert(b.engine_hash, b.seq_hash) {
            Some(old) if old == b.seq_hash => {}
            Some(old) => {
                release(index, worker, state, old);
                acquire(index, worker, state, b.seq_hash);
            }
            None => acquire(index, worker, state, b.seq_hash),
        }
    }
}

/// Returns how many engine hashes were unknown.
fn remove(
    index: &KvIndex,
    worker: WorkerId,
    state: &mut WorkerState,
    hashes: &[EngineHash],
) -> u64 {
    let mut unknown = 0;
    for h in hashes {
        match state.engine_to_seq.remove(h) {
            Some(seq) => release(index, worker, state, seq),
            None => unknown += 1,
        }
    }
    unknown
}

fn clear(index: &KvIndex, worker: WorkerId, state: &mut WorkerState) {
    let blocks = index.blocks.pin();
    for seq in state.seq_refs.keys() {
        unpublish(&blocks, *seq, worker);
    }
    index.entries.fetch_sub(state.seq_refs.len(), Relaxed);
    state.seq_refs.clear();
    state.engine_to_seq.clear();
}

fn acquire(index: &KvIndex, worker: WorkerId, state: &mut WorkerState, seq: SeqHash) {
    let refs = state.seq_refs.entry(seq).or_insert(0);
    *refs += 1;
    if *refs == 1 {
        let blocks = index.blocks.pin();
        let added = blocks.compute(seq, |entry| match entry {
            None => Operation::Insert(WorkerSet::one(worker)),
            Some((_, set)) => set
                .with(worker)
                .map_or(Operation::Abort(()), Operation::Insert),
        });
        debug_assert!(
            !matches!(added, Compute::Aborted(())),
            "{worker} already held {seq:?}"
        );
        index.entries.fetch_add(1, Relaxed);
    }
}

fn release(index: &KvIndex, worker: WorkerId, state: &mut WorkerState, seq: SeqHash) {
    let Some(refs) = state.seq_refs.get_mut(&seq) else {
        debug_assert!(false, "engine map names {seq:?} without a ref");
        return;
    };
    *refs -= 1;
    if *refs == 0 {
        state.seq_refs.remove(&seq);
        unpublish(&index.blocks.pin(), seq, worker);
        index.entries.fetch_sub(1, Relaxed);
    }
}

type BlocksRef<'a> = papaya::HashMapRef<'a, SeqHash, WorkerSet, KeyedState, papaya::LocalGuard<'a>>;

/// Removes `worker` from the set of `seq` (the key goes when the set would be empty).
fn unpublish(blocks: &BlocksRef<'_>, seq: SeqHash, worker: WorkerId) {
    let removed = blocks.compute(seq, |entry| {
        match entry.and_then(|(_, set)| set.without(worker)) {
            None => Operation::Abort(()),
            Some(rest) if rest.is_empty() => Operation::Remove,
            Some(rest) => Operation::Insert(rest),
        }
    });
    debug_assert!(
        !matches!(removed, Compute::Aborted(())),
        "{worker} did not hold {seq:?}"
    );
}

fn publish_count(index: &KvIndex, worker: WorkerId, count: u64) {
    let cached = index.cached.pin();
    match cached.get(&worker) {
        Some(c) => c.store(count, Relaxed),
        None => {
            cached.insert(worker, AtomicU64::new(count));
        }
    }
}
