//! Routing decision quality (issue #16): for every KV-routed decision, the best prefix overlap
//! any candidate had against the overlap of the worker chosen. Their difference, the *regret* in
//! blocks, is what the decision gave away in cache hits (it may have bought lower load).
//!
//! - [`Quality::of`]: the pure computation (max over the candidates' overlaps).
//! - [`RegretMetrics`]: per-shard counters behind `kvgate_routing_overlap_regret_blocks` (the
//!   names and the rendering live in [`crate::metrics`]).
//! - [`DecisionLog`]: the optional JSONL log (`--decision-log PATH`), one line per decision.
//!
//! Invariants: `chosen ≤ best` (the chosen worker is a candidate), so regret never underflows.
//! In `kv` mode with a non-zero overlap weight the overlaps are those the router already scored
//! (no second index lookup); otherwise ([`Recorder::assess`]) one lookup of the prompt serves it.
//! The decision log's queue holds at most [`DECISION_LOG_QUEUE`] records; a full queue drops the
//! record and counts it, so a slow disk never slows routing.
//!
//! Concurrency: [`RegretMetrics`] is written by one shard (relaxed adds) and summed on scrape.
//! [`DecisionLog`] is shared by every shard (`try_send` on a bounded `sync_channel`, no lock); one writer
//! thread owns the file and is joined when the log drops (it flushes what was queued).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Serialize;

use super::{Candidate, LoadView, RouteDecision, Router, RouterMode};
use crate::contract::WorkerId;
use crate::kv::index::{KvIndex, OverlapScores};
use crate::kv::SeqHash;

/// Records queued for the decision log's writer before new ones are dropped: a few seconds of
/// decisions at thousands per second, a few MB at most.
pub const DECISION_LOG_QUEUE: usize = 8192;

/// Upper bounds of the regret histogram's buckets, in blocks (`+Inf` is added on render).
pub const REGRET_BUCKETS_BLOCKS: [u64; 12] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// One decision's overlaps, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quality {
    /// The largest prefix overlap any candidate had.
    pub best_overlap_blocks: u32,
    /// The chosen worker's prefix overlap.
    pub chosen_overlap_blocks: u32,
}

impl Quality {
    /// `overlaps`: every candidate's overlap (the chosen one's among them).
    pub fn of(overlaps: impl IntoIterator<Item = u32>, chosen_overlap_blocks: u32) -> Self {
        let best = overlaps.into_iter().fold(chosen_overlap_blocks, u32::max);
        Self { best_overlap_blocks: best, chosen_overlap_blocks }
    }

    /// Blocks the decision gave away against the best-overlap candidate.
    pub fn regret_blocks(&self) -> u32 {
        self.best_overlap_blocks - self.chosen_overlap_blocks
    }
}

/// One shard's regret counters.
#[derive(Default)]
pub struct RegretMetrics {
    /// Non-cumulative: bucket `i` counts regrets in `(bound[i-1], bound[i]]`; the last slot is
    /// beyond the last bound.
    pub buckets: [AtomicU64; REGRET_BUCKETS_BLOCKS.len() + 1],
    pub decisions: AtomicU64,
    pub regret_blocks: AtomicU64,
    pub best_overlap_blocks: AtomicU64,
    pub chosen_overlap_blocks: AtomicU64,
    /// Decision-log records dropped because its queue was full.
    pub log_dropped: AtomicU64,
}

impl RegretMetrics {
    pub fn observe(&self, q: Quality) {
        let r = u64::from(q.regret_blocks());
        let i = REGRET_BUCKETS_BLOCKS.iter().position(|&b| r <= b).unwrap_or(REGRET_BUCKETS_BLOCKS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.decisions.fetch_add(1, Relaxed);
        self.regret_blocks.fetch_add(r, Relaxed);
        self.best_overlap_blocks.fetch_add(u64::from(q.best_overlap_blocks), Relaxed);
        self.chosen_overlap_blocks.fetch_add(u64::from(q.chosen_overlap_blocks), Relaxed);
    }
}

/// `--decision-log`: the flag, flattened into the router's arguments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DecisionLogArgs {
    /// Write one JSON line per routing decision here (chosen worker, its overlap, the best
    /// overlap, every candidate's overlap, cost and load). Off by default; records are dropped
    /// (and counted in `kvgate_routing_decision_log_dropped_total`) when the writer falls behind.
    #[arg(long, value_name = "PATH")]
    pub decision_log: Option<PathBuf>,
}

