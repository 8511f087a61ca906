//! Admission: between preprocessing and dispatch, a request waits while every candidate worker
//! of its model is busy (issue #15).
//!
//! Busy is Dynamo's test (`--active-decode-blocks-threshold`, a fraction 0..=1 of a worker's KV
//! blocks; `--active-prefill-tokens-threshold`, prompt tokens not yet prefilled), asked of one
//! function, [`WorkerEntry::is_busy`], over the load the frontend knows of each worker. Unlike
//! Dynamo, which refuses at once, a request finding every worker busy waits in its shard's queue,
//! ordered by the request's `priority` (lower first, as vLLM and SGLang) then arrival, until a
//! worker frees or `--queue-timeout-s` passes; a full queue (`--max-queued-requests` per shard)
//! or an expired wait is refused with 503 and `Retry-After` ([`ApiError::QueueFull`],
//! [`ApiError::QueueTimeout`]).
//!
//! Invariants: a waiting request holds a `Ticket`, its place in the queue; the ticket leaves the
//! queue in `Drop` (admitted, timed out, or its client gone: the handler's future is dropped), so
//! the queue and its depth gauge hold exactly the live waiters. Only a model's head waiter admits
//! itself; when it leaves it wakes the next, so order holds within a shard.
//!
//! Concurrency: one queue per shard thread (thread-local, no lock shared between cores), touched
//! only by that shard's tasks. The head re-checks the workers' load when a booking is released
//! on any shard ([`crate::router::release`]: the [`LoadGuard`](crate::router::LoadGuard)'s drop
//! or prefill end wakes every shard with waiters) and at least every [`RECHECK`] (bounded work:
//! one pass over its model's candidates), the fallback that picks up engine-reported load.
//! Shards queue independently: the order is per shard, not global.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::frontend::data::error::ApiError;
use crate::frontend::{Frontend, ModelState, WorkerEntry, WorkerGroup};
use crate::metrics::Metrics;
use crate::router::release;

/// How often a model's head waiter re-reads its workers' load when no booking was released: the
/// fallback for load reported by the engines, which arrives at most every 50 ms
/// (`crate::worker::load`); one pass over the candidates per tick per model per shard.
pub const RECHECK: Duration = Duration::from_millis(10);

/// The largest `--max-queued-requests`: a waiter costs its prepared prompt plus ~100 bytes of
/// queue, so 64 Ki per shard bounds the queue well inside the memory of the prompts themselves.
pub const MAX_QUEUED_CEILING: usize = 65_536;

/// When a worker counts as busy (Dynamo's flags; each `None` disables its test).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BusyThresholds {
    /// Busy when its active decode blocks exceed this fraction (0..=1) of its KV capacity.
    pub decode_blocks_frac: Option<f64>,
    /// Busy when its prompt tokens not yet prefilled exceed this count.
    pub prefill_tokens: Option<u64>,
}

impl BusyThresholds {
    /// Whether any test is set (admission is off otherwise: no queue, no cost).
    pub fn enabled(&self) -> bool {
        self.decode_blocks_frac.is_some() || self.prefill_tokens.is_some()
    }
}

/// Admission settings (validated by the config layer).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    pub thresholds: BusyThresholds,
    /// Waiters per shard; past it, 503.
    pub max_queued: usize,
    /// Longest wait; past it, 503.
    pub queue_timeout: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self { thresholds: BusyThresholds::default(), max_queued: 1024, queue_timeout: Duration::from_secs(30) }
    }
}

impl WorkerEntry {
    /// Whether this worker is over a busy threshold, by the load the frontend knows of it (its
    /// own bookings; engine-reported load folds in here when the frontend keeps it).
    pub fn is_busy(&self, t: &BusyThresholds) -> bool {
        let decode = t.decode_blocks_frac.is_some_and(|f| {
            let capacity = self.info.kv_capacity_blocks;
            capacity > 0 && self.load.active_decode_blocks() as f64 > f * capacity as f64
        });
        let prefill = t.prefill_tokens.is_some_and(|n| self.load.active_prefill_tokens() > n);
        decode || prefill
    }
}

