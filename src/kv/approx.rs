//! Approximate mode: what a worker that publishes no KV events probably caches, predicted from
//! what the frontend routed to it (NVIDIA Dynamo's `--no-kv-events` / `ApproxKvIndexer`).
//!
//! A request dispatched to such a worker is taken to leave its prompt's full blocks in the
//! worker's cache. Each prediction lives until [`ApproxConfig::ttl`] has passed since the last
//! request that sent that block (Dynamo's default: 120 s), and beyond the worker's KV capacity
//! (`kv_capacity_blocks` of its registration, or [`DEFAULT_CAPACITY_BLOCKS`] when it does not
//! say) the least recently sent blocks go first, deepest first within one prompt (engines free a
//! sequence's tail before its prefix, and a prefix without its tail still matches).
//!
//! Where the predictions live, and why: in the same [`KvIndex`](super::index::KvIndex) as the
//! exact workers' blocks, written by its one writer (the control plane) through
//! [`KvIndexWriter::apply_predicted`]. A shard that dispatches to an approximate worker sends the
//! prompt's sequence hashes over a bounded channel (a full channel drops the prediction and
//! counts it); the control plane stamps them here and applies what changed. The alternative, a
//! second index for predictions, would cost every routing decision a second lookup and a merge
//! of two score lists, and need a second writer; with one index the router and the shards do not
//! know the mode exists, and a worker's predicted blocks are its `cached_blocks` like any other.
//! A worker is never in both modes: when its real events begin, its predictions are dropped
//! ([`Predictions::forget`]) before the first event applies.
//!
//! - [`PredictedBlocks`]: one worker's prediction (a plain data structure, no clock of its own:
//!   every call takes `now`).
//! - [`Predictions`]: every approximate worker's, applied to the index through its writer.
//!
//! Concurrency: both are owned by the control plane beside the [`KvIndexWriter`] (`&mut self`).
//!
//! Bounds: a worker's prediction holds at most its capacity ([`MAX_PREDICTED_BLOCKS`] at most);
//! its touch queue at most twice that plus [`COMPACT_SLACK`] (compacted when longer); one
//! [`Predictions::expire`] call does at most [`MAX_EXPIRED_PER_TICK`] steps.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;
use crate::kv::index::{KeyedState, KvIndexWriter};

/// Dynamo's default TTL of a predicted block (`router_ttl_secs`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// Capacity assumed for a worker that registers none (0 blocks): 1 M tokens at 16 per block,
/// a mid-size GPU's cache; bounds the prediction's memory (~40 B per block) all the same.
pub const DEFAULT_CAPACITY_BLOCKS: u64 = 1 << 16;
/// The most blocks predicted for one worker, whatever it registers: the most any worker may
/// publish ([`crate::contract::events::MAX_WORKER_BLOCKS`]).
pub const MAX_PREDICTED_BLOCKS: u64 = crate::contract::events::MAX_WORKER_BLOCKS;
/// Stale entries a touch queue may carry past twice its live ones before it is compacted: small
/// predictions are not rebuilt on every refresh.
pub const COMPACT_SLACK: usize = 1024;
/// Queue entries one expiry pass looks at, over all workers: a pass is a bounded pause of the
/// control plane (a few ms); what is left expires on the next pass.
pub const MAX_EXPIRED_PER_TICK: usize = 65_536;

/// How the frontend treats workers without KV events.
#[derive(Debug, Clone, PartialEq)]
pub struct ApproxConfig {
    /// `--no-kv-events`: every worker is approximate and KV events are ignored.
    pub all: bool,
    /// `--approx-ttl-s`: how long a predicted block outlives the last request that sent it.
    pub ttl: Duration,
}

impl Default for ApproxConfig {
    fn default() -> Self {
        Self { all: false, ttl: DEFAULT_TTL }
    }
}

/// One touch of one block: its stamp (the block's current one unless stale) and when.
#[derive(Debug, Clone, Copy)]
struct Touch {
    seq: SeqHash,
    stamp: u64,
    at: Instant,
}

/// One worker's predicted cache: blocks in order of their last touch.
///
/// Invariant: `stamps` holds exactly the predicted blocks, at most `capacity`; for each, the
/// queue holds exactly one entry with its stamp (the live one), and live entries are in
/// increasing stamp and time order. Other entries are stale (an older touch) and skipped.
#[derive(Debug)]
pub struct PredictedBlocks {
    capacity: usize,
    stamps: HashMap<SeqHash, u64, KeyedState>,
    order: VecDeque<Touch>,
    next_stamp: u64,
}

