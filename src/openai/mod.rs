//! OpenAI API types: requests as clients send them, validated requests the frontend acts on,
//! and the JSON of responses and stream chunks.
//!
//! Layers parse before they act: bytes → [`ChatCompletionRequest`] / [`CompletionRequest`]
//! (serde; unknown fields are ignored as OpenAI clients send many) → [`Validated`] (every range
//! checked, defaults applied). Invariant: nothing past [`Validated`] re-checks client input.
//! On the way back, [`parse`] turns a model's raw text into reasoning, content and tool calls.

pub mod parse;
mod request;
mod response;

pub use request::{
    ChatCompletionRequest, CompletionRequest, Prompt, StopSpec, StreamOptions, ToolChoice, Validated, ValidationError,
    DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS,
};
pub use response::{ChunkWriter, ResponseKind, Usage, DONE};
