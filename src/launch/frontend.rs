//! `kvgate frontend`: the OpenAI endpoint of a distributed deployment.
//!
//! The frontend needs no model flags: it learns each served model from the workers'
//! registrations in etcd and loads that model's tokenizer and chat template itself. It
//! subscribes to KV events (NATS) before it reads discovery, so no event published after a
//! worker registered is missed without a gap showing.
//!
//! Threads: the control plane (tokio: etcd watch, NATS subscription, model loading, the index
//! writer) and the data-plane shards (monoio), as in `kvgate serve`.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::watch;

use crate::config::{ConfigError, FrontendArgs};
use crate::frontend::data::shards;
use crate::frontend::replica::{self, ReplicaSync};
use crate::frontend::{control, Frontend, HttpLimits};
use crate::kv::index::KvIndex;
use crate::planes::discovery::etcd::{EtcdDiscovery, EtcdError};
use crate::planes::discovery::{WorkerInfo, WorkerSnapshot};
use crate::planes::events::nats::{self, NatsError, NatsSubscriber};
use crate::planes::load::NatsLoadSubscriber;
use crate::planes::replica::{NatsDecisionPublisher, NatsDecisionSubscriber};
use crate::planes::request::tcp::TcpRequestPlane;
use crate::preprocess::{ModelSource, Preprocessor};
use crate::router::RouterConfig;

/// A model whose tokenizer failed to load is retried no sooner than this.
const MODEL_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum FrontendLaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
    #[error("NATS: {0}")]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Listen(#[from] shards::ListenError),
    #[error("could not start a runtime thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("could not open the decision log: {0}")]
    DecisionLog(#[source] std::io::Error),
}

/// A running frontend.
pub struct FrontendServer {
    pub addr: SocketAddr,
    data_plane: shards::DataPlane,
    control_rt: Option<tokio::runtime::Runtime>,
}

/// Turns raw discovery snapshots into what the router may use: workers of models whose
/// tokenizer is loaded, whose page size matches and whose address resolves (resolved here,
/// once: the worker groups carry the literal address, which the request plane dials).
struct Admission {
    fe: Arc<Frontend<TcpRequestPlane>>,
    page_size: u32,
    refused: HashSet<crate::contract::WorkerId>,
    failed_models: HashMap<String, Instant>,
}

impl Admission {
    fn admit(&mut self, snap: &WorkerSnapshot) -> WorkerSnapshot {
        let mut out = Vec::with_capacity(snap.len());
        for w in snap.iter() {
            if w.page_size != self.page_size {
                if self.refused.insert(w.id) {
                    tracing::error!(
                        worker = %w.id, model = %w.model, worker_page_size = w.page_size, frontend_page_size = self.page_size,
                        "REFUSING worker: its KV page size differs from this frontend's --page-size; its blocks would never match"
                    );
                }
                continue;
            }
            let Some(addr) = w.address.as_deref().and_then(|a| a.to_socket_addrs().ok()).and_then(|mut a| a.next())
            else {
                if self.refused.insert(w.id) {
                    tracing::error!(worker = %w.id, address = ?w.address, "REFUSING worker: its request-plane address does not resolve");
                }
                continue;
            };
            if !self.ensure_model(w) {
                continue;
            }
            out.push(WorkerInfo { address: Some(addr.to_string()), ..w.clone() });
        }
        Arc::new(out)
    }

    /// Loads the model's tokenizer the first time one of its workers shows up.
    fn ensure_model(&mut self, w: &WorkerInfo) -> bool {
        if self.fe.model(&w.model).is_some() {
            return true;
        }
        if self.failed_models.get(&w.model).is_some_and(|t| t.elapsed() < MODEL_RETRY) {
            return false;
        }
        let mut sources = vec![ModelSource::parse(w.model_path.as_deref())];
        let by_name = ModelSource::parse(Some(&w.model));
        if w.model_path.is_some() && !sources.contains(&by_name) {
            sources.push(by_name);
        }
        let mut last_err = None;
        for source in sources {
            match tokio::task::block_in_place(|| Preprocessor::load(&source)) {
                Ok(p) => {
                    tracing::info!(model = %w.model, source = %p.source_description(), "serving model");
                    self.fe.add_model(&w.model, Arc::new(p), self.page_size);
                    self.failed_models.remove(&w.model);
                    return true;
                }
                Err(e) => last_err = Some(e),
            }
        }
        tracing::error!(model = %w.model, model_path = ?w.model_path, error = ?last_err.map(|e| e.to_string()), "cannot load the model's tokenizer; its workers are not routed (retrying later)");
        self.failed_models.insert(w.model.clone(), Instant::now());
        false
    }
}

