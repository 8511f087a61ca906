//! Byte-pair merging of one pre-token, as HF `tokenizers`' BPE model does it.
//!
//! Invariant: [`Bpe::encode_word`] returns HF's ids for a pre-token: starting from one symbol per
//! byte, it merges the adjacent pair of lowest rank, the leftmost among equals, until no pair has
//! a rank (HF pops a heap ordered by (rank, position); stale entries never validate, because a
//! changed neighbour makes a longer string, so both orders merge the same pairs). Whole
//! pre-tokens that HF would return as one id are looked up first: with `ignore_merges` any vocab
//! entry (HF checks the vocab before merging), otherwise only entries whose own merge yields
//! themselves (checked for every entry at load). The merge map is read by every lookup and
//! misses the cache (151k merges): the first pairs of a word come from a dense byte-pair table
//! and heap entries are checked by rank, without the map. Built once at load, immutable, read by
//! every thread; each call's scratch space is the caller's.

use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, Hasher};

/// Pre-tokens of this many bytes or more merge through a heap (O(n log n)); shorter ones by
/// scanning the pair ranks (O(n²) but branch-light). Measured on one core: the scan is as fast
/// for English words, the heap from 16 bytes on ~5% faster for CJK clauses (one pre-token each).
const HEAP_MIN_BYTES: usize = 16;

/// FxHash (rustc's hasher): one multiply per word; keys here are ids and short byte strings that
/// no client chooses to collide (the maps are built from the model, and only looked up at run
/// time).
#[derive(Clone, Copy, Default)]
pub(super) struct FxBuild;

pub(super) struct Fx(u64);

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl Fx {
    #[inline]
    fn add(&mut self, v: u64) {
        self.0 = self.0.wrapping_add(v).wrapping_mul(FX_K);
    }
}

impl Hasher for Fx {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

impl BuildHasher for FxBuild {
    type Hasher = Fx;
    fn build_hasher(&self) -> Fx {
        Fx(0)
    }
}

pub(super) type FxMap<K, V> = HashMap<K, V, FxBuild>;

/// No merge for this pair.
const NO_MERGE: u64 = u64::MAX;

#[inline]
fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// A BPE model over the 256 byte symbols.
pub(super) struct Bpe {
    /// The id of each single byte's symbol.
    byte_ids: [u32; 256],
    /// `(left << 32 | right)` → `(rank << 32 | merged id)`.
    merges: FxMap<u64, u64>,
    /// `(left, right, merged)` of each rank's merge (so a heap entry is checked without the
    /// map); `u32::MAX` for a rank a later duplicate replaced.
    rank_pairs: Box<[(u32, u32, u32)]>,
    /// The same for the pairs of single bytes, by `first << 8 | second` (512 KiB, dense: every
    /// word starts with these lookups, and the big map misses the cache).
    byte_pairs: Box<[u64]>,
    /// Whole pre-tokens that encode to one id (see the module doc).
    words: FxMap<Box<[u8]>, u32>,
}

/// Merged words one thread keeps: at most this many, then the cache starts over. A long prompt's
/// distinct multi-token words fit many times over (a 40k-token prompt has a few thousand), and a
/// chat's next turn re-sends the earlier ones. Bytes are bounded too ([`WORD_CACHE_ARENA_BYTES`]).
pub(super) const WORD_CACHE_ENTRIES: usize = 65_536;

/// Longer pre-tokens are merged every time, neither looked up in nor added to the word cache:
/// they are rare runs (of one char, or text without a split) that seldom repeat and would fill
/// the arenas. CJK clauses (one pre-token each, 3 bytes a char) are shorter and cached; the
/// arenas make an insert cheap enough that new CJK text encodes as fast with the cache as
/// without it (perf/RESULTS.md, issue #13).
pub(super) const WORD_CACHE_MAX_BYTES: usize = 256;

/// Reusable buffers for merging and the cache of merged words, owned by one thread and used for
/// one model at a time (the caller clears it when the model changes).
#[derive(Default)]
pub(super) struct Scratch {
    ids: Vec<u32>,
    ranks: Vec<u64>,
    heap: HeapScratch,
    /// Words that merge to more than one id (one-id words are in [`Bpe::words`]).
    cache: WordCache,
}

/// Start the word cache over past this many bytes of words (and 4 bytes an id): ~8 MiB per
/// thread at most, a few times what [`WORD_CACHE_ENTRIES`] average words take.
const WORD_CACHE_ARENA_BYTES: usize = 4 << 20;

/// Merged words, kept in two arenas (their bytes, their ids) with a map from a word's hash to
/// where they lie: an insert appends, without an allocation of its own, and starting over
/// truncates (no frees). A lookup compares the bytes, so a hash collision is a miss (the later
/// word takes the slot).
#[derive(Default)]
struct WordCache {
    slots: FxMap<u64, WordSlot>,
    bytes: Vec<u8>,
    ids: Vec<u32>,
}

#[derive(Clone, Copy)]
struct WordSlot {
    bytes_at: u32,
    bytes_len: u32,
    ids_at: u32,
    ids_len: u32,
}

impl WordCache {
    fn hash(word: &[u8]) -> u64 {
        let mut h = FxBuild.build_hasher();
        h.write(word);
        h.write_usize(word.len());
        h.finish()
    }