impl DecisionLogArgs {
    /// The open log, if asked for. `Err` names the path.
    pub fn open(&self) -> std::io::Result<Option<Arc<DecisionLog>>> {
        self.decision_log.as_deref().map(|p| DecisionLog::create(p).map(Arc::new)).transpose()
    }
}

/// One candidate of a logged decision.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateRecord {
    pub worker: String,
    pub overlap_blocks: u32,
    /// The router's cost (`kv` mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    pub active_prefill_tokens: u64,
    pub active_decode_blocks: u64,
    pub active_requests: u64,
}

/// One line of the decision log.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    pub request: String,
    pub model: String,
    pub leg: &'static str,
    pub prompt_tokens: usize,
    pub prompt_blocks: usize,
    pub chosen: String,
    pub chosen_overlap_blocks: u32,
    pub best_overlap_blocks: u32,
    pub regret_blocks: u32,
    /// Loads as read just before the decision (the chosen one's booking not yet in them).
    pub candidates: Vec<CandidateRecord>,
}

#[derive(Default)]
struct LogCounters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// See the module doc.
pub struct DecisionLog {
    tx: Option<SyncSender<DecisionRecord>>,
    counters: Arc<LogCounters>,
    writer: Option<JoinHandle<()>>,
}

impl DecisionLog {
    /// Creates (truncates) `path` and starts its writer thread.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("--decision-log {}: {e}", path.display())))?;
        let (tx, rx) = sync_channel(DECISION_LOG_QUEUE);
        let counters = Arc::new(LogCounters::default());
        let c = counters.clone();
        let writer = std::thread::Builder::new()
            .name("kvgate-decision-log".into())
            .spawn(move || write_loop(std::io::BufWriter::new(file), rx, &c))?;
        Ok(Self { tx: Some(tx), counters, writer: Some(writer) })
    }

    /// Queues `r`; `false` (and counted) when the queue was full and `r` was dropped.
    pub fn record(&self, r: DecisionRecord) -> bool {
        // Full, or (only while dropping) disconnected: the record is dropped.
        let queued = self.tx.as_ref().is_some_and(|tx| tx.try_send(r).is_ok());
        if !queued {
            self.counters.dropped.fetch_add(1, Relaxed);
        }
        queued
    }

    /// Records written, dropped (queue full), lost to write errors.
    pub fn counts(&self) -> (u64, u64, u64) {
        let c = &self.counters;
        (c.written.load(Relaxed), c.dropped.load(Relaxed), c.failed.load(Relaxed))
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Writes records as they come, flushing whenever the queue is empty.
fn write_loop(mut out: impl Write, rx: Receiver<DecisionRecord>, c: &LogCounters) {
    let mut warned = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(r) = next {
            let ok = serde_json::to_writer(&mut out, &r).is_ok() && out.write_all(b"\n").is_ok();
            let counter = if ok { &c.written } else { &c.failed };
            counter.fetch_add(1, Relaxed);
            if !ok && !warned {
                tracing::warn!("decision log: a write failed; later failures are only counted");
                warned = true;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() && !warned {
            tracing::warn!("decision log: flush failed");
            warned = true;
        }
    }
    let _ = out.flush();
}

/// What a decision is assessed against and where the result goes.
#[derive(Clone, Copy)]
pub struct Recorder<'a> {
    pub index: &'a KvIndex,
    pub metrics: &'a RegretMetrics,
    pub log: Option<&'a DecisionLog>,
}

impl Recorder<'_> {
    /// The candidates' loads, read before a decision only when the log will want them.
    pub fn loads_before(&self, candidates: &[Candidate]) -> Option<Vec<LoadView>> {
        self.log.map(|_| candidates.iter().map(|c| c.load.view()).collect())
    }

    /// Every candidate's overlap (candidate order) and the decision's [`Quality`]: from the
    /// router's own scores when it scored against the index, else from `overlaps` or one lookup.
    pub fn assess(
        &self,
        router: &Router,
        decision: &RouteDecision,
        candidates: &[Candidate],
        seq: &[SeqHash],
        overlaps: Option<&OverlapScores>,
    ) -> (Vec<u32>, Quality) {
        let c = router.config();
        let scored = c.mode == RouterMode::Kv && c.overlap_weight > 0.0 && decision.scores.len() == candidates.len();
        let per: Vec<u32> = if scored {
            decision.scores.iter().map(|s| s.overlap_blocks).collect()
        } else {
            let looked;
            let o = match overlaps {
                Some(o) => o,
                None => {
                    looked = self.index.find_matches(seq);
                    &looked
                }
            };
            candidates.iter().map(|c| o.overlap(c.id)).collect()
        };
        let chosen = candidates.iter().position(|c| c.id == decision.worker).map_or(0, |i| per[i]);
        let q = Quality::of(per.iter().copied(), chosen);
        self.metrics.observe(q);
        (per, q)
    }

    /// Queues the decision's record when the log is on.
    #[allow(clippy::too_many_arguments)]
    pub fn log(
        &self,
        model: &str,
        leg: &'static str,
        request_id: u64,
        prompt_tokens: usize,
        seq: &[SeqHash],
        decision: &RouteDecision,
        candidates: &[Candidate],
        per: &[u32],
        loads: Option<Vec<LoadView>>,
        q: Quality,
    ) {
        let (Some(log), Some(loads)) = (self.log, loads) else { return };
        let cost = |w: WorkerId| decision.scores.iter().find(|s| s.worker == w).map(|s| s.cost);
        let candidates = candidates
            .iter()
            .zip(per)
            .zip(loads)
            .map(|((c, &overlap_blocks), l)| CandidateRecord {
                worker: c.id.to_string(),
                overlap_blocks,
                cost: cost(c.id),
                active_prefill_tokens: l.prefill_tokens,
                active_decode_blocks: l.decode_blocks,
                active_requests: l.requests,
            })
            .collect();
        let t_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let queued = log.record(DecisionRecord {
            t_ms,
            request: format!("{request_id:x}"),
            model: model.to_owned(),
            leg,
            prompt_tokens,
            prompt_blocks: seq.len(),
            chosen: decision.worker.to_string(),
            chosen_overlap_blocks: q.chosen_overlap_blocks,
            best_overlap_blocks: q.best_overlap_blocks,
            regret_blocks: q.regret_blocks(),
            candidates,
        });
        if !queued {
            self.metrics.log_dropped.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regret_is_best_minus_chosen() {
        let q = Quality::of([3, 9, 0, 5], 5);
        assert_eq!((q.best_overlap_blocks, q.chosen_overlap_blocks, q.regret_blocks()), (9, 5, 4));
        // The best candidate chosen: no regret.
        assert_eq!(Quality::of([3, 9, 0], 9).regret_blocks(), 0);
        // No candidate (cannot happen after a decision) still cannot underflow.
        assert_eq!(Quality::of([], 2).regret_blocks(), 0);
    }

    #[test]
    fn metrics_bucket_and_sum_regrets() {
        let m = RegretMetrics::default();
        for (per, chosen) in [(vec![4, 0], 0), (vec![4, 4], 4), (vec![2000, 0], 0)] {
            m.observe(Quality::of(per, chosen));
        }
        let b: Vec<u64> = m.buckets.iter().map(|x| x.load(Relaxed)).collect();
        assert_eq!(b[0], 1); // regret 0
        assert_eq!(b[3], 1); // regret 4: bucket le=4
        assert_eq!(b[REGRET_BUCKETS_BLOCKS.len()], 1); // 2000 > 1024
        assert_eq!(m.decisions.load(Relaxed), 3);
        assert_eq!(m.regret_blocks.load(Relaxed), 2004);
        assert_eq!(m.best_overlap_blocks.load(Relaxed), 2008);
        assert_eq!(m.chosen_overlap_blocks.load(Relaxed), 4);
    }

    #[test]
    fn decision_log_writes_lines_and_flushes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = DecisionLog::create(&path).unwrap();
        for i in 0..3u32 {
            let queued = log.record(DecisionRecord {
                t_ms: 1,
                request: format!("{i:x}"),
                model: "m".into(),
                leg: "whole",
                prompt_tokens: 64,
                prompt_blocks: 4,
                chosen: "a".into(),
                chosen_overlap_blocks: 1,
                best_overlap_blocks: 3,
                regret_blocks: 2,
                candidates: vec![],
            });
            assert!(queued);
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["request"], "2");
        assert_eq!(lines[0]["regret_blocks"], 2);
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let err = DecisionLog::create(Path::new("/nonexistent-dir/x.jsonl")).err().unwrap();
        assert!(err.to_string().contains("--decision-log /nonexistent-dir/x.jsonl"), "{err}");
    }
}
