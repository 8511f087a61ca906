//! The frontend's view of the workers under one prefix, kept by one task.
//!
//! Invariant: the published snapshot is the prefix's contents at some revision (values that are
//! not a `WorkerInfo` are skipped), replaced whole. The task reads the prefix, publishes, then
//! watches from the read revision + 1, so no change between read and watch is missed. On any
//! watch error, cancellation or compaction (an etcd restart shows up as one of those) it keeps
//! the last snapshot, backs off, re-reads and re-watches.
//!
//! Concurrency: the task owns the key → worker map and is the only sender on its watch channel;
//! it ends when every receiver is dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::{call, Backoff, EtcdError};
use crate::planes::discovery::{WorkerInfo, WorkerSnapshot};

/// Reads the prefix and starts the task that follows it.
pub(super) async fn start(
    client: Client,
    prefix: String,
    model: Option<String>,
) -> Result<watch::Receiver<WorkerSnapshot>, EtcdError> {
    let mut w = Watcher { client, prefix, model, workers: BTreeMap::new() };
    let revision = w.read().await?;
    let (tx, rx) = watch::channel(w.snapshot());
    tokio::spawn(w.run(tx, revision));
    Ok(rx)
}

/// Applies one put; values that are not a `WorkerInfo` (or of another model: a prefix
/// `/ns/workers/m/` also covers model `m/x`) are skipped.
fn apply_put(workers: &mut BTreeMap<String, WorkerInfo>, model: Option<&str>, key: &[u8], value: &[u8]) {
    let key = String::from_utf8_lossy(key).into_owned();
    match serde_json::from_slice::<WorkerInfo>(value) {
        Ok(info) if model.is_none_or(|m| m == info.model) => {
            workers.insert(key, info);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(%key, error = %e, "skipping malformed worker entry in etcd"),
    }
}

/// The frontend's view of one prefix: owned by its watch task.
struct Watcher {
    client: Client,
    prefix: String,
    model: Option<String>,
    workers: BTreeMap<String, WorkerInfo>,
}

enum WatchEnd {
    /// Every receiver is gone.
    Closed,
    /// Re-read and re-watch after a delay.
    Retry(EtcdError),
}

impl Watcher {
    fn snapshot(&self) -> WorkerSnapshot {
        Arc::new(self.workers.values().cloned().collect())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        apply_put(&mut self.workers, self.model.as_deref(), key, value);
    }

    /// Replaces the map with the prefix's current contents; returns the read's revision.
    async fn read(&mut self) -> Result<i64, EtcdError> {
        let opts = GetOptions::new().with_prefix();
        let resp = call("get", self.client.get(self.prefix.clone(), Some(opts))).await?;
        self.workers.clear();
        for kv in resp.kvs() {
            self.put(kv.key(), kv.value());
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn run(mut self, tx: watch::Sender<WorkerSnapshot>, mut revision: i64) {
        let mut backoff = Backoff::new();
        loop {
            let end = tokio::select! {
                _ = tx.closed() => WatchEnd::Closed,
                end = self.follow(&tx, revision, &mut backoff) => end,
            };
            let WatchEnd::Retry(mut err) = end else {
                return;
            };
            loop {
                let delay = backoff.delay();
                tracing::warn!(prefix = %self.prefix, error = %err, retry_in_ms = delay.as_millis() as u64,
                    "etcd watch lost; keeping the last snapshot");
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.read().await {
                    Ok(rev) => {
                        revision = rev;
                        self.publish(&tx);
                        tracing::info!(prefix = %self.prefix, revision, workers = self.workers.len(),
                            "etcd re-read; watching again");
                        break;
                    }
                    Err(e) => err = e,
                }
            }
        }
    }

    fn publish(&self, tx: &watch::Sender<WorkerSnapshot>) {
        let snap = self.snapshot();
        tx.send_if_modified(|cur| {
            let changed = **cur != *snap;
            if changed {
                *cur = snap;
            }
            changed
        });
    }

    /// Watches from `revision + 1`, publishing after every response, until something breaks.
    async fn follow(&mut self, tx: &watch::Sender<WorkerSnapshot>, revision: i64, backoff: &mut Backoff) -> WatchEnd {
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = match call("watch", self.client.watch(self.prefix.clone(), Some(opts))).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Retry(e),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let source = etcd_client::Error::WatchError("stream closed by etcd".into());
                    return WatchEnd::Retry(EtcdError::Request { op: "watch", source });
                }
                Err(source) => return WatchEnd::Retry(EtcdError::Request { op: "watch", source }),
            };
            if resp.canceled() {
                let why = if resp.compact_revision() > 0 {
                    format!("revision {} compacted (now {})", revision + 1, resp.compact_revision())
                } else {
                    format!("canceled: {}", resp.cancel_reason())
                };
                let source = etcd_client::Error::WatchError(why);
                return WatchEnd::Retry(EtcdError::Request { op: "watch", source });
            }
            backoff.reset();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    EventType::Put => self.put(kv.key(), kv.value()),
                    EventType::Delete => {
                        self.workers.remove(&*String::from_utf8_lossy(kv.key()));
                    }
                }
            }
            self.publish(tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{WorkerId, WorkerRole};

    fn info(id: u64, model: &str) -> Vec<u8> {
        serde_json::to_vec(&WorkerInfo {
            id: WorkerId(id),
            model: model.into(),
            model_path: None,
            role: WorkerRole::Decode,
            page_size: 16,
            kv_capacity_blocks: 1024,
            max_num_seqs: 8,
            max_num_batched_tokens: 2048,
            address: None,
            engine: Default::default(),
            disagg: Default::default(),
            bootstrap: None,
            kv_events: true,
        })
        .unwrap()
    }

    #[test]
    fn puts_skip_malformed_values_and_other_models() {
        let mut m = BTreeMap::new();
        apply_put(&mut m, Some("m"), b"/n/workers/m/decode/1", &info(1, "m"));
        apply_put(&mut m, Some("m"), b"/n/workers/m/x/decode/2", &info(2, "m/x"));
        apply_put(&mut m, Some("m"), b"/n/workers/m/decode/3", b"not json");
        assert_eq!(m.values().map(|w| w.id.0).collect::<Vec<_>>(), vec![1]);
        apply_put(&mut m, None, b"/n/workers/m/x/decode/2", &info(2, "m/x"));
        assert_eq!(m.len(), 2);
    }
}
