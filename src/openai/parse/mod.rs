//! A model's raw text → what OpenAI clients expect: reasoning apart from content
//! (`reasoning_content`), and tool calls (`tool_calls`) apart from both.
//!
//! Layers: text deltas (after detokenization and stop strings) → [`OutputParser`] (a reasoning
//! splitter, [`reasoning`], then a tool-call splitter, [`tools`], over the answer) → typed
//! [`ParseEvent`]s → SSE chunks, or a whole [`Message`] ([`assemble`]).
//!
//! Invariant: the parsers are pure state machines over text. Whatever the cut of the text into
//! deltas (a marker may end one delta and begin the next), they emit the same reasoning,
//! content and calls, no marker reaches reasoning or content, and text that is not a
//! well-formed call is returned as content, never an error. Held-back text is bounded by a
//! marker's length, except inside a call (the call's own text).
//!
//! Concurrency: one [`OutputParser`] per request, owned by its generation; the choice of parsers
//! ([`ParserFlags`], from the command line) is resolved once per request against the model's
//! chat template.

pub mod assemble;
mod call;
mod marker;
mod reasoning;
mod tools;

use crate::openai::ToolChoice;

pub use assemble::{Message, ToolCall};

/// One piece of a parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseEvent {
    /// Text inside the model's think block.
    Reasoning(String),
    /// Answer text.
    Content(String),
    /// A tool call begins; its arguments follow.
    ToolCallStart { index: u32, id: String, name: String },
    /// More of a call's arguments (a JSON text, streamed as written).
    ToolCallArgs { index: u32, delta: String },
    /// A call announced earlier turned out malformed (its arguments are not JSON, or the output
    /// ended inside them): `text` is what the model wrote for it. A whole response shows it as
    /// content instead of the call; a stream cannot take back what it sent.
    ToolCallInvalid { index: u32, text: String },
}

/// `--reasoning-parser` (vLLM's names).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningFlag {
    /// `qwen3` when the model's chat template mentions `<think>`, else none.
    #[default]
    Auto,
    None,
    /// An optional `<think>…</think>` block that opens the output (Qwen3).
    Qwen3,
    /// Reasoning from the first token to `</think>` (DeepSeek-R1).
    #[value(name = "deepseek_r1", alias = "deepseek-r1")]
    DeepseekR1,
}

