//! The KV routing costs and the selection among scored workers: pure functions, no shared state.
//!
//! Two costs (lower wins), block size `B`, weight `w`, chosen once by `--router-cost`:
//!
//! - [`ttft_cost`] (the default): the part of the worker's predicted time to first token that
//!   routing changes, in ms, `w × s × (queued_prefill_tokens + uncached_tokens) + c ×
//!   running_requests`, with the worker's learned coefficients ([`super::ttft`]); the learned
//!   fixed latency `a` is left out (alike on alike workers, and its noise alone would herd
//!   requests onto whichever worker looked faster); plus two cache terms in the same unit:
//!   *duplication*, `s × dup_tokens × fill`, where `dup_tokens` is the prefix another worker
//!   holds and this one would compute again and `fill` the share of this worker's cache already
//!   in use (a copy in a near-full cache evicts something that will be recomputed later; in an
//!   empty one it costs nothing); and *pressure*, `s × B × excess_blocks`, the blocks by which
//!   the request's new blocks overflow the worker's free cache (the engine preempts or waits,
//!   and recomputes). `w` scales the prefill term only (1: the prediction as learned; 0: no
//!   index lookup, load alone).
//! - [`kv_cost`] (`--router-cost overlap`, the cost before issue #16):
//!   `w × (active_prefill_tokens + prompt_tokens − overlap_blocks × B) / B +
//!   active_decode_blocks + new_blocks`, where `new_blocks = ceil(prompt_tokens / B) −
//!   overlap_blocks` (both subtractions saturate at 0).
//!
//! Selection at temperature 0 takes the minimum (ties: fewer cached blocks, then uniformly at
//! random); at `T > 0` it samples `softmax(−(cost / max cost) / T)` (either cost).

use rand::Rng;

use super::ttft::{TtftCoefficients, TtftFeatures};
use crate::contract::WorkerId;

/// One candidate's score, as logged at debug level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerScore {
    pub worker: WorkerId,
    pub overlap_blocks: u32,
    pub cost: f64,
    pub cached_blocks: u64,
}

/// Everything the cost of one worker depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CostInputs {
    pub active_prefill_tokens: u64,
    pub active_decode_blocks: u64,
    pub prompt_tokens: u32,
    pub overlap_blocks: u32,
}

/// Blocks a prompt occupies, counting a partial tail block.
#[inline]
pub fn prompt_blocks(prompt_tokens: u32, block_size: u32) -> u64 {
    debug_assert!(block_size > 0);
    (prompt_tokens as u64).div_ceil(block_size as u64)
}

/// Prompt tokens the worker must still prefill: the part not covered by its cached prefix.
#[inline]
pub fn uncached_tokens(prompt_tokens: u32, overlap_blocks: u32, block_size: u32) -> u64 {
    (prompt_tokens as u64).saturating_sub(overlap_blocks as u64 * block_size as u64)
}

/// The cost of sending the request to one worker (see the module doc).
#[inline]
pub fn kv_cost(weight: f64, block_size: u32, x: CostInputs) -> f64 {
    let prefill = x.active_prefill_tokens + uncached_tokens(x.prompt_tokens, x.overlap_blocks, block_size);
    let new_blocks = prompt_blocks(x.prompt_tokens, block_size).saturating_sub(x.overlap_blocks as u64);
    weight * prefill as f64 / block_size as f64 + x.active_decode_blocks as f64 + new_blocks as f64
}

/// Everything the `ttft` cost of one worker depends on beyond [`CostInputs`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftInputs {
    pub load: CostInputs,
    /// Requests in flight on the worker.
    pub running: u64,
    /// The worker's learned model.
    pub model: TtftCoefficients,
    /// The longest overlap any candidate has with the prompt.
    pub best_overlap_blocks: u32,
    /// Blocks the worker holds (KV index).
    pub cached_blocks: u64,
    /// The worker's KV capacity in blocks; 0 when unknown (no cache terms).
    pub total_blocks: u64,
}

impl TtftInputs {
    /// The learning features of this choice (what the first token will be compared against).
    pub fn features(&self, block_size: u32) -> TtftFeatures {
        let x = &self.load;
        let work_tokens = x.active_prefill_tokens + uncached_tokens(x.prompt_tokens, x.overlap_blocks, block_size);
        TtftFeatures { work_tokens, running: self.running }
    }
}

/// The `ttft` cost (see the module doc), in predicted milliseconds.
#[inline]
pub fn ttft_cost(weight: f64, block_size: u32, x: TtftInputs) -> f64 {
    let m = &x.model;
    let f = x.features(block_size);
    let mut ms = weight * m.ms_per_token * f.work_tokens as f64 + m.ms_per_running * f.running as f64;
    if x.total_blocks > 0 {
        let b = block_size as u64;
        let new_blocks = prompt_blocks(x.load.prompt_tokens, block_size).saturating_sub(x.load.overlap_blocks as u64);
        let dup_tokens = x.best_overlap_blocks.saturating_sub(x.load.overlap_blocks) as u64 * b;
        let fill = (x.cached_blocks as f64 / x.total_blocks as f64).min(1.0);
        let free_blocks = x.total_blocks.saturating_sub(x.load.active_decode_blocks);
        let excess_blocks = new_blocks.saturating_sub(free_blocks);
        ms += m.ms_per_token * (dup_tokens as f64 * fill + (excess_blocks * b) as f64);
    }
    ms
}

