//! The frontend's shared state: served models, their worker groups (one snapshot per model,
//! swapped whole), the KV index, metrics.
//!
//! Concurrency: [`Frontend`] is shared (`Arc`) by every data-plane shard and the control plane.
//! Everything a shard reads on the request path is either immutable or published whole by one
//! atomic swap (the model table, each model's worker group) or read lock-free (the KV index,
//! per-shard load slots). Only the control plane ([`super::control`]) writes: it owns the index writer
//! and rebuilds worker groups from discovery snapshots.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::contract::{DisaggStyle, WorkerId, WorkerRole};
use crate::kv::hash::BlockHasher;
use crate::kv::index::KvIndex;
use crate::metrics::{Metrics, WorkerGauge};
use crate::planes::discovery::WorkerInfo;
use crate::preprocess::Preprocessor;
use crate::router::{Candidate, Router, RouterConfig, WorkerLoad};

/// The live workers of one model, replaced whole when discovery changes.
#[derive(Default)]
pub struct WorkerGroup {
    /// Workers that serve whole requests: aggregated workers, and decode workers (which
    /// prefill locally when there is no prefill worker, or conditional disaggregation says so).
    pub candidates: Vec<Candidate>,
    /// Prefill workers (disaggregated serving).
    pub prefill: Vec<Candidate>,
    /// Decode workers (disaggregated serving); also in `candidates`.
    pub decode: Vec<Candidate>,
    /// How each worker takes part in disaggregation: its engine's style and bootstrap value.
    pub peers: HashMap<WorkerId, Peer>,
    pub infos: Vec<WorkerInfo>,
}

/// A worker's part in disaggregated serving (from its registration).
#[derive(Debug, Clone)]
pub struct Peer {
    pub style: DisaggStyle,
    pub bootstrap: Option<Arc<str>>,
}

impl WorkerGroup {
    /// `worker`'s disaggregation style and bootstrap value (the mocker's push when unknown).
    pub fn peer(&self, worker: WorkerId) -> Peer {
        self.peers.get(&worker).cloned().unwrap_or(Peer { style: DisaggStyle::Push, bootstrap: None })
    }

    /// Live workers in all.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// Whether requests run disaggregated: the model has prefill and decode workers.
    pub fn disaggregated(&self) -> bool {
        !self.prefill.is_empty() && !self.decode.is_empty()
    }

    /// Every worker with its load cell and role (metrics).
    pub fn all(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.iter().chain(self.prefill.iter())
    }
}

/// When and how requests of a model with prefill workers run disaggregated.
#[derive(Debug, Clone, PartialEq)]
pub struct DisaggPolicy {
    /// No prefill workers: refuse (503) instead of serving aggregated.
    pub enforce: bool,
    /// Prefill on the decode worker when fewer prompt tokens than this are uncached there.
    pub min_uncached_tokens: u32,
    /// ... or when it holds at least this share of the prompt (above 1: never).
    pub local_cached_ratio: f64,
}

impl Default for DisaggPolicy {
    fn default() -> Self {
        Self { enforce: false, min_uncached_tokens: 0, local_cached_ratio: 1.0 }
    }
}

impl DisaggPolicy {
    /// Whether a prompt of `prompt_tokens` with `cached_tokens` already on the decode worker
    /// is prefilled there.
    pub fn prefill_locally(&self, prompt_tokens: u32, cached_tokens: u32) -> bool {
        let uncached = prompt_tokens.saturating_sub(cached_tokens);
        uncached < self.min_uncached_tokens
            || (self.local_cached_ratio <= 1.0
                && f64::from(cached_tokens) >= self.local_cached_ratio * f64::from(prompt_tokens))
    }
}

/// One served model.
pub struct ModelState {
    pub name: String,
    pub preprocessor: Arc<Preprocessor>,
    pub hasher: BlockHasher,
    pub router: Router,
    /// Picks decode workers of disaggregated requests: by load alone (overlap weight 0).
    pub decode_router: Router,
    pub workers: ArcSwap<WorkerGroup>,
    /// Unix seconds when the model was first served (`/v1/models`).
    pub created: u64,
}

/// Settings of the HTTP layer that handlers need.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    /// How many times a request may move to another worker when its worker fails.
    pub migration_limit: u32,
    pub disagg: DisaggPolicy,
}

/// A worker the request plane could not reach is left out of routing for this long (or until
/// discovery drops it, when its lease expires).
pub const WORKER_DOWN_FOR: Duration = Duration::from_secs(10);

