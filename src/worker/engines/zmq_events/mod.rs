//! Consuming the KV events of real engines (SGLang ≥ 0.5, vLLM ≥ 0.10): ZMQ PUB/SUB with msgpack
//! batches and a ROUTER replay endpoint, turned into kvgate [`KvEventKind`]s. The wire rules are
//! ENGINES.md §1b, §2b and §6; golden bytes in §7.
//!
//! Layers, each parsing before the next acts:
//! 1. [`decode`]: one message's frames → [`EngineBatch`] of engine-neutral [`EngineEvent`]s
//!    (pure; any input gives a value or a [`DecodeError`], never a panic), over a hand-rolled
//!    bounds-checked msgpack cursor (`msgpack`).
//! 2. [`convert`]: per (worker, rank) [`RankState`]: engine events → `KvEventKind`, with kvgate's
//!    own block hashes over the events' token ids ([`crate::kv::hash::BlockHasher`]).
//! 3. [`driver`]: the sequencing state machine (gaps, duplicates, replay, window overrun,
//!    publisher restart) over a [`Wire`] seam.
//! 4. [`subscriber`]: the tokio task per (engine, rank) with the real ZMQ wire; [`spawn`] it.
//!
//! Invariant: what a subscriber has published, applied in order by its consumer starting from
//! an empty worker, equals its [`RankState`]: a block is published as stored iff the state tracks
//! its engine hash, and every reset of the state (engine clear, restart, lost history, bound
//! reached) is published as `Cleared`. The first thing a subscriber publishes is `Cleared`.
//! Between resets the engine's batches are applied exactly once, in seq order.
//!
//! Each (engine, rank) stream is its own cache: give each its own kvgate `WorkerId` (the
//! `source` tag), since a `Cleared` or a removal on one rank says nothing about another.
//!
//! Concurrency: one task owns each stream's state (the wire, the [`RankState`], the sequence
//! cursor); nothing is shared but the [`Counters`] (atomics, written by the task, read by
//! whoever exports metrics) and the bounded output channel ([`EVENT_CHANNEL_CAPACITY`]).
//! Memory is bounded by the engine's cache (one map entry per GPU block it holds) and a hard
//! cap ([`DEFAULT_MAX_TRACKED_BLOCKS`]); replays are streamed, not buffered.
//!
//! [`KvEventKind`]: crate::contract::events::KvEventKind

pub mod convert;
pub mod decode;
pub mod driver;
mod msgpack;
pub mod subscriber;

#[cfg(test)]
mod conformance_tests;
#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod test_wire;
#[cfg(test)]
mod tests;

pub use convert::{BlockSizeError, DropReason, Outcome, RankState, Skip, DEFAULT_MAX_TRACKED_BLOCKS};
pub use decode::{
    decode_message, decode_payload, parse_replay_reply, parse_seq, DecodeError, EngineBatch, EngineEvent, Medium,
    ReplayReply, SEQ_END,
};
pub use driver::{Wire, WireEvent, MAX_RESYNC_ATTEMPTS};
pub use subscriber::{
    event_channel, spawn, Counters, SourcedEvent, SubscriberConfig, SubscriberHandle, Timeouts, EVENT_CHANNEL_CAPACITY,
};