    #[inline]
    fn get(&self, word: &[u8]) -> Option<&[u32]> {
        let s = self.slots.get(&Self::hash(word))?;
        let bytes = &self.bytes[s.bytes_at as usize..][..s.bytes_len as usize];
        (bytes == word).then(|| &self.ids[s.ids_at as usize..][..s.ids_len as usize])
    }

    fn insert(&mut self, word: &[u8], ids: &[u32]) {
        if self.slots.len() >= WORD_CACHE_ENTRIES
            || self.bytes.len() + word.len() > WORD_CACHE_ARENA_BYTES
            || self.ids.len() + ids.len() > WORD_CACHE_ARENA_BYTES / 4
        {
            self.clear();
        }
        // Words over the arena's size are refused by the caller (WORD_CACHE_MAX_BYTES).
        let slot = WordSlot {
            bytes_at: self.bytes.len() as u32,
            bytes_len: word.len() as u32,
            ids_at: self.ids.len() as u32,
            ids_len: ids.len() as u32,
        };
        self.bytes.extend_from_slice(word);
        self.ids.extend_from_slice(ids);
        self.slots.insert(Self::hash(word), slot);
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.bytes.clear();
        self.ids.clear();
    }
}

impl Scratch {
    pub(super) fn clear_cache(&mut self) {
        self.cache.clear();
    }
}

impl Bpe {
    /// `vocab`: every token's bytes and id; `merges`: `(left, right, merged)` ids in rank order.
    /// The caller has checked that every byte has a symbol (`byte_ids`).
    pub(super) fn new(
        byte_ids: [u32; 256],
        vocab: &[(Vec<u8>, u32)],
        merges: &[(u32, u32, u32)],
        ignore_merges: bool,
    ) -> Self {
        let mut map = FxMap::with_capacity_and_hasher(merges.len(), FxBuild);
        let mut rank_pairs = vec![(u32::MAX, u32::MAX, u32::MAX); merges.len()].into_boxed_slice();
        for (rank, &(l, r, m)) in merges.iter().enumerate() {
            let rank32 = u32::try_from(rank).expect("fewer than 2^32 merges");
            // A repeated pair keeps its last rank, as HF's map does.
            if let Some(old) = map.insert(pair_key(l, r), (u64::from(rank32) << 32) | u64::from(m)) {
                rank_pairs[(old >> 32) as usize] = (u32::MAX, u32::MAX, u32::MAX);
            }
            rank_pairs[rank] = (l, r, m);
        }
        let mut byte_pairs = vec![NO_MERGE; 1 << 16].into_boxed_slice();
        for (i, slot) in byte_pairs.iter_mut().enumerate() {
            let key = pair_key(byte_ids[i >> 8], byte_ids[i & 0xff]);
            *slot = map.get(&key).copied().unwrap_or(NO_MERGE);
        }
        let mut bpe = Bpe { byte_ids, merges: map, rank_pairs, byte_pairs, words: FxMap::default() };
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        let mut words = FxMap::with_capacity_and_hasher(vocab.len(), FxBuild);
        for (bytes, id) in vocab {
            let keep = ignore_merges || {
                out.clear();
                bpe.merge(bytes, &mut scratch, &mut out);
                out == [*id]
            };
            if keep && bytes.len() > 1 {
                words.insert(bytes.clone().into_boxed_slice(), *id);
            }
        }
        bpe.words = words;
        bpe
    }

