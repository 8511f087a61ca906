//! Engine events → kvgate [`KvEventKind`]s, for one (worker, rank) stream (ENGINES.md §6 rules
//! 5–7).
//!
//! kvgate does not trust or reproduce the engine's block hashes: it hashes each stored block's
//! token ids itself with [`BlockHasher`] (XXH3-64, seed 1337, chained into a [`SeqHash`] from the
//! parent's), exactly as the frontend hashes prompts, so the index keys on the same ids. The
//! engine hash stays the block's opaque name ([`EngineHash`]); [`RankState`] maps engine hash →
//! sequence hash only to find a store's parent and to know which removals name blocks it tracks.
//!
//! Rules, each counted by the caller through the returned [`Outcome`]:
//! - A store must have `len(token_ids) == len(block_hashes) × block_size` (+1 for bigram pages)
//!   and `block_size ==` the configured size, else it is dropped whole: never mis-hashed.
//! - A store whose parent is not in the map is dropped and reported as
//!   [`DropReason::MissingParent`] (a gap in what this state has seen); the parent is never
//!   guessed.
//! - Stores and removals on a medium other than GPU (or none), or in a KV cache group other than
//!   0, are skipped; so are LoRA stores (kvgate's hash has no adapter namespace, and hashing them
//!   like base-model blocks would claim prefixes the worker does not hold). Each of these is
//!   decided by the event's own fields: an engine chains GPU blocks onto GPU blocks, group-0
//!   blocks onto group 0 and adapter blocks onto the same adapter, so a skip never leaves a
//!   kvgate-tracked child without its parent.
//! - A removal resolves each engine hash through the map and deletes it; hashes not tracked are
//!   dropped from the event and counted ([`RankState::take_unknown_removals`]).
//! - A clear empties the map.
//!
//! Memory: one map entry per block the engine holds on GPU, so the map is bounded by the engine's
//! own cache (removals delete entries). A lost removal would leak an entry, so the map also has a
//! hard bound ([`RankState::new`]'s `max_blocks`); reaching it resets the state
//! ([`Outcome::Overflow`]: the caller publishes `Cleared`), which sheds any leaked entries.
//!
//! Concurrency: plain data owned by the one task that drives a stream (`&mut self`).

use std::collections::HashMap;

use crate::contract::events::{EngineHash, KvEventKind, StoredBlock};
use crate::kv::hash::{BlockHasher, SeqHash, MAX_BLOCK_SIZE};

use super::decode::{EngineEvent, Medium};

/// Default hard bound on tracked blocks per (worker, rank): 4 Mi blocks (64 Mi tokens at 16 per
/// block), above any one engine's GPU cache; about 100 MiB of map at the bound.
pub const DEFAULT_MAX_TRACKED_BLOCKS: usize = 1 << 22;

/// What one engine event became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Publish this.
    Emit(KvEventKind),
    /// Valid, but changes nothing kvgate tracks (an empty store, a removal of untracked blocks).
    Nothing,
    /// Valid, deliberately not indexed.
    Skipped(Skip),
    /// Invalid or unplaceable: not applied.
    Dropped(DropReason),
    /// The map reached its bound and was reset; the caller publishes `Cleared`. The event that
    /// hit the bound is not applied.
    Overflow,
}

/// Why a valid event is not indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not on GPU (a host, disk or external tier).
    Medium,
    /// A KV cache group other than 0 (vLLM hybrid models).
    Group,
    /// Stored under a LoRA adapter.
    Lora,
}

/// Why an event is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `block_size` is not the configured block size.
    BlockSize { got: u32, want: u32 },
    /// `token_ids` does not cover the blocks exactly.
    TokenCount { got: usize, want: usize },
    /// The parent engine hash is not tracked.
    MissingParent { parent: u64 },
}

/// The configured block size is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block size {0} is out of range 1..={MAX_BLOCK_SIZE}; set the engine and kvgate block size to the same value")]
pub struct BlockSizeError(pub u32);

/// One (worker, rank) stream's view of the engine's GPU cache.
#[derive(Debug)]
pub struct RankState {
    hasher: BlockHasher,
    block_size: u32,
    max_blocks: usize,
    /// Engine hash → kvgate sequence hash, for every tracked block.
    blocks: HashMap<u64, SeqHash>,
    unknown_removals: u64,
}