/// Connects to etcd and NATS, waits for `--router-min-initial-workers`, and starts serving.
pub fn start(args: &FrontendArgs) -> Result<FrontendServer, FrontendLaunchError> {
    args.validate()?;
    let shards = args.http.shard_count();
    let control_rt = shards::tokio_runtime("kvgate-control", 2).map_err(FrontendLaunchError::Runtime)?;
    let plane = TcpRequestPlane::new();
    let (index, writer) = KvIndex::new();
    let router_config = RouterConfig {
        mode: args.router.router_mode,
        cost: args.router.router_cost,
        overlap_weight: args.router.kv_overlap_score_weight,
        temperature: args.router.router_temperature,
        block_size: args.page_size,
    };
    let limits = HttpLimits {
        max_body_bytes: args.http.max_body_bytes,
        migration_limit: args.router.migration_limit,
        disagg: args.router.disagg_policy(),
    };
    let prep_pool = args.http.prep_pool().map_err(FrontendLaunchError::Runtime)?;
    let fe = Arc::new(
        Frontend::new(plane.clone(), index, router_config, limits, shards)
            .with_prep_pool(prep_pool)
            .with_approx(args.router.approx())
            .with_admission(args.router.admission.config(shards))
            .with_parsers(args.http.parsers.flags())
            .with_replica_sync(args.router_replica_sync.then(ReplicaSync::new))
            .with_token_cache(args.http.token_cache())
            .with_decision_log(args.router.decision_log.open().map_err(FrontendLaunchError::DecisionLog)?),
    );

    let cluster = args.cluster.clone();
    let replica = fe.replica.clone();
    let (events, loads, mut raw) = control_rt.block_on(async {
        let client = nats::connect(&cluster.nats_server, "kvgate-frontend").await?;
        // Subscribe before reading discovery: every event after a registration is seen.
        let events = NatsSubscriber::subscribe(&client, &cluster.namespace, None).await?;
        let loads = NatsLoadSubscriber::subscribe(&client, &cluster.namespace).await?;
        if let Some(sync) = &replica {
            let decisions = NatsDecisionSubscriber::subscribe(&client, &cluster.namespace).await?;
            tokio::spawn(replica::publish(
                sync.clone(),
                NatsDecisionPublisher::new(client.clone(), &cluster.namespace),
            ));
            tokio::spawn(replica::receive(sync.clone(), decisions));
        }
        let etcd = EtcdDiscovery::connect(&cluster.etcd_endpoints, &cluster.namespace).await?;
        let raw = etcd.watch(None).await?;
        Ok::<_, FrontendLaunchError>((events, loads, raw))
    })?;
    // Every worker's reported load, reconciled with this frontend's bookings.
    control_rt.spawn(control::load::run(fe.clone(), loads));

    let mut admission =
        Admission { fe: fe.clone(), page_size: args.page_size, refused: HashSet::new(), failed_models: HashMap::new() };
    let first = control_rt.block_on(async { admission.admit(&raw.borrow_and_update().clone()) });
    let (admitted_tx, admitted_rx) = watch::channel(first);
    control_rt.spawn(async move {
        while raw.changed().await.is_ok() {
            let snap = raw.borrow_and_update().clone();
            let admitted = admission.admit(&snap);
            if admitted_tx.send(admitted).is_err() {
                break;
            }
        }
    });
    let min = args.router_min_initial_workers;
    if min > 0 {
        tracing::info!(min, "waiting for workers before serving (--router-min-initial-workers)");
        let mut rx = admitted_rx.clone();
        control_rt.block_on(async move {
            while rx.borrow_and_update().len() < min {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    // Shards must see the workers waited for from their first request: publish the current
    // snapshot before listening (the control plane re-applies it, keeping the same loads).
    fe.set_workers(&admitted_rx.borrow());
    control_rt.spawn(control::run(fe.clone(), writer, admitted_rx, events, Arc::new(plane)));

    let data_plane = shards::DataPlane::start(fe, &args.http.listen()?)?;
    let addr = data_plane.addr;
    tracing::info!(%addr, shards, namespace = %args.cluster.namespace, "kvgate frontend serving");
    Ok(FrontendServer { addr, data_plane, control_rt: Some(control_rt) })
}

impl FrontendServer {
    /// Stops accepting, drains in-flight requests, stops the control plane. Idempotent.
    pub fn shutdown(&mut self) {
        self.data_plane.stop();
        shards::shutdown_tokio(self.control_rt.take());
    }
}

impl Drop for FrontendServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
