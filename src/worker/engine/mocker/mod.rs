//! The mocker: a simulated LLM engine with a paged KV cache, prefix caching, LRU eviction,
//! continuous batching with chunked prefill and preemption, and a step-time model — no GPU.
//!
//! Layout (data structures apart from the task that drives them):
//! - [`config`]: flags and their validation.
//! - [`kv_cache`]: blocks, prefix sharing, eviction, the KV events they cause.
//! - [`sequence`]: one request's tokens and block hashes.
//! - [`scheduler`]: which sequences compute what in each step.
//! - [`model`]: the deterministic mock language model.
//! - [`timing`]: how long a step takes.
//! - [`reply`]: one request's non-blocking reply stream.
//! - [`ring`]: the recent KV events kept for replay.
//! - [`disagg`]: prefill legs that push their KV, decode legs that wait for it.
//! - [`engine`]: the worker task: intake, step loop, replies, event publishing, load reports.
//!
//! Concurrency: all engine state is owned by one tokio task per worker ([`engine`]); nothing is
//! shared but the immutable corpus (`Arc`) and the channels.

pub mod config;
pub mod disagg;
pub mod engine;
pub mod kv_cache;
pub mod model;
pub mod reply;
pub mod ring;
pub mod scheduler;
pub mod sequence;
pub mod timing;

#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
pub(crate) mod test_util;

pub use config::{MockerArgs, MockerConfig, MockerConfigError};
