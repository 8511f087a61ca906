//! The data plane: shards and their HTTP layer.
//!
//! - [`shards`]: thread-per-core monoio shards on io_uring, SO_REUSEPORT listeners, shutdown.
//! - [`server`]: per-shard accept loop (bounded connections); hyper HTTP/1.1 over monoio-compat.
//! - [`routes`]: path dispatch and the small routes (`/health`, `/live`, `/v1/models`, `/metrics`,
//!   the page of [`crate::frontend::dashboard`]);
//!   generation, `/tokenize` and `/detokenize` go to [`crate::frontend::pipeline`].
//! - [`body`]: response bodies (full, or SSE).
//! - [`error`]: [`error::ApiError`], the one mapping from failure to HTTP status.
//! - [`auth`]: API keys (`--api-key`), checked before any route runs.
//!
//! Concurrency: everything here runs on the shard that accepted the connection; per-shard state
//! ([`ShardCtx`]) is `!Sync` and never leaves its thread.

pub mod auth;
pub mod body;
pub mod error;
pub mod routes;
pub mod server;
pub mod shards;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use rand::rngs::SmallRng;

use crate::kv::SeqHash;
use rand::SeedableRng;

/// Per-shard state: the shard's id, its random source, request ids, in-flight count, the API
/// keys, and where the shard is in a drain.
pub struct ShardCtx {
    pub id: usize,
    /// The configured API keys (shared, read-only).
    pub auth: Arc<auth::ApiKeys>,
    /// Set when shutdown begins: new requests are refused (503) and `/health` says `draining`.
    pub draining: Cell<bool>,
    /// Set when `--drain-timeout-s` has passed: streams still running end with an error event
    /// and `[DONE]` at their next chunk.
    pub cut: Cell<bool>,
    pub rng: RefCell<SmallRng>,
    next_request: Cell<u64>,
    /// Requests being served on this shard (drained at shutdown).
    pub inflight: Cell<usize>,
    /// Reused per request for the prompt's block hashes (no allocation per request).
    pub seq_scratch: RefCell<Vec<SeqHash>>,
}

impl ShardCtx {
    pub fn new(id: usize, auth: Arc<auth::ApiKeys>) -> Self {
        // Request ids: shard in the top byte, a per-process random start below, so ids from
        // different shards and restarts do not collide in logs.
        let start = rand::random::<u64>() & 0x00ff_ffff_0000_0000;
        Self {
            id,
            auth,
            draining: Cell::new(false),
            cut: Cell::new(false),
            rng: RefCell::new(SmallRng::from_os_rng()),
            next_request: Cell::new(start),
            inflight: Cell::new(0),
            seq_scratch: RefCell::new(Vec::with_capacity(1024)),
        }
    }

    pub fn next_request_id(&self) -> u64 {
        let n = self.next_request.get().wrapping_add(1);
        self.next_request.set(n);
        ((self.id as u64) << 56) | (n & 0x00ff_ffff_ffff_ffff)
    }
}

/// Counts a request as in flight on its shard until dropped.
pub struct InflightGuard(pub(crate) Rc<ShardCtx>);

impl InflightGuard {
    pub fn new(ctx: &Rc<ShardCtx>) -> Self {
        ctx.inflight.set(ctx.inflight.get() + 1);
        Self(ctx.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.set(self.0.inflight.get() - 1);
    }
}
