//! The mocker's flags ([`MockerArgs`]) and their validated form ([`MockerConfig`]).
//!
//! Invariant: a [`MockerConfig`] only exists validated (built by [`MockerConfig::from_args`]), so
//! the engine may rely on every field being in the range documented on its bound below.
//! Concurrency: plain values, copied into each worker task at spawn.

use thiserror::Error;

use crate::kv::hash::MAX_BLOCK_SIZE;

/// Most KV blocks one mocker simulates: bookkeeping is ~100 B per cached block, so this caps a
/// worker's host memory near 400 MiB however large a GPU it pretends to be.
pub const MAX_GPU_BLOCKS: u64 = 1 << 22;
/// Most tokens one simulated cache holds (`num_gpu_blocks × page_size`): keeps token counts in
/// `u32` arithmetic everywhere and is far beyond any real GPU's KV capacity.
pub const MAX_CACHE_TOKENS: u64 = 1 << 31;
/// Largest per-step token budget: larger steps would only stretch the timing model's fit.
pub const MAX_BATCHED_TOKENS: u32 = 1 << 20;
// A step stores at most one block per batched token: one event holds them all.
const _: () = assert!(MAX_BATCHED_TOKENS as usize <= crate::contract::events::MAX_EVENT_BLOCKS);
const _: () = assert!(MAX_GPU_BLOCKS <= crate::contract::events::MAX_WORKER_BLOCKS);
/// Most concurrently running sequences: vLLM's practical ceiling is far below this.
pub const MAX_NUM_SEQS: u32 = 1 << 16;
/// Largest speed-up: beyond it a step is shorter than the runtime can measure.
pub const MAX_SPEEDUP_RATIO: f64 = 1e9;

/// Flags of the simulated engine (`--engine mocker`).
#[derive(clap::Args, Debug, Clone)]
pub struct MockerArgs {
    /// KV cache capacity of each simulated worker, in blocks of --page-size tokens.
    #[arg(long, default_value_t = 16384)]
    pub num_gpu_blocks: u64,
    /// Token budget of one engine step (prefill chunks plus one token per running decode).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: u32,
    /// Most sequences a simulated worker runs at once; later requests wait in its queue.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: u32,
    /// Divides every simulated step time (10 runs the mock engine ten times faster than real).
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
}

impl Default for MockerArgs {
    fn default() -> Self {
        Self { num_gpu_blocks: 16384, max_num_batched_tokens: 8192, max_num_seqs: 256, speedup_ratio: 1.0 }
    }
}

/// The validated mocker configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MockerConfig {
    /// Tokens per KV block, `1..=MAX_BLOCK_SIZE`.
    pub page_size: u32,
    /// Blocks in the cache, `1..=MAX_GPU_BLOCKS`, and `num_gpu_blocks × page_size ≤ MAX_CACHE_TOKENS`.
    pub num_gpu_blocks: u64,
    /// `1..=MAX_BATCHED_TOKENS`.
    pub max_num_batched_tokens: u32,
    /// `1..=MAX_NUM_SEQS`.
    pub max_num_seqs: u32,
    /// Finite, `> 0` and `≤ MAX_SPEEDUP_RATIO`.
    pub speedup_ratio: f64,
    /// KV bytes one token takes in the simulated model (the caller computes it from the model's
    /// `config.json`); `None` when unknown. Set through [`MockerConfig::with_kv_bytes_per_token`]:
    /// `> 0` and the whole cache's bytes fit in a `u64`. Only reported, never simulated.
    pub kv_bytes_per_token: Option<u64>,
}

/// A mocker flag the user must change; the message names the flag and the accepted range.
#[derive(Debug, Error, PartialEq)]
pub enum MockerConfigError {
    #[error("invalid {flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

fn invalid(flag: &'static str, message: String) -> MockerConfigError {
    MockerConfigError::Invalid { flag, message }
}

impl MockerConfig {
    /// Validates the flags against the deployment's page size.
    pub fn from_args(args: &MockerArgs, page_size: u32) -> Result<Self, MockerConfigError> {
        if page_size == 0 || page_size as usize > MAX_BLOCK_SIZE {
            return Err(invalid("--page-size", format!("{page_size} is not in 1..={MAX_BLOCK_SIZE}")));
        }
        let blocks = args.num_gpu_blocks;
        if blocks == 0 || blocks > MAX_GPU_BLOCKS {
            return Err(invalid("--num-gpu-blocks", format!("{blocks} is not in 1..={MAX_GPU_BLOCKS}")));
        }
        let tokens = blocks * page_size as u64;
        if tokens > MAX_CACHE_TOKENS {
            return Err(invalid(
                "--num-gpu-blocks",
                format!(
                    "{blocks} blocks of {page_size} tokens hold {tokens} tokens, more than the \
                     {MAX_CACHE_TOKENS} a mocker simulates; lower it or --page-size"
                ),
            ));
        }
        let budget = args.max_num_batched_tokens;
        if budget == 0 || budget > MAX_BATCHED_TOKENS {
            return Err(invalid("--max-num-batched-tokens", format!("{budget} is not in 1..={MAX_BATCHED_TOKENS}")));
        }
        let seqs = args.max_num_seqs;
        if seqs == 0 || seqs > MAX_NUM_SEQS {
            return Err(invalid("--max-num-seqs", format!("{seqs} is not in 1..={MAX_NUM_SEQS}")));
        }
        let s = args.speedup_ratio;
        if !s.is_finite() || s <= 0.0 || s > MAX_SPEEDUP_RATIO {
            return Err(invalid(
                "--speedup-ratio",
                format!("{s} must be a finite number > 0 and <= {MAX_SPEEDUP_RATIO:e}"),
            ));
        }
        Ok(Self {
            page_size,
            num_gpu_blocks: blocks,
            max_num_batched_tokens: budget,
            max_num_seqs: seqs,
            speedup_ratio: s,
            kv_bytes_per_token: None,
        })
    }

