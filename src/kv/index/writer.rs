//! [`KvIndexWriter`]: the one writer of a [`KvIndex`], and its recovery entry points.
//!
//! Invariant: for each worker, the published sets, `cached_blocks` and `num_entries` equal the
//! result of the worker's events `1..=last_event_id` applied in order (or of the dump it last
//! took); an event is applied only as `last_event_id + 1` (see the gap rule in the parent doc).
//!
//! Concurrency: `&mut self` on every mutation; exactly one writer per index (not `Clone`), so
//! per-worker state needs no synchronisation and each key's `compute` never races another
//! writer. Readers see each key's set replaced whole.
//!
//! Per-worker state is one map `engine hash → sequence hash` (engines name blocks by their own
//! opaque ids, and removals use them) plus `extra_names`, the blocks named by more than one
//! engine hash (usually empty). Whether a worker already holds a block is read from the
//! published set itself, so no second per-worker map of held blocks is kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use papaya::{Compute, Operation};

use super::directory::Directory;
use super::{IndexError, KeyedState, KvIndex, WorkerSet, MAX_TOMBSTONES};
use crate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;

/// One worker's private state, owned by the writer.
#[derive(Default)]
pub(super) struct WorkerState {
    pub(super) last_event_id: u64,
    /// Every engine block the worker holds, and the sequence hash it names.
    pub(super) engine_to_seq: HashMap<EngineHash, SeqHash, KeyedState>,
    /// For a block named by `k > 1` engine hashes, `k - 1`; blocks named once are absent.
    pub(super) extra_names: HashMap<SeqHash, u32, KeyedState>,
    /// Distinct blocks held: `engine_to_seq.len()` minus the sum of `extra_names`.
    pub(super) held: u64,
}

/// Recently removed workers, bounded by [`MAX_TOMBSTONES`] (oldest forgotten first).
#[derive(Default)]
pub(super) struct Tombstones {
    pub(super) set: HashSet<WorkerId>,
    pub(super) order: VecDeque<WorkerId>,
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
    /// The directory this writer last published (the same `Arc` readers load).
    directory: Arc<Directory>,
    pub(super) workers: HashMap<WorkerId, WorkerState, KeyedState>,
    pub(super) tombstones: Tombstones,
    unknown_removals: u64,
}

impl KvIndexWriter {
    pub(super) fn new(index: Arc<KvIndex>) -> Self {
        Self {
            directory: index.cached.load_full(),
            index,
            workers: HashMap::default(),
            tombstones: Tombstones::default(),
            unknown_removals: 0,
        }
    }

    /// The index this writer updates.
    pub fn index(&self) -> &Arc<KvIndex> {
        &self.index
    }

    /// Removals of engine hashes the worker never stored (or already removed) so far: counted,
    /// not fatal (an engine may evict a block whose store event predates this frontend).
    pub fn unknown_removals(&self) -> u64 {
        self.unknown_removals
    }

    /// Last event id applied for `worker` (`None`: never seen, or removed).
    pub fn last_event_id(&self, worker: WorkerId) -> Option<u64> {
        self.workers.get(&worker).map(|s| s.last_event_id)
    }

    /// Would applying `event` leave a gap? `Some(expected)` when `event.event_id > last + 1`
    /// (`last` is 0 for a worker never seen, so a first event above 1 gives `Some(1)`). `None`
    /// for a removed worker, whose events are refused anyway. Pure: applies nothing.
    pub fn check_gap(&self, event: &KvEvent) -> Option<u64> {
        if self.tombstones.set.contains(&event.worker) {
            return None;
        }
        let expected = self.last_event_id(event.worker).unwrap_or(0) + 1;
        (event.event_id > expected).then_some(expected)
    }

    /// Applies `event` if it is the worker's next (`last + 1`). `Err(Gap)`: not applied, recover
    /// first (module doc); `Err(Stale)` and `Err(RemovedWorker)`: ignored.
    pub fn apply(&mut self, event: &KvEvent) -> Result<(), IndexError> {
        self.check(event.worker, event.event_id)?;
        self.apply_kind(event.worker, &event.kind);
        self.state(event.worker).last_event_id = event.event_id;
        Ok(())
    }

