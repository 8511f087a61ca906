//! The published mirror: the cache state a worker's KV events describe, as the runtime published
//! them. It answers "dump" for any engine, including engines that cannot list their own cache
//! (SGLang, vLLM): replaying the dump gives exactly the blocks the published events left.
//!
//! Invariant: after [`Mirror::apply`] of every published event in order, the mirror holds one
//! entry per block the events say is cached, keyed by the engine's id, with the sequence hash
//! and parent the `Stored` event gave it. Memory is bounded by the engine's cache (one entry per
//! cached block, [`MIRROR_BYTES_PER_BLOCK`] each). Concurrency: owned by the runtime task.

use std::collections::HashMap;

use crate::contract::events::{EngineHash, KvEventKind, StoredBlock};
use crate::kv::hash::SeqHash;

/// Approximate bytes per mirrored block (hash-map entry with its key and value).
pub const MIRROR_BYTES_PER_BLOCK: usize = 40;

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq_hash: SeqHash,
    parent: Option<SeqHash>,
}

/// What the published events say the engine caches.
#[derive(Debug, Default)]
pub struct Mirror {
    blocks: HashMap<EngineHash, Entry>,
}

impl Mirror {
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Follows one published event.
    pub fn apply(&mut self, kind: &KvEventKind) {
        match kind {
            KvEventKind::Stored { parent, blocks } => {
                let mut parent = *parent;
                for b in blocks {
                    self.blocks.insert(b.engine_hash, Entry { seq_hash: b.seq_hash, parent });
                    parent = Some(b.seq_hash);
                }
            }
            KvEventKind::Removed { engine_hashes } => {
                for h in engine_hashes {
                    self.blocks.remove(h);
                }
            }
            KvEventKind::Cleared => self.blocks.clear(),
        }
    }

    /// The state as events: one `Cleared`, then `Stored` runs that rebuild every block, each
    /// block after its parent when the parent is mirrored (a block whose parent was removed
    /// before it starts a run of its own, keeping its parent id). Sorted, so the same state
    /// always dumps the same events.
    pub fn dump(&self) -> Vec<KvEventKind> {
        let by_seq: HashMap<SeqHash, EngineHash> = self.blocks.iter().map(|(&e, b)| (b.seq_hash, e)).collect();
        let mut children: HashMap<Option<SeqHash>, Vec<SeqHash>> = HashMap::new();
        let mut roots: Vec<(Option<SeqHash>, SeqHash)> = Vec::new();
        for b in self.blocks.values() {
            match b.parent {
                Some(p) if by_seq.contains_key(&p) => children.entry(Some(p)).or_default().push(b.seq_hash),
                parent => roots.push((parent, b.seq_hash)),
            }
        }
        children.values_mut().for_each(|v| v.sort_unstable());
        roots.sort_unstable_by_key(|&(p, h)| (h, p));
        roots.reverse();
        let mut out = vec![KvEventKind::Cleared];
        let mut runs = roots;
        while let Some((parent, mut h)) = runs.pop() {
            let mut blocks = Vec::new();
            loop {
                blocks.push(StoredBlock { seq_hash: h, engine_hash: by_seq[&h] });
                let Some(kids) = children.get(&Some(h)) else {
                    break;
                };
                // Other children start their own runs, emitted after this one.
                runs.extend(kids[1..].iter().rev().map(|&k| (Some(h), k)));
                h = kids[0];
            }
            out.push(KvEventKind::Stored { parent, blocks });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(parent: Option<u64>, blocks: &[u64]) -> KvEventKind {
        KvEventKind::Stored {
            parent: parent.map(SeqHash),
            blocks: blocks
                .iter()
                .map(|&b| StoredBlock { seq_hash: SeqHash(b), engine_hash: EngineHash(b + 1000) })
                .collect(),
        }
    }

    /// The blocks (seq hash, parent) a sequence of events leaves.
    fn state(events: &[KvEventKind]) -> Vec<(u64, Option<u64>)> {
        let mut m = Mirror::default();
        events.iter().for_each(|e| m.apply(e));
        let mut v: Vec<_> = m.blocks.values().map(|b| (b.seq_hash.0, b.parent.map(|p| p.0))).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_dump_rebuilds_the_published_state_parents_first() {
        let events = vec![
            stored(None, &[1, 2, 3]),
            stored(Some(2), &[4]),
            stored(None, &[9]),
            KvEventKind::Removed { engine_hashes: vec![EngineHash(1001)] },
            stored(Some(77), &[5]),
        ];
        let mut m = Mirror::default();
        events.iter().for_each(|e| m.apply(e));
        let dump = m.dump();
        assert_eq!(dump[0], KvEventKind::Cleared);
        assert_eq!(state(&dump), state(&events));
        // Every run's parent is either outside the mirror or emitted before it.
        let mut seen = std::collections::HashSet::new();
        for e in &dump[1..] {
            let KvEventKind::Stored { parent, blocks } = e else { panic!("only Stored after Cleared") };
            if let Some(p) = parent {
                assert!(seen.contains(&p.0) || !state(&events).iter().any(|(h, _)| h == &p.0));
            }
            seen.extend(blocks.iter().map(|b| b.seq_hash.0));
        }
        assert_eq!(m.dump(), dump, "deterministic");
    }

    #[test]
    fn cleared_empties_it() {
        let mut m = Mirror::default();
        m.apply(&stored(None, &[1, 2]));
        m.apply(&KvEventKind::Cleared);
        assert!(m.is_empty());
        assert_eq!(m.dump(), vec![KvEventKind::Cleared]);
    }
}
