//! The mocker's paged KV cache with prefix caching: which blocks exist, who holds them, and
//! which are evicted when space is needed.
//!
//! Invariants:
//! - `cached + partial ≤ capacity` blocks. A *full* block is identified by its sequence hash
//!   ([`BlockHasher`](crate::kv::hash::BlockHasher), the router's hashes), is cached once and is
//!   shared by reference count; a *partial* block (a sequence's unfinished tail, or a slot
//!   reserved for tokens being computed) belongs to one sequence and is never hashed.
//! - A full block with no references stays cached and is *evictable*; eviction takes the least
//!   recently released first, and a freed sequence releases its blocks tail first, so a tail is
//!   evicted before its prefix. Hence a cached block's parent is always cached.
//! - Every change is recorded as a [`KvEventKind`] in order: `Stored` once when a block becomes
//!   cached (a hit does not republish), `Removed` when evicted, `Cleared` on reset. Engine hashes
//!   are `seq_hash ^ salt` (a per-worker non-zero salt), so they differ from sequence hashes.
//! - [`KvCache::snapshot`] rebuilds the cached state as events (`Cleared`, then `Stored` parents
//!   first); [`KvCache::reset`] drops unreferenced blocks and publishes that snapshot, so blocks
//!   held by running sequences survive a reset and the events always describe the cache exactly.
//!
//! Concurrency: a plain structure owned by one worker task's scheduler; no locks, no I/O.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use crate::contract::events::{EngineHash, KvEventKind, StoredBlock};
use crate::kv::hash::SeqHash;

/// The engine's id of one sequence (request) while it holds blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Not enough free or evictable blocks for an allocation (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: u64,
    pub available: u64,
}

#[derive(Debug)]
struct CachedBlock {
    refs: u32,
    parent: Option<SeqHash>,
    /// `Some` exactly when `refs == 0`: the block's key in the LRU list.
    lru_tick: Option<u64>,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    /// The sequence's full blocks, in prefix order (each holds one reference).
    full: Vec<SeqHash>,
    /// Blocks reserved for its tail and for tokens being computed (not hashed).
    partial: u64,
}

/// A paged KV cache of `capacity` blocks of `page_size` tokens.
#[derive(Debug)]
pub struct KvCache {
    page_size: usize,
    capacity: u64,
    salt: u64,
    blocks: HashMap<SeqHash, CachedBlock>,
    /// Evictable blocks by release tick; the smallest is evicted first.
    lru: BTreeMap<u64, SeqHash>,
    next_tick: u64,
    seqs: HashMap<SeqId, SeqBlocks>,
    partial_blocks: u64,
    events: Vec<KvEventKind>,
}

