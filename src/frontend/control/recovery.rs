//! The recovery seam: how the control plane asks a worker to replay the KV events it missed,
//! or to dump its whole cache state when they are too old.
//!
//! One trait, [`RecoverySource`]; the in-process implementation reaches embedded workers'
//! [`WorkerControl`]s, a request-plane implementation reaches remote workers. Cold path: called
//! only after an event-id gap, from tasks beside the control plane's event loop (never inside
//! it: a worker waiting on a full event plane must still be drained while it answers).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::contract::control::{Recovery, WorkerControl};
use crate::contract::control::{RecoveryError, RecoverySource};
use crate::contract::{Target, WorkerId};

/// Embedded workers' control handles, published whole on change.
#[derive(Default, Clone)]
pub struct InProcessRecovery {
    controls: Arc<ArcSwap<HashMap<WorkerId, WorkerControl>>>,
}

impl InProcessRecovery {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, control: WorkerControl) {
        self.controls.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(control.worker(), control.clone());
            m
        });
    }

    pub fn remove(&self, worker: WorkerId) {
        self.controls.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(&worker);
            m
        });
    }
}

impl RecoverySource for InProcessRecovery {
    async fn recover(&self, to: Target, since: u64) -> Result<Recovery, RecoveryError> {
        let control = self.controls.load().get(&to.worker).cloned().ok_or(RecoveryError::Unknown(to.worker))?;
        Ok(control.recover(since).await?)
    }
}