    /// Records the model's KV bytes per token (from its `config.json`), validated.
    pub fn with_kv_bytes_per_token(mut self, bytes: u64) -> Result<Self, MockerConfigError> {
        if bytes == 0 || self.capacity_tokens().checked_mul(bytes).is_none() {
            return Err(invalid(
                "--model-path",
                format!(
                    "its config.json gives {bytes} KV bytes per token; a {}-token cache needs a \
                     size in 1..={}",
                    self.capacity_tokens(),
                    u64::MAX / self.capacity_tokens()
                ),
            ));
        }
        self.kv_bytes_per_token = Some(bytes);
        Ok(self)
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> u64 {
        self.num_gpu_blocks * self.page_size as u64
    }

    /// KV bytes of one block, when the model's size is known.
    pub fn kv_bytes_per_block(&self) -> Option<u64> {
        self.kv_bytes_per_token?.checked_mul(self.page_size as u64)
    }

    /// KV bytes of the whole cache, when the model's size is known.
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.kv_bytes_per_token?.checked_mul(self.capacity_tokens())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag_of(r: Result<MockerConfig, MockerConfigError>) -> &'static str {
        match r {
            Err(MockerConfigError::Invalid { flag, .. }) => flag,
            Ok(c) => panic!("accepted {c:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = MockerConfig::from_args(&MockerArgs::default(), 16).unwrap();
        assert_eq!(c.capacity_tokens(), 16384 * 16);
    }

    #[test]
    fn each_bad_flag_is_named() {
        let ok = MockerArgs::default();
        assert_eq!(flag_of(MockerConfig::from_args(&ok, 0)), "--page-size");
        let a = MockerArgs { num_gpu_blocks: 0, ..ok.clone() };
        assert_eq!(flag_of(MockerConfig::from_args(&a, 16)), "--num-gpu-blocks");
        let a = MockerArgs { num_gpu_blocks: MAX_GPU_BLOCKS, ..ok.clone() };
        assert_eq!(flag_of(MockerConfig::from_args(&a, 1024)), "--num-gpu-blocks");
        let a = MockerArgs { max_num_batched_tokens: 0, ..ok.clone() };
        assert_eq!(flag_of(MockerConfig::from_args(&a, 16)), "--max-num-batched-tokens");
        let a = MockerArgs { max_num_seqs: 0, ..ok.clone() };
        assert_eq!(flag_of(MockerConfig::from_args(&a, 16)), "--max-num-seqs");
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let a = MockerArgs { speedup_ratio: s, ..ok.clone() };
            assert_eq!(flag_of(MockerConfig::from_args(&a, 16)), "--speedup-ratio");
        }
    }

    #[test]
    fn kv_bytes_are_validated_and_sized() {
        let c = MockerConfig::from_args(&MockerArgs::default(), 16).unwrap();
        assert_eq!((c.kv_bytes_per_block(), c.capacity_bytes()), (None, None));
        // Llama-3-8B in bf16: 2 (K, V) × 32 layers × 8 KV heads × 128 dims × 2 bytes.
        let c = c.with_kv_bytes_per_token(131_072).unwrap();
        assert_eq!(c.kv_bytes_per_block(), Some(16 * 131_072));
        assert_eq!(c.capacity_bytes(), Some(16384 * 16 * 131_072));
        assert_eq!(flag_of(c.clone().with_kv_bytes_per_token(0)), "--model-path");
        assert_eq!(flag_of(c.with_kv_bytes_per_token(u64::MAX)), "--model-path");
    }

    #[test]
    fn message_says_what_to_change() {
        let a = MockerArgs { num_gpu_blocks: 0, ..MockerArgs::default() };
        let e = MockerConfig::from_args(&a, 16).unwrap_err().to_string();
        assert!(e.contains("--num-gpu-blocks") && e.contains("1..="), "{e}");
    }
}
