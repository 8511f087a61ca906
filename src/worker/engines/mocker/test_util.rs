//! Test helpers shared by the mocker's unit tests.

use std::collections::{HashMap, HashSet};

use crate::contract::events::{EngineHash, KvEventKind};
use crate::kv::hash::SeqHash;

/// What a router learns from the events alone.
#[derive(Default, Clone)]
pub struct NaiveIndex {
    pub cached: HashSet<SeqHash>,
    pub by_engine: HashMap<EngineHash, SeqHash>,
    /// Each block's parent as first announced; never forgotten (a sequence hash fixes its
    /// parent), so every later `Stored` of the block, from a dump too, is checked against it.
    pub parents: HashMap<SeqHash, Option<SeqHash>>,
}

impl NaiveIndex {
    pub fn apply(&mut self, e: &KvEventKind) {
        match e {
            KvEventKind::Stored { parent, blocks } => {
                if let Some(p) = parent {
                    assert!(self.cached.contains(p), "Stored under an unknown parent");
                }
                let mut parent = *parent;
                for b in blocks {
                    assert!(self.cached.insert(b.seq_hash), "Stored twice while cached");
                    self.by_engine.insert(b.engine_hash, b.seq_hash);
                    let known = *self.parents.entry(b.seq_hash).or_insert(parent);
                    assert_eq!(known, parent, "{:?} announced with another parent", b.seq_hash);
                    parent = Some(b.seq_hash);
                }
            }
            KvEventKind::Removed { engine_hashes } => {
                for e in engine_hashes {
                    let s = self.by_engine.remove(e).expect("Removed an unknown engine hash");
                    assert!(self.cached.remove(&s));
                }
            }
            KvEventKind::Cleared => {
                self.cached.clear();
                self.by_engine.clear();
            }
        }
    }
}

use crate::contract::{GenerateRequest, SamplingParams, TokenId};

use super::config::MockerConfig;

/// A config with the given shape and a large speed-up.
pub fn config(page_size: u32, num_gpu_blocks: u64, max_num_batched_tokens: u32, max_num_seqs: u32) -> MockerConfig {
    MockerConfig {
        page_size,
        num_gpu_blocks,
        max_num_batched_tokens,
        max_num_seqs,
        speedup_ratio: 1000.0,
        kv_bytes_per_token: None,
    }
}

/// A request for `max_tokens` tokens (`ignore_eos` so the length is exact), seeded.
pub fn request(id: u64, prompt: Vec<TokenId>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id,
        token_ids: prompt,
        sampling: SamplingParams { max_tokens, seed: Some(id), ignore_eos: true, ..Default::default() },
        eos_token_ids: vec![2],
        disagg: None,
        trace: None,
    }
}
