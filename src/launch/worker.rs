//! `kvgate worker`: one engine worker of a distributed deployment.
//!
//! Start-up order: load the model's tokenizer (for readable mock output) and sizing, set up the
//! KV transfer plane (a decode worker listens on its transfer port), start the engine, serve the request plane on an ephemeral (or given) port, connect the KV event plane
//! (NATS), and only then register in etcd, so the frontend never routes to a worker that cannot
//! answer yet. Shutdown reverses it: revoke the lease (leave routing at once), drain the
//! request plane, stop the engine.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;

use crate::config::{ConfigError, DisaggregationMode, WorkerArgs};
use crate::contract::EngineKind;
use crate::contract::{WorkerId, WorkerRole};
use crate::planes::discovery::etcd::{EtcdDiscovery, EtcdError};
use crate::planes::events::nats::{self, NatsError, NatsPublisher};
use crate::planes::load::NatsLoadPublisher;
use crate::planes::request::tcp::serve_worker;
use crate::planes::request::WORKER_QUEUE_DEPTH;
use crate::preprocess::{ModelSource, PreprocessError, Preprocessor};
use crate::worker::engine::Placement;
use crate::worker::engines::http::EngineStartError;
use crate::worker::engines::mocker::transfer;
use crate::worker::engines::mocker::{MockerConfig, MockerConfigError};
use crate::worker::engines::{llama_cpp, openai, sglang, vllm};
use crate::worker::{spawn, EventRing, Mocker};

#[derive(Debug, Error)]
pub enum WorkerLaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid mocker settings: {0}")]
    Mocker(#[from] MockerConfigError),
    #[error("could not load the model: {0}")]
    Model(#[from] PreprocessError),
    #[error("could not listen for requests on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
    #[error("NATS: {0}")]
    Nats(#[from] NatsError),
    #[error("{0}")]
    /// Boxed: the refusal carries what to change, and errors stay small on the happy path.
    Engine(#[source] Box<EngineStartError>),
}

/// The address other hosts reach this one at: the first non-loopback address the host name
/// resolves to, else loopback (a single-host deployment).
pub fn primary_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..len]) {
            if let Ok(addrs) = (name, 0).to_socket_addrs() {
                if let Some(a) = addrs.map(|a| a.ip()).find(|ip| !ip.is_loopback() && ip.is_ipv4()) {
                    return a.to_string();
                }
            }
        }
    }
    "127.0.0.1".to_string()
}

/// The one `--engine-url` of a worker.
fn engine_url(args: &WorkerArgs) -> Result<String, WorkerLaunchError> {
    Ok(args.real_engine.urls()?.swap_remove(0).url)
}

/// A mocker engine: the model's tokenizer gives it readable text, its config the KV's size;
/// a decode worker listens for KV transfers (advertised as `host:port`).
async fn mocker(args: &WorkerArgs, id: WorkerId, role: WorkerRole, host: &str) -> Result<Mocker, WorkerLaunchError> {
    let mut mocker = MockerConfig::from_args(&args.mocker, args.model.page_size)?;
    let source = ModelSource::parse(args.model.model_path.as_deref());
    let pre =
        tokio::task::spawn_blocking(move || Preprocessor::load(&source)).await.expect("model loading panicked")?;
    if let Some(cfg) = pre.model_config() {
        mocker = mocker.with_kv_bytes_per_token(cfg.kv_bytes_per_token())?;
    }
    let transfer_bind: SocketAddr = (IpAddr::from([0, 0, 0, 0]), args.transfer_port).into();
    let bytes_per_block = mocker.kv_bytes_per_block().unwrap_or(0);
    let listen = transfer::Listen::Tcp { bind: transfer_bind, advertise_host: host };
    let setup = transfer::setup(role, bytes_per_block, args.transfer.timeout(), listen)
        .map_err(|source| WorkerLaunchError::Bind { addr: transfer_bind, source })?;
    Ok(Mocker::disaggregated(id, mocker, pre.sample_text_tokens(), setup).with_kv_events(!args.no_kv_events))
}

/// The served model's tokenizer, for adapters that check the engine's vocabulary or re-encode
/// its text (llama.cpp, OpenAI API).
async fn tokenizer(args: &WorkerArgs) -> Result<std::sync::Arc<Preprocessor>, WorkerLaunchError> {
    let source = ModelSource::parse(args.model.model_path.as_deref());
    let pre =
        tokio::task::spawn_blocking(move || Preprocessor::load(&source)).await.expect("model loading panicked")?;
    Ok(std::sync::Arc::new(pre))
}

