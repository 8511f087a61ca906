//! Data-plane shards: one thread per shard, each running a monoio runtime on io_uring (tuned
//! ring flags; the epoll driver where io_uring is unavailable) with its own SO_REUSEPORT
//! listener, so the kernel spreads connections over shards and no request crosses cores.
//!
//! Invariant: a shard owns everything it creates; the only things it shares are the
//! [`Frontend`] (read-mostly, atomically swapped) and its own slots in per-shard counters.
//! Bounded: each shard serves at most its share of [`Listen::max_connections`] connections.

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::frontend::data::{auth::ApiKeys, server::serve_shard, ShardCtx};
use crate::frontend::Frontend;
use crate::planes::request::RequestPlane;

/// Connections waiting to be accepted per shard listener.
const LISTEN_BACKLOG: i32 = 4096;
/// io_uring submission queue entries per shard.
const URING_ENTRIES: u32 = 4096;

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Binds one SO_REUSEPORT listener per shard on the same address (port 0 resolves once, and
/// every other shard binds the port the first one got).
pub fn bind_listeners(addr: SocketAddr, shards: usize) -> std::io::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = reuseport_listener(addr)?;
    let bound = first.local_addr()?;
    let mut v = vec![first];
    for _ in 1..shards {
        v.push(reuseport_listener(bound)?);
    }
    Ok((bound, v))
}

/// Runs `f` to completion on a new monoio runtime on the current thread.
fn block_on_monoio<F: std::future::Future>(shard: usize, f: F) -> std::io::Result<F::Output> {
    let uring = monoio::utils::detect_uring();
    let tuned = io_uring::IoUring::builder().setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun().clone();
    let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(URING_ENTRIES)
        .uring_builder(tuned)
        .build();
    let mut rt = match built {
        Ok(rt) => rt,
        Err(e) if uring => {
            tracing::warn!(shard, error = %e, "io_uring refused the tuned ring flags; using default flags");
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().with_entries(URING_ENTRIES).build()?
        }
        Err(e) => return Err(e),
    };
    if uring {
        tracing::debug!(shard, "shard runs on io_uring (coop_taskrun, single_issuer, defer_taskrun)");
    } else if shard == 0 {
        tracing::warn!("io_uring is unavailable here; shards run on monoio's epoll driver");
    }
    Ok(rt.block_on(f))
}

/// Starts one thread per listener, each serving HTTP until `shutdown` flips to true (then
/// draining), with at most its share of `listen.max_connections` connections open on each.
pub fn spawn_shards<P: RequestPlane>(
    fe: Arc<Frontend<P>>,
    listeners: Vec<TcpListener>,
    listen: &Listen,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(listeners.len());
    let (per_shard, drain_timeout) = (listen.max_connections_per_shard(), listen.drain_timeout);
    for (i, listener) in listeners.into_iter().enumerate() {
        let fe = fe.clone();
        let shutdown = shutdown.clone();
        let auth = listen.auth.clone();
        let t = std::thread::Builder::new().name(format!("kvgate-shard-{i}")).spawn(move || {
            let ctx = Rc::new(ShardCtx::new(i, auth));
            match block_on_monoio(i, serve_shard(fe, ctx, listener, per_shard, drain_timeout, shutdown)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) | Err(e) => tracing::error!(shard = i, error = %e, "shard stopped with an error"),
            }
        })?;
        threads.push(t);
    }
    Ok(threads)
}

/// The frontend could not start listening.
#[derive(Debug, thiserror::Error)]
#[error("could not listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: String,
    #[source]
    pub source: std::io::Error,
}

/// Where and how the data plane listens (`HttpArgs::listen` builds it from the flags).
#[derive(Debug, Clone)]
pub struct Listen {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    pub shards: usize,
    /// Open connections in total, split evenly: each shard serves at most
    /// `ceil(max_connections / shards)`. (The kernel spreads connections over the shards'
    /// listeners by address hash, so a shard can reach its share a little before the total.)
    pub max_connections: usize,
    /// How long in-flight requests may run after the shutdown signal (`--drain-timeout-s`).
    pub drain_timeout: Duration,
    /// The API keys requests must carry (none: open).
    pub auth: Arc<ApiKeys>,
}

impl Default for Listen {
    /// 127.0.0.1 on a free port, one shard, the flags' defaults, no API key.
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            shards: 1,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            drain_timeout: Duration::from_secs_f64(crate::config::DEFAULT_DRAIN_TIMEOUT_S),
            auth: Arc::default(),
        }
    }
}

impl Listen {
    pub fn max_connections_per_shard(&self) -> usize {
        self.max_connections.div_ceil(self.shards.max(1)).max(1)
    }
}

/// A running data plane: one listener and thread per shard. Stopping it stops accepting and
/// waits for in-flight requests to drain.
pub struct DataPlane {
    /// The bound address (the real port when started with port 0).
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl DataPlane {
    /// Binds `host:port` once per shard and starts the shards.
    pub fn start<P: RequestPlane>(fe: Arc<Frontend<P>>, listen: &Listen) -> Result<Self, ListenError> {
        let host_port = format!("{}:{}", listen.host, listen.port);
        let err = |source| ListenError { addr: host_port.clone(), source };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::Error::other("the address resolved to nothing")))?;
        let (addr, listeners) = bind_listeners(addr, listen.shards).map_err(err)?;
        let (shutdown, rx) = watch::channel(false);
        let threads = spawn_shards(fe, listeners, listen, rx).map_err(err)?;
        Ok(Self { addr, shutdown, threads })
    }

    /// Stops accepting and joins the shards once their requests drained. Idempotent.
    pub fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tokio runtime of `threads` worker threads named `name` (the control plane, the engines).
pub fn tokio_runtime(name: &str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads).thread_name(name).enable_all().build()
}

/// Shuts tokio runtimes down from a thread of their own: the caller may itself be inside an
/// async runtime, where blocking on another's shutdown is refused.
pub fn shutdown_tokio(runtimes: impl IntoIterator<Item = tokio::runtime::Runtime>) {
    let rts: Vec<_> = runtimes.into_iter().collect();
    if !rts.is_empty() {
        let _ = std::thread::spawn(move || {
            for rt in rts {
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            }
        })
        .join();
    }
}
