//! Response bodies and SSE chunks, in OpenAI's JSON shapes.
//!
//! Invariant: every chunk is one complete SSE event (`data: {...}\n\n`); a stream always ends
//! with `data: [DONE]\n\n`, after an error event if it failed.

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

use super::parse::{Message, ParseEvent};

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    Chat,
    Completion,
}

/// Token accounting of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
    /// Of `completion_tokens`, those inside the model's think block.
    pub reasoning_tokens: u32,
}

impl Usage {
    fn to_json(self) -> serde_json::Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
            "completion_tokens_details": { "reasoning_tokens": self.reasoning_tokens },
        })
    }
}

/// Builds the chunks of one response (id, creation time and model fixed per request).
pub struct ChunkWriter {
    kind: ResponseKind,
    id: String,
    created: u64,
    model: String,
}

#[derive(Serialize, Default)]
struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

/// One entry of `delta.tool_calls`: the first of a call carries its id, type and name.
#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    delta: ChatDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
}

fn sse(json: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(json.len() + 8);
    v.extend_from_slice(b"data: ");
    v.extend_from_slice(json);
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}

/// The last event of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

impl ChunkWriter {
    pub fn new(kind: ResponseKind, request_id: u64, model: &str) -> Self {
        let prefix = match kind {
            ResponseKind::Chat => "chatcmpl",
            ResponseKind::Completion => "cmpl",
        };
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { kind, id: format!("{prefix}-{request_id:016x}"), created, model: model.to_string() }
    }

    fn chunk(&self, role: Option<&str>, text: Option<&str>, finish: Option<&str>) -> Bytes {
        match self.kind {
            ResponseKind::Chat => self.chat_chunk(ChatDelta { role, content: text, ..ChatDelta::default() }, finish),
            ResponseKind::Completion => {
                let json = serde_json::to_vec(&Chunk {
                    id: &self.id,
                    object: "text_completion",
                    created: self.created,
                    model: &self.model,
                    choices: [TextChoice { index: 0, text: text.unwrap_or(""), logprobs: None, finish_reason: finish }],
                });
                sse(&json.expect("chunk serialization cannot fail"))
            }
        }
    }