    /// A worker's `Replay`: applies `events` in order. Ids `<= last` are skipped (already
    /// applied, e.g. live events taken while the replay was in flight); the rest must be
    /// contiguous from `last + 1`. A hole is `Err(Gap)`: the events before it stay applied and
    /// the consumer needs a dump (or another replay). `Err(RemovedWorker)` applies nothing.
    pub fn apply_replay(&mut self, worker: WorkerId, events: &[KvEvent]) -> Result<(), IndexError> {
        for event in events {
            debug_assert_eq!(event.worker, worker, "a replay carries one worker's events");
            let got = event.event_id;
            match self.check(worker, got) {
                Err(IndexError::Stale { .. }) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            self.apply_kind(worker, &event.kind);
            self.state(worker).last_event_id = got;
        }
        Ok(())
    }

    /// A worker's `Dump`: drops everything the index has for `worker`, applies `events` in
    /// order whatever their ids (a leading `Cleared`, then `Stored` events), then sets the
    /// worker's last id to `last_event_id`, even if lower than before (the worker's word wins).
    /// Ignored for a removed worker (a late answer must not resurrect it).
    pub fn apply_dump(&mut self, worker: WorkerId, events: &[KvEvent], last_event_id: u64) {
        if self.tombstones.set.contains(&worker) {
            return;
        }
        self.apply_kind(worker, &KvEventKind::Cleared);
        for event in events {
            debug_assert_eq!(event.worker, worker, "a dump carries one worker's events");
            self.apply_kind(worker, &event.kind);
        }
        self.state(worker).last_event_id = last_event_id;
    }

    /// Drops every block of `worker` and refuses its later events.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        if let Some(mut state) = self.workers.remove(&worker) {
            let index = &*self.index;
            let blocks = index.blocks.pin();
            let w = Writing { index, blocks: &blocks, worker };
            w.clear(&mut state);
        }
        if let Some(dir) = self.directory.without(worker) {
            self.publish_directory(dir);
        }
        self.tombstones.insert(worker);
    }

    /// Approximate mode ([`crate::kv::approx`]): publishes `stored` and then unpublishes
    /// `removed` as `worker`'s blocks, outside the event-id sequence (a predicted block is named
    /// by its sequence hash as engine hash; the worker's last event id does not move). Ignored
    /// for a removed worker.
    pub fn apply_predicted(&mut self, worker: WorkerId, stored: &[SeqHash], removed: &[SeqHash]) {
        if self.tombstones.set.contains(&worker) {
            return;
        }
        if !stored.is_empty() {
            let blocks = stored.iter().map(|&s| StoredBlock { seq_hash: s, engine_hash: EngineHash(s.0) }).collect();
            self.apply_kind(worker, &KvEventKind::Stored { parent: None, blocks });
        }
        if !removed.is_empty() {
            let engine_hashes = removed.iter().map(|s| EngineHash(s.0)).collect();
            self.apply_kind(worker, &KvEventKind::Removed { engine_hashes });
        }
    }

    /// Drops every block the index has for `worker` (a known worker's predictions, when its real
    /// events begin), keeping its last event id and accepting its later events.
    pub fn clear_worker(&mut self, worker: WorkerId) {
        if self.workers.contains_key(&worker) {
            self.apply_kind(worker, &KvEventKind::Cleared);
        }
    }

    fn publish_directory(&mut self, dir: Directory) {
        self.directory = Arc::new(dir);
        self.index.cached.store(self.directory.clone());
    }

    /// Estimated bytes of the whole index: the read side ([`KvIndex::memory_bytes`]) plus every
    /// worker's private maps and the tombstones. See the `memory` module for the method.
    pub fn memory_bytes(&self) -> usize {
        super::memory::writer_bytes(self)
    }

    /// The id rule shared by `apply` and `apply_replay`: `Ok` iff `got` is `last + 1`.
    fn check(&self, worker: WorkerId, got: u64) -> Result<(), IndexError> {
        if self.tombstones.set.contains(&worker) {
            return Err(IndexError::RemovedWorker { worker, got });
        }
        let last = self.last_event_id(worker).unwrap_or(0);
        if got <= last {
            return Err(IndexError::Stale { worker, last, got });
        }
        if got > last + 1 {
            let expected = last + 1;
            return Err(IndexError::Gap { worker, expected, got });
        }
        Ok(())
    }

    /// `worker`'s state, created (and the worker added to the directory) on first use. A join
    /// copies the directory (O(workers)): joins are rare, lookups are not.
    fn state(&mut self, worker: WorkerId) -> &mut WorkerState {
        if !self.workers.contains_key(&worker) {
            if let Some(dir) = self.directory.with(worker) {
                self.publish_directory(dir);
            }
        }
        self.workers.entry(worker).or_default()
    }

    /// Applies one change to `worker`'s blocks, with no id check, and publishes its count.
    fn apply_kind(&mut self, worker: WorkerId, kind: &KvEventKind) {
        self.state(worker);
        let index = &*self.index;
        let state = self.workers.get_mut(&worker).expect("created above");
        // One pin per event (entering the map's reclamation epoch is not free).
        let blocks = index.blocks.pin();
        let w = Writing { index, blocks: &blocks, worker };
        match kind {
            KvEventKind::Stored { parent: _, blocks } => w.store(state, blocks),
            KvEventKind::Removed { engine_hashes } => {
                self.unknown_removals += w.remove(state, engine_hashes);
            }
            KvEventKind::Cleared => w.clear(state),
        }
        self.directory.store(worker, state.held);
    }
}

type BlocksRef<'a> = papaya::HashMapRef<'a, SeqHash, WorkerSet, KeyedState, papaya::LocalGuard<'a>>;

