//! Engines a worker can run, each an [`Engine`](crate::worker::Engine):
//! - [`mocker`]: kvgate's simulated engine (no GPU), with kvgate's own KV transfer plane;
//! - [`sglang`]: a stock SGLang server over its HTTP API and ZMQ KV events;
//! - [`vllm`]: a stock vLLM server likewise;
//! - [`llama_cpp`]: llama.cpp's `llama-server` over its native `/completion` (no KV events);
//! - [`openai`]: any server taking token-id prompts on OpenAI's `/v1/completions` (no KV events).
//!
//! The adapters share [`http`] (the client, SSE, start-up errors, the adapter's task) and
//! [`zmq_events`] (the engines' KV-event wire, decoded by the rules of `ENGINES.md` §6).

pub mod http;
pub mod llama_cpp;
pub mod mocker;
pub mod openai;
pub mod sglang;
pub mod vllm;
pub mod zmq_events;