impl KvCache {
    /// `salt` must be non-zero (so engine hashes differ from sequence hashes).
    pub fn new(page_size: usize, capacity: u64, salt: u64) -> Self {
        assert!(page_size > 0 && capacity > 0 && salt != 0, "validated by MockerConfig");
        Self {
            page_size,
            capacity,
            salt,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            next_tick: 0,
            seqs: HashMap::new(),
            partial_blocks: 0,
            events: Vec::new(),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The engine's own id for a block.
    pub fn engine_hash(&self, h: SeqHash) -> EngineHash {
        EngineHash(h.0 ^ self.salt)
    }

    /// Blocks in use: cached full blocks plus partial blocks.
    pub fn used_blocks(&self) -> u64 {
        self.blocks.len() as u64 + self.partial_blocks
    }

    /// Blocks held by some sequence (referenced full blocks plus partial blocks).
    pub fn active_blocks(&self) -> u64 {
        self.used_blocks() - self.lru.len() as u64
    }

    /// Cached blocks nobody holds (evicted when space is needed).
    pub fn evictable_blocks(&self) -> u64 {
        self.lru.len() as u64
    }

    /// Blocks an allocation may take now: free plus evictable.
    pub fn available_blocks(&self) -> u64 {
        self.capacity - self.used_blocks() + self.evictable_blocks()
    }

    /// Share of the blocks held by sequences.
    pub fn usage(&self) -> f64 {
        self.active_blocks() as f64 / self.capacity as f64
    }

    pub fn is_cached(&self, h: SeqHash) -> bool {
        self.blocks.contains_key(&h)
    }

    /// Every cached full block.
    pub fn cached_hashes(&self) -> impl Iterator<Item = SeqHash> + '_ {
        self.blocks.keys().copied()
    }

    /// Number of sequences holding blocks.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Blocks `seq` holds (full + partial), or 0 if it holds none.
    pub fn held_by(&self, seq: SeqId) -> u64 {
        self.seqs.get(&seq).map_or(0, |s| s.full.len() as u64 + s.partial)
    }

    /// How many leading blocks of `hashes` are cached (no change is made).
    pub fn prefix_hits(&self, hashes: &[SeqHash]) -> usize {
        hashes.iter().take_while(|h| self.blocks.contains_key(h)).count()
    }

    /// Starts `seq` holding the cached blocks `hits` (a cached prefix, see [`Self::prefix_hits`])
    /// plus `partial` new blocks. All or nothing.
    pub fn admit(&mut self, seq: SeqId, hits: &[SeqHash], partial: u64) -> Result<(), OutOfBlocks> {
        assert!(!self.seqs.contains_key(&seq), "{seq:?} admitted twice");
        debug_assert_eq!(self.prefix_hits(hits), hits.len());
        let hits_evictable = hits.iter().filter(|h| self.blocks[h].refs == 0).count() as u64;
        let available = self.available_blocks() - hits_evictable;
        if available < partial {
            return Err(OutOfBlocks { needed: partial, available });
        }
        for &h in hits {
            self.acquire(h);
        }
        self.take_blocks(partial);
        self.seqs.insert(seq, SeqBlocks { full: hits.to_vec(), partial });
        Ok(())
    }

    /// Makes `seq` hold enough blocks for `tokens` tokens, evicting if needed. All or nothing.
    pub fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<(), OutOfBlocks> {
        let want = tokens.div_ceil(self.page_size) as u64;
        let s = self.seqs.get(&seq).expect("reserve for an admitted sequence");
        let need = want.saturating_sub(s.full.len() as u64 + s.partial);
        if need == 0 {
            return Ok(());
        }
        let available = self.available_blocks();
        if available < need {
            return Err(OutOfBlocks { needed: need, available });
        }
        self.take_blocks(need);
        self.seqs.get_mut(&seq).expect("checked above").partial += need;
        Ok(())
    }

    /// Records that `seq`'s full blocks are now `hashes` (all of them, in order): the new ones
    /// turn reserved partial blocks into cached full blocks, published as `Stored`.
    pub fn commit(&mut self, seq: SeqId, hashes: &[SeqHash]) {
        let mut s = self.seqs.remove(&seq).expect("commit for an admitted sequence");
        debug_assert_eq!(&hashes[..s.full.len()], &s.full[..], "a sequence's prefix never changes");
        for &h in &hashes[s.full.len()..] {
            assert!(s.partial > 0, "{seq:?} filled a block it did not reserve");
            s.partial -= 1;
            self.partial_blocks -= 1;
            let parent = s.full.last().copied();
            let new = match self.blocks.entry(h) {
                Entry::Occupied(_) => false,
                Entry::Vacant(v) => {
                    v.insert(CachedBlock { refs: 1, parent, lru_tick: None });
                    true
                }
            };
            if new {
                self.push_stored(parent, h);
            } else {
                // Computed concurrently by another sequence: share it, free our copy.
                self.acquire(h);
            }
            s.full.push(h);
        }
        self.seqs.insert(seq, s);
    }

    /// Releases everything `seq` holds: partial blocks are freed, full blocks stay cached and
    /// become evictable once unreferenced, tail first.
    pub fn free(&mut self, seq: SeqId) {
        let Some(s) = self.seqs.remove(&seq) else {
            return;
        };
        self.partial_blocks -= s.partial;
        for &h in s.full.iter().rev() {
            let b = self.blocks.get_mut(&h).expect("held blocks are cached");
            b.refs -= 1;
            if b.refs == 0 {
                let tick = self.next_tick;
                self.next_tick += 1;
                b.lru_tick = Some(tick);
                self.lru.insert(tick, h);
            }
        }
    }

    /// Drops every cached block nobody holds and publishes the state that is left: one
    /// `Cleared`, then `Stored` for every block a running sequence still holds (its prefix, so
    /// parents come first). In-flight requests keep their blocks, cached and shareable; a consumer
    /// applying the events sees exactly the cache. When idle, the cache ends empty.
    pub fn reset(&mut self) {
        for (_, h) in std::mem::take(&mut self.lru) {
            let b = self.blocks.remove(&h).expect("LRU entries are cached");
            debug_assert_eq!(b.refs, 0);
        }
        let state = self.snapshot();
        self.events.extend(state);
    }

    /// The whole cache as events that rebuild it from nothing: one `Cleared`, then `Stored`
    /// events covering every cached block, parents before children, each with its true
    /// `parent` (one event per chain of single children).
    pub fn snapshot(&self) -> Vec<KvEventKind> {
        let mut children: HashMap<Option<SeqHash>, Vec<SeqHash>> = HashMap::new();
        for (&h, b) in &self.blocks {
            children.entry(b.parent).or_default().push(h);
        }
        // Sorted so the same cache always dumps the same events.
        children.values_mut().for_each(|v| v.sort_unstable());
        let mut out = vec![KvEventKind::Cleared];
        let mut runs: Vec<(Option<SeqHash>, SeqHash)> =
            children.get(&None).map_or_else(Vec::new, |r| r.iter().rev().map(|&h| (None, h)).collect());
        let mut dumped = 0;
        while let Some((parent, mut h)) = runs.pop() {
            let mut blocks = Vec::new();
            loop {
                blocks.push(StoredBlock { seq_hash: h, engine_hash: self.engine_hash(h) });
                let Some(kids) = children.get(&Some(h)) else {
                    break;
                };
                // Other children start their own runs, emitted after this one.
                runs.extend(kids[1..].iter().rev().map(|&k| (Some(h), k)));
                h = kids[0];
            }
            dumped += blocks.len();
            out.push(KvEventKind::Stored { parent, blocks });
        }
        assert_eq!(dumped, self.blocks.len(), "every cached block's parent is cached");
        out
    }

    /// Moves the changes recorded since the last call into `out`, in order.
    pub fn drain_events(&mut self, out: &mut Vec<KvEventKind>) {
        out.append(&mut self.events);
    }

    fn acquire(&mut self, h: SeqHash) {
        let b = self.blocks.get_mut(&h).expect("acquire a cached block");
        if let Some(tick) = b.lru_tick.take() {
            self.lru.remove(&tick);
        }
        b.refs += 1;
    }

    /// Takes `n` blocks as partial, evicting the least recently released if needed.
    fn take_blocks(&mut self, n: u64) {
        let free = self.capacity - self.used_blocks();
        if n > free {
            self.evict(n - free);
        }
        self.partial_blocks += n;
        assert!(self.used_blocks() <= self.capacity);
    }

    fn evict(&mut self, n: u64) {
        for _ in 0..n {
            let (_, h) = self.lru.pop_first().expect("callers checked available_blocks");
            let b = self.blocks.remove(&h).expect("LRU entries are cached");
            debug_assert_eq!(b.refs, 0);
            let eh = self.engine_hash(h);
            match self.events.last_mut() {
                Some(KvEventKind::Removed { engine_hashes }) => engine_hashes.push(eh),
                _ => self.events.push(KvEventKind::Removed { engine_hashes: vec![eh] }),
            }
        }
    }

    /// Appends to the previous `Stored` when this block continues its chain (one event per
    /// contiguous run of one sequence's blocks).
    fn push_stored(&mut self, parent: Option<SeqHash>, h: SeqHash) {
        let block = StoredBlock { seq_hash: h, engine_hash: self.engine_hash(h) };
        if let (Some(p), Some(KvEventKind::Stored { blocks, .. })) = (parent, self.events.last_mut()) {
            if blocks.last().map(|b| b.seq_hash) == Some(p) {
                blocks.push(block);
                return;
            }
        }
        self.events.push(KvEventKind::Stored { parent, blocks: vec![block] });
    }

    /// Checks the structure's invariants (tests and debug assertions).
    pub fn check_invariants(&self) {
        assert!(self.used_blocks() <= self.capacity);
        let mut refs: HashMap<SeqHash, u32> = HashMap::new();
        for s in self.seqs.values() {
            for h in &s.full {
                *refs.entry(*h).or_default() += 1;
            }
        }
        assert_eq!(self.partial_blocks, self.seqs.values().map(|s| s.partial).sum::<u64>());
        for (h, b) in &self.blocks {
            assert_eq!(b.refs, refs.get(h).copied().unwrap_or(0), "refcount of {h:?}");
            assert_eq!(b.lru_tick.is_some(), b.refs == 0);
            if let Some(t) = b.lru_tick {
                assert_eq!(self.lru.get(&t), Some(h));
            }
            if let Some(p) = b.parent {
                assert!(self.blocks.contains_key(&p), "{h:?} cached without its parent");
            }
        }
        assert_eq!(self.lru.len(), self.blocks.values().filter(|b| b.refs == 0).count());
    }
}

#[cfg(test)]
mod tests;
