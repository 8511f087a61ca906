//! The worker: one engine behind kvgate's engine-neutral runtime.
//!
//! - [`engine`]: the [`Engine`] trait, the one seam between the runtime and what generates tokens.
//! - [`runtime`]: what every worker owes a frontend whatever its engine: intake and stop,
//!   contiguous KV event ids, the replay [`ring`] and the published [`mirror`] that answer
//!   "replay since N" and "dump", resets, the load watch ([`runtime::spawn`], [`WorkerHandle`]).
//! - [`reply`]: one request's non-blocking, coalescing reply stream (used by every engine).
//! - [`engines`]: the engines (the [`mocker`](engines::mocker) simulation, and adapters).
//!
//! Invariant: a worker's engine state is owned by its engine's task alone, its published event
//! state by its runtime task alone; the outside reaches them only through the bounded inbox,
//! each request's bounded reply channel, the event publisher, the `watch` of load and the
//! bounded control channel behind [`WorkerControl`] (see [`crate::contract::control`]).

pub mod engine;
pub mod engines;
pub mod load;
pub mod mirror;
pub mod reply;
pub mod ring;
pub mod runtime;

pub use crate::contract::control::{Recovery, WorkerControl, WorkerGoneError, CONTROL_QUEUE_DEPTH};
pub use engine::{Engine, EngineCard, EngineIo, EventSink, Intake};
pub use engines::mocker::{DisaggIo, Mocker, MockerArgs, MockerConfig, MockerConfigError};
pub use ring::{EventRing, EVENT_RING_CAPACITY, EVENT_RING_MAX_BLOCKS};
pub use runtime::{spawn, WorkerHandle};
