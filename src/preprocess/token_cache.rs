//! The token cache: the ids of long text segments already tokenized, so that a conversation's
//! next turn pays only for its new text (issue #13).
//!
//! Why it is exact: the fast path ([`super::bpe`]) splits added and special tokens out of the
//! text first, as HF does, and then normalizes, pre-tokenizes and merges each text segment
//! between two of them on its own. A chat template puts special tokens (`<|im_start|>`,
//! `<|im_end|>`, `<think>`, `<tool_response>`, ...) at every message boundary, so a message sent
//! again is the same segment, with the same ids. The cache maps a segment to its ids. The key
//! is the model's identity, the segment's length and a 128-bit XXH3 of its bytes, seeded at
//! random per process (a client cannot compute collisions offline for a seed it does not know).
//! Only segments of at least [`MIN_SEGMENT_BYTES`] are looked up or stored, so short ones (the
//! `\n` between messages, role names, short questions) cost a hash and churn nothing. Only the
//! fast path caches: HF `tokenizers`, the fallback, serves models whose added tokens or
//! pre-tokenizer (lstrip/rstrip, normalized added tokens, Metaspace's "first" prepend) make a
//! segment's ids depend on what precedes it.
//!
//! Bounds: the bytes held (ids at 4 bytes each plus [`ENTRY_OVERHEAD_BYTES`] per entry) never
//! exceed the budget (`--token-cache-mb`, 64 MiB by default: ~16M tokens, the histories of some
//! 400 conversations of 40k tokens). The budget is split evenly over [`STRIPES`] stripes; a
//! segment larger than one stripe's share is not stored. Eviction is a second-chance clock per
//! stripe: entries queue in insertion order, a hit marks its entry, and an insert that needs
//! room takes entries from the front, sending marked ones to the back unmarked (at most
//! [`MAX_SECOND_CHANCES`] per insert) and evicting the rest. An insert's work is bounded by the
//! entries it evicts, at most its own size over the smallest entry's (plus the second chances),
//! so it is proportional to the segment it stores, which the caller has just tokenized.
//!
//! Concurrency: one cache per process, shared (`Arc`) by every thread that encodes prompts (the
//! shards, or the preprocessing pool of `--preprocess-threads`) and by every model (the model's
//! identity is in the key). Each stripe is a mutex held for one hash-map lookup and an
//! `Arc` clone (the ids are copied out after it is released), or for one insert and its
//! evictions; counters live in the stripes, under the same locks, and a scrape sums them. A
//! shared cache rather than one per thread: a client's next turn comes on whatever connection,
//! so on whatever shard (and is encoded on whatever pool thread); per-thread caches would hit
//! only when it lands on the thread of the turn before (1 in N, for N threads), and would hold
//! N copies of the hot histories. The lock
//! costs tens of nanoseconds against the microseconds of tokenizing even one segment, and 16
//! stripes keep shards apart (perf/RESULTS.md, issue #13, measures a warm turn).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_128_with_seed;

/// Segments shorter than this are neither looked up nor stored: a short segment is quick to
/// tokenize, and a chat's many short ones (role names, `\n`, short questions) would churn it.
pub const MIN_SEGMENT_BYTES: usize = 256;

/// Bytes an entry costs besides its ids: key, `Arc` header, map slot and queue slot.
pub const ENTRY_OVERHEAD_BYTES: usize = 96;

/// Stripes, each with its own lock and an even share of the budget: enough that the shards
/// (at most 64, one per core) rarely wait on one another, few enough that a stripe's share
/// of the default budget (4 MiB, 1M tokens) holds the longest prompts.
pub const STRIPES: usize = 16;

/// Marked entries an insert sends back to the queue before it evicts regardless: keeps the
/// insert's work bounded when every entry at the front is hot.
pub const MAX_SECOND_CHANCES: usize = 32;

/// The default budget, `--token-cache-mb 64`.
pub const DEFAULT_BUDGET_MB: usize = 64;

/// One segment of one model.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SegmentKey {
    model: u64,
    len: u64,
    hash: u128,
}

impl Hash for SegmentKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The hash is already uniform; the map needs only 64 bits of it.
        state.write_u64(self.hash as u64 ^ self.model);
    }
}

/// Passes a key's own hash through (see [`SegmentKey`]'s `Hash`).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Entry {
    ids: Arc<[u32]>,
    /// Hit since it last went through the clock.
    referenced: bool,
}

/// One stripe: its entries, their clock queue, and its counters.
#[derive(Default)]
struct Stripe {
    map: HashMap<SegmentKey, Entry, BuildHasherDefault<PassThrough>>,
    /// Every key of `map`, once, oldest (or least recently spared) first.
    queue: VecDeque<SegmentKey>,
    bytes: usize,
    stats: TokenCacheStats,
}

/// What the cache did since start and what it holds now (summed over stripes at scrape).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCacheStats {
    /// Segments whose ids came from the cache.
    pub hits: u64,
    /// Segments looked up and not found (then tokenized and offered to the cache).
    pub misses: u64,
    /// Tokens that came from the cache.
    pub hit_tokens: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now (ids plus [`ENTRY_OVERHEAD_BYTES`] each).
    pub bytes: u64,
    /// The budget.
    pub capacity_bytes: u64,
}

/// The bytes an entry of `tokens` ids costs.
fn entry_bytes(tokens: usize) -> usize {
    tokens * 4 + ENTRY_OVERHEAD_BYTES
}

/// A bounded map from text segments to their token ids, shared by every shard (module doc).
pub struct TokenCache {
    stripes: Box<[Mutex<Stripe>]>,
    stripe_budget: usize,
    seed: u64,
}

