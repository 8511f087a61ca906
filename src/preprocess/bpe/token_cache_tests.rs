//! The token cache changes no id: encoding with it (cold, warm, after evictions, conversations
//! re-sent with a turn appended) equals encoding without it, and equals HF.

use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::tests::{generated_corpus, llama3_like, qwen, text, Pair};
use crate::preprocess::token_cache::{TokenCache, MIN_SEGMENT_BYTES, STRIPES};

/// One cache for every property case, small enough that they evict each other's entries:
/// ~4 entries of 150 tokens per stripe.
fn small_cache() -> &'static TokenCache {
    static CACHE: OnceLock<TokenCache> = OnceLock::new();
    CACHE.get_or_init(|| TokenCache::new(STRIPES * 4 * 700))
}

/// A ChatML conversation (Qwen's markers): a system prompt, then `turns` as user and assistant
/// in turn, then the generation prompt.
fn chatml(turns: &[String]) -> String {
    let mut s = String::from("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n");
    for (i, t) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        s.push_str(&format!("<|im_start|>{role}\n{t}<|im_end|>\n"));
    }
    s + "<|im_start|>assistant\n"
}

/// A message of up to a few hundred bytes (often past [`MIN_SEGMENT_BYTES`]), added tokens
/// and all.
fn message() -> impl Strategy<Value = String> {
    prop::collection::vec(text(), 1..5).prop_map(|v| v.concat())
}

/// The conversation re-sent with one more turn each time, as clients do: every prefix encodes
/// with each cache (twice: as it comes, then warm) as HF encodes it.
fn check_conversation(pair: &Pair, turns: &[String], caches: &[&TokenCache]) {
    for n in 1..=turns.len() {
        let prompt = chatml(&turns[..n]);
        for add in [false, true] {
            let want = pair.hf.encode_fast(prompt.as_str(), add).unwrap().get_ids().to_vec();
            assert_eq!(pair.fast.encode(&prompt, add), want, "uncached, turn {n}");
            for (i, cache) in caches.iter().enumerate() {
                for pass in ["first", "again"] {
                    let got = pair.fast.encode_with(&prompt, add, Some(cache));
                    assert!(got == want, "cache {i}, turn {n}, {pass} encode, add {add}: ids differ from HF's");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conversations_with_the_cache_equal_hf(turns in prop::collection::vec(message(), 1..6)) {
        let fresh = TokenCache::new(64 << 20);
        check_conversation(qwen(), &turns, &[&fresh, small_cache()]);
    }

    #[test]
    fn llama3_config_with_the_cache_equals_hf(turns in prop::collection::vec(message(), 1..4)) {
        let fresh = TokenCache::new(64 << 20);
        check_conversation(llama3_like(), &turns, &[&fresh, small_cache()]);
    }
}

/// Long conversations through a cache of 2 KiB a stripe: entries are evicted and tokenized
/// again, and every prompt still equals the uncached encode (and the last one HF's).
#[test]
fn evictions_change_no_id() {
    let pair = qwen();
    let cache = TokenCache::new(STRIPES * 2 * 1024);
    for seed in 0..3 {
        let corpus = generated_corpus(48 << 10, 100 + seed);
        let mut turns = Vec::new();
        let mut rest = corpus.as_str();
        let mut len = 300;
        while !rest.is_empty() {
            let mut cut = len.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            turns.push(rest[..cut].to_string());
            rest = &rest[cut..];
            len = 300 + (len * 7) % 2900;
        }
        let mut prompt = String::new();
        for n in 1..=turns.len() {
            prompt = chatml(&turns[..n]);
            assert_eq!(
                pair.fast.encode_with(&prompt, false, Some(&cache)),
                pair.fast.encode(&prompt, false),
                "turn {n}"
            );
        }
        let want = pair.hf.encode_fast(prompt.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(pair.fast.encode_with(&prompt, false, Some(&cache)), want);
    }
    let s = cache.stats();
    assert!(s.evictions > 0 && s.hits > 0, "{s:?}");
    assert!(s.bytes <= s.capacity_bytes, "{s:?}");
}

// The messages below (900 bytes and up) are long enough to cache.
const _: () = assert!(MIN_SEGMENT_BYTES <= 900);

/// Qwen3's own chat template, tools and thinking included: each turn equals HF, and from the
/// second turn on only the segments new to the prompt miss (the last answer, the new question).
#[test]
fn qwen3_template_turns_hit_and_equal_hf() {
    let Some(p) = crate::preprocess::tests::qwen() else { return };
    let cache = TokenCache::new(64 << 20);
    let tools = json!([{"type": "function", "function": {"name": "search", "description": "Searches the code base for a symbol and returns the matching lines with their paths.", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]);
    // The corpus without `<`: its added tokens would cut messages into segments too short to cache.
    let corpus = |bytes: usize, seed: u64| generated_corpus(bytes, seed).replace('<', "‹");
    let system = format!("You are a coding agent. Follow the house style.\n\n{}", corpus(2000, 1));
    let mut msgs = vec![json!({"role": "system", "content": system})];
    let (mut misses, mut hit_tokens) = (0, 0);
    for turn in 0..8u64 {
        msgs.push(json!({"role": "user", "content": corpus(1500 + 300 * turn as usize, 10 + turn)}));
        let text = p.render_chat(&Value::Array(msgs.clone()), Some(&tools), true).unwrap();
        let want = p.hf_tokenizer().encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(p.encode_with(&text, false, Some(&cache)).unwrap(), want, "turn {turn}");
        let s = cache.stats();
        if turn > 0 {
            assert!(s.misses - misses <= 2, "turn {turn}: {} segments missed", s.misses - misses);
            let hits = s.hit_tokens - hit_tokens;
            assert!(hits * 2 > want.len() as u64, "turn {turn}: {hits} of {} tokens from the cache", want.len());
        }
        (misses, hit_tokens) = (s.misses, s.hit_tokens);
        let answer = format!("<think>\n{}\n</think>\n\n{}", corpus(400, 50 + turn), corpus(900, 70 + turn));
        msgs.push(json!({"role": "assistant", "content": answer}));
    }
}
