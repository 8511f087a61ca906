//! The control plane: turns discovery snapshots into worker groups and KV events into index
//! updates.
//!
//! Concurrency: one task on the control-plane runtime owns the [`KvIndexWriter`] (the index's
//! only writer) and is the only caller of [`Frontend::set_workers`]. It is never on the request
//! path: shards read what it publishes.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::watch;

use super::Frontend;
use crate::discovery::WorkerSnapshot;
use crate::events::EventSubscriber;
use crate::kv::index::KvIndexWriter;
use crate::protocol::WorkerId;

/// Runs until both the discovery watch and the event plane are closed.
pub async fn run<P: Send + Sync + 'static>(
    frontend: Arc<Frontend<P>>,
    mut writer: KvIndexWriter,
    mut discovery: watch::Receiver<WorkerSnapshot>,
    mut events: impl EventSubscriber,
) {
    let mut known: HashSet<WorkerId> = HashSet::new();
    apply_snapshot(&frontend, &mut writer, &mut known, &discovery.borrow_and_update().clone());
    let mut discovery_open = true;
    loop {
        tokio::select! {
            changed = discovery.changed(), if discovery_open => {
                if changed.is_err() {
                    discovery_open = false;
                    continue;
                }
                let snap = discovery.borrow_and_update().clone();
                apply_snapshot(&frontend, &mut writer, &mut known, &snap);
            }
            batch = events.next_batch() => {
                let Some(batch) = batch else { break };
                for event in &batch {
                    match writer.apply(event) {
                        Ok(()) => frontend.metrics.control.kv_events_applied.fetch_add(1, Relaxed),
                        Err(e) => {
                            tracing::debug!(worker = %event.worker, error = %e, "kv event");
                            frontend.metrics.control.kv_event_errors.fetch_add(1, Relaxed)
                        }
                    };
                }
            }
        }
    }
}

fn apply_snapshot<P>(
    frontend: &Frontend<P>,
    writer: &mut KvIndexWriter,
    known: &mut HashSet<WorkerId>,
    snap: &WorkerSnapshot,
) {
    let now: HashSet<WorkerId> = snap.iter().map(|w| w.id).collect();
    for gone in known.difference(&now) {
        tracing::info!(worker = %gone, "worker left; dropping its blocks from the index");
        writer.remove_worker(*gone);
    }
    for new in now.difference(known) {
        tracing::info!(worker = %new, "worker joined");
    }
    *known = now;
    frontend.set_workers(snap);
}
