//! Routing: which worker serves a request, and the load booked on it.
//!
//! - [`cost`]: the KV cost functions (`ttft`, `overlap`) and min / softmax selection (pure).
//! - [`ttft`]: each worker's time to first token, learned online from the first tokens it sends.
//! - [`load`]: per-worker load cells (one padded slot per shard) and the [`LoadGuard`].
//! - [`release`]: wakes the shards' admission queues when a guard releases load.
//! - [`quality`]: each decision's overlap regret (best candidate's overlap − chosen's), its
//!   metric and the optional decision log.
//!
//! Invariant: every successful [`Router::select`] returns a [`LoadGuard`] that has booked the
//! request on the chosen worker; the booking is released when the guard drops.
//!
//! Concurrency: one [`Router`] per model, shared (`Send + Sync`) by all shards; its policy is
//! chosen once from config. `select` reads the KV index lock-free and each candidate's load by
//! summing slots; it writes only the calling shard's slot of the chosen worker and, in
//! round-robin mode, one shared `Relaxed` counter.

pub mod cost;
pub mod load;
pub mod quality;
pub mod release;
pub mod ttft;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use rand::Rng;
use thiserror::Error;

use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;
use crate::kv::index::{KvIndex, OverlapScores};

pub use cost::WorkerScore;
use cost::{kv_cost, pick_min, prompt_blocks, sample_softmax, ttft_cost, uncached_tokens, CostInputs, TtftInputs};
pub use load::{Booking, LoadGuard, LoadView, WorkerLoad, MAX_SHARDS, REPORT_FRESH_FOR};
use ttft::TtftFeatures;

/// The routing policy, chosen once from config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterMode {
    /// Cache overlap weighed against load ([`cost`]).
    Kv,
    /// Candidates in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// What `kv` mode minimizes, chosen once from config (`--router-cost`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RouterCost {
    /// Predicted time to first token from each worker's learned prefill speed, plus the cost of
    /// duplicating a prefix into a full cache ([`cost::ttft_cost`]).
    #[default]
    Ttft,
    /// Overlap weighed against decode blocks, as before issue #16 ([`cost::kv_cost`]).
    Overlap,
}

/// How a model's router picks workers. Validated by the config layer ([`RouterConfig::validate`]
/// restates the ranges).
#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    pub mode: RouterMode,
    /// The cost `kv` mode minimizes.
    pub cost: RouterCost,
    /// Weight of the prefill term; 0 skips the KV index lookup (pure load). Finite, `>= 0`.
    pub overlap_weight: f64,
    /// 0 takes the cheapest worker; above 0 samples a softmax. Finite, `>= 0`.
    pub temperature: f64,
    /// KV block size in tokens, `>= 1`.
    pub block_size: u32,
}

impl RouterConfig {
    /// `Err` names what to change.
    pub fn validate(&self) -> Result<(), String> {
        let finite_non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !finite_non_negative(self.overlap_weight) {
            return Err(format!("overlap weight {} must be a finite number >= 0", self.overlap_weight));
        }
        if !finite_non_negative(self.temperature) {
            return Err(format!("temperature {} must be a finite number >= 0", self.temperature));
        }
        if self.block_size == 0 {
            return Err("block size must be at least 1".into());
        }
        Ok(())
    }
}

/// Why no worker was selected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The model has no live worker. Not the client's fault; retrying once a worker registers helps.
    #[error("no workers available")]
    NoWorkers,
}

/// One live worker as the router sees it; the frontend keeps one `Arc<WorkerLoad>` per worker.
#[derive(Clone)]
pub struct Candidate {
    pub id: WorkerId,
    pub load: Arc<WorkerLoad>,
}

/// The inputs of one selection.
#[derive(Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The prompt's sequence hashes (full blocks only).
    pub seq_hashes: &'a [SeqHash],
    pub prompt_tokens: u32,
    pub candidates: &'a [Candidate],
    /// The calling shard, `< MAX_SHARDS`: the load slot it books into.
    pub shard: usize,
    /// The KV index lookup of `seq_hashes`, when the caller already made it (the router then
    /// does not look up again); `None`: the router looks up itself if its policy needs it.
    pub overlaps: Option<&'a OverlapScores>,
}

/// The chosen worker and its booking.
#[derive(Debug)]
pub struct RouteDecision {
    pub worker: WorkerId,
    pub overlap_blocks: u32,
    /// Every candidate's score in `kv` mode (for the debug log); empty in other modes.
    pub scores: Vec<WorkerScore>,
    pub guard: LoadGuard,
}

/// See the module doc.
pub struct Router {
    config: RouterConfig,
    index: Arc<KvIndex>,
    /// Router replica sync: other frontends' recent decisions ([`crate::kv::replica`]),
    /// merged into the overlaps when it holds any.
    replica: Option<Arc<KvIndex>>,
    next: AtomicUsize,
}

impl Router {
    /// `config` must be valid (checked at start-up by the config layer).
    pub fn new(config: RouterConfig, index: Arc<KvIndex>) -> Self {
        if let Err(e) = config.validate() {
            panic!("router config not validated at start-up: {e}");
        }
        Self { config, index, replica: None, next: AtomicUsize::new(0) }
    }