/// One event's changes to one worker's blocks, through one pinned view of the map.
struct Writing<'a> {
    index: &'a KvIndex,
    blocks: &'a BlocksRef<'a>,
    worker: WorkerId,
}

impl Writing<'_> {
    fn store(&self, state: &mut WorkerState, blocks: &[StoredBlock]) {
        state.engine_to_seq.reserve(blocks.len());
        for b in blocks {
            match state.engine_to_seq.insert(b.engine_hash, b.seq_hash) {
                Some(old) if old == b.seq_hash => {}
                Some(old) => {
                    self.release(state, old);
                    self.acquire(state, b.seq_hash);
                }
                None => self.acquire(state, b.seq_hash),
            }
        }
    }

    /// Returns how many engine hashes were unknown.
    fn remove(&self, state: &mut WorkerState, hashes: &[EngineHash]) -> u64 {
        let mut unknown = 0;
        for h in hashes {
            match state.engine_to_seq.remove(h) {
                Some(seq) => self.release(state, seq),
                None => unknown += 1,
            }
        }
        unknown
    }

    fn clear(&self, state: &mut WorkerState) {
        for seq in state.engine_to_seq.values() {
            // A block named k times is unpublished at its last name.
            if let Some(extra) = state.extra_names.get_mut(seq) {
                if *extra > 0 {
                    *extra -= 1;
                    continue;
                }
            }
            self.unpublish(*seq);
        }
        sub(&self.index.counters.entries, state.held as usize);
        state.held = 0;
        state.engine_to_seq.clear();
        state.extra_names.clear();
    }

    /// A new engine name for `seq`: publishes the worker as a holder, or counts an extra name
    /// when the published set already has it (the set is the truth for "already held").
    fn acquire(&self, state: &mut WorkerState, seq: SeqHash) {
        let (index, worker) = (self.index, self.worker);
        let added = self.blocks.compute(seq, |entry| match entry {
            None => Operation::Insert(WorkerSet::one(worker)),
            Some((_, set)) => set.with(worker).map_or(Operation::Abort(()), Operation::Insert),
        });
        match added {
            Compute::Aborted(()) => {
                *state.extra_names.entry(seq).or_insert(0) += 1;
                return;
            }
            Compute::Inserted(..) => {
                let keys = add(&index.counters.keys, 1);
                if keys > index.counters.peak_keys.load(Relaxed) {
                    index.counters.peak_keys.store(keys, Relaxed);
                }
            }
            Compute::Updated { old, new } => track_heap(index, old.1, Some(new.1)),
            Compute::Removed(..) => unreachable!("acquire never removes"),
        }
        add(&index.counters.entries, 1);
        state.held += 1;
    }

    /// One engine name of `seq` is gone: unpublishes the worker at the last name.
    fn release(&self, state: &mut WorkerState, seq: SeqHash) {
        if !state.extra_names.is_empty() {
            if let Some(extra) = state.extra_names.get_mut(&seq) {
                *extra -= 1;
                if *extra == 0 {
                    state.extra_names.remove(&seq);
                }
                return;
            }
        }
        self.unpublish(seq);
        sub(&self.index.counters.entries, 1);
        state.held -= 1;
    }

    /// Removes the worker from the set of `seq` (the key goes when the set would be empty).
    fn unpublish(&self, seq: SeqHash) {
        let (index, worker) = (self.index, self.worker);
        let removed = self.blocks.compute(seq, |entry| match entry.and_then(|(_, set)| set.without(worker)) {
            None => Operation::Abort(()),
            Some(rest) if rest.is_empty() => Operation::Remove,
            Some(rest) => Operation::Insert(rest),
        });
        match removed {
            Compute::Updated { old, new } => track_heap(index, old.1, Some(new.1)),
            Compute::Removed(_, old) => {
                track_heap(index, old, None);
                sub(&index.counters.keys, 1);
            }
            Compute::Aborted(()) => debug_assert!(false, "{worker} did not hold {seq:?}"),
            Compute::Inserted(..) => unreachable!("unpublish never inserts"),
        }
    }
}

/// Accounts for a set replaced by `new` (or removed) in `set_heap_bytes`.
fn track_heap(index: &KvIndex, old: &WorkerSet, new: Option<&WorkerSet>) {
    let (was, now) = (old.heap_bytes(), new.map_or(0, WorkerSet::heap_bytes));
    if now != was {
        add(&index.counters.set_heap_bytes, now);
        sub(&index.counters.set_heap_bytes, was);
    }
}

// The index's counters have one writer: a load and a store, no locked read-modify-write.

fn add(counter: &AtomicUsize, n: usize) -> usize {
    let v = counter.load(Relaxed) + n;
    counter.store(v, Relaxed);
    v
}

fn sub(counter: &AtomicUsize, n: usize) {
    counter.store(counter.load(Relaxed) - n, Relaxed);
}