/// Whether every candidate of `group` is busy (no candidate: not busy; dispatch says why).
pub fn all_busy(group: &WorkerGroup, t: &BusyThresholds) -> bool {
    !group.candidates.is_empty()
        && group.candidates.iter().all(|c| group.entries.get(&c.id).is_none_or(|e| e.is_busy(t)))
}

/// A waiter's place: its model (by address), priority, arrival on this shard.
type Key = (usize, i32, u64);

#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    /// Set when the waiter ahead left: this one is the head now.
    notified: bool,
}

/// One shard's waiters, in admission order.
#[derive(Default)]
struct WaitQueue {
    waiters: BTreeMap<Key, Slot>,
    next_seq: u64,
}

impl WaitQueue {
    fn head(&self, model: usize) -> Option<Key> {
        self.waiters.range((model, i32::MIN, 0)..=(model, i32::MAX, u64::MAX)).next().map(|(k, _)| *k)
    }
}

thread_local! {
    /// This shard's queue (each shard is one thread).
    static QUEUE: RefCell<WaitQueue> = RefCell::default();
}

/// A request's place in its shard's queue; leaves it in `Drop` and wakes the model's next head.
struct Ticket<'a> {
    key: Key,
    metrics: &'a Metrics,
    shard: usize,
}

impl<'a> Ticket<'a> {
    fn join(model: usize, priority: i32, metrics: &'a Metrics, shard: usize) -> Self {
        let key = QUEUE.with_borrow_mut(|q| {
            q.next_seq += 1;
            let key = (model, priority, q.next_seq);
            q.waiters.insert(key, Slot::default());
            key
        });
        release::set_waiting(shard, true);
        metrics.shard(shard).queue_depth.fetch_add(1, Relaxed);
        Self { key, metrics, shard }
    }

    fn is_head(&self) -> bool {
        QUEUE.with_borrow(|q| q.head(self.key.0) == Some(self.key))
    }

