//! A worker's part of the KV transfer plane, by role: a prefill worker gets a sender, a decode
//! worker a receiver (listening on its transfer address) whose arrivals feed its engine, an
//! aggregated worker neither.
//!
//! Concurrency: the receiver runs as tasks on the caller's tokio runtime; arrivals reach the
//! engine over a bounded channel ([`ARRIVALS_DEPTH`]), which pushes back on senders.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use super::DisaggIo;
use crate::contract::WorkerRole;
use crate::planes::transfer::{self, TransferBackend, TransferConfig, TransferSender};

/// Landed transfers queued for one decode engine.
pub const ARRIVALS_DEPTH: usize = 256;

/// What [`setup`] made: the engine's side, and the address decode workers advertise.
pub struct TransferSetup {
    pub io: DisaggIo,
    pub address: Option<String>,
}

/// Where a decode worker receives transfers.
pub enum Listen<'a> {
    /// TCP on `bind`, advertised as `advertise_host` with the bound port.
    Tcp { bind: SocketAddr, advertise_host: &'a str },
    /// An `inproc://` address of this process (`kvgate serve` only).
    InProcess,
}

/// Sets up the transfer plane of an embedded (`kvgate serve`) worker: loopback TCP on an
/// ephemeral port, or the in-process backend.
pub fn setup_embedded(
    role: WorkerRole,
    backend: TransferBackend,
    timeout: Duration,
    bytes_per_block: u64,
) -> std::io::Result<TransferSetup> {
    let listen = match backend {
        TransferBackend::Tcp => {
            Listen::Tcp { bind: SocketAddr::from(([127, 0, 0, 1], 0)), advertise_host: "127.0.0.1" }
        }
        TransferBackend::InProcess => Listen::InProcess,
    };
    setup(role, bytes_per_block, timeout, listen)
}

/// Sets up the transfer plane of a worker of `role`; a decode worker starts receiving as
/// `listen` says. Must run inside a tokio runtime.
pub fn setup(
    role: WorkerRole,
    bytes_per_block: u64,
    timeout: Duration,
    listen: Listen<'_>,
) -> std::io::Result<TransferSetup> {
    if bytes_per_block == 0 && role != WorkerRole::Aggregated {
        tracing::warn!(?role, "the model has no config.json to size its KV: transfers will carry no payload");
    }
    let mut config = TransferConfig::new(bytes_per_block);
    config.timeout = timeout;
    let mut io = DisaggIo { bytes_per_block, timeout, ..DisaggIo::default() };
    let mut address = None;
    match role {
        WorkerRole::Aggregated => {}
        WorkerRole::Prefill => io.sender = Some(TransferSender::new(config)),
        WorkerRole::Decode => {
            let (tx, rx) = mpsc::channel(ARRIVALS_DEPTH);
            io.arrivals = Some(rx);
            match listen {
                Listen::Tcp { bind, advertise_host } => {
                    let std_listener = std::net::TcpListener::bind(bind)?;
                    std_listener.set_nonblocking(true)?;
                    let port = std_listener.local_addr()?.port();
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    drop(transfer::spawn_receiver(listener, config, tx));
                    address = Some(format!("{advertise_host}:{port}"));
                }
                Listen::InProcess => {
                    let guard = transfer::bind_in_process(config, tx);
                    address = Some(guard.address().to_string());
                    io.in_process = Some(guard);
                }
            }
        }
    }
    Ok(TransferSetup { io, address })
}
