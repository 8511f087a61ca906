//! Discovery: which workers exist, for which model, in which role.
//!
//! Invariant: the frontend sees an immutable snapshot of all live workers, replaced whole on
//! every change (one atomic swap via a watch channel). A registration is an RAII guard: dropping
//! it deregisters the worker (in etcd, revokes its lease).

pub mod etcd;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::protocol::{DisaggStyle, EngineKind, WorkerId, WorkerRole};

/// What a worker registers about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: WorkerId,
    /// The served model name clients use.
    pub model: String,
    /// Where the frontend can load the model's tokenizer (a local path or hub id; None = built-in).
    pub model_path: Option<String>,
    pub role: WorkerRole,
    /// KV block size in tokens.
    pub page_size: u32,
    pub kv_capacity_blocks: u64,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    /// Request-plane address (None in-process).
    pub address: Option<String>,
    /// The engine this worker runs.
    #[serde(default)]
    pub engine: EngineKind,
    /// How this worker's engine runs the legs of a disaggregated request.
    #[serde(default)]
    pub disagg: DisaggStyle,
    /// What a disaggregation peer needs to reach this worker's KV: a mocker decode worker's
    /// KV transfer address (prefill workers push to it), an SGLang prefill worker's bootstrap
    /// `host:port` (decode workers pull from it); None when the engine needs none.
    #[serde(default, alias = "transfer_address")]
    pub bootstrap: Option<String>,
    /// Whether this worker publishes KV events (else the frontend can only predict its cache).
    #[serde(default = "yes")]
    pub kv_events: bool,
}

fn yes() -> bool {
    true
}

/// The live workers, as one immutable snapshot.
pub type WorkerSnapshot = Arc<Vec<WorkerInfo>>;

/// In-process discovery: a watch channel of snapshots.
#[derive(Clone)]
pub struct InProcessDiscovery {
    tx: Arc<watch::Sender<WorkerSnapshot>>,
}

impl Default for InProcessDiscovery {
    fn default() -> Self {
        Self { tx: Arc::new(watch::channel(Arc::new(Vec::new())).0) }
    }
}

/// Deregisters its worker when dropped.
pub struct Registration {
    tx: Arc<watch::Sender<WorkerSnapshot>>,
    id: WorkerId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let id = self.id;
        self.tx.send_modify(|s| *s = Arc::new(s.iter().filter(|w| w.id != id).cloned().collect()));
    }
}

impl InProcessDiscovery {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, info: WorkerInfo) -> Registration {
        let id = info.id;
        self.tx.send_modify(|s| {
            let mut v: Vec<WorkerInfo> = s.iter().filter(|w| w.id != id).cloned().collect();
            v.push(info);
            *s = Arc::new(v);
        });
        Registration { tx: self.tx.clone(), id }
    }

    pub fn subscribe(&self) -> watch::Receiver<WorkerSnapshot> {
        self.tx.subscribe()
    }
}
