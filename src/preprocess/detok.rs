//! Incremental detokenization of one generated stream.
//!
//! Invariant: `step` never returns half a UTF-8 character (text whose decoding ends in U+FFFD is
//! held until a later token completes it), and the concatenation of every `step` and `finish`
//! equals decoding all ids at once (special tokens skipped). Each step decodes only the window
//! `ids[prefix_offset..]` (the prefix_offset/read_offset technique of HF text-generation-inference
//! and vLLM), so its cost does not grow with the output. One decoder per request, owned by the task
//! driving that stream (`Send`, not shared); the `Arc<Preprocessor>` it holds is immutable.

use std::sync::Arc;

use super::error::PreprocessError;
use super::Preprocessor;

/// Streams text out of generated token ids.
pub struct IncrementalDecoder {
    preprocessor: Arc<Preprocessor>,
    ids: Vec<u32>,
    /// Start of the decode window: the tokens before it have been emitted long ago.
    prefix_offset: usize,
    /// End of what has been emitted: `ids[prefix_offset..read_offset]` is context only.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub(crate) fn new(preprocessor: Arc<Preprocessor>) -> Self {
        IncrementalDecoder { preprocessor, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Feeds newly generated ids; returns the newly completed text (possibly empty).
    pub fn step(&mut self, ids: &[u32]) -> Result<String, PreprocessError> {
        let mut out = String::new();
        // One id at a time: text completed early in a batch is emitted even when the batch ends
        // in the middle of a character.
        for &id in ids {
            self.ids.push(id);
            let (prefix, text) = self.window()?;
            if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
                out.push_str(new_suffix(&prefix, &text));
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
            }
        }
        Ok(out)
    }

    /// At the end of the stream: whatever was held back (may hold U+FFFD if the stream really
    /// ended mid-character).
    pub fn finish(&mut self) -> Result<String, PreprocessError> {
        let (prefix, text) = self.window()?;
        let out = if text.len() > prefix.len() { new_suffix(&prefix, &text).to_string() } else { String::new() };
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(out)
    }

    /// Decodes `[prefix_offset, read_offset)` and `[prefix_offset, end)`.
    fn window(&self) -> Result<(String, String), PreprocessError> {
        let prefix = self.preprocessor.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = self.preprocessor.decode(&self.ids[self.prefix_offset..], true)?;
        Ok((prefix, text))
    }
}

/// The part of `text` after `prefix`; when a decoder rewrote the prefix (it should not), the part
/// after their longest common prefix, so text is never dropped.
fn new_suffix<'a>(prefix: &str, text: &'a str) -> &'a str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    &text[common..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_stream(p: &Arc<Preprocessor>, ids: &[u32], chunk: usize) {
        let full = p.decode(ids, true).unwrap();
        let mut d = p.decoder();
        let mut joined = String::new();
        for c in ids.chunks(chunk) {
            let s = d.step(c).unwrap();
            assert!(!s.contains('\u{FFFD}'), "partial char emitted: {s:?}");
            joined.push_str(&s);
        }
        joined.push_str(&d.finish().unwrap());
        assert_eq!(joined, full);
    }

    #[test]
    fn builtin_one_byte_at_a_time() {
        let p = Arc::new(Preprocessor::builtin());
        let text = "héllo 世界 🎉";
        let ids = p.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len(), "one id per byte");
        let mut d = p.decoder();
        let steps: Vec<String> = ids.iter().map(|&id| d.step(&[id]).unwrap()).collect();
        assert!(d.finish().unwrap().is_empty());
        // Every non-empty step is a whole character; nothing is a fragment.
        let emitted: Vec<&str> = steps.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
        let chars: Vec<String> = text.chars().map(String::from).collect();
        assert_eq!(emitted, chars);
        assert_eq!(steps.concat(), text);
        for chunk in [2, 3, 5, 64] {
            check_stream(&p, &ids, chunk);
        }
    }

    #[test]
    fn special_tokens_are_skipped_and_truncated_tail_is_flushed() {
        let p = Arc::new(Preprocessor::builtin());
        let mut d = p.decoder();
        let mut ids = vec![257];
        ids.extend(p.encode("ok ", false).unwrap());
        ids.extend(&"🎉".as_bytes()[..2].iter().map(|&b| u32::from(b)).collect::<Vec<_>>());
        assert_eq!(d.step(&ids).unwrap(), "ok ");
        assert_eq!(d.finish().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn qwen_token_by_token() {
        let Some(p) = super::super::tests::qwen() else {
            return;
        };
        let text = "Paris 是法国的首都 🇫🇷🎉 — naïve café, 東京タワー!";
        let ids = p.encode(text, false).unwrap();
        check_stream(&p, &ids, 1);
        check_stream(&p, &ids, 3);
        let mut d = p.decoder();
        let joined: String = ids.iter().map(|&id| d.step(&[id]).unwrap()).collect();
        assert_eq!(joined + &d.finish().unwrap(), text);
    }

    #[test]
    fn suffix_fallback() {
        assert_eq!(new_suffix("ab", "abc"), "c");
        assert_eq!(new_suffix("aé", "aèx"), "èx");
    }
}
