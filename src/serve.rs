//! `kvgate serve`: the frontend and N workers in one process (mocker engines by default, any
//! [`Engine`] through [`start_with`]), wired through the
//! in-process discovery, event plane and request plane (the same seams etcd, NATS and TCP
//! implement in the distributed build). With `--prefill-workers` / `--decode-workers` the
//! workers are disaggregated; their KV moves over loopback TCP (or, with
//! `--disaggregation-transfer-backend in-process`, by memory copy).
//!
//! Threads: one per data-plane shard (monoio), one control-plane thread (tokio: discovery and
//! the KV index writer), one engine thread (tokio: the simulated workers). [`Server`] owns them
//! all; dropping it shuts everything down in order (stop accepting, drain, deregister workers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::config::{ConfigError, ServeArgs};
use crate::contract::EngineKind;
use crate::contract::{WorkerId, WorkerRole};
use crate::frontend::control::recovery::InProcessRecovery;
use crate::frontend::data::shards;
use crate::frontend::{control, Frontend, HttpLimits};
use crate::kv::index::KvIndex;
use crate::planes::discovery::{InProcessDiscovery, Registration};
use crate::planes::events;
use crate::planes::request::InProcessRequestPlane;
use crate::preprocess::{ModelSource, PreprocessError, Preprocessor};
use crate::router::RouterConfig;
use crate::worker::engine::Placement;
use crate::worker::engines::http::{AdapterOptions, EngineStartError};
use crate::worker::engines::mocker::transfer;
use crate::worker::engines::mocker::{MockerConfig, MockerConfigError};
use crate::worker::engines::{llama_cpp, openai, sglang, vllm};
use crate::worker::{spawn, Engine, EventRing, Mocker, WorkerHandle};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid mocker settings: {0}")]
    Mocker(#[from] MockerConfigError),
    #[error("could not load the model: {0}")]
    Model(#[from] PreprocessError),
    #[error(transparent)]
    Listen(#[from] shards::ListenError),
    #[error("could not start a runtime thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("could not open the decision log: {0}")]
    DecisionLog(#[source] std::io::Error),
    #[error("could not start the KV transfer plane: {0}")]
    Transfer(#[source] std::io::Error),
    #[error("{0}")]
    /// Boxed: the refusal carries what to change, and errors stay small on the happy path.
    Engine(#[source] Box<EngineStartError>),
}

/// A running embedded deployment.
pub struct Server {
    /// The address the HTTP endpoint listens on (the real port when started with port 0).
    pub addr: SocketAddr,
    /// The embedded workers' ids, in start order: aggregated, then prefill, then decode.
    pub worker_ids: Vec<WorkerId>,
    /// Each worker's role, in the order of `worker_ids`.
    pub worker_roles: Vec<WorkerRole>,
    /// The name clients use for the served model.
    pub model_name: String,
    data_plane: shards::DataPlane,
    registrations: Vec<Registration>,
    workers: Vec<WorkerHandle>,
    plane: InProcessRequestPlane,
    engine_rt: Option<tokio::runtime::Runtime>,
    control_rt: Option<tokio::runtime::Runtime>,
}

/// One embedded worker to start: what an engine factory of [`start_with`] is given.
pub struct WorkerSlot<'a> {
    /// Its place in start order (see [`ServeArgs::roles`]).
    pub index: usize,
    pub id: WorkerId,
    pub role: WorkerRole,
    pub args: &'a ServeArgs,
    /// The served model's tokenizer and sizing.
    pub preprocessor: &'a Arc<Preprocessor>,
}

/// Starts the frontend and its workers (mocker engines, or adapters to the `--engine-url`
/// engines); returns once the endpoint accepts connections.
pub fn start(args: &ServeArgs) -> Result<Server, ServeError> {
    match args.engine {
        EngineKind::Mocker => start_mockers(args),
        EngineKind::Sglang => start_with(args, |slot| {
            let opts = adapter_options(slot)?;
            Ok(on_engine_runtime(sglang::connect(&opts))?)
        }),
        EngineKind::Vllm => start_with(args, |slot| {
            let opts = adapter_options(slot)?;
            Ok(on_engine_runtime(vllm::connect(&opts))?)
        }),
        // The tokenizer checks llama.cpp's vocabulary and re-encodes text a server sends without ids.
        EngineKind::LlamaCpp => start_with(args, |slot| {
            let opts = adapter_options(slot)?;
            Ok(on_engine_runtime(llama_cpp::connect(&opts, Some(slot.preprocessor.clone())))?)
        }),
        EngineKind::Openai => start_with(args, |slot| {
            let opts = adapter_options(slot)?;
            let tokenizer = args.model.model_path.is_some().then(|| slot.preprocessor.clone());
            Ok(on_engine_runtime(openai::connect(&opts, tokenizer))?)
        }),
    }
}

/// Runs `f` to its end on the engine runtime (entered by the caller) from a thread of its own:
/// the caller may itself be on an async runtime, where blocking is refused.
fn on_engine_runtime<F: std::future::Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    let handle = tokio::runtime::Handle::current();
    std::thread::scope(|s| s.spawn(move || handle.block_on(f)).join().expect("engine start-up panicked"))
}

fn engine_url(slot: &WorkerSlot<'_>) -> Result<crate::config::EngineUrl, ServeError> {
    Ok(slot.args.real_engine.urls()?.swap_remove(slot.index))
}

fn adapter_options(slot: &WorkerSlot<'_>) -> Result<AdapterOptions, ServeError> {
    let (args, url) = (slot.args, engine_url(slot)?.url);
    Ok(crate::launch::adapter_options(
        &args.real_engine,
        url,
        slot.role,
        args.model.page_size,
        &args.model.served_name(),
    ))
}

/// [`start`] with mocker workers.
fn start_mockers(args: &ServeArgs) -> Result<Server, ServeError> {
    let mut mocker = MockerConfig::from_args(&args.mocker, args.model.page_size)?;
    let mut sized = false;
    start_with(args, move |slot| {
        if !sized {
            sized = true;
            if let Some(cfg) = slot.preprocessor.model_config() {
                // The workers report their KV capacity in bytes from the model's own sizing.
                mocker = mocker.clone().with_kv_bytes_per_token(cfg.kv_bytes_per_token())?;
            }
        }
        let bytes_per_block = mocker.kv_bytes_per_block().unwrap_or(0);
        let setup = transfer::setup_embedded(
            slot.role,
            slot.args.transfer.disaggregation_transfer_backend,
            slot.args.transfer.timeout(),
            bytes_per_block,
        )
        .map_err(ServeError::Transfer)?;
        let mocker = Mocker::disaggregated(slot.id, mocker.clone(), slot.preprocessor.sample_text_tokens(), setup);
        Ok(mocker.with_kv_events(!slot.args.router.no_kv_events))
    })
}

/// Starts the frontend and workers whose engines `engine` makes (called once per worker, on
/// the engine runtime: it may spawn tasks); returns once the endpoint accepts connections.
pub fn start_with<E: Engine>(
    args: &ServeArgs,
    mut engine: impl FnMut(&WorkerSlot<'_>) -> Result<E, ServeError>,
) -> Result<Server, ServeError> {
    args.validate()?;
    let page_size = args.model.page_size;
    let source = ModelSource::parse(args.model.model_path.as_deref());
    let preprocessor = Arc::new(Preprocessor::load(&source)?);
    let model_name = args.model.served_name();

    let shards = args.http.shard_count();
    let (index, writer) = KvIndex::new();
    let plane = InProcessRequestPlane::new();
    let discovery = InProcessDiscovery::new();
    let (publisher, subscriber) = events::in_process();
    let (load_publisher, load_subscriber) = crate::planes::load::in_process();
    let router_config = RouterConfig {
        mode: args.router.router_mode,
        cost: args.router.router_cost,
        overlap_weight: args.router.kv_overlap_score_weight,
        temperature: args.router.router_temperature,
        block_size: page_size,
    };
    let limits = HttpLimits {
        max_body_bytes: args.http.max_body_bytes,
        migration_limit: args.router.migration_limit,
        disagg: args.router.disagg_policy(),
    };
    let prep_pool = args.http.prep_pool().map_err(ServeError::Runtime)?;
    let fe = Arc::new(
        Frontend::new(plane.clone(), index, router_config, limits, shards)
            .with_prep_pool(prep_pool)
            .with_approx(args.router.approx())
            .with_admission(args.router.admission.config(shards))
            .with_parsers(args.http.parsers.flags())
            .with_token_cache(args.http.token_cache())
            .with_decision_log(args.router.decision_log.open().map_err(ServeError::DecisionLog)?),
    );
    fe.add_model(&model_name, preprocessor.clone(), page_size);

    let recovery = Arc::new(InProcessRecovery::new());
    let control_rt = shards::tokio_runtime("kvgate-control", 1).map_err(ServeError::Runtime)?;
    control_rt.spawn(control::run(fe.clone(), writer, discovery.subscribe(), subscriber, recovery.clone()));
    control_rt.spawn(control::load::run(fe.clone(), load_subscriber));

    // Disaggregated workers copy real KV bytes: a second thread lets transfers overlap steps.
    let engine_threads = if args.prefill_workers + args.decode_workers > 0 { 2 } else { 1 };
    let engine_rt = shards::tokio_runtime("kvgate-engine", engine_threads).map_err(ServeError::Runtime)?;
    let roles = args.roles();
    let mut workers = Vec::with_capacity(roles.len());
    let mut registrations = Vec::with_capacity(roles.len());
    let mut worker_ids = Vec::with_capacity(roles.len());
    for (index, &role) in roles.iter().enumerate() {
        let id = WorkerId(rand::random::<u64>() >> 1);
        let inbox = plane.attach(id);
        let handle = {
            let _ctx = engine_rt.enter();
            let e = engine(&WorkerSlot { index, id, role, args, preprocessor: &preprocessor })?;
            let handle = spawn(id, e, inbox, publisher.clone(), EventRing::default());
            tokio::spawn(crate::worker::load::publish_load(id, handle.load.clone(), load_publisher.clone()));
            handle
        };
        recovery.insert(handle.control());
        let placement = Placement {
            id,
            model: model_name.clone(),
            model_path: args.model.model_path.clone(),
            role,
            page_size,
            address: None,
        };
        registrations.push(discovery.register(handle.card.worker_info(placement)));
        tracing::info!(worker = %id, ?role, engine = handle.card.kind.as_str(), "started worker");
        workers.push(handle);
        worker_ids.push(id);
    }
    // The control plane publishes the worker set asynchronously; wait until shards can see it
    // so the first request does not get a spurious 503.
    let model = fe.model(&model_name).expect("model was just added");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while model.workers.load().len() < roles.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }

    let data_plane = shards::DataPlane::start(fe, &args.http.listen()?)?;
    let addr = data_plane.addr;
    tracing::info!(%addr, model = %model_name, source = %preprocessor.source_description(), workers = roles.len(), prefill_workers = args.prefill_workers, decode_workers = args.decode_workers, shards, "kvgate serving");
    Ok(Server {
        addr,
        worker_ids,
        worker_roles: roles,
        model_name,
        data_plane,
        registrations,
        workers,
        plane,
        engine_rt: Some(engine_rt),
        control_rt: Some(control_rt),
    })
}

impl Server {
    /// Fault injection for tests and demos: aborts one embedded worker as a crash would (its
    /// streams end without finishing), then removes it from discovery and the request plane.
    pub fn kill_worker(&mut self, id: WorkerId) {
        if let Some(i) = self.worker_ids.iter().position(|w| *w == id) {
            self.worker_ids.remove(i);
            self.worker_roles.remove(i);
            drop(self.workers.remove(i));
            drop(self.registrations.remove(i));
            self.plane.detach(id);
        }
    }

    /// Stops accepting, drains in-flight requests, stops the workers. Idempotent.
    pub fn shutdown(&mut self) {
        self.data_plane.stop();
        self.registrations.clear();
        self.workers.clear();
        shards::shutdown_tokio([self.engine_rt.take(), self.control_rt.take()].into_iter().flatten());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl From<EngineStartError> for ServeError {
    fn from(e: EngineStartError) -> Self {
        ServeError::Engine(Box::new(e))
    }
}