/// Runs one worker until `shutdown` resolves.
pub async fn run(args: WorkerArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerLaunchError> {
    args.validate()?;
    let page_size = args.model.page_size;
    let model = args.model.served_name();
    let role = match args.disaggregation_mode {
        None => WorkerRole::Aggregated,
        Some(DisaggregationMode::Prefill) => WorkerRole::Prefill,
        Some(DisaggregationMode::Decode) => WorkerRole::Decode,
    };
    let id = WorkerId(rand::random::<u64>() >> 1);
    let host = args.advertise_host.clone().unwrap_or_else(primary_host);

    let nats_client = nats::connect(&args.cluster.nats_server, &format!("kvgate-worker-{id}")).await?;
    let load_publisher = NatsLoadPublisher::new(nats_client.clone(), &args.cluster.namespace, &model);
    let publisher = NatsPublisher::new(nats_client, &args.cluster.namespace, &model);
    let (inbox_tx, inbox) = tokio::sync::mpsc::channel(WORKER_QUEUE_DEPTH);
    let ring = EventRing::default();
    let handle = match args.engine {
        EngineKind::Mocker => {
            let engine = mocker(&args, id, role, &host).await?;
            spawn(id, engine, inbox, publisher, ring)
        }
        EngineKind::Sglang => {
            let opts = super::adapter_options(&args.real_engine, engine_url(&args)?, role, page_size, &model);
            spawn(id, sglang::connect(&opts).await?, inbox, publisher, ring)
        }
        EngineKind::Vllm => {
            let opts = super::adapter_options(&args.real_engine, engine_url(&args)?, role, page_size, &model);
            spawn(id, vllm::connect(&opts).await?, inbox, publisher, ring)
        }
        EngineKind::LlamaCpp => {
            let opts = super::adapter_options(&args.real_engine, engine_url(&args)?, role, page_size, &model);
            let tokenizer = Some(tokenizer(&args).await?);
            spawn(id, llama_cpp::connect(&opts, tokenizer).await?, inbox, publisher, ring)
        }
        EngineKind::Openai => {
            let opts = super::adapter_options(&args.real_engine, engine_url(&args)?, role, page_size, &model);
            let tokenizer = match args.model.model_path {
                Some(_) => Some(tokenizer(&args).await?),
                None => None,
            };
            spawn(id, openai::connect(&opts, tokenizer).await?, inbox, publisher, ring)
        }
    };
    let transfer_address = handle.card.bootstrap.clone();
    // Ends when the engine does (it drops its load sender).
    tokio::spawn(crate::worker::load::publish_load(id, handle.load.clone(), load_publisher));

    let bind: SocketAddr = (IpAddr::from([0, 0, 0, 0]), args.port).into();
    let listener =
        tokio::net::TcpListener::bind(bind).await.map_err(|source| WorkerLaunchError::Bind { addr: bind, source })?;
    let port = listener.local_addr().map_err(|source| WorkerLaunchError::Bind { addr: bind, source })?.port();
    let address = format!("{host}:{port}");
    let (stop_tx, stop_rx) = watch::channel(false);
    let plane = tokio::spawn(serve_worker(listener, inbox_tx, handle.control(), stop_rx));

    let etcd = EtcdDiscovery::connect(&args.cluster.etcd_endpoints, &args.cluster.namespace).await?;
    let placement = Placement {
        id,
        model: model.clone(),
        model_path: args.model.model_path.clone(),
        role,
        page_size,
        address: Some(address.clone()),
    };
    let info = handle.card.worker_info(placement);
    let registration = etcd.register(info, Duration::from_secs(args.lease_ttl)).await?;
    if let Some(t) = &transfer_address {
        println!("KV transfers for worker {id} at {t}");
    }
    println!("kvgate worker {id} serving {model} ({role:?}) at {address}");
    tracing::info!(worker = %id, %model, ?role, %address, transfer_address = ?transfer_address, "worker registered");

    shutdown.await;
    tracing::info!(worker = %id, "shutting down: revoking the lease, draining requests");
    if let Err(e) = registration.revoke().await {
        tracing::warn!(error = %e, "could not revoke the lease; it expires by itself");
    }
    let _ = stop_tx.send(true);
    let _ = plane.await;
    handle.stop().await;
    Ok(())
}

impl From<EngineStartError> for WorkerLaunchError {
    fn from(e: EngineStartError) -> Self {
        WorkerLaunchError::Engine(Box::new(e))
    }
}
