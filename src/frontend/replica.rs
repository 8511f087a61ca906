//! Router replica sync in the frontend (`--router-replica-sync`, Dynamo's flag): this frontend
//! tells the others of its namespace where it routed, and counts what they routed as
//! predictions until the workers' KV events arrive ([`crate::kv::replica`]).
//!
//! The path of one decision:
//! 1. A shard dispatches a request; once the send succeeded it queues a [`Decision`] (worker,
//!    model, the prompt's leading block hashes) with [`ReplicaSync::decided`]: `try_send` on a
//!    bounded queue ([`DECISION_QUEUE_DEPTH`]); a full queue drops it (counted), never waits.
//! 2. The publisher task ([`publish`]) takes what is queued, up to
//!    [`MAX_DECISIONS_PER_BATCH`] at a time, and publishes one message per batch: one message
//!    per decision when traffic is light (no added delay: the next turn of a session can follow
//!    within milliseconds), fewer, larger messages under load. The rate is thus bounded by the
//!    request rate and the queue, never by a timer.
//! 3. Every other frontend's receiver task ([`receive`]) skips its own batches (by the random
//!    [`ReplicaSync::id`]) and hands the others' to its control plane over a bounded queue
//!    ([`REPLICA_QUEUE_DEPTH`]; full: dropped, counted).
//! 4. The control plane ([`super::control`]) applies each decision to its
//!    [`ReplicaPredictions`] (an exact worker: predicted for [`REPLICA_TTL`] or until the
//!    worker's `Stored` events confirm it) or, for a worker without KV events, to the
//!    approximate mode's predictions, as its own dispatches are.
//!
//! Concurrency: [`ReplicaSync`] is shared by the shards and the control-plane tasks; its
//! counters are atomics; its queues' receiving ends are taken once each.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::kv::index::KvIndex;
use crate::kv::replica::{ReplicaPredictions, REPLICA_TTL};
use crate::planes::replica::{
    Decision, DecisionBatch, DecisionPublisher, DecisionSubscriber, MAX_DECISIONS_PER_BATCH, REPLICA_QUEUE_DEPTH,
};

/// Decisions queued by the shards for the publisher: a publish takes microseconds, so this is
/// seconds of slack at any rate a frontend serves.
pub const DECISION_QUEUE_DEPTH: usize = 1024;

/// Counters of `/metrics` (`kvgate_router_sync_*`).
#[derive(Debug, Default)]
pub struct ReplicaStats {
    pub published: AtomicU64,
    pub batches_published: AtomicU64,
    pub dropped_outgoing: AtomicU64,
    pub received: AtomicU64,
    pub dropped_incoming: AtomicU64,
    pub applied: AtomicU64,
    pub ignored: AtomicU64,
    pub blocks_confirmed: AtomicU64,
    pub blocks_expired: AtomicU64,
}

/// What the control plane takes to apply the others' decisions.
pub struct ReplicaControl {
    pub predictions: ReplicaPredictions,
    pub incoming: mpsc::Receiver<DecisionBatch>,
}

/// See the module doc.
pub struct ReplicaSync {
    /// This frontend's id in its messages (random per process).
    pub id: u64,
    index: Arc<KvIndex>,
    outgoing: mpsc::Sender<Decision>,
    outgoing_rx: Mutex<Option<mpsc::Receiver<Decision>>>,
    incoming: mpsc::Sender<DecisionBatch>,
    control: Mutex<Option<ReplicaControl>>,
    pub stats: ReplicaStats,
}

impl ReplicaSync {
    pub fn new() -> Arc<Self> {
        let predictions = ReplicaPredictions::new(REPLICA_TTL);
        let (outgoing, outgoing_rx) = mpsc::channel(DECISION_QUEUE_DEPTH);
        let (incoming, incoming_rx) = mpsc::channel(REPLICA_QUEUE_DEPTH);
        Arc::new(Self {
            id: rand::random::<u64>(),
            index: predictions.index(),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            incoming,
            control: Mutex::new(Some(ReplicaControl { predictions, incoming: incoming_rx })),
            stats: ReplicaStats::default(),
        })
    }