impl PredictedBlocks {
    /// An empty prediction holding at most `capacity_blocks` (0: [`DEFAULT_CAPACITY_BLOCKS`];
    /// at most [`MAX_PREDICTED_BLOCKS`]).
    pub fn new(capacity_blocks: u64) -> Self {
        let capacity = match capacity_blocks {
            0 => DEFAULT_CAPACITY_BLOCKS,
            n => n.min(MAX_PREDICTED_BLOCKS),
        } as usize;
        Self { capacity, stamps: HashMap::default(), order: VecDeque::new(), next_stamp: 0 }
    }

    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn contains(&self, seq: SeqHash) -> bool {
        self.stamps.contains_key(&seq)
    }

    /// A prompt's blocks (`seq`, in prompt order) were sent to the worker at `now`: each becomes
    /// the most recent (the prefix more recent than the tail). Blocks not predicted before are
    /// pushed to `added`; the least recent ones beyond the capacity are evicted to `evicted`.
    /// A prompt longer than the capacity is predicted up to the capacity (its prefix).
    pub fn store(&mut self, seq: &[SeqHash], now: Instant, added: &mut Vec<SeqHash>, evicted: &mut Vec<SeqHash>) {
        let seq = &seq[..seq.len().min(self.capacity)];
        for &s in seq.iter().rev() {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            if self.stamps.insert(s, stamp).is_none() {
                added.push(s);
            }
            self.order.push_back(Touch { seq: s, stamp, at: now });
        }
        while self.stamps.len() > self.capacity {
            match self.pop_live() {
                Some(t) => evicted.push(t.seq),
                None => break,
            }
        }
        if self.order.len() > 2 * self.stamps.len() + COMPACT_SLACK {
            self.compact();
        }
    }

    /// Moves the blocks last sent at or before `now - ttl` to `expired`, oldest first, looking
    /// at no more than `budget` queue entries. Returns the entries looked at.
    pub fn expire(&mut self, now: Instant, ttl: Duration, budget: usize, expired: &mut Vec<SeqHash>) -> usize {
        let mut steps = 0;
        while steps < budget {
            let Some(front) = self.order.front() else { break };
            if now.saturating_duration_since(front.at) < ttl {
                break;
            }
            let t = self.order.pop_front().expect("front exists");
            steps += 1;
            if self.stamps.get(&t.seq) == Some(&t.stamp) {
                self.stamps.remove(&t.seq);
                expired.push(t.seq);
            }
        }
        steps
    }

    /// Drops the blocks of `seq` that are predicted (their queue entries turn stale), pushing
    /// them to `removed`: their real events arrived ([`crate::kv::replica`]).
    pub fn remove(&mut self, seq: impl IntoIterator<Item = SeqHash>, removed: &mut Vec<SeqHash>) {
        for s in seq {
            if self.stamps.remove(&s).is_some() {
                removed.push(s);
            }
        }
        if self.order.len() > 2 * self.stamps.len() + COMPACT_SLACK {
            self.compact();
        }
    }

    /// Removes and returns the least recent live entry, dropping stale ones on the way.
    fn pop_live(&mut self) -> Option<Touch> {
        while let Some(t) = self.order.pop_front() {
            if self.stamps.get(&t.seq) == Some(&t.stamp) {
                self.stamps.remove(&t.seq);
                return Some(t);
            }
        }
        None
    }

    /// Drops the stale entries (order kept).
    fn compact(&mut self) {
        let stamps = &self.stamps;
        self.order.retain(|t| stamps.get(&t.seq) == Some(&t.stamp));
        debug_assert_eq!(self.order.len(), self.stamps.len());
    }

    /// Queue entries, live and stale (tests of the bound).
    #[cfg(test)]
    fn queue_len(&self) -> usize {
        self.order.len()
    }
}

/// What one [`Predictions`] call changed in the index (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub stored: u64,
    pub evicted: u64,
    pub expired: u64,
}

/// Every approximate worker's prediction, applied to the index through its one writer.
///
/// Invariant: for each worker here, its blocks in the index are exactly its prediction (the
/// writer's state for it holds nothing else); a worker leaves when it turns exact or leaves.
pub struct Predictions {
    ttl: Duration,
    workers: HashMap<WorkerId, PredictedBlocks, KeyedState>,
    added: Vec<SeqHash>,
    removed: Vec<SeqHash>,
}

