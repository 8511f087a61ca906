//! The frontend ↔ worker contract: everything both sides must agree on, and nothing else.
//!
//! - [`messages`]: a request as a worker receives it ([`GenerateRequest`], its disaggregation
//!   leg), what it streams back ([`WorkerOutput`], errors as data: [`WorkerError`] says who is
//!   at fault and whether a retry helps), its load ([`LoadReport`]), the engine kinds and how
//!   their disaggregated legs run ([`DisaggStyle`]).
//! - [`worker`]: what a worker registers in discovery ([`WorkerInfo`]).
//! - [`events`]: KV events ([`events::KvEvent`]) and their newtypes, and [`codec`], their ONE
//!   wire encoding (rkyv, read in place), used by the event plane and by recovery alike.
//! - [`control`]: recovering a consumer that missed events ("replay since N" or "dump") and
//!   resetting a worker's cache; [`control::RecoverySource`] is the frontend's seam for it.
//! - [`frame`]: the request plane's frames (TCP between frontend and worker).
//! - [`trace`]: the W3C trace context a request carries to its workers and their engines.
//!
//! Invariant: this module depends on nothing else of kvgate; every other layer depends on it.
//! Concurrency: plain values and bounded channels only.

pub mod codec;
pub mod control;
pub mod events;
pub mod frame;
pub mod messages;
pub mod trace;
pub mod worker;

pub use messages::*;
pub use trace::TraceContext;
pub use worker::{Target, WorkerInfo};
