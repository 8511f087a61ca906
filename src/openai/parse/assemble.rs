//! A whole response's message, folded from the events of its output.
//!
//! Invariant: every call in [`Message::tool_calls`] has arguments that parse as JSON; a call
//! the model broke is withdrawn and its text is content, where it was written.

use super::ParseEvent;

/// One tool call of a whole response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON text.
    pub arguments: String,
    /// The call's index in the output (before withdrawn calls were removed).
    index: u32,
}

/// The assistant message of a whole response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl Message {
    pub fn apply(&mut self, event: ParseEvent) {
        match event {
            ParseEvent::Reasoning(t) => self.reasoning.push_str(&t),
            ParseEvent::Content(t) => self.content.push_str(&t),
            ParseEvent::ToolCallStart { index, id, name } => {
                self.tool_calls.push(ToolCall { id, name, arguments: String::new(), index })
            }
            ParseEvent::ToolCallArgs { index, delta } => {
                if let Some(c) = self.tool_calls.iter_mut().rev().find(|c| c.index == index) {
                    c.arguments.push_str(&delta);
                }
            }
            ParseEvent::ToolCallInvalid { index, text } => {
                self.tool_calls.retain(|c| c.index != index);
                self.content.push_str(&text);
            }
        }
    }

    /// OpenAI's finish reason: `tool_calls` when the model stopped after calling tools.
    pub fn finish_reason(&self, reason: &'static str) -> &'static str {
        if reason == "stop" && !self.tool_calls.is_empty() {
            "tool_calls"
        } else {
            reason
        }
    }
}