    /// The predictions' read side, for the routers.
    pub fn index(&self) -> Arc<KvIndex> {
        self.index.clone()
    }

    /// A shard sent a request as `decision` says. Never waits.
    pub fn decided(&self, decision: Decision) {
        if self.outgoing.try_send(decision).is_err() {
            self.stats.dropped_outgoing.fetch_add(1, Relaxed);
        }
    }

    /// The control plane's part: `Some` once.
    pub fn take_control(&self) -> Option<ReplicaControl> {
        self.control.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn take_outgoing(&self) -> Option<mpsc::Receiver<Decision>> {
        self.outgoing_rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The publisher task: runs until the control-plane runtime stops (a second publisher returns
/// at once).
pub async fn publish(sync: Arc<ReplicaSync>, publisher: impl DecisionPublisher) {
    let Some(mut rx) = sync.take_outgoing() else { return };
    let mut decisions = Vec::with_capacity(MAX_DECISIONS_PER_BATCH);
    while rx.recv_many(&mut decisions, MAX_DECISIONS_PER_BATCH).await > 0 {
        let n = decisions.len() as u64;
        let batch = DecisionBatch { frontend: sync.id, decisions: std::mem::take(&mut decisions) };
        publisher.publish(&batch).await;
        decisions = batch.decisions;
        decisions.clear();
        sync.stats.published.fetch_add(n, Relaxed);
        sync.stats.batches_published.fetch_add(1, Relaxed);
    }
}

/// The receiver task: hands the other frontends' batches to the control plane.
pub async fn receive(sync: Arc<ReplicaSync>, mut subscriber: impl DecisionSubscriber) {
    while let Some(batch) = subscriber.next_batch().await {
        if batch.frontend == sync.id {
            continue;
        }
        let n = batch.decisions.len() as u64;
        sync.stats.received.fetch_add(n, Relaxed);
        if sync.incoming.try_send(batch).is_err() {
            sync.stats.dropped_incoming.fetch_add(n, Relaxed);
        }
    }
}

/// Appends the `kvgate_router_sync_*` metrics.
pub fn render(sync: &ReplicaSync, out: &mut String) {
    let s = &sync.stats;
    let counters: [(&str, &str, &AtomicU64); 8] = [
        (
            "kvgate_router_sync_decisions_published_total",
            "Routing decisions this frontend published to the others (router replica sync).",
            &s.published,
        ),
        ("kvgate_router_sync_batches_published_total", "Messages those decisions went in.", &s.batches_published),
        (
            "kvgate_router_sync_decisions_received_total",
            "Routing decisions received from other frontends.",
            &s.received,
        ),
        (
            "kvgate_router_sync_decisions_applied_total",
            "Received decisions applied as predictions (the others were for workers this frontend does not know).",
            &s.applied,
        ),
        (
            "kvgate_router_sync_decisions_ignored_total",
            "Received decisions for workers this frontend does not know.",
            &s.ignored,
        ),
        (
            "kvgate_router_sync_decisions_dropped_total",
            "Decisions dropped because a queue was full (outgoing or incoming).",
            &s.dropped_outgoing,
        ),
        (
            "kvgate_router_sync_blocks_confirmed_total",
            "Predicted blocks dropped because the worker's KV events stored them.",
            &s.blocks_confirmed,
        ),
        ("kvgate_router_sync_blocks_expired_total", "Predicted blocks that expired unconfirmed.", &s.blocks_expired),
    ];
    for (name, help, c) in counters {
        let mut v = c.load(Relaxed);
        if name == "kvgate_router_sync_decisions_dropped_total" {
            v += s.dropped_incoming.load(Relaxed);
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let name = "kvgate_router_sync_predicted_blocks";
    let _ = writeln!(
        out,
        "# HELP {name} Block-worker pairs predicted from other frontends' decisions, not yet confirmed or expired.\n# TYPE {name} gauge\n{name} {}",
        sync.index.num_entries()
    );
}
