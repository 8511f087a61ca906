//! Router replica sync's predictions (Dynamo's `--router-replica-sync`): what other frontends of
//! the fleet just sent to workers whose cache this frontend knows from KV events, held until
//! those events arrive.
//!
//! Several frontends on one fleet each build their index from the workers' KV events, which
//! reach every frontend only after the worker has run the request's prefill. A request routed
//! by frontend A, followed at once by a request with the same prefix reaching frontend B (a
//! session's next turn behind a round-robin balancer, or a burst sharing a system prompt), finds
//! nothing in B's index and is routed by load alone. With replica sync, A publishes each routing
//! decision (worker and the prompt's block hashes, [`crate::planes::replica`]); B records them
//! here, and its router counts them in a worker's overlap until the worker's own events say
//! the same or [`REPLICA_TTL`] passes.
//!
//! Invariant: predictions never enter the exact index ([`KvIndex`] of the events). They live in
//! an index of their own, written only here, and the router takes, per worker, the larger of
//! the exact and the predicted overlap ([`merge`]); so the exact index stays exactly the result
//! of the workers' events, and a wrong prediction costs at most a misrouted request for
//! [`REPLICA_TTL`]. A predicted block is dropped when the worker's `Stored` event for it is
//! applied ([`ReplicaPredictions::confirm`]: the exact index holds it now, and the worker's
//! later `Removed` then counts), when it expires, or when the worker leaves.
//!
//! The machinery is the approximate mode's ([`Predictions`], [`crate::kv::approx`]): one
//! stamp-ordered queue per worker, bounded by the worker's capacity and expired in bounded steps.
//!
//! Concurrency: [`ReplicaPredictions`] is owned by the control plane (`&mut self`), beside the
//! exact index's writer; routers read its index lock-free ([`ReplicaPredictions::index`]).
//! Bounds: those of [`Predictions`] (at most a worker's capacity per worker).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::contract::events::{KvEvent, KvEventKind};
use crate::contract::WorkerId;
use crate::kv::approx::{Changed, Predictions};
use crate::kv::hash::SeqHash;
use crate::kv::index::{KvIndex, KvIndexWriter, OverlapScores};

/// How long another frontend's decision counts when the worker's events do not confirm it: the
/// events of a routed request arrive within one prefill (milliseconds to a second or two); past
/// this the worker may have evicted the blocks, and only its events say so.
pub const REPLICA_TTL: Duration = Duration::from_secs(5);

/// Other frontends' recent decisions on exact workers; see the module doc.
pub struct ReplicaPredictions {
    writer: KvIndexWriter,
    predictions: Predictions,
}

impl ReplicaPredictions {
    /// Empty predictions, expiring after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        let (_, writer) = KvIndex::new();
        Self { writer, predictions: Predictions::new(ttl) }
    }

    /// The read side routers merge with the exact index.
    pub fn index(&self) -> Arc<KvIndex> {
        self.writer.index().clone()
    }

    /// Another frontend sent a prompt of blocks `seq` to `worker` (of `capacity_blocks`).
    /// `exact`: the exact index; blocks it already holds for `worker` are not predicted.
    pub fn apply(
        &mut self,
        exact: &KvIndex,
        worker: WorkerId,
        capacity_blocks: u64,
        seq: &[SeqHash],
        now: Instant,
    ) -> Changed {
        let held = exact.find_matches(seq).overlap(worker) as usize;
        if held >= seq.len() {
            return Changed::default();
        }
        // The held prefix is refreshed too (one walk of the tail alone would not start at the
        // first block, and the overlap walk starts there).
        self.predictions.store(&mut self.writer, worker, capacity_blocks, seq, now)
    }

    /// The worker's event applied to the exact index: its stored blocks are no longer
    /// predictions. Returns the predicted blocks dropped.
    pub fn confirm(&mut self, event: &KvEvent) -> u64 {
        if self.predictions.len_of(event.worker) == 0 {
            return 0;
        }
        match &event.kind {
            KvEventKind::Stored { blocks, .. } => {
                self.predictions.remove_blocks(&mut self.writer, event.worker, blocks.iter().map(|b| b.seq_hash))
            }
            _ => 0,
        }
    }

    /// Drops what is older than the TTL (bounded steps).
    pub fn expire(&mut self, now: Instant) -> Changed {
        self.predictions.expire(&mut self.writer, now)
    }

    /// `worker` left: its predictions go.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.writer.remove_worker(worker);
        self.predictions.remove(worker);
    }

    /// Blocks predicted for `worker`.
    pub fn len_of(&self, worker: WorkerId) -> usize {
        self.predictions.len_of(worker)
    }
}