    #[inline]
    fn rank(&self, left: u32, right: u32) -> u64 {
        self.merges.get(&pair_key(left, right)).copied().unwrap_or(NO_MERGE)
    }

    /// The ranks of the pairs of adjacent bytes of `word`.
    #[inline]
    fn byte_pair_ranks<'a>(&'a self, word: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
        word.windows(2).map(|w| self.byte_pairs[usize::from(w[0]) << 8 | usize::from(w[1])])
    }

    /// Appends the ids of one pre-token (its raw bytes) to `out`. `scratch` must have been used
    /// with this model only since its cache was last cleared.
    #[inline]
    pub(super) fn encode_word(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        match word {
            [] => {}
            [b] => out.push(self.byte_ids[usize::from(*b)]),
            _ => {
                if let Some(&id) = self.words.get(word) {
                    return out.push(id);
                }
                if word.len() > WORD_CACHE_MAX_BYTES {
                    return self.merge(word, scratch, out);
                }
                if let Some(ids) = scratch.cache.get(word) {
                    return out.extend_from_slice(ids);
                }
                let start = out.len();
                self.merge(word, scratch, out);
                scratch.cache.insert(word, &out[start..]);
            }
        }
    }

    /// Merges `word` from its bytes, without the whole-word lookup.
    fn merge(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if word.len() >= HEAP_MIN_BYTES {
            return self.merge_heap(word, &mut scratch.heap, out);
        }
        let ids = &mut scratch.ids;
        let ranks = &mut scratch.ranks;
        ids.clear();
        ids.extend(word.iter().map(|&b| self.byte_ids[usize::from(b)]));
        ranks.clear();
        ranks.extend(self.byte_pair_ranks(word));
        loop {
            // The first pair of lowest rank (the merged id in the low bits is the same for
            // equal ranks: one rank, one pair).
            let mut best = NO_MERGE;
            let mut k = usize::MAX;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    k = i;
                }
            }
            if best == NO_MERGE {
                break;
            }
            ids[k] = best as u32;
            ids.remove(k + 1);
            ranks.remove(k);
            if k > 0 {
                ranks[k - 1] = self.rank(ids[k - 1], ids[k]);
            }
            if k + 1 < ids.len() {
                ranks[k] = self.rank(ids[k], ids[k + 1]);
            }
        }
        out.extend_from_slice(ids);
    }

    /// HF's algorithm for long words: symbols in a linked list, candidate merges in a heap of
    /// `rank << 32 | position` (a pair's rank names it, so an entry is checked against
    /// `rank_pairs` rather than the map).
    fn merge_heap(&self, word: &[u8], s: &mut HeapScratch, out: &mut Vec<u32>) {
        const END: u32 = u32::MAX;
        // Pre-tokens come from request bodies, bounded far below 4 GiB.
        let n = u32::try_from(word.len()).expect("a pre-token shorter than 4 GiB");
        s.ids.clear();
        s.ids.extend(word.iter().map(|&b| self.byte_ids[usize::from(b)]));
        s.prev.clear();
        s.prev.extend((0..n).map(|i| i.checked_sub(1).unwrap_or(END)));
        s.next.clear();
        s.next.extend((1..n).chain([END]));
        s.alive.clear();
        s.alive.resize(word.len(), true);
        s.heap.clear();
        let entry = |r: u64, pos: u32| std::cmp::Reverse((r & !0xffff_ffff) | u64::from(pos));
        for (i, r) in (0..n).zip(self.byte_pair_ranks(word)) {
            if r != NO_MERGE {
                s.heap.push(entry(r, i));
            }
        }
        while let Some(std::cmp::Reverse(e)) = s.heap.pop() {
            let (rank, i) = ((e >> 32) as usize, e as u32);
            let j = s.next[i as usize];
            let (left, right, merged) = self.rank_pairs[rank];
            // A stale entry: the symbol was absorbed, or its pair is no longer this one.
            if !s.alive[i as usize] || j == END || s.ids[i as usize] != left || s.ids[j as usize] != right {
                continue;
            }
            s.ids[i as usize] = merged;
            s.alive[j as usize] = false;
            let after = s.next[j as usize];
            s.next[i as usize] = after;
            if after != END {
                s.prev[after as usize] = i;
                let r = self.rank(merged, s.ids[after as usize]);
                if r != NO_MERGE {
                    s.heap.push(entry(r, i));
                }
            }
            let before = s.prev[i as usize];
            if before != END {
                let r = self.rank(s.ids[before as usize], merged);
                if r != NO_MERGE {
                    s.heap.push(entry(r, before));
                }
            }
        }
        let mut i = 0;
        while i != END {
            out.push(s.ids[i as usize]);
            i = s.next[i as usize];
        }
    }
}

