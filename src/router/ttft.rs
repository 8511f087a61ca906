//! A worker's time to first token, learned online: `ttft_ms ≈ a + s × work_tokens + c × running`,
//! where `work_tokens` is the prefill queued on the worker plus the request's own uncached
//! tokens, and `running` its requests in flight, both as the router saw them when it chose the
//! worker. `a` is the fixed latency (network, scheduling, one engine step), `s` the worker's
//! prefill time per token, `c` what each running request adds (decode tokens sharing the
//! step). The [`ttft` cost](super::cost::ttft_cost) ranks workers by this prediction.
//!
//! [`TtftFit`] (plain data) is an exponentially weighted least-squares fit that starts from a
//! prior ([`TtftCoefficients::PRIOR`]) worth [`PRIOR_SAMPLES`] observations, which fade like
//! any observation, so it is defined before the first one and the data decide after a few
//! dozen; a small permanent ridge ([`RIDGE_SAMPLES`]) toward the prior keeps a run of
//! same-sized requests (which cannot tell `a` from `s`) from a singular solve. Invariants: the
//! published coefficients are finite and within [`TtftCoefficients::clamp`]'s ranges; memory
//! fades with weight [`DECAY`] per sample (about 64 samples), so the fit follows a worker whose
//! speed changes. Workers are ranked on the fleet's model ([`fleet_model`], [`rank_model`])
//! unless one has [`TRUSTED_SAMPLES`] observations and a prefill speed more than
//! [`OWN_MODEL_DEVIATION`] from the fleet's: idle workers are not held at the prior while busy
//! ones learn, and identical workers are not told apart by noise.
//!
//! Concurrency ([`LearnedTtft`], one per worker, inside its `WorkerLoad`): any shard observes
//! a first token by `try_lock` on the fit (a contended sample is dropped, never waited for: the
//! fit needs a sample, not every sample) and republishes the three coefficients as `f64` bits
//! in `Relaxed` atomics; the router's hot path reads those atomics, never the lock. A reader may
//! see coefficients from two consecutive fits; each alone is in range, so the mix is too.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Weight an observation keeps per later observation: memory of about `1 / (1 − DECAY)` = 64.
pub const DECAY: f64 = 1.0 - 1.0 / 64.0;
/// How many observations the prior is worth at the start (fading with [`DECAY`]).
pub const PRIOR_SAMPLES: f64 = 4.0;
/// How many observations the permanent pull toward the prior is worth (regularization only).
pub const RIDGE_SAMPLES: f64 = 0.05;
/// Scales of the features, for the ridge terms (a prior worth `n` samples of typical size):
/// a few thousand prompt tokens, a few running requests.
const WORK_SCALE_TOKENS: f64 = 2048.0;
const RUNNING_SCALE: f64 = 4.0;
/// Observations above this are dropped (a stalled stream says nothing about prefill speed).
pub const MAX_OBSERVED_TTFT: Duration = Duration::from_secs(120);

/// What the router saw of the chosen worker when it booked the request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TtftFeatures {
    /// Prefill queued on the worker plus this request's uncached tokens.
    pub work_tokens: u64,
    /// Requests in flight on the worker, this one excluded.
    pub running: u64,
}

/// The model's coefficients (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftCoefficients {
    /// Fixed latency, ms.
    pub base_ms: f64,
    /// Prefill time per token, ms.
    pub ms_per_token: f64,
    /// Time each running request adds, ms.
    pub ms_per_running: f64,
}

