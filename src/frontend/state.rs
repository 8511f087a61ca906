//! The frontend's shared state: served models, their worker groups (one snapshot per model,
//! swapped whole), the KV index, metrics.
//!
//! Concurrency: [`Frontend`] is shared (`Arc`) by every data-plane shard and the control plane.
//! Everything a shard reads on the request path is either immutable or published whole by one
//! atomic swap (the model table, each model's worker group) or read lock-free (the KV index,
//! per-shard load slots). The token cache ([`crate::preprocess::token_cache`]) is the exception:
//! shards write it, under its own striped locks. Only the control plane ([`super::control`]) writes: it owns the index writer
//! and rebuilds worker groups from discovery snapshots.
//!
//! Approximate mode ([`crate::kv::approx`]): each worker's [`KvTracking`] cell holds its index
//! state ([`crate::frontend::index_state`]), so whether its cache is known from its events or
//! predicted (approximate, or blind); shards read it when they route and, after
//! dispatching to an approximate worker, queue a [`Prediction`] for the control plane
//! ([`Frontend::predict`]: a bounded channel, `try_send`, dropped and counted when full).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::contract::{DisaggStyle, Target, WorkerId, WorkerRole};
use crate::frontend::index_state::KvTracking;
use crate::kv::approx::ApproxConfig;
use crate::kv::hash::{BlockHasher, SeqHash};
use crate::kv::index::KvIndex;
use crate::metrics::{Metrics, WorkerGauge};
use crate::openai::parse::ParserFlags;
use crate::planes::discovery::WorkerInfo;
use crate::preprocess::{Preprocessor, TokenCache};
use crate::router::{Candidate, Router, RouterConfig, WorkerLoad};

/// One worker as the frontend knows it: its registration, where to reach it, its load cell
/// (the router's bookings) and its health cell. The cells survive snapshot swaps (in-flight
/// bookings and a recent failure must outlive a discovery change).
#[derive(Clone)]
pub struct WorkerEntry {
    pub info: WorkerInfo,
    /// The request-plane endpoint (None in-process, or when it does not resolve).
    pub endpoint: Option<SocketAddr>,
    pub load: Arc<WorkerLoad>,
    pub health: Arc<Health>,
    pub peer: Peer,
    /// Whether its cache is known from its KV events or predicted (survives snapshot swaps).
    pub kv: Arc<KvTracking>,
}

impl WorkerEntry {
    pub fn target(&self) -> Target {
        Target { worker: self.info.id, endpoint: self.endpoint }
    }
}

/// Whether the request plane could reach a worker lately: a worker that could not be reached
/// is left out of routing for [`WORKER_DOWN_FOR`] (or until discovery drops it).
#[derive(Debug, Default)]
pub struct Health {
    /// Milliseconds since [`epoch`] when it was found unreachable; 0 = fine.
    down_at_ms: AtomicU64,
}

impl Health {
    pub fn mark_down(&self) {
        // 0 means "fine": a mark in the epoch's first millisecond is stored as 1.
        self.down_at_ms.store((epoch().elapsed().as_millis() as u64).max(1), Relaxed);
    }

    pub fn is_down(&self) -> bool {
        let at = self.down_at_ms.load(Relaxed);
        at != 0 && (epoch().elapsed().as_millis() as u64).saturating_sub(at) < WORKER_DOWN_FOR.as_millis() as u64
    }
}

/// Approximate mode: a prompt's blocks dispatched to an approximate worker, for the control
/// plane to record as that worker's predicted cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    pub worker: WorkerId,
    pub blocks: Box<[SeqHash]>,
}

impl Prediction {
    /// `worker` was sent a prompt of blocks `seq` (its first [`MAX_PREDICTION_BLOCKS`] kept).
    pub fn of(worker: WorkerId, seq: &[SeqHash]) -> Self {
        Self { worker, blocks: seq[..seq.len().min(MAX_PREDICTION_BLOCKS)].into() }
    }
}

