//! The mock language model: deterministic text from a corpus of token ids.
//!
//! Invariant: the output is a pure function of (seed, prompt tokens, eos ids, max_tokens,
//! ignore_eos): a start offset in the corpus and an end-of-sequence length are drawn from one
//! hash, then consecutive corpus tokens are emitted (eos ids skipped, so none is ever emitted).
//! The corpus is English text encoded by the frontend's tokenizer, so output reads as text.
//! Concurrency: [`MockModel`] is immutable and shared by `Arc`; each [`Generation`] belongs to
//! one sequence.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::contract::{FinishReason, SamplingParams, TokenId};

/// Shortest output before the model "samples" end-of-sequence (unless `ignore_eos`).
pub const MIN_EOS_TOKENS: u32 = 8;
/// Longest output before the model samples end-of-sequence: keeps mock answers paragraph-sized.
pub const MAX_EOS_TOKENS: u32 = 512;
/// Used as the hash seed when a request has no seed.
const UNSEEDED: u64 = 0x6b76_6761_7465;
/// Corpus used when the frontend supplies none (ids of printable ASCII in byte-level vocabularies).
const FALLBACK_CORPUS: std::ops::Range<TokenId> = 32..127;

/// The token source every sequence of one worker draws from.
#[derive(Debug, Clone)]
pub struct MockModel {
    corpus: Arc<[TokenId]>,
}

/// One sequence's generation state.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Next corpus position to read.
    cursor: usize,
    /// Tokens to emit before finishing.
    limit: u32,
    /// Why generation stops at `limit`.
    reason: FinishReason,
    emitted: u32,
}

/// What the model produces at one sampling point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    Token(TokenId),
    /// End-of-sequence was sampled; nothing is emitted.
    Eos,
}

impl MockModel {
    /// `corpus` may be empty: a fixed ASCII-range corpus is used then.
    pub fn new(corpus: Arc<[TokenId]>) -> Self {
        let corpus = if corpus.is_empty() { FALLBACK_CORPUS.collect() } else { corpus };
        Self { corpus }
    }

    /// Plans a generation for a prompt (`max_tokens` ≥ 1).
    pub fn start(&self, prompt: &[TokenId], sampling: &SamplingParams) -> Generation {
        let mut bytes = Vec::with_capacity(prompt.len() * 4);
        prompt.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
        let h = xxh3_64_with_seed(&bytes, sampling.seed.unwrap_or(UNSEEDED));
        let cursor = (h % self.corpus.len() as u64) as usize;
        let eos_len = MIN_EOS_TOKENS + ((h >> 32) % u64::from(MAX_EOS_TOKENS - MIN_EOS_TOKENS + 1)) as u32;
        let (limit, reason) = if sampling.ignore_eos || eos_len >= sampling.max_tokens {
            (sampling.max_tokens, FinishReason::Length)
        } else {
            (eos_len, FinishReason::Eos)
        };
        Generation { cursor, limit, reason, emitted: 0 }
    }

    /// The next sample of `g`; `None` once `g` has finished.
    pub fn sample(&self, g: &mut Generation, eos_ids: &[TokenId]) -> Option<Sample> {
        if g.emitted >= g.limit {
            return (g.reason == FinishReason::Eos && g.emitted == g.limit).then(|| {
                g.emitted += 1;
                Sample::Eos
            });
        }
        // Skips eos ids; a corpus made only of eos ids falls back to its first token.
        let n = self.corpus.len();
        let mut token = self.corpus[g.cursor % n];
        for i in 0..n {
            let t = self.corpus[(g.cursor + i) % n];
            if !eos_ids.contains(&t) {
                token = t;
                g.cursor = (g.cursor + i) % n;
                break;
            }
        }
        g.cursor = (g.cursor + 1) % n;
        g.emitted += 1;
        Some(Sample::Token(token))
    }
}

impl Generation {
    /// Whether the sample just taken ended the sequence, and why.
    pub fn finished(&self, last: Sample) -> Option<FinishReason> {
        match last {
            Sample::Eos => Some(FinishReason::Eos),
            Sample::Token(_) if self.reason == FinishReason::Length && self.emitted >= self.limit => {
                Some(FinishReason::Length)
            }
            Sample::Token(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &MockModel, prompt: &[TokenId], s: &SamplingParams, eos: &[TokenId]) -> (Vec<TokenId>, FinishReason) {
        let mut g = m.start(prompt, s);
        let mut out = Vec::new();
        loop {
            let x = m.sample(&mut g, eos).expect("finished() ends the loop first");
            if let Sample::Token(t) = x {
                out.push(t);
            }
            if let Some(r) = g.finished(x) {
                return (out, r);
            }
        }
    }

    fn corpus() -> Arc<[TokenId]> {
        (0..1000).collect()
    }

    #[test]
    fn same_seed_and_prompt_same_tokens() {
        let m = MockModel::new(corpus());
        let s = SamplingParams { max_tokens: 600, seed: Some(3), ..Default::default() };
        let a = run(&m, &[1, 2, 3], &s, &[]);
        assert_eq!(a, run(&m, &[1, 2, 3], &s, &[]));
        assert_ne!(a.0, run(&m, &[1, 2, 4], &s, &[]).0);
        let other = SamplingParams { seed: Some(4), ..s.clone() };
        assert_ne!(a.0, run(&m, &[1, 2, 3], &other, &[]).0);
        // Consecutive corpus tokens.
        assert!(a.0.windows(2).all(|w| w[1] == (w[0] + 1) % 1000));
    }

    #[test]
    fn eos_length_is_bounded_and_max_tokens_wins() {
        let m = MockModel::new(corpus());
        for p in 0..200u32 {
            let s = SamplingParams { max_tokens: 1000, ..Default::default() };
            let (out, r) = run(&m, &[p], &s, &[]);
            assert_eq!(r, FinishReason::Eos);
            assert!((MIN_EOS_TOKENS..=MAX_EOS_TOKENS).contains(&(out.len() as u32)));
            let s = SamplingParams { max_tokens: 5, ..Default::default() };
            assert_eq!(run(&m, &[p], &s, &[]), (out[..5].to_vec(), FinishReason::Length));
        }
    }

    #[test]
    fn ignore_eos_generates_exactly_max_tokens_and_never_emits_eos() {
        let m = MockModel::new((0..10).collect());
        let s = SamplingParams { max_tokens: 700, ignore_eos: true, ..Default::default() };
        let (out, r) = run(&m, &[9], &s, &[3]);
        assert_eq!((out.len(), r), (700, FinishReason::Length));
        assert!(!out.contains(&3));
        let (out, _) = run(&MockModel::new(Arc::from(vec![])), &[1], &s, &[]);
        assert!(out.iter().all(|t| FALLBACK_CORPUS.contains(t)));
    }
}
