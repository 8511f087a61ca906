//! Block hashing, compatible with NVIDIA Dynamo's KV router.
//!
//! `local[i]` = XXH3-64 (seed 1337) over block `i`'s token ids as little-endian u32; only full
//! blocks are hashed (a partial tail block is not). `seq[0] = local[0]` and
//! `seq[i] = XXH3-64(seed 1337, seq[i-1] as LE u64 ‖ local[i] as LE u64)`, so equal sequence
//! hashes mean equal prefixes.
//!
//! Concurrency: pure functions over borrowed slices; no shared state, no allocation per block.
//! On little-endian targets a block's tokens are hashed in place (their memory already is the
//! little-endian byte string); big-endian targets copy each block through a stack buffer.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::contract::TokenId;

/// The seed Dynamo's router uses for every block hash.
pub const HASH_SEED: u64 = 1337;

/// The largest block size accepted (big-endian targets hash a block from a stack buffer of this
/// many tokens).
pub const MAX_BLOCK_SIZE: usize = 1024;

/// Hash of one block's tokens alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LocalHash(pub u64);

pub use crate::contract::events::SeqHash;

/// Hashes prompts into blocks of a fixed size.
#[derive(Debug, Clone, Copy)]
pub struct BlockHasher {
    block_size: usize,
}

impl BlockHasher {
    /// `block_size` must be in `1..=MAX_BLOCK_SIZE` (validated by the config layer).
    pub fn new(block_size: usize) -> Self {
        assert!((1..=MAX_BLOCK_SIZE).contains(&block_size), "block size {block_size} out of range");
        Self { block_size }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Hash of one full block of tokens.
    #[inline]
    pub fn local_hash(&self, block: &[TokenId]) -> LocalHash {
        debug_assert_eq!(block.len(), self.block_size);
        #[cfg(target_endian = "little")]
        {
            // SAFETY: `TokenId` is `u32`: no padding, every byte initialised, and `u8` has
            // alignment 1, so the `block.len() * 4` bytes at `block.as_ptr()` are a valid
            // `[u8]` borrowed for as long as `block`. On a little-endian target they are
            // exactly the tokens' little-endian encoding that the hash is defined over.
            let bytes =
                unsafe { std::slice::from_raw_parts(block.as_ptr().cast::<u8>(), std::mem::size_of_val(block)) };
            LocalHash(xxh3_64_with_seed(bytes, HASH_SEED))
        }
        #[cfg(not(target_endian = "little"))]
        {
            local_hash_portable(block)
        }
    }

    /// Chains a block's local hash onto its parent's sequence hash.
    #[inline]
    pub fn chain(parent: Option<SeqHash>, local: LocalHash) -> SeqHash {
        match parent {
            None => SeqHash(local.0),
            Some(p) => {
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(&p.0.to_le_bytes());
                buf[8..].copy_from_slice(&local.0.to_le_bytes());
                SeqHash(xxh3_64_with_seed(&buf, HASH_SEED))
            }
        }
    }

    /// Local hashes of every full block of `tokens`.
    pub fn local_hashes(&self, tokens: &[TokenId]) -> Vec<LocalHash> {
        tokens.chunks_exact(self.block_size).map(|b| self.local_hash(b)).collect()
    }

    /// Sequence hashes of every full block of `tokens`, appended to `out` (cleared first).
    pub fn seq_hashes_into(&self, tokens: &[TokenId], out: &mut Vec<SeqHash>) {
        out.clear();
        out.reserve(tokens.len() / self.block_size);
        let mut parent = None;
        for block in tokens.chunks_exact(self.block_size) {
            let s = Self::chain(parent, self.local_hash(block));
            out.push(s);
            parent = Some(s);
        }
    }

    /// Sequence hashes of every full block of `tokens`.
    pub fn seq_hashes(&self, tokens: &[TokenId]) -> Vec<SeqHash> {
        let mut out = Vec::new();
        self.seq_hashes_into(tokens, &mut out);
        out
    }
}

/// `local_hash` by explicit little-endian conversion through a stack buffer: the big-endian
/// path, and the reference the in-place path is tested against.
#[cfg(any(test, not(target_endian = "little")))]
fn local_hash_portable(block: &[TokenId]) -> LocalHash {
    assert!(block.len() <= MAX_BLOCK_SIZE, "block of {} tokens", block.len());
    let mut buf = [0u8; MAX_BLOCK_SIZE * 4];
    let bytes = &mut buf[..block.len() * 4];
    for (chunk, t) in bytes.chunks_exact_mut(4).zip(block) {
        chunk.copy_from_slice(&t.to_le_bytes());
    }
    LocalHash(xxh3_64_with_seed(bytes, HASH_SEED))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place path agrees with the explicit little-endian encoding, at every block size
    /// class xxh3 distinguishes (≤16, ≤128, ≤240, >240 bytes).
    #[test]
    fn in_place_matches_portable() {
        let tokens: Vec<u32> =
            (0..MAX_BLOCK_SIZE as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ 0x00ff_00ff).collect();
        for bs in [1, 2, 3, 4, 16, 32, 59, 60, 61, 64, 256, 1000, MAX_BLOCK_SIZE] {
            let h = BlockHasher::new(bs);
            let block = &tokens[..bs];
            assert_eq!(h.local_hash(block), local_hash_portable(block), "block size {bs}");
        }
    }

    #[test]
    fn partial_tail_is_not_hashed() {
        let h = BlockHasher::new(16);
        assert_eq!(h.seq_hashes(&[1; 15]).len(), 0);
        assert_eq!(h.seq_hashes(&[1; 33]).len(), 2);
    }

    #[test]
    fn equal_prefixes_share_hashes() {
        let h = BlockHasher::new(4);
        let a = h.seq_hashes(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let b = h.seq_hashes(&[1, 2, 3, 4, 9, 9, 9, 9]);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
    }

    /// Every case of the shared Dynamo-produced vectors, local and sequence hashes.
    #[test]
    fn reproduces_dynamo_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/block-hash-vectors.json");
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("skipping: {path} not present");
            return;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let bs = case["block_size"].as_u64().unwrap() as usize;
            let tokens: Vec<u32> =
                case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            let want_local: Vec<u64> =
                case["local_hashes"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            let want_seq: Vec<u64> =
                case["sequence_hashes"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            let h = BlockHasher::new(bs);
            let local: Vec<u64> = h.local_hashes(&tokens).iter().map(|l| l.0).collect();
            let seq: Vec<u64> = h.seq_hashes(&tokens).iter().map(|s| s.0).collect();
            assert_eq!(local, want_local, "local hashes of case {}", case["name"]);
            assert_eq!(seq, want_seq, "sequence hashes of case {}", case["name"]);
        }
    }
}
