//! Per-worker load as the frontend books it, and the guard that releases a booking.
//!
//! Invariant: each slot of a [`WorkerLoad`] is the sum of the live [`LoadGuard`]s booked by that
//! shard, so it never underflows, and the totals are the sum of the slots.
//!
//! Concurrency: one [`WorkerLoad`] per live worker is shared (`Arc`) by every shard. Shard `i`
//! writes only slot `i` (each slot padded to its own cache line, so shards never contend on a
//! line or a lock); readers sum all slots with `Relaxed` loads, a momentary view that may be a
//! few bookings stale. Writes are `fetch_add`/`fetch_sub` rather than load+store, so a guard
//! dropped on another thread (it is `Send`) still cannot lose an update.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::contract::WorkerId;

/// The most data-plane shards a frontend runs (one slot each per worker): 64 cores per process
/// covers current hosts, and costs 64 × 128 B = 8 KiB per worker.
pub const MAX_SHARDS: usize = 64;

const _: () = assert!(MAX_SHARDS > 0 && MAX_SHARDS <= 1024, "slots are a per-worker array");

#[derive(Default)]
struct Slot {
    prefill_tokens: AtomicU64,
    decode_blocks: AtomicU64,
    requests: AtomicU64,
}

/// See the module doc.
pub struct WorkerLoad {
    slots: [CachePadded<Slot>; MAX_SHARDS],
}

impl WorkerLoad {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { slots: std::array::from_fn(|_| CachePadded::new(Slot::default())) })
    }

    fn sum(&self, field: impl Fn(&Slot) -> &AtomicU64) -> u64 {
        self.slots.iter().map(|s| field(s).load(Relaxed)).sum()
    }

    /// Prompt tokens booked and not yet prefilled (first token not yet seen).
    pub fn active_prefill_tokens(&self) -> u64 {
        self.sum(|s| &s.prefill_tokens)
    }

    /// KV blocks booked by requests in flight.
    pub fn active_decode_blocks(&self) -> u64 {
        self.sum(|s| &s.decode_blocks)
    }

    /// Requests in flight.
    pub fn active_requests(&self) -> u64 {
        self.sum(|s| &s.requests)
    }
}

/// What one request books on its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Booking {
    pub prefill_tokens: u64,
    pub decode_blocks: u64,
}

/// Books load at selection and releases it in `Drop`, on every exit path (finish, error,
/// cancellation, client disconnect).
pub struct LoadGuard {
    load: Arc<WorkerLoad>,
    worker: WorkerId,
    shard: usize,
    booking: Booking,
    prefill_released: bool,
}

impl LoadGuard {
    /// Books `booking` on `load` from `shard` (which must be `< MAX_SHARDS`).
    pub fn book(load: Arc<WorkerLoad>, worker: WorkerId, shard: usize, booking: Booking) -> Self {
        assert!(shard < MAX_SHARDS, "shard {shard} >= MAX_SHARDS (config validation missed it)");
        let slot = &load.slots[shard];
        slot.prefill_tokens.fetch_add(booking.prefill_tokens, Relaxed);
        slot.decode_blocks.fetch_add(booking.decode_blocks, Relaxed);
        slot.requests.fetch_add(1, Relaxed);
        Self { load, worker, shard, booking, prefill_released: false }
    }

    /// Releases the prefill tokens once the first token arrived; idempotent.
    pub fn prefill_done(&mut self) {
        if !self.prefill_released {
            self.prefill_released = true;
            self.load.slots[self.shard].prefill_tokens.fetch_sub(self.booking.prefill_tokens, Relaxed);
        }
    }

    pub fn worker(&self) -> WorkerId {
        self.worker
    }

    pub fn booking(&self) -> Booking {
        self.booking
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.prefill_done();
        let slot = &self.load.slots[self.shard];
        slot.decode_blocks.fetch_sub(self.booking.decode_blocks, Relaxed);
        slot.requests.fetch_sub(1, Relaxed);
    }
}

impl std::fmt::Debug for LoadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadGuard")
            .field("worker", &self.worker)
            .field("shard", &self.shard)
            .field("booking", &self.booking)
            .field("prefill_released", &self.prefill_released)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(l: &WorkerLoad) -> (u64, u64, u64) {
        (l.active_prefill_tokens(), l.active_decode_blocks(), l.active_requests())
    }

    #[test]
    fn guards_release_on_drop_across_shards() {
        let load = WorkerLoad::new();
        let b = Booking { prefill_tokens: 100, decode_blocks: 7 };
        let mut g1 = LoadGuard::book(load.clone(), WorkerId(1), 0, b);
        let g2 = LoadGuard::book(load.clone(), WorkerId(1), MAX_SHARDS - 1, b);
        assert_eq!(snapshot(&load), (200, 14, 2));
        g1.prefill_done();
        g1.prefill_done();
        assert_eq!(snapshot(&load), (100, 14, 2));
        drop(g1);
        assert_eq!(snapshot(&load), (100, 7, 1));
        drop(g2);
        assert_eq!(snapshot(&load), (0, 0, 0));
    }

    #[test]
    fn guard_dropped_on_another_thread_releases() {
        let load = WorkerLoad::new();
        let g = LoadGuard::book(load.clone(), WorkerId(1), 3, Booking { prefill_tokens: 5, decode_blocks: 1 });
        std::thread::spawn(move || drop(g)).join().unwrap();
        assert_eq!(snapshot(&load), (0, 0, 0));
    }
}