/// `--tool-call-parser` (vLLM's names).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallFlag {
    /// `hermes` when the model's chat template mentions `<tool_call>`, else none.
    #[default]
    Auto,
    None,
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>` (Qwen2.5, Qwen3, Hermes).
    Hermes,
    /// `{"name": …, "parameters": …}` as the whole answer (Llama 3.1+).
    #[value(name = "llama3_json", alias = "llama3-json")]
    Llama3Json,
}

/// A reasoning format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningKind {
    Qwen3,
    DeepseekR1,
}

/// A tool-call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallKind {
    Hermes,
    Llama3Json,
}

/// The parser flags of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParserFlags {
    pub reasoning: ReasoningFlag,
    pub tool_call: ToolCallFlag,
}

/// What a model's chat template teaches it to write (the evidence `auto` goes by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TemplateConventions {
    /// The template mentions `<think>`.
    pub think: bool,
    /// The template mentions `<tool_call>`.
    pub tool_call: bool,
}

impl ParserFlags {
    /// The parsers for a model whose chat template follows `conventions`.
    pub fn resolve(&self, conventions: TemplateConventions) -> (Option<ReasoningKind>, Option<ToolCallKind>) {
        let reasoning = match self.reasoning {
            ReasoningFlag::Auto => conventions.think.then_some(ReasoningKind::Qwen3),
            ReasoningFlag::None => None,
            ReasoningFlag::Qwen3 => Some(ReasoningKind::Qwen3),
            ReasoningFlag::DeepseekR1 => Some(ReasoningKind::DeepseekR1),
        };
        let tool_call = match self.tool_call {
            ToolCallFlag::Auto => conventions.tool_call.then_some(ToolCallKind::Hermes),
            ToolCallFlag::None => None,
            ToolCallFlag::Hermes => Some(ToolCallKind::Hermes),
            ToolCallFlag::Llama3Json => Some(ToolCallKind::Llama3Json),
        };
        (reasoning, tool_call)
    }
}

/// How a rendered prompt leaves the think block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptEnd {
    /// The prompt opened the block (`…<think>\n`): the output starts in reasoning.
    InThink,
    /// The prompt closed an empty block (Qwen3's `enable_thinking: false`).
    AfterThink,
    Other,
}

impl PromptEnd {
    pub fn of(prompt: &str) -> Self {
        let t = prompt.trim_end();
        if t.ends_with(reasoning::THINK_OPEN) {
            PromptEnd::InThink
        } else if t.ends_with(reasoning::THINK_CLOSE) {
            PromptEnd::AfterThink
        } else {
            PromptEnd::Other
        }
    }
}

/// What one request's parser needs.
#[derive(Debug, Clone)]
pub struct ParserSpec {
    pub reasoning: Option<ReasoningKind>,
    /// Present only when the request offers tools (and `tool_choice` is not `none`).
    pub tool_call: Option<ToolCallKind>,
    pub prompt_end: PromptEnd,
    /// Text appended to the prompt as the start of the model's answer (see [`forced_prefill`]);
    /// parsed as if the model had written it.
    pub prefill: String,
    /// Makes the calls' ids (`call_…`) unique across requests.
    pub id_seed: u64,
}

/// The start of an answer that makes the model call a tool (`tool_choice: "required"`) or a
/// given one (`{"type": "function", …}`): the model continues a call already begun. With a
/// reasoning parser the think block is closed first (Qwen3's non-thinking form). Empty for
/// other choices.
pub fn forced_prefill(tool_call: ToolCallKind, choice: &ToolChoice, reasoning: bool, prompt_end: PromptEnd) -> String {
    let call = match (tool_call, choice) {
        (_, ToolChoice::None | ToolChoice::Auto) => return String::new(),
        (ToolCallKind::Hermes, ToolChoice::Required) => "<tool_call>\n".to_string(),
        (ToolCallKind::Hermes, ToolChoice::Function(name)) => {
            format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", Value::from(name.as_str()))
        }
        (ToolCallKind::Llama3Json, ToolChoice::Required) => "{\"name\": \"".to_string(),
        (ToolCallKind::Llama3Json, ToolChoice::Function(name)) => {
            format!("{{\"name\": {}, \"parameters\": ", Value::from(name.as_str()))
        }
    };
    let think = match (reasoning, prompt_end) {
        (false, _) | (true, PromptEnd::AfterThink) => "",
        (true, PromptEnd::InThink) => "</think>\n\n",
        (true, PromptEnd::Other) => "<think>\n\n</think>\n\n",
    };
    format!("{think}{call}")
}

use serde_json::Value;

/// One request's output parser: text deltas in, [`ParseEvent`]s out.
#[derive(Debug)]
pub struct OutputParser {
    reasoning: Option<reasoning::ReasoningSplitter>,
    tools: Option<tools::ToolSplitter>,
    /// Events of the prefill, sent with the first delta.
    pending: Vec<ParseEvent>,
    reasoning_tokens: u32,
    /// Tokens read while it was not yet known whether the output reasons.
    undecided_tokens: u32,
}

impl OutputParser {
    /// `None` when the request needs no parsing.
    pub fn new(spec: ParserSpec) -> Option<Self> {
        if spec.reasoning.is_none() && spec.tool_call.is_none() {
            return None;
        }
        let reasoning = spec.reasoning.map(|kind| {
            let open = match spec.prompt_end {
                PromptEnd::InThink => true,
                PromptEnd::AfterThink => false,
                PromptEnd::Other => kind == ReasoningKind::DeepseekR1,
            };
            reasoning::ReasoningSplitter::new(open)
        });
        let tools = spec.tool_call.map(|k| tools::ToolSplitter::new(k, spec.id_seed));
        let mut p = Self { reasoning, tools, pending: Vec::new(), reasoning_tokens: 0, undecided_tokens: 0 };
        let mut pending = Vec::new();
        p.push(&spec.prefill, 0, &mut pending);
        p.pending = pending;
        Some(p)
    }

    /// Whether reasoning is parsed (a response then carries `reasoning_content`).
    pub fn parses_reasoning(&self) -> bool {
        self.reasoning.is_some()
    }

    /// Feeds the text of `tokens` generated tokens; appends what is decided to `out`.
    pub fn push(&mut self, text: &str, tokens: u32, out: &mut Vec<ParseEvent>) {
        out.append(&mut self.pending);
        let mut o = Out(out);
        let Self { reasoning, tools, .. } = self;
        let Some(r) = reasoning else {
            if let Some(t) = tools {
                t.push(text, &mut o);
            }
            return;
        };
        let before = r.phase();
        r.push(text, &mut |part, s| route(part, s, tools, &mut o));
        self.account(before, tokens);
    }

    /// The end of the output: whatever was held is decided.
    pub fn finish(&mut self, out: &mut Vec<ParseEvent>) {
        out.append(&mut self.pending);
        let mut o = Out(out);
        let Self { reasoning, tools, .. } = self;
        if let Some(r) = reasoning {
            r.finish(&mut |part, s| route(part, s, tools, &mut o));
        }
        if let Some(t) = tools {
            t.finish(&mut o);
        }
        self.undecided_tokens = 0;
    }

    /// Tokens generated inside the think block, its markers included.
    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    fn account(&mut self, before: reasoning::Phase, tokens: u32) {
        use reasoning::Phase;
        let Some(r) = &self.reasoning else { return };
        let reasoned = match (before, r.phase()) {
            (_, Phase::Reasoning) | (Phase::Reasoning, Phase::Done) => true,
            (Phase::Undecided, Phase::Done) => r.opened(),
            (_, Phase::Undecided) => {
                self.undecided_tokens += tokens;
                return;
            }
            (Phase::Done, Phase::Done) => false,
        };
        let undecided = std::mem::take(&mut self.undecided_tokens);
        if reasoned {
            self.reasoning_tokens += tokens + undecided;
        }
    }
}

fn route(part: reasoning::Part, s: &str, tools: &mut Option<tools::ToolSplitter>, out: &mut Out<'_>) {
    match (part, tools) {
        (reasoning::Part::Reasoning, _) => out.reasoning(s),
        (reasoning::Part::Content, Some(t)) => t.push(s, out),
        (reasoning::Part::Content, None) => out.content(s),
    }
}

/// The event list being written, merging adjacent pieces of the same kind.
pub(crate) struct Out<'a>(&'a mut Vec<ParseEvent>);

impl Out<'_> {
    pub(crate) fn content(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(ParseEvent::Content(c)) => c.push_str(s),
            _ => self.0.push(ParseEvent::Content(s.to_string())),
        }
    }

    pub(crate) fn reasoning(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(ParseEvent::Reasoning(r)) => r.push_str(s),
            _ => self.0.push(ParseEvent::Reasoning(s.to_string())),
        }
    }

    pub(crate) fn start(&mut self, index: u32, id: String, name: String) {
        self.0.push(ParseEvent::ToolCallStart { index, id, name });
    }

    pub(crate) fn args(&mut self, index: u32, s: &str) {
        match self.0.last_mut() {
            Some(ParseEvent::ToolCallArgs { index: i, delta }) if *i == index => delta.push_str(s),
            _ => self.0.push(ParseEvent::ToolCallArgs { index, delta: s.to_string() }),
        }
    }

    pub(crate) fn invalid(&mut self, index: u32, text: String) {
        self.0.push(ParseEvent::ToolCallInvalid { index, text });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_template() {
        let f = ParserFlags::default();
        let qwen = TemplateConventions { think: true, tool_call: true };
        assert_eq!(f.resolve(qwen), (Some(ReasoningKind::Qwen3), Some(ToolCallKind::Hermes)));
        assert_eq!(f.resolve(TemplateConventions::default()), (None, None));
        let f = ParserFlags { reasoning: ReasoningFlag::DeepseekR1, tool_call: ToolCallFlag::None };
        assert_eq!(f.resolve(qwen), (Some(ReasoningKind::DeepseekR1), None));
    }

    #[test]
    fn prompt_ends_and_prefills() {
        assert_eq!(PromptEnd::of("<|im_start|>assistant\n<think>\n"), PromptEnd::InThink);
        assert_eq!(PromptEnd::of("<|im_start|>assistant\n<think>\n\n</think>\n\n"), PromptEnd::AfterThink);
        assert_eq!(PromptEnd::of("<|im_start|>assistant\n"), PromptEnd::Other);
        let named = ToolChoice::Function("get_weather".into());
        assert_eq!(
            forced_prefill(ToolCallKind::Hermes, &named, true, PromptEnd::Other),
            "<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
        );
        assert_eq!(
            forced_prefill(ToolCallKind::Hermes, &ToolChoice::Required, false, PromptEnd::Other),
            "<tool_call>\n"
        );
        assert_eq!(forced_prefill(ToolCallKind::Hermes, &ToolChoice::Auto, true, PromptEnd::Other), "");
    }

    #[test]
    fn reasoning_tokens_count_the_block() {
        let spec = ParserSpec {
            reasoning: Some(ReasoningKind::Qwen3),
            tool_call: None,
            prompt_end: PromptEnd::Other,
            prefill: String::new(),
            id_seed: 0,
        };
        let mut p = OutputParser::new(spec.clone()).unwrap();
        let mut out = Vec::new();
        for t in ["<think>", "\n", "a", "b", "\n", "</think>", "\n\n", "Hi", "!"] {
            p.push(t, 1, &mut out);
        }
        p.finish(&mut out);
        assert_eq!(p.reasoning_tokens(), 6);
        let mut p = OutputParser::new(spec).unwrap();
        for t in ["  ", "Hi"] {
            p.push(t, 1, &mut out);
        }
        assert_eq!(p.reasoning_tokens(), 0);
    }
}
