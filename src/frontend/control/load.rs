//! Load reconciliation: applies every worker's [`LoadReport`](crate::contract::LoadReport) from
//! the load plane ([`crate::planes::load`]) to its load cell
//! ([`WorkerLoad::apply_report`](crate::router::WorkerLoad::apply_report)), where the cost
//! combines it with this frontend's bookings; watches the drift between the two; renders the
//! load gauges of `/metrics`.
//!
//! Drift (`kvgate_worker_load_drift_blocks`): decode blocks this frontend had booked on a worker
//! minus the active blocks the worker reported, at each report. With several frontends it is
//! normally negative (the others' load). A booking cannot outlive its request (the
//! [`LoadGuard`](crate::router::LoadGuard) releases it in `Drop`), so a drift that stays above
//! [`DRIFT_WARN_BLOCKS`] (and half of what is booked) for [`DRIFT_WARN_AFTER`] means the two
//! disagree on what a request costs (prompts sharing blocks, an engine that frees early): it is
//! logged at warn, at most once per [`DRIFT_WARN_AFTER`] per worker.
//!
//! Concurrency: one task on the control-plane runtime, the only writer of the report fields;
//! shards read them lock-free. Bounded: one map entry per worker that has drifted, removed when
//! the worker leaves discovery (checked on each report).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::contract::WorkerId;
use crate::frontend::Frontend;
use crate::planes::load::LoadSubscriber;
use crate::router::WorkerLoad;

/// Drift (blocks booked beyond what the worker reports) worth a warning, if it persists.
pub const DRIFT_WARN_BLOCKS: i64 = 32;
/// How long the drift must stay large before the warning, and the warning's repeat period.
pub const DRIFT_WARN_AFTER: Duration = Duration::from_secs(10);

/// Whether a drift is large: above [`DRIFT_WARN_BLOCKS`] and above half of what is booked.
fn large(drift: i64, booked: u64) -> bool {
    drift > DRIFT_WARN_BLOCKS && drift > (booked / 2) as i64
}

/// Since when each worker's drift has been large, and when it was last warned about.
#[derive(Default)]
struct DriftWatch {
    since: HashMap<WorkerId, (Instant, Option<Instant>)>,
}

impl DriftWatch {
    /// Returns `true` when a warning is due for `worker` now.
    fn observe(&mut self, worker: WorkerId, is_large: bool, now: Instant) -> bool {
        if !is_large {
            self.since.remove(&worker);
            return false;
        }
        let (since, warned) = self.since.entry(worker).or_insert((now, None));
        let due = now.duration_since(*since) >= DRIFT_WARN_AFTER
            && warned.is_none_or(|w| now.duration_since(w) >= DRIFT_WARN_AFTER);
        if due {
            *warned = Some(now);
        }
        due
    }
}

/// `worker`'s load cell, from the current snapshots.
fn cell<P>(fe: &Frontend<P>, worker: WorkerId) -> Option<Arc<WorkerLoad>> {
    fe.models().iter().find_map(|m| m.workers.load().entries.get(&worker).map(|e| e.load.clone()))
}

/// Applies reports until the load plane closes.
pub async fn run<P: Send + Sync + 'static>(fe: Arc<Frontend<P>>, mut reports: impl LoadSubscriber) {
    let mut drift = DriftWatch::default();
    let mut unknown = 0u64;
    while let Some(msg) = reports.next_report().await {
        let Some(load) = cell(&fe, msg.worker) else {
            // Not in discovery (yet, or any more): its next report (a heartbeat at most) counts.
            unknown += 1;
            drift.since.remove(&msg.worker);
            tracing::trace!(worker = %msg.worker, unknown, "load report of a worker not in discovery");
            continue;
        };
        if !load.apply_report(msg.seq, &msg.report) {
            continue;
        }
        let d = load.drift_blocks();
        if drift.observe(msg.worker, large(d, load.active_decode_blocks()), Instant::now()) {
            tracing::warn!(worker = %msg.worker, drift_blocks = d, booked_blocks = load.active_decode_blocks(),
                reported_blocks = msg.report.active_blocks, for_s = DRIFT_WARN_AFTER.as_secs(),
                "this frontend's bookings exceed the worker's reported load");
        }
    }
}

/// The load gauges of `/metrics`: per worker, the load the cost uses, the reported blocks, the
/// drift, and whether a fresh report is in use.
pub fn render<P>(fe: &Frontend<P>, out: &mut String) {
    let mut rows = Vec::new();
    for m in fe.models() {
        let group = m.workers.load();
        for c in group.all() {
            rows.push((m.name.clone(), c.id, c.load.clone()));
        }
    }
    type Of = fn(&WorkerLoad) -> i64;
    let gauges: [(&str, &str, Of); 5] = [
        (
            "kvgate_worker_load_decode_blocks",
            "KV blocks the router counts per worker: its last report plus this frontend's bookings the report does not cover.",
            |l| l.view().decode_blocks as i64,
        ),
        (
            "kvgate_worker_load_prefill_tokens",
            "Prefill tokens the router counts per worker (report plus uncovered bookings).",
            |l| l.view().prefill_tokens as i64,
        ),
        ("kvgate_worker_load_requests", "Requests the router counts per worker (report plus uncovered bookings).", |l| {
            l.view().requests as i64
        }),
        (
            "kvgate_worker_reported_active_blocks",
            "Active KV blocks in the worker's last load report (-1: none, or the engine does not say).",
            |l| l.reported_blocks().map_or(-1, |b| b as i64),
        ),
        (
            "kvgate_worker_load_drift_blocks",
            "Decode blocks this frontend had booked minus the worker's reported active blocks, at its last report.",
            WorkerLoad::drift_blocks,
        ),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (model, id, load) in &rows {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\",worker=\"{id}\"}} {}",
                model.replace(['"', '\\', '\n'], "_"),
                f(load)
            );
        }
    }
    let name = "kvgate_worker_load_reported";
    let _ = writeln!(
        out,
        "# HELP {name} 1 when a fresh load report of the worker is in the router's load.\n# TYPE {name} gauge"
    );
    for (model, id, load) in &rows {
        let _ = writeln!(
            out,
            "{name}{{model=\"{}\",worker=\"{id}\"}} {}",
            model.replace(['"', '\\', '\n'], "_"),
            u8::from(load.has_fresh_report())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_warns_only_when_it_persists_and_not_too_often() {
        let mut w = DriftWatch::default();
        let t0 = Instant::now();
        let id = WorkerId(1);
        assert!(!w.observe(id, true, t0));
        assert!(!w.observe(id, true, t0 + DRIFT_WARN_AFTER / 2));
        assert!(w.observe(id, true, t0 + DRIFT_WARN_AFTER));
        assert!(!w.observe(id, true, t0 + DRIFT_WARN_AFTER + Duration::from_secs(1)));
        assert!(w.observe(id, true, t0 + DRIFT_WARN_AFTER * 2));
        // Back to normal: the clock restarts.
        assert!(!w.observe(id, false, t0 + DRIFT_WARN_AFTER * 3));
        assert!(!w.observe(id, true, t0 + DRIFT_WARN_AFTER * 3));
        assert!(w.since.len() == 1);
    }

    #[test]
    fn large_means_absolute_and_relative() {
        assert!(!large(-500, 0), "other frontends' load is not drift");
        assert!(!large(DRIFT_WARN_BLOCKS, 0));
        assert!(large(DRIFT_WARN_BLOCKS + 1, 0));
        assert!(!large(100, 400), "a quarter of a large booking");
        assert!(large(300, 400));
    }
}
