//! KV events: what a worker publishes when its cache changes.
//!
//! Invariant: event ids are contiguous per worker (`event_id` = previous + 1), so a consumer
//! detects a gap and can ask the worker to replay or dump. Engine hashes are opaque ids that only
//! the publishing worker assigns; the index maps them back to sequence hashes for removals.
//!
//! Concurrency: plain values (`Send + Sync`, no interior mutability); each event is built by its
//! worker and moved or copied to whoever applies it.
//!
//! Wire form: every type here derives rkyv `Archive` with bytecheck; the archived twins
//! (`ArchivedKvEvent`, `ArchivedKvEventKind`, …) are read in place from validated bytes by
//! [`crate::contract::codec`], which owns the batch format. The serde derives serve JSON (dumps,
//! debugging) and are not the event plane's format.

use serde::{Deserialize, Serialize};

use super::WorkerId;

/// Hash of a block and every block before it: the router's identity for a cached prefix.
///
/// Archived (rkyv) as a little-endian u64: it travels in [`crate::contract::events`].
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq, Hash))]
pub struct SeqHash(pub u64);

/// Blocks one event may carry at most (a worker splits larger changes): every frame and batch
/// bound is derived from it.
pub const MAX_EVENT_BLOCKS: usize = 1 << 20;
/// Blocks one worker may hold at most (a dump's size bound).
pub const MAX_WORKER_BLOCKS: u64 = 1 << 22;

/// An engine's own id for one of its cached blocks (opaque to the router).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq, Hash))]
pub struct EngineHash(pub u64);

/// One stored block: its sequence hash (the router's id) and the engine's id for it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug))]
pub struct StoredBlock {
    pub seq_hash: SeqHash,
    pub engine_hash: EngineHash,
}

/// What changed in a worker's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum KvEventKind {
    /// Blocks filled, in prefix order; `parent` is the block before the first (None at the root).
    Stored { parent: Option<SeqHash>, blocks: Vec<StoredBlock> },
    /// Blocks evicted.
    Removed { engine_hashes: Vec<EngineHash> },
    /// The whole cache was reset.
    Cleared,
}

/// One event as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct KvEvent {
    pub worker: WorkerId,
    /// Contiguous per worker, starting at 1.
    pub event_id: u64,
    /// Microseconds since the Unix epoch, at the worker.
    pub timestamp_us: u64,
    pub kind: KvEventKind,
}