impl TtftCoefficients {
    /// Before any observation: a mid-sized GPU prefilling 20k tokens/s (0.05 ms/token), 20 ms
    /// of fixed latency, and a running request worth 256 prompt tokens (the lower bound
    /// below). Only ratios matter between identical workers; the fit corrects the scale.
    pub const PRIOR: Self = Self { base_ms: 20.0, ms_per_token: 0.05, ms_per_running: 12.8 };
    /// Lower bounds: prefill is never free (1 ms per million tokens), and every running request
    /// weighs at least as much as 256 prompt tokens (its decode shares every step and its
    /// blocks the cache, which a TTFT fit does not see: on the mocker, TTFT barely depends on
    /// the running requests), so requests spread by their number where prefill does not
    /// decide, and a 10 % error in a worker's learned speed on a 2,048-token prompt cannot
    /// outweigh one running request.
    pub const MIN_MS_PER_TOKEN: f64 = 1e-6;
    pub const MIN_RUNNING_IN_TOKENS: f64 = 256.0;
    /// Upper bounds, far above any real engine: a fit on garbage stays finite.
    const MAX_MS_PER_TOKEN: f64 = 100.0;
    const MAX_MS: f64 = 600_000.0;

    /// Predicted TTFT in ms for `f`.
    #[inline]
    pub fn predict_ms(&self, f: TtftFeatures) -> f64 {
        self.base_ms + self.ms_per_token * f.work_tokens as f64 + self.ms_per_running * f.running as f64
    }

    /// The coefficients brought into range (NaN goes to the prior's value).
    pub fn clamp(self) -> Self {
        let fix = |x: f64, lo: f64, hi: f64, prior: f64| if x.is_nan() { prior } else { x.clamp(lo, hi) };
        let p = Self::PRIOR;
        let ms_per_token = fix(self.ms_per_token, Self::MIN_MS_PER_TOKEN, Self::MAX_MS_PER_TOKEN, p.ms_per_token);
        let min_running = ms_per_token * Self::MIN_RUNNING_IN_TOKENS;
        Self {
            base_ms: fix(self.base_ms, 0.0, Self::MAX_MS, p.base_ms),
            ms_per_token,
            ms_per_running: fix(self.ms_per_running, min_running, Self::MAX_MS, p.ms_per_running).max(min_running),
        }
    }
}

/// Observations a worker needs before its own fit ranks it; until then it borrows the fleet's
/// ([`fleet_model`]). Without this an idle worker keeps the prior while the busy ones learn
/// their real speed: where the prior is slower than the truth (the mocker, any GPU faster than
/// the prior's), idle workers look slow, are never chosen and never learn (measured: 2 of 4
/// workers idle on a low-rate workload).
pub const TRUSTED_SAMPLES: u64 = 16;

/// The mean model of the workers with at least [`TRUSTED_SAMPLES`] observations, if any: what a
/// worker with fewer is assumed to be (identical hardware until its own data say otherwise).
pub fn fleet_model(models: impl IntoIterator<Item = (TtftCoefficients, u64)>) -> Option<TtftCoefficients> {
    let (mut sum, mut n) = ([0.0f64; 3], 0u32);
    for (c, samples) in models {
        if samples >= TRUSTED_SAMPLES {
            sum[0] += c.base_ms;
            sum[1] += c.ms_per_token;
            sum[2] += c.ms_per_running;
            n += 1;
        }
    }
    (n > 0).then(|| {
        let k = f64::from(n);
        TtftCoefficients { base_ms: sum[0] / k, ms_per_token: sum[1] / k, ms_per_running: sum[2] / k }.clamp()
    })
}

/// How far (as a fraction) a worker's learned prefill speed must be from the fleet's before the
/// router ranks it on its own model: identical workers' fits differ by noise, and ranking on
/// noise sends every new prefix to whichever worker happens to look fastest (measured: 3 of 4
/// workers served a low-rate shared-prefix workload, the busiest 2.2x the mean); a slower
/// device (2x and more) is still seen as such.
pub const OWN_MODEL_DEVIATION: f64 = 0.25;

/// The model a worker is ranked on: its own fit when it has [`TRUSTED_SAMPLES`] observations
/// and its prefill speed is more than [`OWN_MODEL_DEVIATION`] away from the fleet's, else the
/// fleet's (when there is one).
#[inline]
pub fn rank_model(own: TtftCoefficients, samples: u64, fleet: Option<TtftCoefficients>) -> TtftCoefficients {
    match fleet {
        Some(f) if samples < TRUSTED_SAMPLES => f,
        Some(f) if (own.ms_per_token / f.ms_per_token - 1.0).abs() <= OWN_MODEL_DEVIATION => f,
        _ => own,
    }
}

