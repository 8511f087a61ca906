//! Token budgets known before tokenizing: a lower bound on a text's token count from its bytes,
//! so a prompt that cannot fit the model's context is refused without encoding it.
//!
//! The bound: every token covers at most [`TokenBytes::max`] bytes of normalized text, so a
//! text of `n` normalized bytes has at least `n / max` tokens. Normalization can shrink text,
//! so the bound counts only what survives it: NFC leaves ASCII unchanged unless it composes
//! it with a following combining mark, and any composition or singleton replacement keeps at
//! least a third of the bytes it consumes (the worst cases: Hangul L+V+T, 9 bytes → 3; an ASCII
//! base and a 2-byte mark, 3 → 2), so `ascii + non_ascii / 3` is at most the normalized length.
//! Other normalizers (lowercasing may shrink, `Replace` arbitrarily) and tokenizers that are
//! not byte-level BPE get no bound.
//!
//! Invariant: computed once at load from the vocabulary, immutable afterwards (plain data).

use tokenizers::{NormalizerWrapper, Tokenizer};

use super::template::ChatExtras;
use super::{PreprocessError, Preprocessor};

/// The longest token of a byte-level vocabulary, in bytes of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBytes {
    max: usize,
}

impl TokenBytes {
    /// `None` when no sound bound exists for this tokenizer (see the module doc). `byte_level`:
    /// the model's vocabulary spells each byte as one char (GPT-2's ByteLevel alphabet).
    pub fn of(tokenizer: &Tokenizer, byte_level: bool) -> Option<Self> {
        if !byte_level {
            return None;
        }
        match tokenizer.get_normalizer() {
            None | Some(NormalizerWrapper::NFC(_)) => {}
            Some(_) => return None,
        }
        let vocab = tokenizer.get_vocab(false).into_keys().map(|t| t.chars().count()).max().unwrap_or(0);
        let added = tokenizer.get_added_tokens_decoder().into_values().map(|t| t.content.len()).max().unwrap_or(0);
        let max = vocab.max(added);
        (max > 0).then_some(Self { max })
    }

    /// The bytes of the longest token.
    pub fn max(&self) -> usize {
        self.max
    }

    /// At least this many tokens encode `text`.
    pub fn min_tokens(&self, text: &str) -> usize {
        let ascii = text.bytes().filter(u8::is_ascii).count();
        let kept = ascii + (text.len() - ascii) / 3;
        kept / self.max
    }
}

impl Preprocessor {
    /// A lower bound on the tokens of `text` (0 when this tokenizer has none): the refusal of a
    /// prompt that cannot fit, before encoding it.
    pub fn min_tokens(&self, text: &str) -> usize {
        self.token_bytes.map_or(0, |b| b.min_tokens(text))
    }

    /// Renders `messages` with `extras`, with or without the generation prompt (`/tokenize`'s
    /// `add_generation_prompt`).
    pub fn render_chat_with(
        &self,
        messages: &serde_json::Value,
        extras: ChatExtras<'_>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        let template = self.template.as_ref().ok_or(PreprocessError::MissingChatTemplate)?;
        template.render_with(messages, extras, add_generation_prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_bound_is_below_the_count() {
        let Some(p) = super::super::tests::qwen() else { return };
        let b = p.token_bytes.expect("Qwen3 is byte-level BPE with NFC");
        assert_eq!(b.max(), 128);
        let spaces = " ".repeat(128 * 50);
        let hangul_jamo = "\u{1100}\u{1161}\u{11A8}".repeat(500);
        let marks = "e\u{0301}".repeat(500);
        let text = "The quick brown fox. ".repeat(400);
        for t in [spaces.as_str(), &hangul_jamo, &marks, &text, "", "x"] {
            let n = p.encode(t, false).unwrap().len();
            assert!(p.min_tokens(t) <= n, "{} > {n}", p.min_tokens(t));
        }
        assert!(p.min_tokens(&spaces) >= 49);
    }

    #[test]
    fn ten_megabytes_of_ascii_exceed_qwen3s_context() {
        let Some(p) = super::super::tests::qwen() else { return };
        let text = "a".repeat(10 << 20);
        assert!(p.min_tokens(&text) > 40_960);
    }

    #[test]
    fn builtin_and_other_normalizers() {
        let p = Preprocessor::builtin();
        // The built-in model: one token per byte at most 13 bytes long (its specials).
        assert!(p.min_tokens("hello") <= 5);
        let mut t = crate::preprocess::tokenizer::builtin_tokenizer();
        t.with_normalizer(Some(tokenizers::normalizers::Lowercase)).expect("a normalizer is accepted");
        assert_eq!(TokenBytes::of(&t, true), None);
        assert_eq!(TokenBytes::of(&crate::preprocess::tokenizer::builtin_tokenizer(), false), None);
    }
}