/// Buffers of [`Bpe::merge_heap`].
#[derive(Default)]
struct HeapScratch {
    ids: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    alive: Vec<bool>,
    heap: BinaryHeap<std::cmp::Reverse<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy model over bytes a, b, c (ids 0, 1, 2) with merges ab, bc, abc (via ab+c), aa.
    fn toy() -> Bpe {
        let mut byte_ids = [u32::MAX; 256];
        byte_ids[usize::from(b'a')] = 0;
        byte_ids[usize::from(b'b')] = 1;
        byte_ids[usize::from(b'c')] = 2;
        let vocab: Vec<(Vec<u8>, u32)> = vec![
            (b"a".to_vec(), 0),
            (b"b".to_vec(), 1),
            (b"c".to_vec(), 2),
            (b"bc".to_vec(), 3),
            (b"ab".to_vec(), 4),
            (b"abc".to_vec(), 5),
            (b"aa".to_vec(), 6),
        ];
        Bpe::new(byte_ids, &vocab, &[(1, 2, 3), (0, 1, 4), (4, 2, 5), (0, 0, 6)], false)
    }

    fn both(bpe: &Bpe, word: &[u8]) -> Vec<u32> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut s = Scratch::default();
        bpe.merge(word, &mut s, &mut a);
        if word.len() > 1 {
            bpe.merge_heap(word, &mut s.heap, &mut b);
            assert_eq!(a, b, "scan and heap differ on {:?}", String::from_utf8_lossy(word));
        }
        a
    }

    #[test]
    fn lowest_rank_first_then_leftmost() {
        let bpe = toy();
        // bc (rank 0) wins over ab (rank 1): abc is not reachable from "abc".
        assert_eq!(both(&bpe, b"abc"), [0, 3]);
        assert!(!bpe.words.contains_key(&b"abc"[..]));
        assert_eq!(both(&bpe, b"abab"), [4, 4]);
        assert_eq!(both(&bpe, b"aaa"), [6, 0]);
        assert_eq!(both(&bpe, b"aaaaa"), [6, 6, 0]);
        let long: Vec<u8> = b"abcaab".iter().copied().cycle().take(200).collect();
        both(&bpe, &long);
    }
}