/// Index of the cheapest score; ties go to fewer cached blocks, then uniformly at random.
/// `scores` must not be empty.
pub fn pick_min(scores: &[WorkerScore], rng: &mut impl Rng) -> usize {
    debug_assert!(!scores.is_empty());
    let mut best = 0;
    let mut ties = 1u32;
    for (i, s) in scores.iter().enumerate().skip(1) {
        let b = &scores[best];
        let key = (s.cost, s.cached_blocks);
        match key.partial_cmp(&(b.cost, b.cached_blocks)) {
            Some(std::cmp::Ordering::Less) => {
                best = i;
                ties = 1;
            }
            Some(std::cmp::Ordering::Equal) => {
                // Reservoir sampling: each of the `ties` equal scores ends up chosen with 1/ties.
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = i;
                }
            }
            _ => {}
        }
    }
    best
}

/// Samples an index with probability ∝ `exp(−(cost / max cost) / temperature)`.
/// `scores` must not be empty; `temperature` must be finite and `> 0`.
pub fn sample_softmax(scores: &[WorkerScore], temperature: f64, rng: &mut impl Rng) -> usize {
    debug_assert!(!scores.is_empty() && temperature > 0.0);
    let max = scores.iter().map(|s| s.cost).fold(0.0f64, f64::max);
    let scale = if max > 0.0 { 1.0 / max } else { 0.0 };
    let min = scores.iter().map(|s| s.cost * scale).fold(f64::INFINITY, f64::min);
    // Shifting by the minimum keeps the largest weight at exp(0) = 1: no underflow to all-zero.
    let weight = |s: &WorkerScore| (-(s.cost * scale - min) / temperature).exp();
    let total: f64 = scores.iter().map(weight).sum();
    let mut u = rng.random::<f64>() * total;
    for (i, s) in scores.iter().enumerate() {
        u -= weight(s);
        if u < 0.0 {
            return i;
        }
    }
    scores.len() - 1
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    use super::*;

    fn score(worker: u64, cost: f64, cached_blocks: u64) -> WorkerScore {
        WorkerScore { worker: WorkerId(worker), overlap_blocks: 0, cost, cached_blocks }
    }

    #[test]
    fn cost_matches_hand_examples() {
        // 100-token prompt, B = 16: 7 blocks. Worker holds 4 (64 tokens); 32 prefill tokens and
        // 10 decode blocks are already booked. 1.0 × (32 + 100 − 64) / 16 + 10 + (7 − 4) = 17.25
        let x =
            CostInputs { active_prefill_tokens: 32, active_decode_blocks: 10, prompt_tokens: 100, overlap_blocks: 4 };
        assert_eq!(kv_cost(1.0, 16, x), 17.25);
        assert_eq!(kv_cost(2.0, 16, x), 21.5);
        // Weight 0: load and new blocks only.
        assert_eq!(kv_cost(0.0, 16, x), 13.0);
        // Idle worker, nothing cached: 64 / 16 + 0 + 4.
        let idle = CostInputs { prompt_tokens: 64, ..CostInputs::default() };
        assert_eq!(kv_cost(1.0, 16, idle), 8.0);
        // An inconsistent overlap larger than the prompt saturates instead of going negative.
        let over = CostInputs { prompt_tokens: 16, overlap_blocks: 5, ..CostInputs::default() };
        assert_eq!(kv_cost(1.0, 16, over), 0.0);
        assert_eq!(prompt_blocks(0, 16), 0);
        assert_eq!(prompt_blocks(17, 16), 2);
    }

    #[test]
    fn min_breaks_ties_by_cached_blocks_then_randomly() {
        let mut rng = SmallRng::seed_from_u64(7);
        let scores = [score(1, 5.0, 9), score(2, 4.0, 9), score(3, 4.0, 2), score(4, 6.0, 0)];
        assert_eq!(pick_min(&scores, &mut rng), 2);
        let tied = [score(1, 4.0, 2), score(2, 4.0, 2), score(3, 4.0, 2), score(4, 5.0, 0)];
        let mut seen = [0u32; 4];
        for _ in 0..3000 {
            seen[pick_min(&tied, &mut rng)] += 1;
        }
        assert_eq!(seen[3], 0);
        assert!(seen[..3].iter().all(|&n| (850..1150).contains(&n)), "{seen:?}");
    }

    #[test]
    fn softmax_prefers_cheap_and_flattens_with_temperature() {
        let mut rng = SmallRng::seed_from_u64(11);
        let scores = [score(1, 10.0, 0), score(2, 20.0, 0)];
        let share = |t: f64, rng: &mut SmallRng| {
            (0..20_000).filter(|_| sample_softmax(&scores, t, rng) == 0).count() as f64 / 20_000.0
        };
        // Normalized costs 0.5 and 1.0: P(cheap) = 1 / (1 + e^(−0.5/T)).
        for t in [0.1f64, 0.5, 5.0] {
            let want = 1.0 / (1.0 + (-0.5 / t).exp());
            let got = share(t, &mut rng);
            assert!((got - want).abs() < 0.02, "T={t}: got {got}, want {want}");
        }
        // All costs zero: uniform, no NaN.
        let zero = [score(1, 0.0, 0), score(2, 0.0, 0)];
        let first = (0..10_000).filter(|_| sample_softmax(&zero, 1.0, &mut rng) == 0).count();
        assert!((4500..5500).contains(&first), "{first}");
    }
}
