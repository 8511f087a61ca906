//! What a worker registers about itself in discovery (etcd's value, the in-process snapshot).

use serde::{Deserialize, Serialize};

use super::{DisaggStyle, EngineKind, WorkerId, WorkerRole};

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

/// Where a request or a recovery goes: the worker, and its request-plane endpoint as the
/// frontend's worker snapshot has it (`None` for an in-process worker). Callers take both from
/// the same snapshot, so the request plane keeps no table of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub worker: WorkerId,
    pub endpoint: Option<std::net::SocketAddr>,
}

impl Target {
    /// An in-process worker (no endpoint).
    pub fn in_process(worker: WorkerId) -> Self {
        Self { worker, endpoint: None }
    }
}