impl Predictions {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, workers: HashMap::default(), added: Vec::new(), removed: Vec::new() }
    }

    /// `worker` (of KV capacity `capacity_blocks`, 0 if unknown) was sent a prompt of blocks `seq`.
    pub fn store(
        &mut self,
        writer: &mut KvIndexWriter,
        worker: WorkerId,
        capacity_blocks: u64,
        seq: &[SeqHash],
        now: Instant,
    ) -> Changed {
        let p = self.workers.entry(worker).or_insert_with(|| PredictedBlocks::new(capacity_blocks));
        self.added.clear();
        self.removed.clear();
        p.store(seq, now, &mut self.added, &mut self.removed);
        writer.apply_predicted(worker, &self.added, &self.removed);
        Changed { stored: self.added.len() as u64, evicted: self.removed.len() as u64, expired: 0 }
    }

    /// Expires what is older than the TTL, over all workers, in at most
    /// [`MAX_EXPIRED_PER_TICK`] steps.
    pub fn expire(&mut self, writer: &mut KvIndexWriter, now: Instant) -> Changed {
        let mut budget = MAX_EXPIRED_PER_TICK;
        let mut changed = Changed::default();
        for (&worker, p) in self.workers.iter_mut() {
            if budget == 0 {
                break;
            }
            self.removed.clear();
            budget -= p.expire(now, self.ttl, budget, &mut self.removed);
            if !self.removed.is_empty() {
                writer.apply_predicted(worker, &[], &self.removed);
                changed.expired += self.removed.len() as u64;
            }
        }
        changed
    }

    /// Drops the blocks of `seq` from `worker`'s prediction, here and in the index. Returns
    /// how many were predicted.
    pub fn remove_blocks(
        &mut self,
        writer: &mut KvIndexWriter,
        worker: WorkerId,
        seq: impl IntoIterator<Item = SeqHash>,
    ) -> u64 {
        let Some(p) = self.workers.get_mut(&worker) else { return 0 };
        self.removed.clear();
        p.remove(seq, &mut self.removed);
        if !self.removed.is_empty() {
            writer.apply_predicted(worker, &[], &self.removed);
        }
        self.removed.len() as u64
    }

    /// Whether no worker has a prediction.
    pub fn is_empty(&self) -> bool {
        self.workers.values().all(PredictedBlocks::is_empty)
    }

    /// Drops `worker`'s prediction from here and from the index (it turned exact).
    pub fn forget(&mut self, writer: &mut KvIndexWriter, worker: WorkerId) {
        if self.workers.remove(&worker).is_some() {
            writer.clear_worker(worker);
        }
    }

    /// Forgets `worker` here only (it left: the writer dropped its blocks already).
    pub fn remove(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
    }

    /// Blocks predicted for `worker`.
    pub fn len_of(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, PredictedBlocks::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
    use crate::kv::index::KvIndex;

    fn seqs(range: std::ops::Range<u64>) -> Vec<SeqHash> {
        range.map(SeqHash).collect()
    }

    fn store(p: &mut PredictedBlocks, seq: &[SeqHash], now: Instant) -> (Vec<SeqHash>, Vec<SeqHash>) {
        let (mut added, mut evicted) = (Vec::new(), Vec::new());
        p.store(seq, now, &mut added, &mut evicted);
        (added, evicted)
    }

    #[test]
    fn blocks_expire_after_the_ttl_since_their_last_touch() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut p = PredictedBlocks::new(100);
        assert_eq!(store(&mut p, &seqs(1..4), t0).0, seqs(1..4).into_iter().rev().collect::<Vec<_>>());
        // Block 1 sent again later: it outlives 2 and 3.
        let (added, _) = store(&mut p, &seqs(1..2), t0 + Duration::from_secs(5));
        assert!(added.is_empty(), "a refresh adds nothing");
        let mut out = Vec::new();
        p.expire(t0 + Duration::from_secs(9), ttl, usize::MAX, &mut out);
        assert!(out.is_empty());
        p.expire(t0 + Duration::from_secs(10), ttl, usize::MAX, &mut out);
        out.sort();
        assert_eq!(out, seqs(2..4));
        assert!(p.contains(SeqHash(1)) && p.len() == 1);
        out.clear();
        p.expire(t0 + Duration::from_secs(15), ttl, usize::MAX, &mut out);
        assert_eq!(out, seqs(1..2));
        assert!(p.is_empty());
    }

    #[test]
    fn expiry_work_is_bounded_by_the_budget() {
        let t0 = Instant::now();
        let mut p = PredictedBlocks::new(1000);
        store(&mut p, &seqs(0..100), t0);
        let mut out = Vec::new();
        assert_eq!(p.expire(t0 + DEFAULT_TTL, DEFAULT_TTL, 30, &mut out), 30);
        assert_eq!((out.len(), p.len()), (30, 70));
        // Deepest first: the prefix outlives its tail.
        assert!(out.contains(&SeqHash(99)) && !out.contains(&SeqHash(0)));
    }

    #[test]
    fn least_recently_sent_go_first_beyond_capacity() {
        let t0 = Instant::now();
        let mut p = PredictedBlocks::new(6);
        store(&mut p, &seqs(0..4), t0); // prompt A: 0..4
        store(&mut p, &seqs(0..1), t0); // A's first block again
        let (added, evicted) = store(&mut p, &seqs(10..14), t0); // prompt B: 4 new, 2 must go
        assert_eq!(added.len(), 4);
        // A's tail goes first (3, then 2); its refreshed first block and 1 stay.
        assert_eq!(evicted, vec![SeqHash(3), SeqHash(2)]);
        assert_eq!(p.len(), 6);
        assert!(p.contains(SeqHash(0)) && p.contains(SeqHash(1)) && p.contains(SeqHash(10)));
        // A prompt longer than the capacity: its prefix only.
        let (added, evicted) = store(&mut p, &seqs(100..120), t0);
        assert_eq!(added, seqs(100..106).into_iter().rev().collect::<Vec<_>>());
        assert_eq!(evicted.len(), 6);
        assert_eq!(p.len(), 6);
    }

    #[test]
    fn refreshes_keep_the_queue_bounded() {
        let t0 = Instant::now();
        let mut p = PredictedBlocks::new(64);
        for _ in 0..10_000 {
            store(&mut p, &seqs(0..8), t0);
        }
        assert_eq!(p.len(), 8);
        assert!(p.queue_len() <= 2 * 8 + COMPACT_SLACK + 8, "{}", p.queue_len());
        assert_eq!(PredictedBlocks::new(0).capacity(), DEFAULT_CAPACITY_BLOCKS as usize);
        assert_eq!(PredictedBlocks::new(u64::MAX).capacity(), MAX_PREDICTED_BLOCKS as usize);
    }

    #[test]
    fn predictions_reach_the_index_and_leave_it() {
        let (index, mut writer) = KvIndex::new();
        let mut pr = Predictions::new(Duration::from_secs(60));
        let (a, b) = (WorkerId(1), WorkerId(2));
        let t0 = Instant::now();
        let prompt = seqs(50..55);
        assert_eq!(pr.store(&mut writer, a, 4, &prompt, t0).stored, 4);
        pr.store(&mut writer, b, 0, &prompt[..2], t0 + Duration::from_secs(30));
        let m = index.find_matches(&prompt);
        assert_eq!(m.scores, vec![(a, 4), (b, 2)]);
        assert_eq!(index.cached_blocks(a), 4);
        // a's blocks expire at 60 s, b's at 90 s.
        assert_eq!(pr.expire(&mut writer, t0 + Duration::from_secs(61)).expired, 4);
        assert_eq!(index.find_matches(&prompt).scores, vec![(b, 2)]);
        assert_eq!((index.cached_blocks(a), pr.len_of(a)), (0, 0));
        assert_eq!(writer.last_event_id(b), Some(0), "predictions move no event id");
        pr.expire(&mut writer, t0 + Duration::from_secs(91));
        assert_eq!(index.num_entries(), 0);
    }

    /// A worker whose real events begin: its predictions are dropped, its events apply from id 1.
    #[test]
    fn switching_to_exact_drops_the_predictions() {
        let (index, mut writer) = KvIndex::new();
        let mut pr = Predictions::new(DEFAULT_TTL);
        let w = WorkerId(7);
        pr.store(&mut writer, w, 0, &seqs(1..4), Instant::now());
        assert_eq!(index.cached_blocks(w), 3);
        pr.forget(&mut writer, w);
        assert_eq!((index.cached_blocks(w), index.num_entries(), pr.len_of(w)), (0, 0, 0));
        let blocks = vec![StoredBlock { seq_hash: SeqHash(1), engine_hash: EngineHash(99) }];
        let event =
            KvEvent { worker: w, event_id: 1, timestamp_us: 0, kind: KvEventKind::Stored { parent: None, blocks } };
        writer.apply(&event).unwrap();
        assert_eq!(index.find_matches(&seqs(1..4)).scores, vec![(w, 1)]);
        // A late prediction for a worker no longer predicted creates nothing (the control plane
        // checks the mode first); forgetting twice is harmless.
        pr.forget(&mut writer, w);
        assert_eq!(index.cached_blocks(w), 1);
    }

    #[test]
    fn a_removed_worker_gets_no_predictions() {
        let (index, mut writer) = KvIndex::new();
        let mut pr = Predictions::new(DEFAULT_TTL);
        let w = WorkerId(3);
        pr.store(&mut writer, w, 0, &seqs(1..3), Instant::now());
        writer.remove_worker(w);
        pr.remove(w);
        pr.store(&mut writer, w, 0, &seqs(1..3), Instant::now());
        assert_eq!(index.num_entries(), 0);
    }
}
