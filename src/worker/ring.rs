//! The ring of a worker's most recently published KV events: it answers "every event after id
//! N" while N is recent enough (a router that missed a few batches replays them instead of
//! asking for a whole dump).
//!
//! Invariant: the ring holds the newest published events with contiguous ids, oldest first,
//! ending at [`EventRing::last_event_id`] (0 before any event); at most `max_events` of them and
//! at most `max_blocks` block ids in total, except that the newest event is always kept, so
//! "everything after `last − 1`" is always answerable. Concurrency: owned by the worker task.

use std::collections::VecDeque;

use crate::contract::events::{KvEvent, KvEventKind};

/// Events a worker keeps for replay: a busy worker publishes a few events per step, so this
/// covers seconds of traffic (a dropped batch, a subscriber's reconnect); an older gap gets a
/// dump, which is bounded by the cache size instead.
pub const EVENT_RING_CAPACITY: usize = 4096;
/// Block ids the ring holds at most (16 B each, so 16 MiB): a step can store or evict hundreds
/// of blocks in one event, so the event count alone would not bound the ring's memory.
pub const EVENT_RING_MAX_BLOCKS: usize = 1 << 20;

/// Recent events, for replay.
#[derive(Debug)]
pub struct EventRing {
    events: VecDeque<KvEvent>,
    blocks: usize,
    max_events: usize,
    max_blocks: usize,
    last_event_id: u64,
}

impl Default for EventRing {
    fn default() -> Self {
        Self::new(EVENT_RING_CAPACITY, EVENT_RING_MAX_BLOCKS)
    }
}

impl EventRing {
    /// A ring of at most `max_events` events and `max_blocks` block ids (`max_events > 0`).
    pub fn new(max_events: usize, max_blocks: usize) -> Self {
        assert!(max_events > 0, "a ring keeps at least the newest event");
        Self { events: VecDeque::new(), blocks: 0, max_events, max_blocks, last_event_id: 0 }
    }

    /// Records a published event; ids must be contiguous.
    pub fn push(&mut self, event: KvEvent) {
        assert_eq!(event.event_id, self.last_event_id + 1, "ring events are contiguous");
        self.last_event_id = event.event_id;
        self.blocks += blocks_of(&event.kind);
        self.events.push_back(event);
        while self.events.len() > 1 && (self.events.len() > self.max_events || self.blocks > self.max_blocks) {
            let old = self.events.pop_front().expect("len > 1");
            self.blocks -= blocks_of(&old.kind);
        }
    }

    /// The id of the newest event published (0 before any).
    pub fn last_event_id(&self) -> u64 {
        self.last_event_id
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Every event after `since`, oldest first; `None` when the ring no longer holds them all or
    /// `since` is in the future (newer than the last event).
    pub fn since(&self, since: u64) -> Option<Vec<KvEvent>> {
        if since > self.last_event_id {
            return None;
        }
        if since == self.last_event_id {
            return Some(Vec::new());
        }
        // since < last: at least one event was published, and the newest is always kept.
        let first = self.events.front().expect("newest kept").event_id;
        if since + 1 < first {
            return None;
        }
        let skip = (since + 1 - first) as usize;
        Some(self.events.iter().skip(skip).cloned().collect())
    }
}

fn blocks_of(kind: &KvEventKind) -> usize {
    match kind {
        KvEventKind::Stored { blocks, .. } => blocks.len(),
        KvEventKind::Removed { engine_hashes } => engine_hashes.len(),
        KvEventKind::Cleared => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::events::EngineHash;
    use crate::contract::WorkerId;

    fn event(id: u64, blocks: usize) -> KvEvent {
        let kind = if blocks == 0 {
            KvEventKind::Cleared
        } else {
            KvEventKind::Removed { engine_hashes: (0..blocks as u64).map(EngineHash).collect() }
        };
        KvEvent { worker: WorkerId(1), event_id: id, timestamp_us: 1, kind }
    }

    fn ids(events: Option<Vec<KvEvent>>) -> Option<Vec<u64>> {
        events.map(|v| v.iter().map(|e| e.event_id).collect())
    }

    #[test]
    fn answers_recent_gaps_only() {
        let mut r = EventRing::new(4, usize::MAX);
        assert_eq!(ids(r.since(0)), Some(vec![]));
        assert_eq!(ids(r.since(1)), None, "in the future");
        for id in 1..=6 {
            r.push(event(id, 1));
        }
        assert_eq!(r.len(), 4);
        assert_eq!(ids(r.since(2)), Some(vec![3, 4, 5, 6]));
        assert_eq!(ids(r.since(5)), Some(vec![6]));
        assert_eq!(ids(r.since(6)), Some(vec![]));
        assert_eq!(ids(r.since(1)), None, "event 2 is gone");
        assert_eq!(ids(r.since(7)), None);
    }

    #[test]
    fn the_default_bound_is_respected() {
        let mut r = EventRing::default();
        let n = EVENT_RING_CAPACITY as u64 + 10;
        for id in 1..=n {
            r.push(event(id, 1));
            assert!(r.len() <= EVENT_RING_CAPACITY);
        }
        assert_eq!(r.len(), EVENT_RING_CAPACITY);
        let oldest = n - EVENT_RING_CAPACITY as u64 + 1;
        assert_eq!(r.since(oldest - 1).map(|v| v.len()), Some(EVENT_RING_CAPACITY));
        assert_eq!(ids(r.since(oldest - 2)), None);
    }

    #[test]
    fn blocks_are_bounded_but_the_newest_event_is_kept() {
        let mut r = EventRing::new(100, 10);
        for id in 1..=5 {
            r.push(event(id, 3));
        }
        assert_eq!(r.len(), 3, "9 blocks fit, 12 do not");
        r.push(event(6, 50));
        assert_eq!(ids(r.since(5)), Some(vec![6]));
        assert_eq!(ids(r.since(4)), None);
        r.push(event(7, 0));
        assert_eq!(ids(r.since(6)), Some(vec![7]), "the oversized event goes next");
        r.push(event(8, 0));
        assert_eq!(ids(r.since(6)), Some(vec![7, 8]), "a Cleared holds no blocks");
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn a_skipped_id_is_a_bug() {
        let mut r = EventRing::default();
        r.push(event(2, 1));
    }
}