/// The weighted least-squares fit (see the module doc). `Copy`, no interior state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftFit {
    /// Σ wᵢ xᵢ xᵢᵀ over x = (1, work_tokens, running), symmetric.
    xx: [[f64; 3]; 3],
    /// Σ wᵢ xᵢ tᵢ.
    xt: [f64; 3],
    samples: u64,
}

impl Default for TtftFit {
    /// The prior as [`PRIOR_SAMPLES`] pseudo-observations.
    fn default() -> Self {
        let mut fit = Self { xx: [[0.0; 3]; 3], xt: [0.0; 3], samples: 0 };
        let (ridge, prior) = ridge(PRIOR_SAMPLES);
        for i in 0..3 {
            fit.xx[i][i] = ridge[i];
            fit.xt[i] = ridge[i] * prior[i];
        }
        fit
    }
}

/// Diagonal ridge terms worth `samples` observations of typical size, and the prior they
/// pull toward, per coefficient `(a, s, c)`.
fn ridge(samples: f64) -> ([f64; 3], [f64; 3]) {
    let p = TtftCoefficients::PRIOR;
    let ridge = [samples, samples * WORK_SCALE_TOKENS * WORK_SCALE_TOKENS, samples * RUNNING_SCALE * RUNNING_SCALE];
    (ridge, [p.base_ms, p.ms_per_token, p.ms_per_running])
}

impl TtftFit {
    /// Adds one observation: the request booked with `f` saw its first token after `ttft_ms`.
    pub fn observe(&mut self, f: TtftFeatures, ttft_ms: f64) {
        if !ttft_ms.is_finite() || ttft_ms < 0.0 {
            return;
        }
        let x = [1.0, f.work_tokens as f64, f.running as f64];
        for i in 0..3 {
            for j in 0..3 {
                self.xx[i][j] = self.xx[i][j] * DECAY + x[i] * x[j];
            }
            self.xt[i] = self.xt[i] * DECAY + x[i] * ttft_ms;
        }
        self.samples += 1;
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The ridge solution `(XᵀWX + Λ)⁻¹ (XᵀWt + Λ θ₀)` (the prior's fading pseudo-observations
    /// are in `XᵀWX`), clamped; the prior without observations.
    pub fn coefficients(&self) -> TtftCoefficients {
        let p = TtftCoefficients::PRIOR;
        let (ridge, prior) = ridge(RIDGE_SAMPLES);
        let mut m = self.xx;
        let mut v = self.xt;
        for i in 0..3 {
            m[i][i] += ridge[i];
            v[i] += ridge[i] * prior[i];
        }
        let mut theta = solve3(m, v);
        if theta.is_some_and(|t| t[0] < 0.0) {
            // A negative fixed latency: fit the slopes again with it at 0 (least squares under
            // the constraint), rather than clamping it afterwards and over-predicting.
            m[0] = [1.0, 0.0, 0.0];
            v[0] = 0.0;
            theta = solve3(m, v);
        }
        match theta {
            Some([a, s, c]) => TtftCoefficients { base_ms: a, ms_per_token: s, ms_per_running: c }.clamp(),
            None => p,
        }
    }
}

/// Solves `m θ = v` by Gaussian elimination with partial pivoting; `None` if singular.
fn solve3(mut m: [[f64; 3]; 3], mut v: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        // Also catches NaN (a comparison with NaN is false).
        if m[pivot][col].abs().partial_cmp(&1e-12) != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        m.swap(col, pivot);
        v.swap(col, pivot);
        for row in col + 1..3 {
            let k = m[row][col] / m[col][col];
            let pivot_row = m[col];
            for (x, p) in m[row].iter_mut().zip(pivot_row).skip(col) {
                *x -= k * p;
            }
            v[row] -= k * v[col];
        }
    }
    let mut x = [0.0; 3];
    for i in (0..3).rev() {
        let tail: f64 = (i + 1..3).map(|j| m[i][j] * x[j]).sum();
        x[i] = (v[i] - tail) / m[i][i];
    }
    x.iter().all(|x| x.is_finite()).then_some(x)
}

/// One worker's fit and its published coefficients (see the module doc's concurrency rule).
pub struct LearnedTtft {
    fit: Mutex<TtftFit>,
    base_ms: AtomicU64,
    ms_per_token: AtomicU64,
    ms_per_running: AtomicU64,
    samples: AtomicU64,
}

impl Default for LearnedTtft {
    fn default() -> Self {
        let p = TtftCoefficients::PRIOR;
        Self {
            fit: Mutex::new(TtftFit::default()),
            base_ms: AtomicU64::new(p.base_ms.to_bits()),
            ms_per_token: AtomicU64::new(p.ms_per_token.to_bits()),
            ms_per_running: AtomicU64::new(p.ms_per_running.to_bits()),
            samples: AtomicU64::new(0),
        }
    }
}

impl LearnedTtft {
    /// The coefficients the cost uses now (lock-free).
    #[inline]
    pub fn coefficients(&self) -> TtftCoefficients {
        TtftCoefficients {
            base_ms: f64::from_bits(self.base_ms.load(Relaxed)),
            ms_per_token: f64::from_bits(self.ms_per_token.load(Relaxed)),
            ms_per_running: f64::from_bits(self.ms_per_running.load(Relaxed)),
        }
    }