/// Predictions queued from the shards to the control plane: the control plane applies one in a
/// few µs, so 1,024 is seconds of slack at any request rate a frontend serves; past it a
/// prediction is dropped (counted), which costs a later request a cache miss, never a stall.
pub const PREDICTION_QUEUE_DEPTH: usize = 1024;
/// Blocks one prediction carries at most (its prompt's prefix): 128 Ki tokens at 16 per block,
/// so a full queue holds at most 64 MiB of hashes.
pub const MAX_PREDICTION_BLOCKS: usize = 8192;

/// A request-plane address as a socket address (a literal, else one DNS lookup; control plane only).
fn resolve(address: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    address.parse().ok().or_else(|| address.to_socket_addrs().ok()?.next())
}

/// The process's time origin for health stamps.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The live workers of one model: ONE snapshot (registration, endpoint, disaggregation peer,
/// health and load cells), built from one discovery snapshot and replaced whole. Routing, the
/// request plane (through [`Target`]) and recovery all read it; nothing keeps a second table.
#[derive(Default)]
pub struct WorkerGroup {
    /// Workers that serve whole requests: aggregated workers, and decode workers (which
    /// prefill locally when there is no prefill worker, or conditional disaggregation says so).
    pub candidates: Vec<Candidate>,
    /// Prefill workers (disaggregated serving).
    pub prefill: Vec<Candidate>,
    /// Decode workers (disaggregated serving); also in `candidates`.
    pub decode: Vec<Candidate>,
    /// Every worker of the model, by id.
    pub entries: HashMap<WorkerId, WorkerEntry>,
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
        self.entries.get(&worker).map_or(Peer { style: DisaggStyle::Push, bootstrap: None }, |e| e.peer.clone())
    }

    /// Where to send `worker`'s requests (no endpoint if it left meanwhile: the plane says gone).
    pub fn target(&self, worker: WorkerId) -> Target {
        self.entries.get(&worker).map_or(Target::in_process(worker), WorkerEntry::target)
    }

    /// Whether `worker` could not be reached lately.
    pub fn is_down(&self, worker: WorkerId) -> bool {
        self.entries.get(&worker).is_some_and(|e| e.health.is_down())
    }

    /// Takes `worker` out of routing for [`WORKER_DOWN_FOR`]: it could not be reached.
    pub fn mark_down(&self, worker: WorkerId) {
        if let Some(e) = self.entries.get(&worker) {
            tracing::warn!(worker = %worker, "worker unreachable; leaving it out of routing");
            e.health.mark_down();
        }
    }

    /// Live workers in all.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every worker's registration, sorted by id (for `/health`).
    pub fn infos(&self) -> Vec<&WorkerInfo> {
        let mut v: Vec<&WorkerInfo> = self.entries.values().map(|e| &e.info).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Whether requests run disaggregated: the model has prefill and decode workers.
    pub fn disaggregated(&self) -> bool {
        !self.prefill.is_empty() && !self.decode.is_empty()
    }

    /// Whether `worker`'s cache is predicted (approximate mode) rather than known from events.
    pub fn is_approximate(&self, worker: WorkerId) -> bool {
        self.entries.get(&worker).is_some_and(|e| e.kv.is_approximate())
    }

    /// `worker`'s index state as `/health` says it ([`crate::frontend::index_state`]).
    pub fn kv_state(&self, worker: WorkerId) -> &'static str {
        self.entries.get(&worker).map_or("exact", |e| e.kv.state())
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
    /// Its last routing decisions, recorded while a dashboard page is open.
    pub recent: crate::frontend::dashboard::Recent,
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
    /// `--reasoning-parser` and `--tool-call-parser`, resolved per model's chat template.
    pub parsers: ParserFlags,
    /// The ids of prompt segments already tokenized, for every model (`--token-cache-mb`;
    /// `None` when 0).
    pub token_cache: Option<Arc<TokenCache>>,
    /// When requests wait for a worker to free (off by default; [`crate::frontend::pipeline::admission`]).
    pub admission: crate::frontend::pipeline::admission::AdmissionConfig,
    /// Prepares long requests off the shards (`--preprocess-threads`; inline by default).
    pub prep_pool: crate::frontend::pipeline::offload::PrepPool,
    router_config: RouterConfig,
    models: ArcSwap<HashMap<String, Arc<ModelState>>>,
    /// Approximate mode's settings (`--no-kv-events`, `--approx-ttl-s`).
    pub approx: ApproxConfig,
    /// The live routing page's viewers ([`crate::frontend::dashboard`]).
    pub dashboard: crate::frontend::dashboard::Board,
    /// `--router-replica-sync`: routing decisions shared with the other frontends ([`crate::frontend::replica`]).
    pub replica: Option<Arc<crate::frontend::replica::ReplicaSync>>,
    /// `--decision-log`: one JSON line per routing decision (off by default).
    pub decision_log: Option<Arc<crate::router::quality::DecisionLog>>,
    predictions: tokio::sync::mpsc::Sender<Prediction>,
    /// The receiving end, taken once by the control plane ([`Frontend::take_predictions`]).
    predictions_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Prediction>>>,
}