impl RankState {
    /// `block_size` must be kvgate's block size (1..=[`MAX_BLOCK_SIZE`]); `max_blocks` bounds the
    /// map (see [`DEFAULT_MAX_TRACKED_BLOCKS`]).
    pub fn new(block_size: u32, max_blocks: usize) -> Result<Self, BlockSizeError> {
        if block_size == 0 || block_size as usize > MAX_BLOCK_SIZE {
            return Err(BlockSizeError(block_size));
        }
        Ok(Self {
            hasher: BlockHasher::new(block_size as usize),
            block_size,
            max_blocks: max_blocks.max(1),
            blocks: HashMap::new(),
            unknown_removals: 0,
        })
    }

    /// Tracked blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The sequence hash kvgate gave the block the engine calls `engine_hash`.
    pub fn seq_hash(&self, engine_hash: u64) -> Option<SeqHash> {
        self.blocks.get(&engine_hash).copied()
    }

    /// Every tracked block as (engine hash, sequence hash), in no particular order.
    pub fn blocks(&self) -> impl Iterator<Item = (EngineHash, SeqHash)> + '_ {
        self.blocks.iter().map(|(&e, &s)| (EngineHash(e), s))
    }

    /// Removed engine hashes that were not tracked, since the last call.
    pub fn take_unknown_removals(&mut self) -> u64 {
        std::mem::take(&mut self.unknown_removals)
    }

    /// Forgets everything (the engine cleared, restarted, or history was lost).
    pub fn clear(&mut self) {
        self.blocks.clear();
    }

    pub fn convert(&mut self, event: EngineEvent) -> Outcome {
        match event {
            EngineEvent::Stored {
                block_hashes,
                parent,
                token_ids,
                bigram,
                block_size,
                lora_name,
                medium,
                group_idx,
            } => {
                if let Some(skip) = policy_skip(medium.as_ref(), group_idx).or(lora_name.map(|_| Skip::Lora)) {
                    return Outcome::Skipped(skip);
                }
                self.store(&block_hashes, parent, &token_ids, bigram, block_size)
            }
            EngineEvent::Removed { block_hashes, medium, group_idx } => {
                if let Some(skip) = policy_skip(medium.as_ref(), group_idx) {
                    return Outcome::Skipped(skip);
                }
                self.remove(block_hashes)
            }
            EngineEvent::Cleared => {
                self.clear();
                Outcome::Emit(KvEventKind::Cleared)
            }
        }
    }

    fn store(&mut self, hashes: &[u64], parent: Option<u64>, tokens: &[u32], bigram: bool, block_size: u32) -> Outcome {
        if block_size != self.block_size {
            return Outcome::Dropped(DropReason::BlockSize { got: block_size, want: self.block_size });
        }
        let want = hashes.len() * block_size as usize + bigram as usize;
        if tokens.len() != want || (bigram && hashes.is_empty()) {
            return Outcome::Dropped(DropReason::TokenCount { got: tokens.len(), want });
        }
        if hashes.is_empty() {
            return Outcome::Nothing;
        }
        let parent_seq = match parent {
            None => None,
            Some(p) => match self.blocks.get(&p) {
                Some(&s) => Some(s),
                None => return Outcome::Dropped(DropReason::MissingParent { parent: p }),
            },
        };
        if self.blocks.len().saturating_add(hashes.len()) > self.max_blocks {
            self.clear();
            return Outcome::Overflow;
        }
        let bs = block_size as usize;
        let mut blocks = Vec::with_capacity(hashes.len());
        let mut prev = parent_seq;
        // A bigram page's trailing token only says which token follows the last page; kvgate
        // hashes the pages' own tokens, the pairs' first elements.
        for (&engine, block) in hashes.iter().zip(tokens.chunks_exact(bs)) {
            let seq = BlockHasher::chain(prev, self.hasher.local_hash(block));
            self.blocks.insert(engine, seq);
            blocks.push(StoredBlock { seq_hash: seq, engine_hash: EngineHash(engine) });
            prev = Some(seq);
        }
        Outcome::Emit(KvEventKind::Stored { parent: parent_seq, blocks })
    }

    fn remove(&mut self, hashes: Vec<u64>) -> Outcome {
        let mut engine_hashes = Vec::with_capacity(hashes.len());
        for h in hashes {
            if self.blocks.remove(&h).is_some() {
                engine_hashes.push(EngineHash(h));
            } else {
                self.unknown_removals += 1;
            }
        }
        if engine_hashes.is_empty() {
            Outcome::Nothing
        } else {
            Outcome::Emit(KvEventKind::Removed { engine_hashes })
        }
    }
}

fn policy_skip(medium: Option<&Medium>, group_idx: u32) -> Option<Skip> {
    if matches!(medium, Some(Medium::Other(_))) {
        Some(Skip::Medium)
    } else if group_idx != 0 {
        Some(Skip::Group)
    } else {
        None
    }
}
