//! Added tokens (`<|im_start|>`, `<think>`, ...): split out of the text before anything else.
//!
//! Invariant: [`AddedTokens::split`] cuts the text where HF's `AddedVocabulary` does for tokens
//! with `normalized: false` and no `lstrip`/`rstrip`/`single_word` (the only ones the fast path
//! accepts): leftmost-longest matches over the raw text, special or not, each match one id, the
//! text between matches passed on. Built once at load, immutable, shared by every thread.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// One piece of the input: text to pre-tokenize, or an added token's id.
pub(super) enum Segment<'t> {
    Text(&'t str),
    Added(u32),
}

pub(super) struct AddedTokens {
    /// `None` when the model has no added tokens.
    matcher: Option<AhoCorasick>,
    /// The id of each pattern of `matcher`, by pattern index.
    ids: Vec<u32>,
}

impl AddedTokens {
    /// `tokens`: each added token's content and id.
    pub(super) fn new(tokens: &[(String, u32)]) -> Result<Self, aho_corasick::BuildError> {
        let tokens: Vec<&(String, u32)> = tokens.iter().filter(|(c, _)| !c.is_empty()).collect();
        if tokens.is_empty() {
            return Ok(AddedTokens { matcher: None, ids: Vec::new() });
        }
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(c, _)| c.as_bytes()))?;
        Ok(AddedTokens { matcher: Some(matcher), ids: tokens.iter().map(|(_, id)| *id).collect() })
    }

    /// Calls `segment` with the text between added tokens and with each token's id, in order.
    pub(super) fn split<'t>(&self, text: &'t str, mut segment: impl FnMut(Segment<'t>)) {
        let Some(matcher) = &self.matcher else {
            return segment(Segment::Text(text));
        };
        let mut start = 0;
        for m in matcher.find_iter(text) {
            if m.start() > start {
                segment(Segment::Text(&text[start..m.start()]));
            }
            segment(Segment::Added(self.ids[m.pattern().as_usize()]));
            start = m.end();
        }
        if start < text.len() {
            segment(Segment::Text(&text[start..]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftmost_longest() {
        let added = AddedTokens::new(&[("<a>".into(), 1), ("<a><b>".into(), 2), ("<b>".into(), 3)]).unwrap();
        let mut out = Vec::new();
        added.split("x<a><b><a>y<b", |s| {
            out.push(match s {
                Segment::Text(t) => t.to_string(),
                Segment::Added(id) => format!("#{id}"),
            })
        });
        assert_eq!(out, ["x", "#2", "#1", "y<b"]);
    }
}