    /// Counts the predictions of `replica` (router replica sync) in the overlaps.
    pub fn with_replica(mut self, replica: Option<Arc<KvIndex>>) -> Self {
        self.replica = replica;
        self
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Picks a worker among `req.candidates` and books the request on it.
    pub fn select(&self, req: RouteRequest<'_>, rng: &mut impl Rng) -> Result<RouteDecision, RouteError> {
        let n = req.candidates.len();
        if n == 0 {
            return Err(RouteError::NoWorkers);
        }
        let mut learn = None;
        let (chosen, overlap_blocks, scores) = match self.config.mode {
            RouterMode::Kv => {
                let (scores, features) = self.score(&req);
                let i = if self.config.temperature > 0.0 {
                    sample_softmax(&scores, self.config.temperature, rng)
                } else {
                    pick_min(&scores, rng)
                };
                learn = features.map(|f| f[i]);
                (i, scores[i].overlap_blocks, scores)
            }
            RouterMode::RoundRobin => (self.next.fetch_add(1, Relaxed) % n, 0, Vec::new()),
            RouterMode::Random => (rng.random_range(0..n), 0, Vec::new()),
        };
        let c = &req.candidates[chosen];
        let b = self.config.block_size;
        let booking = Booking {
            prefill_tokens: uncached_tokens(req.prompt_tokens, overlap_blocks, b),
            decode_blocks: prompt_blocks(req.prompt_tokens, b),
        };
        let mut guard = LoadGuard::book(c.load.clone(), c.id, req.shard, booking);
        if let Some(f) = learn {
            guard.expect_first_token(f);
        }
        Ok(RouteDecision { worker: c.id, overlap_blocks, scores, guard })
    }

    /// Every candidate's KV cost, in candidate order; with the `ttft` cost and the index in use,
    /// also what each choice would teach the chosen worker's learned TTFT (a weight of 0, as on
    /// a disaggregated decode leg, predicts no prefill, so it teaches nothing).
    fn score(&self, req: &RouteRequest<'_>) -> (Vec<WorkerScore>, Option<Vec<TtftFeatures>>) {
        let RouterConfig { overlap_weight: w, block_size: b, cost, .. } = self.config;
        let use_index = w > 0.0;
        let mut looked_up;
        let mut overlaps = match req.overlaps {
            Some(o) if use_index => o,
            _ => {
                looked_up = if use_index { self.index.find_matches(req.seq_hashes) } else { OverlapScores::default() };
                &looked_up
            }
        };
        // Another frontend's decision not yet confirmed by the worker's events (one more
        // lookup, only while such predictions exist).
        if let Some(replica) = self.replica.as_ref().filter(|r| use_index && r.num_entries() > 0) {
            let predicted = replica.find_matches(req.seq_hashes);
            if !predicted.scores.is_empty() {
                looked_up = overlaps.clone();
                crate::kv::replica::merge(&mut looked_up, &predicted, |w| self.index.cached_blocks(w));
                overlaps = &looked_up;
            }
        }
        let best_overlap_blocks = req.candidates.iter().map(|c| overlaps.overlap(c.id)).max().unwrap_or(0);
        let mut features = (cost == RouterCost::Ttft && use_index).then(|| Vec::with_capacity(req.candidates.len()));
        // Workers are ranked on the fleet's model unless their own is trusted and distinct.
        let fleet = if cost == RouterCost::Ttft {
            ttft::fleet_model(req.candidates.iter().map(|c| (c.load.ttft().coefficients(), c.load.ttft().samples())))
        } else {
            None
        };
        let scores = req
            .candidates
            .iter()
            .map(|c| {
                let overlap_blocks = overlaps.overlap(c.id);
                let cached_blocks = match overlaps.cached(c.id) {
                    Some(n) => n,
                    None if use_index => self.index.cached_blocks(c.id),
                    None => 0,
                };
                // The worker's last report plus the bookings it does not cover yet.
                let load = c.load.view();
                let x = CostInputs {
                    active_prefill_tokens: load.prefill_tokens,
                    active_decode_blocks: load.decode_blocks,
                    prompt_tokens: req.prompt_tokens,
                    overlap_blocks,
                };
                let cost = match cost {
                    RouterCost::Overlap => kv_cost(w, b, x),
                    RouterCost::Ttft => {
                        let t = TtftInputs {
                            load: x,
                            running: load.requests,
                            model: ttft::rank_model(c.load.ttft().coefficients(), c.load.ttft().samples(), fleet),
                            best_overlap_blocks,
                            cached_blocks,
                            total_blocks: c.load.total_blocks(),
                        };
                        if let Some(f) = features.as_mut() {
                            f.push(t.features(b));
                        }
                        ttft_cost(w, b, t)
                    }
                };
                WorkerScore { worker: c.id, overlap_blocks, cost, cached_blocks }
            })
            .collect();
        (scores, features)
    }
}

#[cfg(test)]
mod tests;
