//! `<think>…</think>` blocks (Qwen3, DeepSeek-R1): reasoning text apart from the answer.
//!
//! Invariant: whatever the cut of the text into deltas, the reasoning and content emitted are
//! the same, and neither marker reaches either of them (a marker split across deltas is held
//! until the next delta decides). The newlines that open and close a block, and those between
//! `</think>` and the answer, are dropped (Qwen3's chat template re-adds them in history).

use super::marker::{could_become, partial_suffix};

pub(crate) const THINK_OPEN: &str = "<think>";
pub(crate) const THINK_CLOSE: &str = "</think>";

/// Where a piece of the model's text belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Reasoning,
    Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Qwen3: the output may open with `<think>` (leading whitespace allowed) or be an answer.
    Undecided,
    /// DeepSeek-R1, or a prompt that opened the block: reasoning, an optional `<think>` first.
    Opening,
    /// Inside the block; `started` once reasoning other than newlines was emitted.
    Thinking { started: bool },
    /// After `</think>`: whitespace before the answer is dropped.
    AfterThink,
    /// The answer: passed through untouched.
    Content,
}

/// Where the reasoning phase stands, for token accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not yet known whether the output reasons.
    Undecided,
    Reasoning,
    Done,
}

/// Splits a text stream into reasoning and content.
#[derive(Debug)]
pub(crate) struct ReasoningSplitter {
    state: State,
    /// Text held back: a possible marker, trailing newlines of reasoning, leading whitespace.
    held: String,
    /// A think block was entered.
    opened: bool,
}

impl ReasoningSplitter {
    /// `open`: the output starts inside the block (DeepSeek-R1's convention, or a prompt that
    /// ends with `<think>`); otherwise only an output that opens with `<think>` reasons.
    pub(crate) fn new(open: bool) -> Self {
        Self { state: if open { State::Opening } else { State::Undecided }, held: String::new(), opened: false }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.state {
            State::Undecided => Phase::Undecided,
            State::Opening | State::Thinking { .. } => Phase::Reasoning,
            State::AfterThink | State::Content => Phase::Done,
        }
    }

    /// Whether a think block was entered (its tokens count as reasoning).
    pub(crate) fn opened(&self) -> bool {
        self.opened
    }

    /// Feeds one delta; `sink` gets the pieces that are decided, in order.
    pub(crate) fn push(&mut self, text: &str, sink: &mut impl FnMut(Part, &str)) {
        if self.state == State::Content && self.held.is_empty() {
            if !text.is_empty() {
                sink(Part::Content, text);
            }
            return;
        }
        self.held.push_str(text);
        loop {
            match self.state {
                State::Undecided | State::Opening => {
                    let t = self.held.trim_start();
                    if could_become(t, THINK_OPEN) {
                        return;
                    }
                    if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                        self.held = rest.to_string();
                    } else if self.state == State::Undecided {
                        self.state = State::Content;
                        continue;
                    }
                    self.state = State::Thinking { started: false };
                    self.opened = true;
                }
                State::Thinking { started } => {
                    if let Some(i) = self.held.find(THINK_CLOSE) {
                        self.emit_reasoning(i, started, sink);
                        self.held.replace_range(..i + THINK_CLOSE.len(), "");
                        self.state = State::AfterThink;
                        continue;
                    }
                    let end = self.held.len() - partial_suffix(&self.held, THINK_CLOSE);
                    let emitted_to = self.emit_reasoning(end, started, sink);
                    self.held.replace_range(..emitted_to, "");
                    return;
                }
                State::AfterThink => {
                    let t = self.held.trim_start();
                    if t.is_empty() {
                        self.held.clear();
                        return;
                    }
                    let skip = self.held.len() - t.len();
                    self.held.replace_range(..skip, "");
                    self.state = State::Content;
                }
                State::Content => {
                    if !self.held.is_empty() {
                        sink(Part::Content, &self.held);
                        self.held.clear();
                    }
                    return;
                }
            }
        }
    }

    /// Emits `held[..end]` as reasoning, without its leading newlines (before any reasoning)
    /// or its trailing ones (they may close the block); returns how much of `held` is done with.
    fn emit_reasoning(&mut self, end: usize, started: bool, sink: &mut impl FnMut(Part, &str)) -> usize {
        let body = &self.held[..end];
        let start = if started { 0 } else { body.len() - body.trim_start_matches('\n').len() };
        let stop = start + body[start..].trim_end_matches('\n').len();
        if stop > start {
            sink(Part::Reasoning, &body[start..stop]);
            self.state = State::Thinking { started: true };
        }
        stop
    }

    /// The end of the output: what was held is decided now.
    pub(crate) fn finish(&mut self, sink: &mut impl FnMut(Part, &str)) {
        match self.state {
            State::Undecided | State::Content => {
                if !self.held.is_empty() {
                    sink(Part::Content, &self.held);
                }
            }
            State::Opening => {
                let t = self.held.trim_start();
                let body = t.strip_prefix(THINK_OPEN).unwrap_or(t).trim_matches('\n');
                if !body.is_empty() {
                    sink(Part::Reasoning, body);
                }
            }
            State::Thinking { started } => {
                let end = self.held.len();
                self.emit_reasoning(end, started, sink);
            }
            State::AfterThink => {}
        }
        self.held.clear();
        if self.state != State::Content {
            self.state = State::AfterThink;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(open: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(open);
        let (mut r, mut c) = (String::new(), String::new());
        let mut sink = |p: Part, t: &str| match p {
            Part::Reasoning => r.push_str(t),
            Part::Content => c.push_str(t),
        };
        for p in pieces {
            s.push(p, &mut sink);
        }
        s.finish(&mut sink);
        (r, c)
    }

    #[test]
    fn qwen3_blocks() {
        assert_eq!(split(false, &["<think>\nhm\n\nyes\n</think>\n\nHi"]), ("hm\n\nyes".into(), "Hi".into()));
        assert_eq!(split(false, &["<thi", "nk>\na", "b</th", "ink>", "\n", "\nHi"]), ("ab".into(), "Hi".into()));
        assert_eq!(split(false, &["  Hello <think>"]), ("".into(), "  Hello <think>".into()));
        assert_eq!(split(false, &["<thing>"]), ("".into(), "<thing>".into()));
        assert_eq!(split(false, &["\n<thi"]), ("".into(), "\n<thi".into()), "an unfinished marker is content");
        assert_eq!(split(false, &["<think>\nunterminated\n"]), ("unterminated".into(), "".into()));
        assert_eq!(split(false, &["<think>\n\n</think>\n\nA"]), ("".into(), "A".into()));
    }

    #[test]
    fn deepseek_blocks() {
        assert_eq!(split(true, &["reason</think>answer"]), ("reason".into(), "answer".into()));
        assert_eq!(split(true, &["<think>\nr\n</think>\n\na</think>"]), ("r".into(), "a</think>".into()));
        assert_eq!(split(true, &["all reasoning </th"]), ("all reasoning </th".into(), "".into()));
        assert_eq!(split(true, &["\n<thi"]), ("<thi".into(), "".into()), "an unfinished marker is reasoning");
        assert_eq!(split(true, &["\n<think>\n"]), ("".into(), "".into()));
    }

    #[test]
    fn phases() {
        let mut s = ReasoningSplitter::new(false);
        let mut sink = |_: Part, _: &str| {};
        assert_eq!(s.phase(), Phase::Undecided);
        s.push("<think>", &mut sink);
        assert_eq!(s.phase(), Phase::Reasoning);
        s.push("x</think>", &mut sink);
        assert_eq!(s.phase(), Phase::Done);
        assert!(s.opened());
    }
}
