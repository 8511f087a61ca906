//! How long one simulated engine step takes: pure functions of what the step computes.
//!
//! Invariant: every step lasts at least [`MIN_STEP_MS`] (before the speed-up), so a busy engine
//! never spins. The fits are the ones Dynamo's mocker uses (measured on a real engine):
//! prefill grows with the uncached tokens computed, decode with the share of the cache in use.
//! A step that both prefills and decodes takes the sum of both (chunked prefill is scheduled
//! alongside decodes, and a mixed batch is costlier than either alone; summing is the simple,
//! conservative choice). Concurrency: none (pure functions).

use std::time::Duration;

/// Shortest step before the speed-up: a real engine step never takes less than a kernel launch
/// round and a scheduler pass.
pub const MIN_STEP_MS: f64 = 1.0;

/// Milliseconds to prefill `tokens` uncached tokens in one step.
pub fn prefill_ms(tokens: u64) -> f64 {
    let t = tokens as f64;
    4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142
}

/// Milliseconds of one decode step with `usage` (0..=1, clamped) of the KV blocks in use.
pub fn decode_ms(usage: f64) -> f64 {
    let u = if usage.is_finite() { usage.clamp(0.0, 1.0) } else { 1.0 };
    -25.74 * u * u + 54.01 * u + 5.74
}

/// What one step computes, as far as its duration is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepWork {
    /// Uncached prompt (or recomputed) tokens prefilled in the step.
    pub prefill_tokens: u64,
    /// Sequences decoding one token each.
    pub decode_seqs: u64,
    /// Share of the KV blocks in use while the step runs.
    pub kv_usage: f64,
}

/// Milliseconds of a step before the speed-up (`0` for an empty step).
pub fn step_ms(work: &StepWork) -> f64 {
    if work.prefill_tokens == 0 && work.decode_seqs == 0 {
        return 0.0;
    }
    let mut ms = 0.0;
    if work.prefill_tokens > 0 {
        ms += prefill_ms(work.prefill_tokens);
    }
    if work.decode_seqs > 0 {
        ms += decode_ms(work.kv_usage);
    }
    ms.max(MIN_STEP_MS)
}

/// Wall-clock duration of a step, divided by `speedup_ratio` (validated finite and > 0).
pub fn step_duration(work: &StepWork, speedup_ratio: f64) -> Duration {
    debug_assert!(speedup_ratio.is_finite() && speedup_ratio > 0.0);
    Duration::from_secs_f64(step_ms(work) / speedup_ratio / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_match_their_formulas() {
        assert!((prefill_ms(0) - 16.50142).abs() < 1e-9);
        assert!((prefill_ms(1000) - (0.4209989 + 15.18344 + 16.50142)).abs() < 1e-9);
        assert!((decode_ms(0.0) - 5.74).abs() < 1e-9);
        assert!((decode_ms(1.0) - (54.01 - 25.74 + 5.74)).abs() < 1e-9);
        assert_eq!(decode_ms(7.0), decode_ms(1.0));
        assert_eq!(decode_ms(f64::NAN), decode_ms(1.0));
    }

    #[test]
    fn mixed_step_is_the_sum_and_speedup_divides() {
        let w = StepWork { prefill_tokens: 512, decode_seqs: 3, kv_usage: 0.5 };
        assert!((step_ms(&w) - (prefill_ms(512) + decode_ms(0.5))).abs() < 1e-9);
        let d1 = step_duration(&w, 1.0).as_secs_f64();
        let d10 = step_duration(&w, 10.0).as_secs_f64();
        assert!((d1 / d10 - 10.0).abs() < 1e-6);
        assert_eq!(step_ms(&StepWork::default()), 0.0);
    }

    #[test]
    fn prefill_cost_grows_with_uncached_tokens() {
        assert!(prefill_ms(4096) > prefill_ms(16));
        assert!(step_ms(&StepWork { prefill_tokens: 1, ..Default::default() }) >= MIN_STEP_MS);
    }
}
