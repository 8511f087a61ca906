//! The frontend: the OpenAI-compatible endpoint in front of the workers.
//!
//! - [`state`]: what every shard shares: models, each model's worker group (one snapshot,
//!   swapped whole), the KV index, metrics ([`Frontend`]).
//! - [`control`]: the control plane (one tokio thread): discovery into worker groups, KV events
//!   into the index, gap recovery ([`control::recovery`]).
//! - [`data`]: the data plane: thread-per-core shards on io_uring ([`data::shards`]), each with
//!   its own listener and bounded connections ([`data::server`]), routes, the SSE body, and the
//!   one error → status mapping ([`data::error`]).
//! - [`index_state`]: each worker's index state (exact, recovering, approximate, blind).
//! - [`dashboard`]: the live routing page (`/dashboard`) and its SSE snapshots.
//! - [`replica`]: router replica sync: routing decisions shared with the other frontends.
//! - [`pipeline`]: one request on its shard: prepare (parse, template, tokenize) → dispatch
//!   (route, plan the legs, send) → generation (detokenize, stop strings, migration).
//!
//! Concurrency: the data plane never takes a lock shared with another core; the control plane
//! is the only writer of the index and of the worker groups, which shards read lock-free.

pub mod control;
pub mod dashboard;
pub mod data;
pub mod index_state;
pub mod pipeline;
pub mod replica;
pub mod state;

pub use index_state::{IndexState, KvTracking};
pub use state::*;