    /// Resolves once the waiter ahead leaves (after which this one may be the head).
    async fn notified(&self) {
        poll_fn(|cx| {
            QUEUE.with_borrow_mut(|q| match q.waiters.get_mut(&self.key) {
                Some(s) if s.notified => {
                    s.notified = false;
                    Poll::Ready(())
                }
                Some(s) => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                None => Poll::Ready(()),
            })
        })
        .await
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let waker = QUEUE.with_borrow_mut(|q| {
            let was_head = q.head(self.key.0) == Some(self.key);
            q.waiters.remove(&self.key);
            if q.waiters.is_empty() {
                release::set_waiting(self.shard, false);
            }
            let next = if was_head { q.head(self.key.0) } else { None };
            next.and_then(|k| q.waiters.get_mut(&k)).and_then(|s| {
                s.notified = true;
                s.waker.take()
            })
        });
        self.metrics.shard(self.shard).queue_depth.fetch_sub(1, Relaxed);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Waiters queued on the calling shard (all models).
pub fn queued_here() -> usize {
    QUEUE.with_borrow(|q| q.waiters.len())
}

/// Returns once `model` has a worker that is not busy and no earlier waiter of this shard is
/// ahead; refuses with 503 when the shard's queue is full or the wait times out. Immediate when
/// admission is off or nobody waits and a worker has room. The caller's future being dropped
/// (client gone) leaves the queue. `Ok`: the time spent waiting.
pub async fn admit<P>(fe: &Frontend<P>, shard: usize, model: &ModelState, priority: i32) -> Result<Duration, ApiError> {
    let cfg = &fe.admission;
    let t = &cfg.thresholds;
    if !t.enabled() {
        return Ok(Duration::ZERO);
    }
    let id = model as *const ModelState as usize;
    let busy = || all_busy(&model.workers.load(), t);
    if QUEUE.with_borrow(|q| q.head(id).is_none()) && !busy() {
        return Ok(Duration::ZERO);
    }
    let m = fe.metrics.shard(shard);
    if queued_here() >= cfg.max_queued {
        m.queue_rejected_full.fetch_add(1, Relaxed);
        return Err(ApiError::QueueFull { limit: cfg.max_queued });
    }
    let ticket = Ticket::join(id, priority, &fe.metrics, shard);
    let started = Instant::now();
    let deadline = started + cfg.queue_timeout;
    loop {
        let head = ticket.is_head();
        if head && !busy() {
            drop(ticket);
            let waited = started.elapsed();
            m.queue_wait.observe(waited);
            return Ok(waited);
        }
        let now = Instant::now();
        if now >= deadline {
            drop(ticket);
            m.queue_wait.observe(started.elapsed());
            m.queue_rejected_timeout.fetch_add(1, Relaxed);
            return Err(ApiError::QueueTimeout { waited: cfg.queue_timeout });
        }
        if head {
            // A booking released anywhere, the waiter ahead leaving, or the periodic re-check.
            let (ahead, released) = (pin!(ticket.notified()), pin!(release::next_release(shard)));
            let _ = monoio::time::timeout(RECHECK.min(deadline - now), futures::future::select(ahead, released)).await;
        } else {
            let _ = monoio::time::timeout(deadline - now, ticket.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{WorkerId, WorkerInfo};
    use crate::router::{Booking, LoadGuard, WorkerLoad};

    fn entry(capacity: u64) -> WorkerEntry {
        let info: WorkerInfo = serde_json::from_value(serde_json::json!({
            "id": 1, "model": "m", "model_path": null, "role": "aggregated", "page_size": 16,
            "kv_capacity_blocks": capacity, "max_num_seqs": 8, "max_num_batched_tokens": 1024, "address": null
        }))
        .expect("worker info");
        WorkerEntry {
            info,
            endpoint: None,
            load: WorkerLoad::new(),
            health: Default::default(),
            peer: crate::frontend::Peer { style: Default::default(), bootstrap: None },
            kv: std::sync::Arc::new(crate::frontend::KvTracking::new(false)),
        }
    }

    #[test]
    fn busy_is_over_a_fraction_of_blocks_or_a_count_of_prefill_tokens() {
        let e = entry(100);
        let off = BusyThresholds::default();
        let blocks = BusyThresholds { decode_blocks_frac: Some(0.5), prefill_tokens: None };
        let tokens = BusyThresholds { decode_blocks_frac: None, prefill_tokens: Some(1000) };
        let g = LoadGuard::book(e.load.clone(), WorkerId(1), 0, Booking { prefill_tokens: 1000, decode_blocks: 50 });
        assert!(!e.is_busy(&off) && !e.is_busy(&blocks) && !e.is_busy(&tokens), "at the threshold is not over it");
        let mut g2 = LoadGuard::book(e.load.clone(), WorkerId(1), 1, Booking { prefill_tokens: 1, decode_blocks: 1 });
        assert!(e.is_busy(&blocks) && e.is_busy(&tokens) && !e.is_busy(&off));
        g2.prefill_done();
        assert!(e.is_busy(&blocks) && !e.is_busy(&tokens));
        drop((g, g2));
        assert!(!e.is_busy(&blocks));
        let zero = BusyThresholds { decode_blocks_frac: Some(0.0), prefill_tokens: None };
        assert!(!e.is_busy(&zero), "an idle worker is never busy");
    }

    #[test]
    fn tickets_leave_in_order_and_wake_the_next_head() {
        let metrics = Metrics::new(1);
        let a = Ticket::join(7, 0, &metrics, 0);
        let b = Ticket::join(7, -1, &metrics, 0);
        let c = Ticket::join(7, 0, &metrics, 0);
        let other = Ticket::join(8, 5, &metrics, 0);
        assert!(b.is_head() && !a.is_head() && !c.is_head() && other.is_head(), "lower priority first, per model");
        assert_eq!(metrics.shard(0).queue_depth.load(Relaxed), 4);
        drop(b);
        assert!(a.is_head());
        assert!(QUEUE.with_borrow(|q| q.waiters[&a.key].notified), "the new head is told");
        drop(c);
        drop(a);
        drop(other);
        assert_eq!((queued_here(), metrics.shard(0).queue_depth.load(Relaxed)), (0, 0));
    }
}