/// Merges the predicted overlaps into the exact ones: each worker's overlap is the larger of
/// the two (both are leading-block counts of the same prompt); a worker only predicted is added
/// with its exact cached-block count (`cached_of`). `exact` stays sorted by worker id.
pub fn merge(exact: &mut OverlapScores, predicted: &OverlapScores, cached_of: impl Fn(WorkerId) -> u64) {
    for &(w, depth) in &predicted.scores {
        match exact.scores.binary_search_by_key(&w, |&(id, _)| id) {
            Ok(i) => exact.scores[i].1 = exact.scores[i].1.max(depth),
            Err(i) => {
                exact.scores.insert(i, (w, depth));
                exact.cached_blocks.insert(i, cached_of(w));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::events::{EngineHash, StoredBlock};

    fn seqs(range: std::ops::Range<u64>) -> Vec<SeqHash> {
        range.map(SeqHash).collect()
    }

    fn stored(worker: WorkerId, id: u64, seq: &[SeqHash]) -> KvEvent {
        let blocks = seq.iter().map(|&s| StoredBlock { seq_hash: s, engine_hash: EngineHash(s.0 + 1000) }).collect();
        KvEvent { worker, event_id: id, timestamp_us: 0, kind: KvEventKind::Stored { parent: None, blocks } }
    }

    fn merged(exact: &KvIndex, r: &ReplicaPredictions, seq: &[SeqHash]) -> Vec<(WorkerId, u32)> {
        let mut m = exact.find_matches(seq);
        merge(&mut m, &r.index().find_matches(seq), |w| exact.cached_blocks(w));
        m.scores
    }

    #[test]
    fn predictions_count_until_the_events_confirm_them_and_never_touch_the_exact_index() {
        let (exact, mut writer) = KvIndex::new();
        let mut r = ReplicaPredictions::new(REPLICA_TTL);
        let (a, b) = (WorkerId(1), WorkerId(2));
        let t0 = Instant::now();
        let prompt = seqs(10..16);
        // b holds the first two blocks by its events; another frontend sent the prompt to a.
        writer.apply(&stored(b, 1, &prompt[..2])).unwrap();
        assert_eq!(r.apply(&exact, a, 0, &prompt, t0).stored, 6);
        assert_eq!(merged(&exact, &r, &prompt), vec![(a, 6), (b, 2)]);
        assert_eq!(exact.find_matches(&prompt).scores, vec![(b, 2)], "the exact index is untouched");
        // a's events for the first four blocks arrive: those predictions go, the tail stays.
        writer.apply(&stored(a, 1, &prompt[..4])).unwrap();
        assert_eq!(r.confirm(&stored(a, 1, &prompt[..4])), 4);
        assert_eq!(r.len_of(a), 2);
        // The predicted tail alone does not start at the first block: the exact 4 count.
        assert_eq!(merged(&exact, &r, &prompt), vec![(a, 4), (b, 2)]);
        // Expired after the TTL.
        assert_eq!(r.expire(t0 + REPLICA_TTL).expired, 2);
        assert_eq!(r.len_of(a), 0);
        assert_eq!(exact.num_entries(), 6);
    }

    #[test]
    fn fully_held_prompts_are_not_predicted_and_leaving_workers_are_dropped() {
        let (exact, mut writer) = KvIndex::new();
        let mut r = ReplicaPredictions::new(REPLICA_TTL);
        let w = WorkerId(3);
        writer.apply(&stored(w, 1, &seqs(0..3))).unwrap();
        assert_eq!(r.apply(&exact, w, 0, &seqs(0..3), Instant::now()), Changed::default());
        r.apply(&exact, w, 0, &seqs(0..5), Instant::now());
        assert_eq!(r.len_of(w), 5);
        r.remove_worker(w);
        assert_eq!((r.len_of(w), r.index().num_entries()), (0, 0));
        // A late decision for a worker that left creates nothing in the index.
        r.apply(&exact, w, 0, &seqs(0..5), Instant::now());
        assert_eq!(r.index().num_entries(), 0);
    }

    #[test]
    fn merge_keeps_workers_sorted_with_their_cached_counts() {
        let mut exact = OverlapScores { scores: vec![(WorkerId(2), 3)], cached_blocks: vec![30] };
        let predicted = OverlapScores {
            scores: vec![(WorkerId(1), 5), (WorkerId(2), 1), (WorkerId(4), 2)],
            cached_blocks: vec![0; 3],
        };
        merge(&mut exact, &predicted, |w| w.0 * 10);
        assert_eq!(exact.scores, vec![(WorkerId(1), 5), (WorkerId(2), 3), (WorkerId(4), 2)]);
        assert_eq!(exact.cached_blocks, vec![10, 30, 40]);
    }
}
