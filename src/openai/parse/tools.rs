//! Tool calls in the answer text, in the formats models are trained on:
//!
//! - Hermes (Qwen2.5/Qwen3, Hermes, many fine-tunes): `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`,
//!   any number of them, text around them is content.
//! - Llama 3 JSON (Llama 3.1+): the answer *is* the call, `{"name": …, "parameters": …}`, several
//!   separated by `;`; an answer that does not open with `{` is content.
//!
//! Invariant: whatever the cut of the text into deltas, the same events come out (up to how
//! they are split), no marker reaches content, and text that turns out not to be a well-formed
//! call is given back as content, as it was written. Whitespace between content and a call,
//! and after a call, is dropped.

use super::call::{CallEvent, CallScanner, Step};
use super::marker::{could_become, partial_suffix};
use super::{Out, ToolCallKind};

pub(crate) const TOOL_CALL_OPEN: &str = "<tool_call>";
pub(crate) const TOOL_CALL_CLOSE: &str = "</tool_call>";
/// Llama 3's code-interpreter tag; a special token, normally skipped when detokenizing.
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug)]
enum State {
    /// Content, watching for the opening marker (Hermes).
    Text,
    /// Llama 3: the answer has not yet shown whether it is a call.
    Lead,
    Call(Box<CallScanner>),
    /// After a call: its closing marker (Hermes) or the next call's separator (Llama 3).
    Between,
}

/// Splits answer text into content and tool calls.
#[derive(Debug)]
pub(crate) struct ToolSplitter {
    kind: ToolCallKind,
    state: State,
    held: String,
    /// The framing text of the call being read: content again if the call breaks.
    opening: String,
    after_call: bool,
    /// Calls announced so far (the next call's index).
    calls: u32,
    id_seed: u64,
}

impl ToolSplitter {
    pub(crate) fn new(kind: ToolCallKind, id_seed: u64) -> Self {
        let state = match kind {
            ToolCallKind::Hermes => State::Text,
            ToolCallKind::Llama3Json => State::Lead,
        };
        Self { kind, state, held: String::new(), opening: String::new(), after_call: false, calls: 0, id_seed }
    }

    fn open_marker(&self) -> Option<&'static str> {
        match self.kind {
            ToolCallKind::Hermes => Some(TOOL_CALL_OPEN),
            ToolCallKind::Llama3Json => None,
        }
    }

    /// Feeds one delta of answer text.
    pub(crate) fn push(&mut self, text: &str, out: &mut Out<'_>) {
        if matches!(self.state, State::Text) && self.open_marker().is_none() && self.held.is_empty() && !self.after_call
        {
            out.content(text);
            return;
        }
        self.held.push_str(text);
        loop {
            match &mut self.state {
                State::Text => {
                    let marker = self.open_marker();
                    if let Some((m, i)) = marker.and_then(|m| Some((m, self.held.find(m)?))) {
                        let stop = self.emit_text(i, out);
                        // The whitespace before the marker goes with the call.
                        self.opening = self.held[stop..i + m.len()].to_string();
                        self.held.replace_range(..i + m.len(), "");
                        self.state = State::Call(Box::new(CallScanner::new()));
                        continue;
                    }
                    let end = self.held.len() - marker.map_or(0, |m| partial_suffix(&self.held, m));
                    let stop = self.emit_text(end, out);
                    self.held.replace_range(..stop, "");
                    return;
                }
                State::Lead => {
                    let t = self.held.trim_start();
                    if t.is_empty() || could_become(t, PYTHON_TAG) {
                        return;
                    }
                    if let Some(rest) = t.strip_prefix(PYTHON_TAG) {
                        self.held = rest.to_string();
                        continue;
                    }
                    self.state = if t.starts_with('{') {
                        self.held = t.to_string();
                        State::Call(Box::new(CallScanner::new()))
                    } else {
                        State::Text
                    };
                }
                State::Call(scanner) => {
                    let input = std::mem::take(&mut self.held);
                    let (calls, seed) = (&mut self.calls, self.id_seed);
                    let step = scanner.feed(&input, &mut |e| call_event(e, calls, seed, out));
                    match step {
                        Step::More => return,
                        Step::Done { rest } => {
                            self.held = rest;
                            self.opening.clear();
                            self.state = State::Between;
                        }
                        Step::Broken { text, rest } => {
                            let started = scanner.started();
                            self.broken(started, &text, out);
                            self.held = rest;
                            self.state = State::Text;
                        }
                    }
                }
                State::Between => {
                    let t = self.held.trim_start();
                    match self.kind {
                        ToolCallKind::Hermes => {
                            if could_become(t, TOOL_CALL_CLOSE) {
                                return;
                            }
                            // A missing closing marker is tolerated.
                            self.held = t.strip_prefix(TOOL_CALL_CLOSE).unwrap_or(t).to_string();
                            self.state = State::Text;
                        }
                        ToolCallKind::Llama3Json => {
                            if t.is_empty() {
                                return;
                            }
                            if let Some(rest) = t.strip_prefix(';') {
                                self.held = rest.to_string();
                                self.opening = ";".into();
                                self.state = State::Call(Box::new(CallScanner::new()));
                                continue;
                            }
                            self.state = State::Text;
                        }
                    }
                    self.after_call = true;
                }
            }
        }
    }

    /// Emits `held[..end]` as content, without the whitespace after a call (dropped) nor its
    /// trailing whitespace (it may precede a call); returns where the emitted text stops.
    fn emit_text(&mut self, end: usize, out: &mut Out<'_>) -> usize {
        let body = &self.held[..end];
        let start = if self.after_call { body.len() - body.trim_start().len() } else { 0 };
        let stop = start + body[start..].trim_end().len();
        if stop > start {
            out.content(&body[start..stop]);
            self.after_call = false;
        }
        stop
    }

    /// A call that is not one: content as written, or (once announced) withdrawn.
    fn broken(&mut self, started: bool, text: &str, out: &mut Out<'_>) {
        let mut whole = std::mem::take(&mut self.opening);
        whole.push_str(text);
        if started {
            out.invalid(self.calls - 1, whole);
        } else if !whole.is_empty() {
            out.content(&whole);
            self.after_call = false;
        }
    }

    /// The end of the output.
    pub(crate) fn finish(&mut self, out: &mut Out<'_>) {
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => {
                let body = if self.after_call { self.held.trim_start() } else { &self.held };
                if !body.is_empty() {
                    out.content(body);
                }
            }
            State::Lead => {
                if !self.held.is_empty() {
                    out.content(&self.held);
                }
            }
            State::Call(mut scanner) => {
                let (calls, seed) = (&mut self.calls, self.id_seed);
                if let Step::Broken { text, rest } = scanner.finish(&mut |e| call_event(e, calls, seed, out)) {
                    self.broken(scanner.started(), &text, out);
                    if !rest.is_empty() {
                        out.content(&rest);
                    }
                }
            }
            State::Between => {}
        }
        self.held.clear();
    }
}

fn call_event(e: CallEvent<'_>, calls: &mut u32, seed: u64, out: &mut Out<'_>) {
    match e {
        CallEvent::Start { name } => {
            out.start(*calls, format!("call_{seed:016x}{:08x}", *calls), name);
            *calls += 1;
        }
        CallEvent::Args(delta) => out.args(*calls - 1, delta),
    }
}