/// State shared by every shard.
pub struct Frontend<P> {
    pub plane: P,
    pub index: Arc<KvIndex>,
    pub metrics: Arc<Metrics>,
    pub limits: HttpLimits,
    router_config: RouterConfig,
    models: ArcSwap<HashMap<String, Arc<ModelState>>>,
    /// Workers found unreachable, and when. Written only on a failed dispatch (rare), read
    /// lock-free by every routing decision while non-empty.
    down: papaya::HashMap<WorkerId, Instant>,
}

impl<P> Frontend<P> {
    pub fn new(plane: P, index: Arc<KvIndex>, router_config: RouterConfig, limits: HttpLimits, shards: usize) -> Self {
        Self {
            plane,
            index,
            metrics: Arc::new(Metrics::new(shards)),
            limits,
            router_config,
            models: ArcSwap::from_pointee(HashMap::new()),
            down: papaya::HashMap::new(),
        }
    }

    /// Takes a worker out of routing for [`WORKER_DOWN_FOR`]: it could not be reached.
    pub fn mark_down(&self, worker: WorkerId) {
        tracing::warn!(worker = %worker, "worker unreachable; leaving it out of routing");
        self.down.pin().insert(worker, Instant::now());
    }

    /// Whether `worker` was found unreachable recently.
    pub fn is_down(&self, worker: WorkerId) -> bool {
        if self.down.is_empty() {
            return false;
        }
        let down = self.down.pin();
        match down.get(&worker) {
            Some(t) if t.elapsed() < WORKER_DOWN_FOR => true,
            Some(_) => {
                down.remove(&worker);
                false
            }
            None => false,
        }
    }

    /// Serves a model (no workers yet). Called on the control plane.
    pub fn add_model(&self, name: &str, preprocessor: Arc<Preprocessor>, page_size: u32) -> Arc<ModelState> {
        let config = RouterConfig { block_size: page_size, ..self.router_config.clone() };
        let state = Arc::new(ModelState {
            name: name.to_string(),
            preprocessor,
            hasher: BlockHasher::new(page_size as usize),
            router: Router::new(config.clone(), self.index.clone()),
            decode_router: Router::new(RouterConfig { overlap_weight: 0.0, ..config }, self.index.clone()),
            workers: ArcSwap::from_pointee(WorkerGroup::default()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        self.models.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(name.to_string(), state.clone());
            m
        });
        state
    }

    pub fn model(&self, name: &str) -> Option<Arc<ModelState>> {
        self.models.load().get(name).cloned()
    }

    /// Every served model, sorted by name.
    pub fn models(&self) -> Vec<Arc<ModelState>> {
        let mut v: Vec<_> = self.models.load().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Replaces the worker groups from a discovery snapshot, keeping the load cells of workers
    /// that stay (their in-flight bookings must survive the swap).
    pub fn set_workers(&self, snapshot: &[WorkerInfo]) {
        for model in self.models() {
            let old = model.workers.load();
            let mut group = WorkerGroup::default();
            for info in snapshot.iter().filter(|w| w.model == model.name) {
                let load = old.all().find(|c| c.id == info.id).map(|c| c.load.clone()).unwrap_or_else(WorkerLoad::new);
                let c = Candidate { id: info.id, load };
                match info.role {
                    WorkerRole::Aggregated => group.candidates.push(c),
                    WorkerRole::Prefill => group.prefill.push(c),
                    WorkerRole::Decode => {
                        group.decode.push(c.clone());
                        group.candidates.push(c);
                    }
                }
                let bootstrap = info.bootstrap.as_deref().map(Arc::from);
                group.peers.insert(info.id, Peer { style: info.disagg, bootstrap });
                group.infos.push(info.clone());
            }
            model.workers.store(Arc::new(group));
        }
    }

    /// Prometheus text of everything, with per-worker gauges.
    pub fn render_metrics(&self) -> String {
        let mut gauges = Vec::new();
        for m in self.models() {
            for c in m.workers.load().all() {
                gauges.push(WorkerGauge {
                    model: m.name.clone(),
                    worker: c.id.to_string(),
                    active_requests: c.load.active_requests(),
                    active_prefill_tokens: c.load.active_prefill_tokens(),
                    active_decode_blocks: c.load.active_decode_blocks(),
                    cached_blocks: self.index.cached_blocks(c.id),
                });
            }
        }
        self.metrics.render(&gauges, self.index.num_entries() as u64)
    }
}
