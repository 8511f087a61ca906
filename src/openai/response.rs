//! Response bodies and SSE chunks, in OpenAI's JSON shapes.
//!
//! Invariant: every chunk is one complete SSE event (`data: {...}\n\n`); a stream always ends
//! with `data: [DONE]\n\n`, after an error event if it failed.

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

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
}

impl Usage {
    fn to_json(self) -> serde_json::Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
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

#[derive(Serialize)]
struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
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
        let json = match self.kind {
            ResponseKind::Chat => serde_json::to_vec(&Chunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: [ChatChoice {
                    index: 0,
                    delta: ChatDelta { role, content: text },
                    logprobs: None,
                    finish_reason: finish,
                }],
            }),
            ResponseKind::Completion => serde_json::to_vec(&Chunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: [TextChoice { index: 0, text: text.unwrap_or(""), logprobs: None, finish_reason: finish }],
            }),
        };
        sse(&json.expect("chunk serialization cannot fail"))
    }

    /// The first chunk of a chat stream (announces the assistant role); None for completions.
    pub fn role_chunk(&self) -> Option<Bytes> {
        (self.kind == ResponseKind::Chat).then(|| self.chunk(Some("assistant"), Some(""), None))
    }

    /// A chunk carrying newly generated text.
    pub fn delta_chunk(&self, text: &str) -> Bytes {
        self.chunk(None, Some(text), None)
    }

    /// The chunk that carries the finish reason (`stop` / `length`).
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
        let u = w.usage_chunk(Usage { prompt_tokens: 15, completion_tokens: 3, cached_tokens: 0 });
        let s = std::str::from_utf8(&u).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 18);
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
    }
}
