//! The fast tokenizer: byte-level BPE (Qwen2/3, Llama 3, ...) with HF `tokenizers`' exact ids.
//!
//! One encode, in HF's order: [`added`] splits added and special tokens out of the raw text;
//! each text segment between them is NFC-normalized when the model says so (with the very crate
//! and Unicode tables HF uses, and only when the quick check says the text is not NFC already);
//! [`pretok`] cuts it into pre-tokens with a hand-written scanner equal to the model's split
//! regex; [`merge`] turns each pre-token's bytes into ids (a whole-word lookup, else rank-ordered
//! merges); the post-processor's ids go around the whole when special tokens are added.
//!
//! Invariant: for every model [`FastBpe::from_json`] accepts, `encode(text, add_special_tokens)`
//! equals HF's `encode_fast(text, add_special_tokens).get_ids()` (truncation and padding off,
//! as kvgate loads every tokenizer). Anything it cannot reproduce exactly it refuses with an
//! [`Unsupported`] reason, and the caller keeps HF ([`super::Preprocessor`] logs which serves).
//! Decoding is not here: kvgate decodes with HF.
//!
//! With a [`TokenCache`] ([`FastBpe::encode_with`]), the ids of each long text segment come from
//! the cache when it holds them, and go into it when it does not; the ids are the same.
//!
//! Concurrency: built once at load, immutable afterwards; `Send + Sync`, shared by every shard,
//! which encode concurrently without locks. Mutable state is per thread (a thread-local, so
//! shared-nothing): merge buffers and a cache of merged words (of up to
//! [`merge::WORD_CACHE_MAX_BYTES`] bytes), bounded by [`merge::WORD_CACHE_ENTRIES`] and its
//! arenas' size, and tagged with the model it was filled for, so a thread that encodes for
//! another model starts it over.

mod added;
mod classes;
mod config;
mod merge;
mod pretok;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_cache_tests;

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde_json::Value;
use unicode_normalization_alignments::char::canonical_combining_class;
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

pub use config::Unsupported;
use config::{Normalizer, PreTokenizer, Spec};

use super::token_cache::{TokenCache, MIN_SEGMENT_BYTES};

thread_local! {
    /// This thread's merge buffers and word cache, and the model they were filled for.
    static SCRATCH: RefCell<(u64, merge::Scratch)> = RefCell::new((0, merge::Scratch::default()));
}

/// A byte-level BPE tokenizer that encodes exactly like HF `tokenizers` for the configurations
/// it accepts.
pub struct FastBpe {
    /// Tells this model's thread-local cache from another's.
    id: u64,
    added: added::AddedTokens,
    normalizer: Normalizer,
    pre_tokenizer: PreTokenizer,
    bpe: merge::Bpe,
    prefix: Box<[u32]>,
    suffix: Box<[u32]>,
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<FastBpe>();
};

impl FastBpe {
    /// From HF's tokenizer as loaded (its own serialization, so what it runs is what is read).
    pub fn from_hf(tokenizer: &tokenizers::Tokenizer) -> Result<Self, Unsupported> {
        let json = serde_json::to_value(tokenizer).map_err(|_| Unsupported::Malformed("serialization"))?;
        Self::from_json(&json)
    }

    /// From a parsed `tokenizer.json`.
    pub fn from_json(json: &Value) -> Result<Self, Unsupported> {
        let spec = Spec::from_json(json)?;
        let added = added::AddedTokens::new(&spec.added).map_err(|_| Unsupported::Malformed("added_tokens"))?;
        let bpe = merge::Bpe::new(spec.byte_ids, &spec.vocab, &spec.merges, spec.ignore_merges);
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(FastBpe {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            added,
            normalizer: spec.normalizer,
            pre_tokenizer: spec.pre_tokenizer,
            bpe,
            prefix: spec.prefix.into(),
            suffix: spec.suffix.into(),
        })
    }

    /// What this tokenizer runs, for the start-up log.
    pub fn describe(&self) -> String {
        let pre = match self.pre_tokenizer {
            PreTokenizer::Split { max_digits } => format!("split regex scanner ({max_digits}-digit numbers)"),
            PreTokenizer::Whole => "no split".to_string(),
        };
        let norm = match self.normalizer {
            Normalizer::None => "no normalizer",
            Normalizer::Nfc => "NFC",
        };
        format!("kvgate byte-level BPE ({pre}, {norm})")
    }

