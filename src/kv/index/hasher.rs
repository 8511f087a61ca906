//! A keyed, fast hasher for the index's 64-bit keys (sequence, engine and worker ids).
//!
//! Sequence hashes are already XXH3 outputs, so SipHash's cost buys nothing; but their seed is
//! public, so a client could grind prompts whose hashes collide in the table's low bits. Mixing
//! each key with a per-process random key through a folded 128-bit multiply (as foldhash does)
//! spreads them: one multiply per word, and one more in `finish` so that keys differing only in
//! high bits still differ in the low bits the table indexes by. Stateless after construction;
//! `Send + Sync`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Builds [`KeyedHasher`]s that share one random key, chosen when the builder is created.
#[derive(Clone, Debug)]
pub struct KeyedState {
    k0: u64,
    k1: u64,
    k2: u64,
}

impl Default for KeyedState {
    fn default() -> Self {
        let s = RandomState::new();
        let k0 = s.hash_one(0x243f_6a88_85a3_08d3_u64);
        let k1 = s.hash_one(k0) | 1;
        let k2 = s.hash_one(k1) | 1;
        Self { k0, k1, k2 }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    #[inline]
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher { acc: self.k0, k1: self.k1, k2: self.k2 }
    }
}

/// See the module doc.
pub struct KeyedHasher {
    acc: u64,
    k1: u64,
    k2: u64,
}

#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = (a as u128).wrapping_mul(b as u128);
    (full as u64) ^ ((full >> 64) as u64)
}

impl Hasher for KeyedHasher {
    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.acc = folded_multiply(self.acc ^ x, self.k1);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        folded_multiply(self.acc, self.k2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_bit_collisions_are_spread() {
        let s = KeyedState::default();
        let buckets: std::collections::HashSet<u64> = (0..1024u64).map(|i| s.hash_one(i << 20) & 0xfff).collect();
        assert!(buckets.len() > 700, "only {} distinct buckets", buckets.len());
    }
}
