//! Memory accounting for the index: an estimate from lengths and capacities, cheap enough to
//! export as a metric (O(workers), no allocator query).
//!
//! How each part is counted:
//! - **Block table** (papaya): `slots × (8-byte entry pointer + 1 metadata byte)`, with `slots`
//!   estimated by papaya's own sizing rule (`next_power_of_two(peak_keys × 8/6)`) from the most
//!   keys the map has held (its table does not shrink until 1/8 full), plus one boxed
//!   `(SeqHash, WorkerSet)` entry per key (48 bytes) and the spilled worker sets' heap bytes
//!   (tracked exactly by the writer).
//! - **Per-worker counts** (the directory): 16 bytes per worker (id and count).
//! - **Writer** (std/hashbrown maps): `buckets × (entry + 1 control byte) + 16`, with `buckets`
//!   recovered exactly from `capacity()`; per worker its `engine → seq` and extra-name maps.
//!
//! Not counted: allocator rounding and headers (mimalloc's size classes fit 16- and 48-byte
//! boxes exactly), the table header, and retired sets or tables that papaya has not yet freed
//! (transient: freed once readers leave their guards). `benches/mooncake_replay.rs` checks the
//! estimate against a counting allocator.
//!
//! Concurrency: reads atomics and the writer's own maps; call from the writer's thread
//! ([`KvIndexWriter::memory_bytes`]) or any thread (the read side only).

use std::mem::{align_of, size_of};

use super::writer::WorkerState;
use super::{KvIndex, KvIndexWriter, WorkerSet};
use crate::contract::events::EngineHash;
use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;

/// The smallest table papaya allocates (slots).
const PAPAYA_MIN_SLOTS: usize = 32;
/// hashbrown's trailing control bytes (one SSE2 group).
const HASHBROWN_GROUP: usize = 16;

/// Size of papaya's boxed `Entry<K, V>` (`repr(C, align(8))`).
const fn papaya_entry<K, V>() -> usize {
    let align = max(8, max(align_of::<K>(), align_of::<V>()));
    let value_at = size_of::<K>().next_multiple_of(align_of::<V>());
    (value_at + size_of::<V>()).next_multiple_of(align)
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

const _: () = assert!(papaya_entry::<SeqHash, WorkerSet>() == 48);

/// Estimated slots of a papaya table that has held at most `peak` keys.
fn papaya_slots(peak: usize) -> usize {
    if peak == 0 {
        return 0;
    }
    (peak * 8 / 6).next_power_of_two().max(PAPAYA_MIN_SLOTS)
}

/// Bytes of a papaya map with `len` keys and at most `peak` ever.
fn papaya_bytes<K, V>(len: usize, peak: usize) -> usize {
    papaya_slots(peak) * (size_of::<usize>() + 1) + len * papaya_entry::<K, V>()
}

/// Bytes of a std (hashbrown) map whose `capacity()` is `capacity`.
pub(super) fn hashbrown_bytes<K, V>(capacity: usize) -> usize {
    let buckets = match capacity {
        0 => return 0,
        c if c < 8 => (c + 1).next_power_of_two(),
        c => c / 7 * 8,
    };
    buckets * (size_of::<(K, V)>() + 1) + HASHBROWN_GROUP
}

/// The shared read side: block table, entries, spilled sets, per-worker counts.
pub(super) fn read_side_bytes(index: &KvIndex) -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    let keys = index.counters.keys.load(Relaxed);
    let peak = index.counters.peak_keys.load(Relaxed).max(keys);
    let workers = index.cached.load().len();
    papaya_bytes::<SeqHash, WorkerSet>(keys, peak)
        + index.counters.set_heap_bytes.load(Relaxed)
        + workers * size_of::<(WorkerId, u64)>()
}

fn worker_bytes(state: &WorkerState) -> usize {
    hashbrown_bytes::<EngineHash, SeqHash>(state.engine_to_seq.capacity())
        + hashbrown_bytes::<SeqHash, u32>(state.extra_names.capacity())
}

/// Everything: the read side plus the writer's per-worker maps and tombstones.
pub(super) fn writer_bytes(writer: &KvIndexWriter) -> usize {
    let per_worker: usize = writer.workers.values().map(worker_bytes).sum();
    read_side_bytes(writer.index())
        + hashbrown_bytes::<WorkerId, WorkerState>(writer.workers.capacity())
        + per_worker
        + hashbrown_bytes::<WorkerId, ()>(writer.tombstones.set.capacity())
        + writer.tombstones.order.capacity() * size_of::<WorkerId>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashbrown_estimate_matches_capacity_rule() {
        let mut m: std::collections::HashMap<u64, u64> = Default::default();
        assert_eq!(hashbrown_bytes::<u64, u64>(m.capacity()), 0);
        m.insert(1, 1);
        // 3 usable slots in 4 buckets.
        assert_eq!(hashbrown_bytes::<u64, u64>(m.capacity()), 4 * 17 + 16);
        for i in 0..1000 {
            m.insert(i, i);
        }
        assert_eq!(m.capacity(), 1792);
        assert_eq!(hashbrown_bytes::<u64, u64>(m.capacity()), 2048 * 17 + 16);
    }
}