impl<P> Frontend<P> {
    pub fn new(plane: P, index: Arc<KvIndex>, router_config: RouterConfig, limits: HttpLimits, shards: usize) -> Self {
        let (predictions, rx) = tokio::sync::mpsc::channel(PREDICTION_QUEUE_DEPTH);
        Self {
            approx: ApproxConfig::default(),
            dashboard: crate::frontend::dashboard::Board::new(shards),
            replica: None,
            decision_log: None,
            admission: Default::default(),
            predictions,
            predictions_rx: Mutex::new(Some(rx)),
            plane,
            index,
            metrics: Arc::new(Metrics::new(shards)),
            limits,
            parsers: ParserFlags::default(),
            token_cache: None,
            prep_pool: crate::frontend::pipeline::offload::PrepPool::inline(),
            router_config,
            models: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// How model outputs are parsed (default: `auto` for both).
    pub fn with_parsers(mut self, parsers: ParserFlags) -> Self {
        self.parsers = parsers;
        self
    }

    /// Prepares requests whose body is not small on `pool` ([`crate::frontend::pipeline::offload`]).
    pub fn with_prep_pool(mut self, pool: crate::frontend::pipeline::offload::PrepPool) -> Self {
        self.prep_pool = pool;
        self
    }

    /// The token cache prompts are encoded with (default: none).
    pub fn with_token_cache(mut self, cache: Option<Arc<TokenCache>>) -> Self {
        self.token_cache = cache;
        self
    }

    /// The routing decision log (default: none).
    pub fn with_decision_log(mut self, log: Option<Arc<crate::router::quality::DecisionLog>>) -> Self {
        self.decision_log = log;
        self
    }

    /// Shares routing decisions with the other frontends (default: off; set before any model).
    pub fn with_replica_sync(mut self, replica: Option<Arc<crate::frontend::replica::ReplicaSync>>) -> Self {
        self.replica = replica;
        self
    }

    /// Busy thresholds and the admission queue (default: off).
    pub fn with_admission(mut self, admission: crate::frontend::pipeline::admission::AdmissionConfig) -> Self {
        self.admission = admission;
        self
    }

    /// Approximate mode's settings (default: exact unless a worker registers no events).
    pub fn with_approx(mut self, approx: ApproxConfig) -> Self {
        self.approx = approx;
        self
    }

    /// Queues `worker`'s predicted blocks for the control plane (a shard, after dispatching to
    /// an approximate worker). Never waits: a full queue drops the prediction and counts it.
    pub fn predict(&self, shard: usize, prediction: Prediction) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = self.predictions.try_send(prediction) {
            self.metrics.shard(shard).kv_predictions_dropped.fetch_add(1, Relaxed);
        }
    }

    /// The receiving end of [`Frontend::predict`]'s queue: `Some` once (the control plane's).
    pub fn take_predictions(&self) -> Option<tokio::sync::mpsc::Receiver<Prediction>> {
        self.predictions_rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Where to reach `worker`, from its model's current snapshot (recovery's address).
    pub fn target(&self, worker: WorkerId) -> Target {
        self.models
            .load()
            .values()
            .find_map(|m| m.workers.load().entries.get(&worker).map(WorkerEntry::target))
            .unwrap_or(Target::in_process(worker))
    }

    /// Serves a model (no workers yet). Called on the control plane.
    pub fn add_model(&self, name: &str, preprocessor: Arc<Preprocessor>, page_size: u32) -> Arc<ModelState> {
        let config = RouterConfig { block_size: page_size, ..self.router_config.clone() };
        let state = Arc::new(ModelState {
            name: name.to_string(),
            preprocessor,
            hasher: BlockHasher::new(page_size as usize),
            router: Router::new(config.clone(), self.index.clone())
                .with_replica(self.replica.as_ref().map(|r| r.index())),
            decode_router: Router::new(RouterConfig { overlap_weight: 0.0, ..config }, self.index.clone()),
            workers: ArcSwap::from_pointee(WorkerGroup::default()),
            recent: self.dashboard.recent(),
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

    /// Replaces each model's worker group from one discovery snapshot, keeping the load and
    /// health cells of workers that stay (in-flight bookings and recent failures must survive
    /// the swap). One store per model: shards see the old group or the new one, never a mix.
    pub fn set_workers(&self, snapshot: &[WorkerInfo]) {
        for model in self.models() {
            let old = model.workers.load();
            let mut group = WorkerGroup::default();
            for info in snapshot.iter().filter(|w| w.model == model.name) {
                let kept = old.entries.get(&info.id);
                let load = kept.map_or_else(WorkerLoad::new, |e| e.load.clone());
                let health = kept.map_or_else(Arc::default, |e| e.health.clone());
                let approximate = self.approx.all || !info.kv_events;
                let kv = kept.map_or_else(|| Arc::new(KvTracking::new(approximate)), |e| e.kv.clone());
                let c = Candidate { id: info.id, load: load.clone() };
                match info.role {
                    WorkerRole::Aggregated => group.candidates.push(c),
                    WorkerRole::Prefill => group.prefill.push(c),
                    WorkerRole::Decode => {
                        group.decode.push(c.clone());
                        group.candidates.push(c);
                    }
                }
                let peer = Peer { style: info.disagg, bootstrap: info.bootstrap.as_deref().map(Arc::from) };
                let endpoint = info.address.as_deref().and_then(resolve);
                group.entries.insert(info.id, WorkerEntry { info: info.clone(), endpoint, load, health, peer, kv });
            }
            model.workers.store(Arc::new(group));
        }
    }

    /// Prometheus text of everything, with per-worker gauges.
    pub fn render_metrics(&self) -> String {
        let mut gauges = Vec::new();
        for m in self.models() {
            let group = m.workers.load();
            for c in group.all() {
                gauges.push(WorkerGauge {
                    model: m.name.clone(),
                    worker: c.id.to_string(),
                    active_requests: c.load.active_requests(),
                    active_prefill_tokens: c.load.active_prefill_tokens(),
                    active_decode_blocks: c.load.active_decode_blocks(),
                    cached_blocks: self.index.cached_blocks(c.id),
                    kv_approximate: group.is_approximate(c.id),
                });
            }
        }
        let token_cache = self.token_cache.as_ref().map(|c| c.stats()).unwrap_or_default();
        let mut out = self.metrics.render(&gauges, self.index.num_entries() as u64, &token_cache);
        crate::frontend::control::load::render(self, &mut out);
        if let Some(r) = &self.replica {
            crate::frontend::replica::render(r, &mut out);
        }
        crate::frontend::index_state::render_frontend(self, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_marks_expire_and_never_underflow() {
        let h = Health::default();
        assert!(!h.is_down());
        h.mark_down();
        assert!(h.is_down(), "marked in the epoch's first millisecond, read at once");
        h.down_at_ms.store(u64::MAX, Relaxed);
        assert!(h.is_down(), "a stamp from the future counts as recent");
        let long_ago = epoch().elapsed().as_millis() as u64;
        std::thread::sleep(Duration::from_millis(2));
        h.down_at_ms.store(long_ago.max(1), Relaxed);
        assert!(h.is_down());
    }
}
