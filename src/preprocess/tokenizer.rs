//! The built-in byte-level tokenizer, special-token lookups, and the sample text.
//!
//! Invariant: the built-in tokenizer maps every byte `b` to id `b` (0..=255) and back, so any
//! UTF-8 string round-trips exactly; its special tokens are fixed (`<|endoftext|>` = 256,
//! `<|im_start|>` = 257, `<|im_end|>` = 258). Built once per [`super::Preprocessor`], immutable
//! afterwards; `tokenizers::Tokenizer` is `Send + Sync` and shared by reference, never cloned per
//! request.

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The built-in tokenizer's special tokens, in id order from 256.
pub const BUILTIN_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const BUILTIN_ENDOFTEXT_ID: u32 = 256;
pub const BUILTIN_IM_END_ID: u32 = 258;

/// ChatML, as used by Qwen and others: the built-in model's chat template.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Readable English the simulated engine replays as its output.
pub const SAMPLE_TEXT: &str = "\
The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the \
spiral stairs, counted the steps out of habit, and wiped the salt from the great lens with a soft \
cloth. Out on the water the fishing boats were already moving, their lamps swinging like slow \
fireflies against the grey.

By midmorning the fog had lifted. He walked down to the harbour to buy bread and coffee, and to hear \
what the sailors said about the weather. A storm was coming from the west, they told him, not a \
large one, but enough to keep the small boats home for a day or two. He thanked them and carried \
his bread back up the hill.

In the afternoon he repaired a window that the wind had cracked, then sat by the stove and read a \
book about the stars. He liked the idea that sailors had once found their way across whole oceans \
with nothing but the sky, a clock, and patience. The light in his tower was only a small help by \
comparison, but it was a steady one.

When evening came the wind rose and the first rain struck the glass. He lit the lamp, set the \
clockwork turning, and watched the beam sweep across the dark water. Somewhere out there a captain \
would see it, check a chart, and turn a few degrees to starboard. Nobody would ever thank him for \
it, and that was exactly how he liked it.
";

/// GPT-2's reversible byte → printable-char map (the ByteLevel alphabet).
pub(crate) fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    // Non-printable bytes take 256 + their rank among non-printable bytes.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("256 + rank < 512 is a valid scalar")
}

/// Builds the byte-level tokenizer: a BPE over the 256 ByteLevel symbols with no merges, the
/// ByteLevel pre-tokenizer (no regex split, no prefix space) and decoder, and three specials.
pub fn builtin_tokenizer() -> Tokenizer {
    let vocab: Vocab = (0..=255u8).map(|b| (byte_char(b).to_string(), u32::from(b))).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .expect("a 256-symbol vocab with no merges is a valid BPE");
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, false, false);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    let specials = BUILTIN_SPECIALS.iter().map(|s| AddedToken::from(*s, true));
    tokenizer.add_special_tokens(specials).expect("adding special tokens to a fresh tokenizer");
    debug_assert_eq!(tokenizer.token_to_id(BUILTIN_SPECIALS[0]), Some(BUILTIN_ENDOFTEXT_ID));
    debug_assert_eq!(tokenizer.token_to_id(BUILTIN_SPECIALS[2]), Some(BUILTIN_IM_END_ID));
    tokenizer
}

/// A special token from `tokenizer_config.json`: a string, or an AddedToken-like `{content}`.
pub fn special_token(config: Option<&Value>, key: &str) -> Option<String> {
    match config?.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Collects eos ids: `eos_token_id` (int or list) from each config given, then the token string.
pub fn eos_token_ids(tokenizer: &Tokenizer, id_configs: &[Option<&Value>], eos_token: Option<&str>) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    let mut push = |id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    for cfg in id_configs.iter().flatten() {
        match cfg.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()).into_iter().for_each(&mut push),
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()?.try_into().ok()).for_each(&mut push),
            _ => {}
        }
    }
    if let Some(id) = eos_token.and_then(|t| tokenizer.token_to_id(t)) {
        push(id);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(chars, ByteLevel::alphabet().into_iter().collect::<std::collections::HashSet<char>>());
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
    }

    #[test]
    fn builtin_round_trips_bytes() {
        let t = builtin_tokenizer();
        for s in ["", "hello", "héllo 世界 🎉", "tabs\tand\nnewlines  ", "\u{0}\u{7f}\u{ffff}"] {
            let ids = t.encode_fast(s, false).unwrap().get_ids().to_vec();
            assert_eq!(ids, s.bytes().map(u32::from).collect::<Vec<_>>(), "{s:?}");
            assert_eq!(t.decode(&ids, false).unwrap(), s);
        }
        let ids = t.encode_fast("<|im_start|>hi<|im_end|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![257, 104, 105, 258]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hi");
        assert_eq!(t.get_vocab_size(true), 259);
    }
}