impl TokenCache {
    /// A cache of at most `budget_bytes` (split over [`STRIPES`]).
    pub fn new(budget_bytes: usize) -> Self {
        Self::with_seed(budget_bytes, rand::random())
    }

    /// The same with a given hash seed (tests).
    pub fn with_seed(budget_bytes: usize, seed: u64) -> Self {
        TokenCache {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            stripe_budget: budget_bytes / STRIPES,
            seed,
        }
    }

    /// From `--token-cache-mb`: `None` for 0 (disabled).
    pub fn from_mb(mb: usize) -> Option<Arc<Self>> {
        (mb > 0).then(|| Arc::new(Self::new(mb.saturating_mul(1 << 20))))
    }

    /// The key of `text` for the model `model` (an id unique to one loaded tokenizer).
    pub fn key(&self, model: u64, text: &str) -> SegmentKey {
        SegmentKey { model, len: text.len() as u64, hash: xxh3_128_with_seed(text.as_bytes(), self.seed) }
    }

    fn stripe(&self, key: &SegmentKey) -> MutexGuard<'_, Stripe> {
        let i = (key.hash >> 64) as usize % STRIPES;
        // A panic under the lock leaves a stripe whose invariants hold between statements
        // (each insert or removal updates map, queue and bytes together), so carry on.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ids of `key`'s segment, if held (counted as a hit or a miss).
    pub fn get(&self, key: &SegmentKey) -> Option<Arc<[u32]>> {
        let mut stripe = self.stripe(key);
        let Stripe { map, stats, .. } = &mut *stripe;
        match map.get_mut(key) {
            Some(e) => {
                e.referenced = true;
                stats.hits += 1;
                stats.hit_tokens += e.ids.len() as u64;
                Some(Arc::clone(&e.ids))
            }
            None => {
                stats.misses += 1;
                None
            }
        }
    }

    /// Stores `ids` for `key`'s segment, evicting as needed (module doc); a segment larger than
    /// one stripe's share, or one already held, is left as it is.
    pub fn insert(&self, key: SegmentKey, ids: &[u32]) {
        let cost = entry_bytes(ids.len());
        if cost > self.stripe_budget {
            return;
        }
        let mut stripe = self.stripe(&key);
        if stripe.map.contains_key(&key) {
            return;
        }
        let mut spared = 0;
        while stripe.bytes + cost > self.stripe_budget {
            let Stripe { map, queue, bytes, stats } = &mut *stripe;
            // Not empty: were it, bytes would be 0 and cost within the budget.
            let old = queue.pop_front().expect("entries to evict while over budget");
            let e = map.get_mut(&old).expect("every queued key is in the map");
            if e.referenced && spared < MAX_SECOND_CHANCES {
                e.referenced = false;
                queue.push_back(old);
                spared += 1;
                continue;
            }
            let e = map.remove(&old).expect("every queued key is in the map");
            *bytes -= entry_bytes(e.ids.len());
            stats.evictions += 1;
        }
        stripe.map.insert(key, Entry { ids: ids.into(), referenced: false });
        stripe.queue.push_back(key);
        stripe.bytes += cost;
    }

    /// Counters and sizes, summed over the stripes.
    pub fn stats(&self) -> TokenCacheStats {
        let mut sum = TokenCacheStats { capacity_bytes: (self.stripe_budget * STRIPES) as u64, ..Default::default() };
        for s in self.stripes.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            sum.hits += s.stats.hits;
            sum.misses += s.stats.misses;
            sum.hit_tokens += s.stats.hit_tokens;
            sum.evictions += s.stats.evictions;
            sum.entries += s.map.len() as u64;
            sum.bytes += s.bytes as u64;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(i: usize) -> String {
        format!("{i:04} {}", "x".repeat(MIN_SEGMENT_BYTES))
    }

    #[test]
    fn hits_misses_and_model_identity() {
        let c = TokenCache::with_seed(1 << 20, 7);
        let k = c.key(1, &text(0));
        assert!(c.get(&k).is_none());
        c.insert(k, &[1, 2, 3]);
        assert_eq!(&*c.get(&k).unwrap(), &[1, 2, 3]);
        assert!(c.get(&c.key(2, &text(0))).is_none(), "another model's entry");
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.hit_tokens, s.entries), (1, 2, 3, 1));
        assert_eq!(s.bytes, entry_bytes(3) as u64);
        assert_eq!(s.capacity_bytes, 1 << 20);
    }

    #[test]
    fn bounded_with_second_chances_and_oversized_entries_refused() {
        // Each stripe holds 4 entries of 100 ids.
        let per_stripe = 4 * entry_bytes(100);
        let c = TokenCache::with_seed(per_stripe * STRIPES, 1);
        let ids: Vec<u32> = (0..100).collect();
        let keys: Vec<SegmentKey> = (0..2000).map(|i| c.key(1, &text(i))).collect();
        let hot = keys[0];
        for k in &keys {
            c.insert(*k, &ids);
            assert!(c.get(&hot).is_some(), "a hot entry survives the churn");
            let s = c.stats();
            assert!(s.bytes <= s.capacity_bytes);
        }
        let s = c.stats();
        assert_eq!(s.entries * entry_bytes(100) as u64, s.bytes);
        assert_eq!(s.entries + s.evictions, 2000);
        assert!(s.entries <= 4 * STRIPES as u64);
        let big: Vec<u32> = vec![0; per_stripe];
        c.insert(c.key(1, "big"), &big);
        assert!(c.get(&c.key(1, "big")).is_none());
    }
}
