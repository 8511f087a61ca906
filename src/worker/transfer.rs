//! A worker's part of the KV transfer plane, by role: a prefill worker gets a sender, a decode
//! worker a receiver (listening on its transfer address) whose arrivals feed its engine, an
//! aggregated worker neither.
//!
//! Concurrency: the receiver runs as tasks on the caller's tokio runtime; arrivals reach the
//! engine over a bounded channel ([`ARRIVALS_DEPTH`]), which pushes back on senders.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{TransferArgs, TransferBackend};
use crate::protocol::WorkerRole;
use crate::transfer::{self, TransferConfig, TransferSender};
use crate::worker::DisaggIo;

/// Landed transfers queued for one decode engine.
pub const ARRIVALS_DEPTH: usize = 256;

/// What [`setup`] made: the engine's side, and the address decode workers advertise.
pub struct TransferSetup {
    pub io: DisaggIo,
    pub address: Option<String>,
}

/// Sets up the transfer plane of an embedded (`kvgate serve`) worker: loopback TCP on an
/// ephemeral port, or the in-process backend.
pub fn setup(role: WorkerRole, args: &TransferArgs, bytes_per_block: u64) -> std::io::Result<TransferSetup> {
    match args.disaggregation_transfer_backend {
        TransferBackend::Tcp => {
            setup_tcp(role, bytes_per_block, args.timeout(), SocketAddr::from(([127, 0, 0, 1], 0)), "127.0.0.1")
        }
        TransferBackend::InProcess => setup_in_process(role, bytes_per_block, args.timeout()),
    }
}

/// The in-process backend: transfers are memory copies between workers of this process.
fn setup_in_process(role: WorkerRole, bytes_per_block: u64, timeout: Duration) -> std::io::Result<TransferSetup> {
    let mut config = TransferConfig::new(bytes_per_block);
    config.timeout = timeout;
    let mut io = DisaggIo { bytes_per_block, timeout, ..DisaggIo::default() };
    let mut address = None;
    match role {
        WorkerRole::Aggregated => {}
        WorkerRole::Prefill => io.sender = Some(TransferSender::new(config)),
        WorkerRole::Decode => {
            let (tx, rx) = mpsc::channel(ARRIVALS_DEPTH);
            let guard = transfer::bind_in_process(config, tx);
            address = Some(guard.address().to_string());
            io.arrivals = Some(rx);
            io.in_process = Some(guard);
        }
    }
    Ok(TransferSetup { io, address })
}

/// Sets up the transfer plane of a worker of `role` (TCP). A decode worker listens on `bind`
/// and advertises `advertise_host` with the bound port. Must run inside a tokio runtime.
pub fn setup_tcp(
    role: WorkerRole,
    bytes_per_block: u64,
    timeout: Duration,
    bind: SocketAddr,
    advertise_host: &str,
) -> std::io::Result<TransferSetup> {
    let mut config = TransferConfig::new(bytes_per_block);
    config.timeout = timeout;
    let mut io = DisaggIo { bytes_per_block, timeout, ..DisaggIo::default() };
    let mut address = None;
    match role {
        WorkerRole::Aggregated => {}
        WorkerRole::Prefill => io.sender = Some(TransferSender::new(config)),
        WorkerRole::Decode => {
            let std_listener = std::net::TcpListener::bind(bind)?;
            std_listener.set_nonblocking(true)?;
            let port = std_listener.local_addr()?.port();
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            let (tx, rx) = mpsc::channel(ARRIVALS_DEPTH);
            drop(transfer::spawn_receiver(listener, config, tx));
            io.arrivals = Some(rx);
            address = Some(format!("{advertise_host}:{port}"));
        }
    }
    Ok(TransferSetup { io, address })
}