    /// Empties the calling thread's cache of merged words (benches measure cold encodes so).
    pub fn clear_thread_cache(&self) {
        SCRATCH.with(|cell| cell.borrow_mut().1.clear_cache());
    }

    /// The ids of `text`; with `add_special_tokens`, the post-processor's ids around them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        self.encode_with(text, add_special_tokens, None)
    }

    /// [`Self::encode`], taking the ids of long segments between added tokens from `cache` and
    /// storing those it lacks (the same ids: each segment tokenizes on its own; see
    /// [`TokenCache`]).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool, cache: Option<&TokenCache>) -> Vec<u32> {
        // About 4 bytes per token in English; a reallocation or two for other text.
        let mut out = Vec::with_capacity(text.len() / 4 + 8);
        if add_special_tokens {
            out.extend_from_slice(&self.prefix);
        }
        SCRATCH.with(|cell| {
            // encode never re-enters itself, so the borrow is never held twice.
            let mut state = cell.borrow_mut();
            let (owner, scratch) = &mut *state;
            if *owner != self.id {
                scratch.clear_cache();
                *owner = self.id;
            }
            self.added.split(text, |segment| match segment {
                added::Segment::Added(id) => out.push(id),
                added::Segment::Text(t) => match cache {
                    Some(cache) if t.len() >= MIN_SEGMENT_BYTES => {
                        let key = cache.key(self.id, t);
                        if let Some(ids) = cache.get(&key) {
                            return out.extend_from_slice(&ids);
                        }
                        let start = out.len();
                        self.encode_segment(t, scratch, &mut out);
                        cache.insert(key, &out[start..]);
                    }
                    _ => self.encode_segment(t, scratch, &mut out),
                },
            });
        });
        if add_special_tokens {
            out.extend_from_slice(&self.suffix);
        }
        out
    }

    fn encode_segment(&self, text: &str, scratch: &mut merge::Scratch, out: &mut Vec<u32>) {
        let text = self.normalize(text);
        match self.pre_tokenizer {
            PreTokenizer::Split { max_digits } => {
                pretok::split(&text, max_digits, |piece| self.bpe.encode_word(piece.as_bytes(), scratch, out))
            }
            PreTokenizer::Whole => self.bpe.encode_word(text.as_bytes(), scratch, out),
        }
    }

    fn normalize<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.normalizer {
            Normalizer::None => Cow::Borrowed(text),
            Normalizer::Nfc if nfc_quick_yes(text) => Cow::Borrowed(text),
            // HF's NFC: the same crate's recomposition, offsets dropped.
            Normalizer::Nfc => Cow::Owned(text.nfc().map(|(c, _)| c).collect()),
        }
    }
}

/// The NFC quick check's "yes" (HF's NFC leaves the text as it is), sped up: a text whose every
/// char is ASCII, or a BMP char of combining class 0 that the quick check passes alone, passes
/// as a whole (the check only fails on a char it refuses or on combining classes out of order);
/// any other text takes the crate's own check.
fn nfc_quick_yes(text: &str) -> bool {
    static STARTERS: OnceLock<Box<[u64]>> = OnceLock::new();
    let starters = STARTERS.get_or_init(|| {
        let mut bits = vec![0u64; 0x1_0000 / 64].into_boxed_slice();
        for cp in 0..0x1_0000u32 {
            let Some(c) = char::from_u32(cp) else { continue };
            if canonical_combining_class(c) == 0 && is_nfc_quick(std::iter::once(c)) == IsNormalized::Yes {
                bits[cp as usize / 64] |= 1 << (cp % 64);
            }
        }
        bits
    });
    let safe = text.chars().all(|c| {
        let cp = c as usize;
        c.is_ascii() || (cp < 0x1_0000 && starters[cp / 64] & (1 << (cp % 64)) != 0)
    });
    safe || is_nfc_quick(text.chars()) == IsNormalized::Yes
}
