//! One request as the engine sees it: its tokens (prompt, then generated), their block hashes,
//! and how many of them have their KV computed.
//!
//! Invariant: `hashes` are the sequence hashes of every full block of `tokens` (the chain
//! continues over generated tokens, as vLLM's prefix caching does), `computed ≤ tokens.len()`,
//! and `tokens.len() ≤ prompt + max_tokens` (bounded by the request). Concurrency: owned by the
//! scheduler of one worker task.

use crate::contract::TokenId;
use crate::kv::hash::{BlockHasher, SeqHash};

use super::model::Generation;

#[derive(Debug)]
pub struct Sequence {
    tokens: Vec<TokenId>,
    hashes: Vec<SeqHash>,
    /// Tokens whose KV is in the cache for the current run (reset by preemption).
    pub computed: usize,
    pub generation: Generation,
    pub eos_ids: Vec<TokenId>,
    /// Prompt tokens served from the cache at the first admission (reported in `Started`).
    pub cached_tokens: Option<u32>,
    /// Prompt tokens whose KV arrived from a prefill worker (disaggregated decode), admitted as
    /// computed; the tokens before the range must be in this worker's cache. Cleared by
    /// preemption, or when that prefix was evicted (the recomputation is then local).
    pub imported: Option<std::ops::Range<usize>>,
    prompt_len: usize,
    generated: u32,
}

impl Sequence {
    pub fn new(hasher: &BlockHasher, prompt: Vec<TokenId>, generation: Generation, eos_ids: Vec<TokenId>) -> Self {
        let hashes = hasher.seq_hashes(&prompt);
        let prompt_len = prompt.len();
        Self {
            tokens: prompt,
            hashes,
            computed: 0,
            generation,
            eos_ids,
            cached_tokens: None,
            imported: None,
            prompt_len,
            generated: 0,
        }
    }

    /// Prompt tokens this worker computed itself at the first admission (0 for an imported
    /// prompt), once admitted.
    pub fn computed_prompt_tokens(&self) -> u32 {
        match self.cached_tokens {
            Some(c) => (self.prompt_len as u32).saturating_sub(c),
            None => 0,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn hashes(&self) -> &[SeqHash] {
        &self.hashes
    }

    /// Tokens still to compute before the next sample.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether the next step is a plain decode (one generated token to feed back), as opposed
    /// to prefilling a prompt or recomputing after preemption.
    pub fn is_decoding(&self) -> bool {
        self.generated > 0 && self.remaining() == 1
    }

    /// Appends a generated token, hashing the block it completes.
    pub fn push(&mut self, hasher: &BlockHasher, t: TokenId) {
        self.tokens.push(t);
        self.generated += 1;
        let page = hasher.block_size();
        if self.tokens.len() % page == 0 {
            let local = hasher.local_hash(&self.tokens[self.tokens.len() - page..]);
            self.hashes.push(BlockHasher::chain(self.hashes.last().copied(), local));
        }
        debug_assert_eq!(self.hashes.len(), self.tokens.len() / page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SamplingParams;
    use crate::worker::engines::mocker::model::MockModel;

    #[test]
    fn hash_chain_continues_over_generated_tokens() {
        let h = BlockHasher::new(4);
        let m = MockModel::new((0..10).collect());
        let g = m.start(&[1], &SamplingParams::default());
        let mut s = Sequence::new(&h, vec![1, 2, 3, 4, 5, 6], g, vec![]);
        assert_eq!(s.hashes().len(), 1);
        for t in [7, 8, 9] {
            s.push(&h, t);
        }
        assert_eq!(s.hashes(), &h.seq_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9])[..]);
        s.computed = 8;
        assert!(s.is_decoding());
    }
}