    fn chat_chunk(&self, delta: ChatDelta<'_>, finish: Option<&str>) -> Bytes {
        let json = serde_json::to_vec(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: [ChatChoice { index: 0, delta, logprobs: None, finish_reason: finish }],
        });
        sse(&json.expect("chunk serialization cannot fail"))
    }

    /// The chunk of one parsed event (chat streams); none for a withdrawn call, which a stream
    /// cannot take back.
    pub fn event_chunk(&self, event: &ParseEvent) -> Option<Bytes> {
        let delta = match event {
            ParseEvent::Content(t) => ChatDelta { content: Some(t), ..ChatDelta::default() },
            ParseEvent::Reasoning(t) => ChatDelta { reasoning_content: Some(t), ..ChatDelta::default() },
            ParseEvent::ToolCallStart { index, id, name } => ChatDelta {
                tool_calls: Some([ToolCallDelta {
                    index: *index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta { name: Some(name), arguments: "" },
                }]),
                ..ChatDelta::default()
            },
            ParseEvent::ToolCallArgs { index, delta } => ChatDelta {
                tool_calls: Some([ToolCallDelta {
                    index: *index,
                    id: None,
                    kind: None,
                    function: FunctionDelta { name: None, arguments: delta },
                }]),
                ..ChatDelta::default()
            },
            ParseEvent::ToolCallInvalid { .. } => return None,
        };
        Some(self.chat_chunk(delta, None))
    }

    /// A whole chat response whose output was parsed: `reasoning_content` (when `reasoning`
    /// is parsed; null if the model did not reason), `content` (null when only tools were
    /// called) and `tool_calls`.
    pub fn full_chat_response(&self, m: &Message, reasoning: bool, finish_reason: &str, usage: Usage) -> Vec<u8> {
        let mut message = json!({"role": "assistant", "content": m.content});
        if m.content.is_empty() && !m.tool_calls.is_empty() {
            message["content"] = serde_json::Value::Null;
        }
        if reasoning {
            message["reasoning_content"] =
                if m.reasoning.is_empty() { serde_json::Value::Null } else { m.reasoning.clone().into() };
        }
        if !m.tool_calls.is_empty() {
            let calls: Vec<serde_json::Value> = m
                .tool_calls
                .iter()
                .map(
                    |c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}),
                )
                .collect();
            message["tool_calls"] = calls.into();
        }
        let v = json!({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage.to_json(),
        });
        serde_json::to_vec(&v).expect("json")
    }

    /// The first chunk of a chat stream (announces the assistant role); None for completions.
    pub fn role_chunk(&self) -> Option<Bytes> {
        (self.kind == ResponseKind::Chat).then(|| self.chunk(Some("assistant"), Some(""), None))
    }

    /// A chunk carrying newly generated text.
    pub fn delta_chunk(&self, text: &str) -> Bytes {
        self.chunk(None, Some(text), None)
    }

    /// The chunk that carries the finish reason (`stop`, `length`, `tool_calls`).
    pub fn finish_chunk(&self, reason: &str) -> Bytes {
        match self.kind {
            ResponseKind::Chat => self.chunk(None, None, Some(reason)),
            ResponseKind::Completion => self.chunk(None, Some(""), Some(reason)),
        }
    }

    /// The usage chunk of `stream_options.include_usage` (empty choices, as OpenAI sends it).
    pub fn usage_chunk(&self, usage: Usage) -> Bytes {
        let object = match self.kind {
            ResponseKind::Chat => "chat.completion.chunk",
            ResponseKind::Completion => "text_completion",
        };
        let v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage.to_json()});
        sse(&serde_json::to_vec(&v).expect("json"))
    }

    /// An error event inside a stream that has already started.
    pub fn error_event(message: &str, kind: &str) -> Bytes {
        let v = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
        sse(&serde_json::to_vec(&v).expect("json"))
    }

    /// A whole non-streaming response body.
    pub fn full_response(&self, text: &str, finish_reason: &str, usage: Usage) -> Vec<u8> {
        let v = match self.kind {
            ResponseKind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish_reason}],
                "usage": usage.to_json(),
            }),
            ResponseKind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
                "usage": usage.to_json(),
            }),
        };
        serde_json::to_vec(&v).expect("json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_chunks_are_sse_events() {
        let w = ChunkWriter::new(ResponseKind::Chat, 7, "m");
        let c = w.delta_chunk("hi \"x\"");
        let s = std::str::from_utf8(&c).unwrap();
        assert!(s.starts_with("data: {") && s.ends_with("}\n\n"));
        let v: serde_json::Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], "hi \"x\"");
        assert_eq!(v["object"], "chat.completion.chunk");
        let u = w.usage_chunk(Usage { prompt_tokens: 15, completion_tokens: 3, cached_tokens: 0, reasoning_tokens: 2 });
        let s = std::str::from_utf8(&u).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 18);
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 2);
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
    }

    fn chunk_json(b: &Bytes) -> serde_json::Value {
        let s = std::str::from_utf8(b).unwrap();
        serde_json::from_str(&s[6..s.len() - 2]).unwrap()
    }

    /// Tool calls stream as OpenAI streams them: the first entry of a call has its id, type
    /// and name (and empty arguments), the next ones only arguments; all with the call's index.
    #[test]
    fn parsed_events_in_openai_shapes() {
        let w = ChunkWriter::new(ResponseKind::Chat, 7, "m");
        let v = chunk_json(&w.event_chunk(&ParseEvent::Reasoning("hm".into())).unwrap());
        assert_eq!(v["choices"][0]["delta"], json!({"reasoning_content": "hm"}));
        let start = ParseEvent::ToolCallStart { index: 1, id: "call_1".into(), name: "f".into() };
        let v = chunk_json(&w.event_chunk(&start).unwrap());
        assert_eq!(
            v["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 1, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]})
        );
        let args = ParseEvent::ToolCallArgs { index: 1, delta: "{\"a\"".into() };
        let v = chunk_json(&w.event_chunk(&args).unwrap());
        assert_eq!(
            v["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"a\""}}]})
        );
        assert!(w.event_chunk(&ParseEvent::ToolCallInvalid { index: 1, text: "x".into() }).is_none());

        let mut m = Message::default();
        m.apply(start);
        m.apply(ParseEvent::ToolCallArgs { index: 1, delta: "{}".into() });
        let body = w.full_chat_response(&m, true, m.finish_reason("stop"), Usage::default());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(
            choice["message"],
            json!({"role": "assistant", "content": null, "reasoning_content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
    }
}
