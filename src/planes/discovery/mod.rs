//! Discovery: which workers exist, for which model, in which role.
//!
//! Invariant: the frontend sees an immutable snapshot of all live workers, replaced whole on
//! every change (one atomic swap via a watch channel). A registration is an RAII guard: dropping
//! it deregisters the worker (in etcd, revokes its lease).

pub mod etcd;

use std::sync::Arc;

use tokio::sync::watch;

use crate::contract::WorkerId;
pub use crate::contract::WorkerInfo;

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
