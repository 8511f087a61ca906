//! The live routing page: `/dashboard` serves one self-contained HTML file (inline CSS and JS,
//! nothing fetched from elsewhere, embedded in the binary); `/dashboard/events` streams a JSON
//! snapshot of the router over SSE every [`SNAPSHOT_PERIOD`] while the page is open.
//!
//! - [`Recent`]: each model's last routing decisions, one bounded ring per shard.
//! - [`snapshot`]: one snapshot (per model: workers, index states, loads, decisions, pairs; the
//!   frontend's rolling hit rate, TTFT and KV transfer throughput), built from what is already
//!   published (worker groups, load cells, index-state cells, metrics counters).
//! - [`stream`]: the SSE body, one per open page.
//!
//! Invariant: with no page open the request path pays one relaxed load per routing decision
//! ([`Recent::record`] returns at once); decisions are recorded only while a page is open.
//!
//! Concurrency: shard `i` alone writes ring `i` of a model's [`Recent`], under a mutex only a
//! snapshot also takes (once per [`SNAPSHOT_PERIOD`] per open page), so the shard never waits on
//! another core in practice. Bounds: [`RING_DECISIONS`] per shard and model,
//! [`MAX_CANDIDATES_SHOWN`] candidates per decision, [`MAX_VIEWERS`] open streams per frontend.

pub mod snapshot;
pub mod stream;

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::contract::WorkerId;
use crate::frontend::IndexState;

/// The page, embedded in the binary.
pub const PAGE_HTML: &str = include_str!("page.html");
/// Decisions kept per shard and model: the page shows the last [`DECISIONS_SHOWN`] of all shards.
pub const RING_DECISIONS: usize = 64;
/// Decisions a snapshot carries per model.
pub const DECISIONS_SHOWN: usize = 50;
/// Candidates kept per decision (the cheapest first): a page row stays readable, and a fleet of
/// hundreds of workers does not make each decision a large copy.
pub const MAX_CANDIDATES_SHOWN: usize = 8;
/// Pages open at once on one frontend: each costs one snapshot per period; past it, 503.
pub const MAX_VIEWERS: usize = 16;
/// How often an open page gets a snapshot.
pub const SNAPSHOT_PERIOD: Duration = Duration::from_millis(750);

/// One candidate of a decision as the page shows it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub worker: WorkerId,
    pub overlap_blocks: u32,
    pub cost: f32,
    pub state: IndexState,
}

/// One routing decision as the page shows it.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub request_id: u64,
    /// `whole`, `prefill` or `decode`.
    pub leg: &'static str,
    pub chosen: WorkerId,
    pub prompt_tokens: u32,
    pub overlap_blocks: u32,
    /// Cached tokens of the chosen worker over prompt tokens, as routed.
    pub hit: f32,
    pub candidates: Vec<Candidate>,
}

/// Open pages (shared by every model's [`Recent`] and the streams' guards).
#[derive(Clone, Default)]
pub struct Viewers(Arc<AtomicUsize>);

impl Viewers {
    pub fn watching(&self) -> bool {
        self.0.load(Relaxed) > 0
    }

    pub fn count(&self) -> usize {
        self.0.load(Relaxed)
    }

    /// A place for one more page, or `None` when [`MAX_VIEWERS`] are open.
    pub fn join(&self) -> Option<Viewer> {
        self.0.fetch_update(Relaxed, Relaxed, |n| (n < MAX_VIEWERS).then_some(n + 1)).ok()?;
        Some(Viewer(self.0.clone()))
    }
}

/// One open page; leaves in `Drop` (the page closed, or its connection dropped).
pub struct Viewer(Arc<AtomicUsize>);

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// One model's recent decisions: one ring per shard (see the module doc).
pub struct Recent {
    viewers: Viewers,
    rings: Box<[CachePadded<Mutex<VecDeque<Decision>>>]>,
}

impl Recent {
    pub fn new(shards: usize, viewers: Viewers) -> Self {
        let rings = (0..shards.max(1)).map(|_| CachePadded::new(Mutex::new(VecDeque::new()))).collect();
        Self { viewers, rings }
    }