    /// First tokens observed so far (samples dropped under contention not counted).
    pub fn samples(&self) -> u64 {
        self.samples.load(Relaxed)
    }

    /// Records a first token `ttft` after booking with `f`; never blocks (see the module doc).
    pub fn observe(&self, f: TtftFeatures, ttft: Duration) {
        if ttft > MAX_OBSERVED_TTFT {
            return;
        }
        let Ok(mut fit) = self.fit.try_lock() else { return };
        fit.observe(f, ttft.as_secs_f64() * 1e3);
        let c = fit.coefficients();
        self.base_ms.store(c.base_ms.to_bits(), Relaxed);
        self.ms_per_token.store(c.ms_per_token.to_bits(), Relaxed);
        self.ms_per_running.store(c.ms_per_running.to_bits(), Relaxed);
        self.samples.store(fit.samples(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(work_tokens: u64, running: u64) -> TtftFeatures {
        TtftFeatures { work_tokens, running }
    }

    #[test]
    fn a_worker_without_enough_data_borrows_the_fleets_model() {
        let fast = TtftCoefficients { base_ms: 2.0, ms_per_token: 0.004, ms_per_running: 1.5 };
        let slow = TtftCoefficients { base_ms: 4.0, ms_per_token: 0.006, ms_per_running: 2.5 };
        let p = TtftCoefficients::PRIOR;
        // Only trusted workers count; none trusted: no fleet model (each keeps its own).
        assert_eq!(fleet_model([(fast, 3), (p, 0)]), None);
        let m = fleet_model([(fast, TRUSTED_SAMPLES), (slow, 100), (p, 0)]).unwrap();
        assert!((m.ms_per_token - 0.005).abs() < 1e-12 && (m.base_ms - 3.0).abs() < 1e-12, "{m:?}");
        assert_eq!(m, m.clamp());
        // Ranked on: the fleet's until trusted, and while within the deviation; its own beyond.
        assert_eq!(rank_model(slow, 3, Some(m)), m);
        assert_eq!(rank_model(slow, 100, Some(m)), m);
        let twice = TtftCoefficients { ms_per_token: 0.01, ..slow };
        assert_eq!(rank_model(twice, 100, Some(m)), twice);
        assert_eq!(rank_model(twice, 3, None), twice);
    }

    #[test]
    fn prior_before_any_observation() {
        assert_eq!(TtftFit::default().coefficients(), TtftCoefficients::PRIOR);
        let l = LearnedTtft::default();
        assert_eq!(l.coefficients(), TtftCoefficients::PRIOR);
        // 20 + 0.05 × 1000 + 12.8 × 3
        assert!((TtftCoefficients::PRIOR.predict_ms(f(1000, 3)) - 108.4).abs() < 1e-9);
    }

    #[test]
    fn learns_a_worker_ten_times_faster_than_the_prior() {
        // The truth: 5 ms + 0.005 ms/token + 2 ms per running request, varied inputs.
        let truth = |x: TtftFeatures| 5.0 + 0.005 * x.work_tokens as f64 + 2.0 * x.running as f64;
        let mut fit = TtftFit::default();
        for i in 0..400u64 {
            let x = f((i * 7919) % 9000, (i * 31) % 12);
            fit.observe(x, truth(x));
        }
        let c = fit.coefficients();
        assert!((c.ms_per_token - 0.005).abs() < 0.0005, "{c:?}");
        assert!((c.base_ms - 5.0).abs() < 1.0, "{c:?}");
        assert!((c.predict_ms(f(4000, 2)) - truth(f(4000, 2))).abs() < 1.0, "{c:?}");
    }

    #[test]
    fn follows_a_worker_that_slows_down() {
        let mut fit = TtftFit::default();
        for i in 0..300u64 {
            let x = f(500 + (i * 613) % 4000, i % 5);
            fit.observe(x, 10.0 + 0.01 * x.work_tokens as f64);
        }
        let fast = fit.coefficients().ms_per_token;
        for i in 0..300u64 {
            let x = f(500 + (i * 613) % 4000, i % 5);
            fit.observe(x, 10.0 + 0.04 * x.work_tokens as f64);
        }
        let slow = fit.coefficients().ms_per_token;
        assert!((fast - 0.01).abs() < 0.002 && (slow - 0.04).abs() < 0.004, "{fast} {slow}");
    }

    #[test]
    fn same_sized_requests_and_garbage_stay_in_range() {
        // One work size only: a and s cannot be told apart; the ridge keeps a finite answer
        // that still predicts the observed TTFT.
        let mut fit = TtftFit::default();
        for _ in 0..200 {
            fit.observe(f(1024, 0), 40.0);
        }
        let c = fit.coefficients();
        assert!((c.predict_ms(f(1024, 0)) - 40.0).abs() < 2.0, "{c:?}");
        // Negative slopes, NaN and infinities are clamped or ignored.
        let mut bad = TtftFit::default();
        for i in 0..100u64 {
            bad.observe(f(i * 100, 0), 1000.0 - i as f64 * 10.0);
        }
        bad.observe(f(1, 1), f64::NAN);
        bad.observe(f(1, 1), f64::INFINITY);
        let c = bad.coefficients();
        assert!(c.ms_per_token >= TtftCoefficients::MIN_MS_PER_TOKEN && c.base_ms.is_finite(), "{c:?}");
        assert!(c.ms_per_running >= c.ms_per_token * TtftCoefficients::MIN_RUNNING_IN_TOKENS);
        let nan = TtftCoefficients { base_ms: f64::NAN, ms_per_token: f64::NAN, ms_per_running: -1.0 }.clamp();
        assert_eq!((nan.base_ms, nan.ms_per_token), (20.0, 0.05));
        assert_eq!(solve3([[0.0; 3]; 3], [1.0; 3]), None);
    }

    #[test]
    fn learned_cell_publishes_and_drops_stalls() {
        let l = LearnedTtft::default();
        for i in 0..100u64 {
            l.observe(f(i * 50, 0), Duration::from_micros(2000 + i * 50 * 10));
        }
        assert_eq!(l.samples(), 100);
        let c = l.coefficients();
        assert!((c.ms_per_token - 0.01).abs() < 0.002, "{c:?}");
        l.observe(f(1, 0), MAX_OBSERVED_TTFT + Duration::from_secs(1));
        assert_eq!(l.samples(), 100);
    }
}
