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
//!
//! Reported load ([`WorkerLoad::apply_report`]): the worker's own [`LoadReport`], published on
//! the load plane, covers every frontend's requests; bookings cover only this frontend's, but
//! at once. The load the cost uses ([`WorkerLoad::view`]) is, per quantity the engine reports,
//! `reported + booked_now − booked_at_report` (saturating at 0): the report for everything it
//! saw, plus this frontend's bookings it does not cover yet. Bookings that ended since the
//! report leave it through the same difference, so a report that still counts a finished
//! request and the booking it no longer has cancel out. The one blind spot is a request booked
//! just before a report arrives that reached the worker after the report was sampled (the
//! request plane's latency plus the load plane's, milliseconds): it is under-counted until the
//! next report, which its own admission triggers within `LOAD_PUBLISH_MIN_INTERVAL`. A
//! quantity the engine does not report (`*_known` false), and any worker without a report
//! newer than [`REPORT_FRESH_FOR`], falls back to bookings alone.
//!
//! The report fields are written by the control plane only (one writer), as separate relaxed
//! stores: a shard reading during an update may combine a new report with the old baseline for
//! one selection, an error of one report's change.
//!
//! Learned TTFT ([`WorkerLoad::ttft`]): a guard booked with [`LoadGuard::expect_first_token`]
//! feeds the worker's [`LearnedTtft`] once, at [`LoadGuard::prefill_done`] (the first token);
//! a guard dropped before its first token (error, cancel) teaches nothing.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use super::ttft::{LearnedTtft, TtftFeatures};
use crate::contract::{LoadReport, WorkerId};

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

/// A report older than this is not trusted (the worker stopped publishing, or the load plane
/// is down): three heartbeats (`crate::worker::load::LOAD_HEARTBEAT`), so one or two lost
/// messages do not matter.
pub const REPORT_FRESH_FOR: Duration = Duration::from_secs(3);

/// One debug line per this many first tokens of a worker shows its learned TTFT model.
const TTFT_LOG_EVERY: u64 = 64;

/// Marks a quantity the engine does not report.
const UNKNOWN: u64 = u64::MAX;

/// The worker's last report and this frontend's bookings when it arrived (control plane writes).
struct Reported {
    /// The report's sequence number; 0 = none yet.
    seq: AtomicU64,
    /// Milliseconds since [`epoch`] when it arrived.
    at_ms: AtomicU64,
    blocks: AtomicU64,
    prefill_tokens: AtomicU64,
    requests: AtomicU64,
    base_blocks: AtomicU64,
    base_prefill_tokens: AtomicU64,
    base_requests: AtomicU64,
    /// Booked decode blocks minus reported active blocks, at the last report.
    drift_blocks: AtomicI64,
    /// The worker's KV capacity in blocks (0: not reported).
    total_blocks: AtomicU64,
}

impl Default for Reported {
    fn default() -> Self {
        Self {
            seq: AtomicU64::new(0),
            at_ms: AtomicU64::new(0),
            blocks: AtomicU64::new(UNKNOWN),
            prefill_tokens: AtomicU64::new(UNKNOWN),
            requests: AtomicU64::new(UNKNOWN),
            base_blocks: AtomicU64::new(0),
            base_prefill_tokens: AtomicU64::new(0),
            base_requests: AtomicU64::new(0),
            drift_blocks: AtomicI64::new(0),
            total_blocks: AtomicU64::new(0),
        }
    }
}

/// A worker's load as the cost sees it (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadView {
    pub prefill_tokens: u64,
    pub decode_blocks: u64,
    pub requests: u64,
    /// Whether a fresh report went into it (false: bookings alone).
    pub reported: bool,
}

/// See the module doc.
pub struct WorkerLoad {
    slots: [CachePadded<Slot>; MAX_SHARDS],
    reported: CachePadded<Reported>,
    ttft: CachePadded<LearnedTtft>,
}

/// The process's time origin for report arrival stamps.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1: 0 means "never".
    epoch().elapsed().as_millis() as u64 + 1
}

/// `reported + now − base`, saturating at 0; bookings alone when the engine does not say.
fn combine(reported: u64, now: u64, base: u64) -> u64 {
    if reported == UNKNOWN {
        now
    } else {
        (reported + now).saturating_sub(base)
    }
}

