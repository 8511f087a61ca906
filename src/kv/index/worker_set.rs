//! [`WorkerSet`]: the immutable set of workers holding one block.
//!
//! Invariant: ids are sorted and strictly increasing, the set is never empty while it is in the
//! index, and the representation is canonical (`Inline` iff `len <= INLINE`). A value is never
//! mutated after it is built: the index's single writer builds a new set (clone-on-write) and
//! swaps it in whole, so a reader holding `&WorkerSet` sees a complete set, never a torn one.

use crate::contract::WorkerId;

/// Workers kept inline in the map entry before spilling to the heap: most blocks are held by a
/// few workers, and an inline set costs no second allocation or pointer chase on lookup.
pub const INLINE: usize = 4;

/// A sorted, duplicate-free, immutable set of worker ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerSet {
    Inline { len: u8, ids: [WorkerId; INLINE] },
    Heap(Box<[WorkerId]>),
}

const _: () = assert!(INLINE < u8::MAX as usize);

impl WorkerSet {
    /// The set `{w}`.
    pub fn one(w: WorkerId) -> Self {
        let mut ids = [WorkerId(0); INLINE];
        ids[0] = w;
        WorkerSet::Inline { len: 1, ids }
    }

    /// The set of the ascending ids `parts` concatenated, built in place (no temporary).
    fn concat(parts: &[&[WorkerId]]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let set = if len <= INLINE {
            // Element by element: a few word moves, no memcpy call or store-forwarding stall.
            let mut ids = [WorkerId(0); INLINE];
            for (slot, &w) in ids.iter_mut().zip(parts.iter().flat_map(|p| p.iter())) {
                *slot = w;
            }
            WorkerSet::Inline { len: len as u8, ids }
        } else {
            let mut v = Vec::with_capacity(len);
            parts.iter().for_each(|p| v.extend_from_slice(p));
            WorkerSet::Heap(v.into_boxed_slice())
        };
        debug_assert!(set.as_slice().windows(2).all(|p| p[0] < p[1]));
        set
    }

    /// The ids, ascending.
    #[inline]
    pub fn as_slice(&self) -> &[WorkerId] {
        match self {
            WorkerSet::Inline { len, ids } => &ids[..*len as usize],
            WorkerSet::Heap(v) => v,
        }
    }

    /// Bytes this set holds on the heap (0 when inline): memory accounting.
    pub fn heap_bytes(&self) -> usize {
        match self {
            WorkerSet::Inline { .. } => 0,
            WorkerSet::Heap(v) => std::mem::size_of_val::<[WorkerId]>(v),
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub fn contains(&self, w: WorkerId) -> bool {
        self.as_slice().binary_search(&w).is_ok()
    }

    /// A new set with `w` added, or `None` when `w` is already present.
    pub fn with(&self, w: WorkerId) -> Option<Self> {
        let s = self.as_slice();
        let at = s.binary_search(&w).err()?;
        Some(Self::concat(&[&s[..at], &[w], &s[at..]]))
    }

    /// A new set with `w` removed (possibly empty), or `None` when `w` is absent.
    pub fn without(&self, w: WorkerId) -> Option<Self> {
        let s = self.as_slice();
        let at = s.binary_search(&w).ok()?;
        Some(Self::concat(&[&s[..at], &s[at + 1..]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_keeps_sorted_and_canonical() {
        let mut s = WorkerSet::one(WorkerId(5));
        for w in [3, 9, 1, 7, 2, 8] {
            s = s.with(WorkerId(w)).unwrap();
        }
        assert!(s.with(WorkerId(7)).is_none());
        assert_eq!(s.as_slice().iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2, 3, 5, 7, 8, 9]);
        assert!(matches!(s, WorkerSet::Heap(_)));
        for w in [1, 9, 5] {
            s = s.without(WorkerId(w)).unwrap();
        }
        assert!(s.without(WorkerId(1)).is_none());
        assert!(matches!(s, WorkerSet::Inline { len: 4, .. }));
        assert!(s.contains(WorkerId(8)) && !s.contains(WorkerId(9)));
        let empty = WorkerSet::one(WorkerId(1)).without(WorkerId(1)).unwrap();
        assert!(empty.is_empty());
    }
}
