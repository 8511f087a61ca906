//! [`Directory`]: every known worker's cached-block count, sorted by worker id, so a lookup
//! fills the counts of its (sorted) scores by one merge instead of one hash lookup per worker.
//! A hot first block (a shared system prompt) is held by every worker, and a lookup then reports
//! all of them.
//!
//! Invariant: `ids` is sorted and strictly increasing; `counts[i]` is the count of `ids[i]`.
//! Concurrency: published whole through an `ArcSwap` by the index's one writer, rebuilt only
//! when a worker joins or leaves; between rebuilds the writer stores counts in place (relaxed).
//! A reader holding an older directory reads that directory's last counts: a lookup racing a
//! join or leave may see a count slightly behind, never a torn or foreign one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::contract::WorkerId;

/// See the module doc.
#[derive(Default)]
pub(super) struct Directory {
    ids: Box<[WorkerId]>,
    counts: Box<[AtomicU64]>,
}

impl Directory {
    /// A copy with `worker` added at count 0 (`None` if present).
    pub(super) fn with(&self, worker: WorkerId) -> Option<Directory> {
        let at = self.ids.binary_search(&worker).err()?;
        let mut ids = Vec::with_capacity(self.ids.len() + 1);
        ids.extend_from_slice(&self.ids[..at]);
        ids.push(worker);
        ids.extend_from_slice(&self.ids[at..]);
        let counts = (0..ids.len())
            .map(|i| {
                let from = match i.cmp(&at) {
                    std::cmp::Ordering::Less => i,
                    std::cmp::Ordering::Equal => return AtomicU64::new(0),
                    std::cmp::Ordering::Greater => i - 1,
                };
                AtomicU64::new(self.counts[from].load(Relaxed))
            })
            .collect();
        Some(Directory { ids: ids.into(), counts })
    }

    /// A copy without `worker` (`None` if absent).
    pub(super) fn without(&self, worker: WorkerId) -> Option<Directory> {
        let at = self.ids.binary_search(&worker).ok()?;
        let keep = |i: &usize| *i != at;
        let ids = (0..self.ids.len()).filter(keep).map(|i| self.ids[i]).collect();
        let counts = (0..self.ids.len()).filter(keep).map(|i| AtomicU64::new(self.counts[i].load(Relaxed))).collect();
        Some(Directory { ids, counts })
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Sets `worker`'s count (the writer only; `worker` must be present).
    pub(super) fn store(&self, worker: WorkerId, count: u64) {
        match self.ids.binary_search(&worker) {
            Ok(i) => self.counts[i].store(count, Relaxed),
            Err(_) => debug_assert!(false, "{worker} not in the directory"),
        }
    }

    /// `worker`'s count (0 if unknown).
    pub(super) fn get(&self, worker: WorkerId) -> u64 {
        self.ids.binary_search(&worker).map_or(0, |i| self.counts[i].load(Relaxed))
    }

    /// The counts of `scores`' workers (sorted by id), 0 for unknown ones: a merge when the
    /// scores are many, a binary search each when they are few.
    pub(super) fn counts_of<T>(&self, scores: &[(WorkerId, T)]) -> Vec<u64> {
        if scores.len() * 16 < self.ids.len() {
            return scores.iter().map(|(w, _)| self.get(*w)).collect();
        }
        let mut j = 0;
        scores
            .iter()
            .map(|(w, _)| {
                while j < self.ids.len() && self.ids[j] < *w {
                    j += 1;
                }
                match self.ids.get(j) {
                    Some(id) if id == w => self.counts[j].load(Relaxed),
                    _ => 0,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_leaves_and_merged_counts() {
        let mut d = Directory::default();
        for w in [5, 1, 9, 3] {
            d = d.with(WorkerId(w)).unwrap();
            d.store(WorkerId(w), w * 10);
        }
        assert!(d.with(WorkerId(3)).is_none());
        d = d.without(WorkerId(9)).unwrap();
        assert!(d.without(WorkerId(9)).is_none());
        assert_eq!(d.len(), 3);
        let scores: Vec<(WorkerId, u32)> = [1, 2, 3, 5, 9].map(|w| (WorkerId(w), 1)).to_vec();
        assert_eq!(d.counts_of(&scores), [10, 0, 30, 50, 0]);
        assert_eq!(d.counts_of(&scores[..1]), [10]);
        assert_eq!(d.get(WorkerId(5)), 50);
    }
}