impl WorkerLoad {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            slots: std::array::from_fn(|_| CachePadded::new(Slot::default())),
            reported: CachePadded::new(Reported::default()),
            ttft: CachePadded::new(LearnedTtft::default()),
        })
    }

    /// Records the worker's report `seq` (control plane only). Returns `false`, changing nothing,
    /// for a report not newer than the last one applied.
    pub fn apply_report(&self, seq: u64, report: &LoadReport) -> bool {
        let r = &self.reported;
        if seq <= r.seq.load(Relaxed) {
            return false;
        }
        let booked_blocks = self.active_decode_blocks();
        r.base_blocks.store(booked_blocks, Relaxed);
        r.base_prefill_tokens.store(self.active_prefill_tokens(), Relaxed);
        r.base_requests.store(self.active_requests(), Relaxed);
        let known = |k: bool, v: u64| if k { v.min(UNKNOWN - 1) } else { UNKNOWN };
        r.blocks.store(known(report.blocks_known, report.active_blocks), Relaxed);
        r.prefill_tokens.store(known(report.prefill_known, report.prefill_tokens), Relaxed);
        r.requests.store(known(true, report.running_requests.saturating_add(report.waiting_requests)), Relaxed);
        let drift = if report.blocks_known {
            booked_blocks as i64 - report.active_blocks.min(i64::MAX as u64) as i64
        } else {
            0
        };
        r.drift_blocks.store(drift, Relaxed);
        r.total_blocks.store(if report.blocks_known { report.total_blocks } else { 0 }, Relaxed);
        r.at_ms.store(now_ms(), Relaxed);
        r.seq.store(seq, Relaxed);
        true
    }

    /// Whether a report arrived within [`REPORT_FRESH_FOR`].
    pub fn has_fresh_report(&self) -> bool {
        self.fresh_at(now_ms())
    }

    fn fresh_at(&self, now_ms: u64) -> bool {
        let at = self.reported.at_ms.load(Relaxed);
        at != 0 && now_ms.saturating_sub(at) < REPORT_FRESH_FOR.as_millis() as u64
    }

    /// The load the cost uses: the last fresh report plus the bookings it does not cover yet.
    pub fn view(&self) -> LoadView {
        let prefill = self.active_prefill_tokens();
        let blocks = self.active_decode_blocks();
        let requests = self.active_requests();
        if !self.has_fresh_report() {
            return LoadView { prefill_tokens: prefill, decode_blocks: blocks, requests, reported: false };
        }
        let r = &self.reported;
        LoadView {
            prefill_tokens: combine(r.prefill_tokens.load(Relaxed), prefill, r.base_prefill_tokens.load(Relaxed)),
            decode_blocks: combine(r.blocks.load(Relaxed), blocks, r.base_blocks.load(Relaxed)),
            requests: combine(r.requests.load(Relaxed), requests, r.base_requests.load(Relaxed)),
            reported: true,
        }
    }

    /// The last report's active blocks, if the engine reports them and a report came.
    pub fn reported_blocks(&self) -> Option<u64> {
        let b = self.reported.blocks.load(Relaxed);
        (self.reported.seq.load(Relaxed) != 0 && b != UNKNOWN).then_some(b)
    }

    /// The worker's last report (`None` before the first): each quantity the engine reports,
    /// and how long ago it arrived (`/health`).
    pub fn last_report(&self) -> Option<LastReport> {
        let r = &self.reported;
        let at = r.at_ms.load(Relaxed);
        if r.seq.load(Relaxed) == 0 || at == 0 {
            return None;
        }
        let known = |v: u64| (v != UNKNOWN).then_some(v);
        Some(LastReport {
            decode_blocks: known(r.blocks.load(Relaxed)),
            prefill_tokens: known(r.prefill_tokens.load(Relaxed)),
            requests: known(r.requests.load(Relaxed)),
            age: Duration::from_millis(now_ms().saturating_sub(at)),
        })
    }

    /// The worker's KV capacity in blocks as last reported; 0 when unknown.
    pub fn total_blocks(&self) -> u64 {
        self.reported.total_blocks.load(Relaxed)
    }

    /// The worker's learned time to first token.
    pub fn ttft(&self) -> &LearnedTtft {
        &self.ttft
    }

    /// Decode blocks this frontend had booked minus the active blocks the worker reported, at
    /// the last report (0 without one). Large and positive: bookings the worker does not see
    /// (or prompts sharing blocks); negative: other frontends' load, or requests not booked.
    pub fn drift_blocks(&self) -> i64 {
        self.reported.drift_blocks.load(Relaxed)
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

/// A worker's last load report as received (`None`: the engine does not report that quantity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastReport {
    pub decode_blocks: Option<u64>,
    pub prefill_tokens: Option<u64>,
    pub requests: Option<u64>,
    /// Since it arrived.
    pub age: Duration,
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
    /// What to teach the worker's [`LearnedTtft`] at the first token.
    first_token: Option<(TtftFeatures, Instant)>,
}

impl LoadGuard {
    /// Books `booking` on `load` from `shard` (which must be `< MAX_SHARDS`).
    pub fn book(load: Arc<WorkerLoad>, worker: WorkerId, shard: usize, booking: Booking) -> Self {
        assert!(shard < MAX_SHARDS, "shard {shard} >= MAX_SHARDS (config validation missed it)");
        let slot = &load.slots[shard];
        slot.prefill_tokens.fetch_add(booking.prefill_tokens, Relaxed);
        slot.decode_blocks.fetch_add(booking.decode_blocks, Relaxed);
        slot.requests.fetch_add(1, Relaxed);
        Self { load, worker, shard, booking, prefill_released: false, first_token: None }
    }

    /// Times this request's first token from now, to teach the worker's [`LearnedTtft`] that
    /// with `features` it took that long (at [`Self::prefill_done`]).
    pub fn expect_first_token(&mut self, features: TtftFeatures) {
        if !self.prefill_released {
            self.first_token = Some((features, Instant::now()));
        }
    }