    /// Records the decision `make` builds, on `shard`'s ring, if a page is open.
    pub fn record(&self, shard: usize, make: impl FnOnce() -> Decision) {
        if !self.viewers.watching() {
            return;
        }
        let Some(ring) = self.rings.get(shard) else { return };
        let d = make();
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == RING_DECISIONS {
            ring.pop_front();
        }
        ring.push_back(d);
    }

    /// The last `n` decisions of every shard, newest first.
    pub fn last(&self, n: usize) -> Vec<Decision> {
        let mut all = Vec::new();
        for ring in self.rings.iter() {
            all.extend(ring.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned());
        }
        all.sort_by_key(|d| std::cmp::Reverse((d.at_ms, d.request_id)));
        all.truncate(n);
        all
    }
}

/// The frontend's page state: who is watching, and the shard count each model's [`Recent`]
/// is made for.
pub struct Board {
    pub viewers: Viewers,
    shards: usize,
}

impl Board {
    pub fn new(shards: usize) -> Self {
        Self { viewers: Viewers::default(), shards }
    }

    /// A new model's decision rings.
    pub fn recent(&self) -> Recent {
        Recent::new(self.shards, self.viewers.clone())
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A decision as the page shows it, from the router's (`scores`: every candidate's, in `kv`
/// mode; the cheapest [`MAX_CANDIDATES_SHOWN`] are kept).
pub fn decision(
    request_id: u64,
    leg: &'static str,
    decision: &crate::router::RouteDecision,
    group: &crate::frontend::WorkerGroup,
    prompt_tokens: usize,
    block_size: usize,
) -> Decision {
    let state = |w| group.entries.get(&w).map_or(IndexState::Exact, |e| e.kv.get());
    let mut candidates: Vec<Candidate> = decision
        .scores
        .iter()
        .map(|s| Candidate {
            worker: s.worker,
            overlap_blocks: s.overlap_blocks,
            cost: s.cost as f32,
            state: state(s.worker),
        })
        .collect();
    candidates.sort_by(|a, b| a.cost.total_cmp(&b.cost));
    candidates.truncate(MAX_CANDIDATES_SHOWN);
    let cached = (decision.overlap_blocks as usize * block_size).min(prompt_tokens);
    Decision {
        at_ms: unix_ms(),
        request_id,
        leg,
        chosen: decision.worker,
        prompt_tokens: prompt_tokens as u32,
        overlap_blocks: decision.overlap_blocks,
        hit: if prompt_tokens == 0 { 0.0 } else { cached as f32 / prompt_tokens as f32 },
        candidates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(at_ms: u64) -> Decision {
        Decision {
            at_ms,
            request_id: at_ms,
            leg: "whole",
            chosen: WorkerId(1),
            prompt_tokens: 10,
            overlap_blocks: 0,
            hit: 0.0,
            candidates: vec![],
        }
    }

    #[test]
    fn rings_record_only_while_watched_and_stay_bounded() {
        let board = Board::new(2);
        let recent = board.recent();
        recent.record(0, || d(1));
        assert!(recent.last(10).is_empty(), "nobody watching: nothing recorded");
        let v = board.viewers.join().unwrap();
        for i in 0..(RING_DECISIONS as u64 + 10) {
            recent.record((i % 2) as usize, || d(i));
        }
        recent.record(7, || d(999));
        let last = recent.last(DECISIONS_SHOWN);
        assert_eq!(last.len(), DECISIONS_SHOWN);
        assert_eq!(last[0].at_ms, RING_DECISIONS as u64 + 9, "newest first; an unknown shard is ignored");
        assert_eq!(recent.last(1000).len(), RING_DECISIONS + 10, "two rings of at most RING_DECISIONS");
        drop(v);
        assert!(!board.viewers.watching());
        let all: Vec<_> = (0..MAX_VIEWERS).map(|_| board.viewers.join().unwrap()).collect();
        assert!(board.viewers.join().is_none(), "bounded");
        drop(all);
        assert_eq!(board.viewers.count(), 0);
    }
}
