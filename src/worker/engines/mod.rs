//! Engines a worker can run, each an [`Engine`](crate::worker::Engine):
//! - [`mocker`]: kvgate's simulated engine (no GPU), with kvgate's own KV transfer plane;
//! - [`sglang`]: a stock SGLang server over its HTTP API and ZMQ KV events;
//! - [`vllm`]: a stock vLLM server likewise.
//!
//! The adapters share [`http`] (the client, SSE, start-up errors, the adapter's task) and
//! [`zmq_events`] (the engines' KV-event wire, decoded by the rules of `ENGINES.md` §6).

pub mod http;
pub mod mocker;
pub mod sglang;
pub mod vllm;
pub mod zmq_events;