    /// Releases the prefill tokens once the first token arrived (and, the first time, records
    /// its TTFT if [`Self::expect_first_token`] asked to); idempotent.
    pub fn prefill_done(&mut self) {
        if let Some((features, at)) = self.first_token.take() {
            let ttft = &self.load.ttft;
            ttft.observe(features, at.elapsed());
            if ttft.samples() % TTFT_LOG_EVERY == 1 {
                let c = ttft.coefficients();
                tracing::debug!(
                    worker = %self.worker,
                    samples = ttft.samples(),
                    base_ms = format_args!("{:.3}", c.base_ms),
                    ms_per_token = format_args!("{:.6}", c.ms_per_token),
                    ms_per_running = format_args!("{:.4}", c.ms_per_running),
                    "learned ttft"
                );
            }
        }
        self.release_prefill();
    }

    fn release_prefill(&mut self) {
        if !self.prefill_released {
            self.prefill_released = true;
            self.load.slots[self.shard].prefill_tokens.fetch_sub(self.booking.prefill_tokens, Relaxed);
            super::release::released();
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
        self.release_prefill();
        let slot = &self.load.slots[self.shard];
        slot.decode_blocks.fetch_sub(self.booking.decode_blocks, Relaxed);
        slot.requests.fetch_sub(1, Relaxed);
        super::release::released();
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
    fn reports_add_only_the_bookings_they_do_not_cover() {
        let load = WorkerLoad::new();
        let b = Booking { prefill_tokens: 64, decode_blocks: 4 };
        let g1 = LoadGuard::book(load.clone(), WorkerId(1), 0, b);
        // No report: bookings alone.
        assert_eq!(load.view(), LoadView { prefill_tokens: 64, decode_blocks: 4, requests: 1, reported: false });
        // The worker reports our request plus another frontend's: 10 blocks, 2 requests.
        let report = |blocks, prefill, requests| LoadReport {
            active_blocks: blocks,
            prefill_tokens: prefill,
            running_requests: requests,
            blocks_known: true,
            prefill_known: true,
            ..LoadReport::default()
        };
        assert!(load.apply_report(1, &report(10, 100, 2)));
        assert_eq!(load.view(), LoadView { prefill_tokens: 100, decode_blocks: 10, requests: 2, reported: true });
        assert_eq!(load.drift_blocks(), 4 - 10);
        // A new booking the report does not cover goes on top.
        let g2 = LoadGuard::book(load.clone(), WorkerId(1), 1, b);
        assert_eq!(load.view(), LoadView { prefill_tokens: 164, decode_blocks: 14, requests: 3, reported: true });
        // Our first request ends: the stale report still counts it, the difference removes it.
        drop(g1);
        assert_eq!(load.view().decode_blocks, 10);
        // An older report is ignored; a newer one replaces the baseline.
        assert!(!load.apply_report(1, &report(0, 0, 0)));
        assert!(load.apply_report(2, &report(9, 0, 2)));
        assert_eq!(load.view(), LoadView { prefill_tokens: 0, decode_blocks: 9, requests: 2, reported: true });
        // A report lower than our own bookings saturates instead of going negative.
        drop(g2);
        assert!(load.apply_report(3, &report(0, 0, 0)));
        let _g3 = LoadGuard::book(load.clone(), WorkerId(1), 0, b);
        assert_eq!(load.view().decode_blocks, 4);
        // What the engine does not report stays booked.
        let partial = LoadReport { running_requests: 5, ..LoadReport::default() };
        assert!(load.apply_report(4, &partial));
        let v = load.view();
        assert_eq!((v.prefill_tokens, v.decode_blocks, v.requests), (64, 4, 5));
        assert_eq!(load.reported_blocks(), None);
        assert_eq!(load.drift_blocks(), 0);
        // Bookings are untouched by reports (the accessors the shards use stay exact).
        assert_eq!(snapshot(&load), (64, 4, 1));
    }

    #[test]
    fn stale_reports_are_not_trusted() {
        let load = WorkerLoad::new();
        let report = LoadReport { active_blocks: 50, blocks_known: true, ..LoadReport::default() };
        assert!(load.apply_report(1, &report));
        assert!(load.has_fresh_report());
        assert_eq!(load.view().decode_blocks, 50);
        let at = load.reported.at_ms.load(Relaxed);
        assert!(load.fresh_at(at + REPORT_FRESH_FOR.as_millis() as u64 - 1));
        assert!(!load.fresh_at(at + REPORT_FRESH_FOR.as_millis() as u64));
        // Long after: bookings alone.
        load.reported.at_ms.store(1, Relaxed);
        assert!(!load.fresh_at(1 + REPORT_FRESH_FOR.as_millis() as u64));
    }

    #[test]
    fn guard_dropped_on_another_thread_releases() {
        let load = WorkerLoad::new();
        let g = LoadGuard::book(load.clone(), WorkerId(1), 3, Booking { prefill_tokens: 5, decode_blocks: 1 });
        std::thread::spawn(move || drop(g)).join().unwrap();
        assert_eq!(snapshot(&load), (0, 0, 0));
    }
}
