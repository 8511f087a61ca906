//! The KV transfer plane of disaggregated serving: a prefill worker pushes the KV blocks of a
//! prompt it computed to the decode worker that will generate from them.
//!
//! - [`TransferSender`] (prefill side) sends every block from its immutable, page-aligned
//!   [`arena::SendArena`] (the mocker has no device memory; real bytes still move) with
//!   vectored writes (no staging copy), over pooled TCP connections per destination.
//! - [`spawn_receiver`] (decode side) reads each payload straight into a page-aligned buffer
//!   per connection (the one kernel → user copy), then reports an [`Arrival`].
//! - `inproc://<name>` addresses ([`bind_in_process`]) copy the payload once, arena → receiver
//!   buffer, without sockets: the in-process implementation of this seam.
//!
//! The wire format is documented in [`wire`]. Both sides log one `debug` line per transfer
//! (room, blocks, bytes, seconds, GB/s) and report it in [`TransferStats`].
//!
//! Invariants: every queue is bounded (arrivals channel, idle connections per destination,
//! receiver connections); wire input never panics a receiver; a connection goes back to the
//! pool only after a clean acknowledgement. Concurrency: a sender's clones share one arena
//! (read-only) and one pool (a std mutex held only to push/pop, never across `.await`).

pub mod arena;
mod in_process;
mod recv;
mod send;
#[cfg(test)]
mod tests;
pub mod wire;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::mpsc;

use crate::contract::TokenId;

/// What one transfer carries besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferHeader {
    /// The bootstrap room: pairs this transfer with the decode leg of the same request.
    pub room: u64,
    /// The frontend's request id (logs only).
    pub request_id: u64,
    /// KV blocks that follow (the prompt's blocks, the last one possibly partial).
    pub num_blocks: u32,
    /// Bytes of one block (from the model's config.json); 0 when unknown (header only).
    pub bytes_per_block: u64,
    /// The first generated token, sampled by the prefill worker; `None` when it sampled EOS.
    pub first_token: Option<TokenId>,
}

impl TransferHeader {
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.num_blocks).saturating_mul(self.bytes_per_block)
    }
}

/// One finished transfer, as measured by the side that reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferStats {
    pub blocks: u32,
    pub bytes: u64,
    /// Sender: connect (or reuse) to the receiver's acknowledgement. Receiver: header to trailer.
    pub elapsed: Duration,
}

impl TransferStats {
    /// Payload throughput in GB/s (10^9 bytes per second); 0 for an instant transfer.
    pub fn gbps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}

/// A transfer that landed at a receiver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    pub header: TransferHeader,
    pub stats: TransferStats,
}

/// Why a transfer failed.
#[derive(Debug, Error)]
pub enum TransferError {
    #[error("cannot reach the decode worker's transfer address {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("KV transfer to {addr} failed: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("KV transfer to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("the decode worker at {addr} refused the transfer: {reason}")]
    Refused { addr: String, reason: String },
    #[error("invalid KV transfer to {addr}: {reason}")]
    Invalid { addr: String, reason: String },
}

/// Tunables of both sides.
#[derive(Debug, Clone)]
pub struct TransferConfig {
    /// Bytes of one KV block of the served model.
    pub bytes_per_block: u64,
    /// Limit on one whole transfer (connect to acknowledgement).
    pub timeout: Duration,
    /// Largest transfer a receiver accepts.
    pub max_transfer_bytes: u64,
    /// Sender: limit on resolving and connecting to a receiver.
    pub connect_timeout: Duration,
    /// Receiver: a connection with no progress for this long is closed (idle or stalled).
    pub idle_timeout: Duration,
    /// Receiver: connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Sender: idle connections kept per destination.
    pub max_idle_per_addr: usize,
    /// Receiver: size of the page-aligned buffer a payload is read into, chunk by chunk (1 MiB
    /// stays in L2 and measured as fast as 4–8 MiB on loopback: perf/TRANSFER_RESULTS.md).
    pub recv_buffer_bytes: usize,
    /// Sender: target size of the arena (slots of one block; at least one).
    pub arena_bytes: u64,
    /// SO_SNDBUF and SO_RCVBUF of transfer sockets (the kernel doubles it and caps it at
    /// `net.core.wmem_max`/`rmem_max`); `None` (the default) keeps the kernel's autotuning,
    /// which adapts to the path and measured no slower on loopback than fixed 4 MiB buffers.
    pub socket_buffer_bytes: Option<usize>,
    /// Receiver: check every landed byte against the arena's pattern and refuse a corrupted
    /// transfer (tests and diagnostics; costs one pass over the payload).
    pub verify_payload: bool,
}

impl TransferConfig {
    /// Defaults for blocks of `bytes_per_block` bytes.
    pub fn new(bytes_per_block: u64) -> Self {
        Self {
            bytes_per_block,
            timeout: Duration::from_secs(30),
            max_transfer_bytes: 16 << 30,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            max_idle_per_addr: 4,
            recv_buffer_bytes: 1 << 20,
            arena_bytes: 64 << 20,
            socket_buffer_bytes: None,
            verify_payload: false,
        }
    }

    /// The payload size of `header` if this receiver accepts it, else the refusal reason.
    fn accept(&self, header: &TransferHeader) -> Result<u64, String> {
        if header.bytes_per_block != self.bytes_per_block {
            return Err(format!(
                "bytes_per_block {} does not match this worker's {} (a different model or KV layout?)",
                header.bytes_per_block, self.bytes_per_block
            ));
        }
        match u64::from(header.num_blocks).checked_mul(header.bytes_per_block) {
            Some(bytes) if bytes <= self.max_transfer_bytes => Ok(bytes),
            _ => Err(format!(
                "{} blocks of {} bytes exceed this worker's limit of {} bytes per transfer",
                header.num_blocks, header.bytes_per_block, self.max_transfer_bytes
            )),
        }
    }
}

/// The sending side (prefill worker). Cheap to clone; clones share the arena and connections.
#[derive(Clone)]
pub struct TransferSender {
    inner: Arc<SenderInner>,
}

struct SenderInner {
    config: TransferConfig,
    /// Built on the first transfer (a sender that never sends costs no memory).
    arena: OnceLock<arena::SendArena>,
    pool: send::Pool,
}

impl TransferSender {
    pub fn new(config: TransferConfig) -> Self {
        let pool = send::Pool::new(config.max_idle_per_addr);
        Self { inner: Arc::new(SenderInner { config, arena: OnceLock::new(), pool }) }
    }

    pub fn config(&self) -> &TransferConfig {
        &self.inner.config
    }

    /// The arena blocks are sent from (built on first use).
    pub fn arena(&self) -> &arena::SendArena {
        let c = &self.inner.config;
        self.inner.arena.get_or_init(|| {
            let bytes_per_block =
                usize::try_from(c.bytes_per_block).expect("bytes_per_block exceeds the address space");
            arena::SendArena::new(bytes_per_block, c.arena_bytes, c.max_transfer_bytes)
        })
    }

    /// Idle pooled connections to `addr` (diagnostics and tests).
    pub fn idle_connections(&self, addr: &str) -> usize {
        self.inner.pool.idle(addr)
    }

    /// Pushes `header.num_blocks` blocks to the receiver at `addr` (`host:port`, or
    /// `inproc://<name>` for [`bind_in_process`]) and waits for its acknowledgement.
    pub async fn send(&self, addr: &str, header: TransferHeader) -> Result<TransferStats, TransferError> {
        let config = &self.inner.config;
        if header.bytes_per_block != config.bytes_per_block {
            return Err(TransferError::Invalid {
                addr: addr.to_owned(),
                reason: format!(
                    "header says {} bytes per block, this sender's arena holds blocks of {}",
                    header.bytes_per_block, config.bytes_per_block
                ),
            });
        }
        let arena = self.arena();
        let start = Instant::now();
        let attempt = async {
            match addr.strip_prefix(in_process::SCHEME) {
                Some(_) => in_process::send(addr, arena, &header).await,
                None => send::send(&self.inner.pool, config, addr, arena, &header).await,
            }
        };
        match tokio::time::timeout(config.timeout, attempt).await {
            Err(_) => return Err(TransferError::Timeout { addr: addr.to_owned(), after: config.timeout }),
            Ok(result) => result?,
        }
        let stats =
            TransferStats { blocks: header.num_blocks, bytes: header.payload_bytes(), elapsed: start.elapsed() };
        tracing::debug!(
            room = header.room,
            request_id = header.request_id,
            addr,
            blocks = stats.blocks,
            bytes = stats.bytes,
            secs = stats.elapsed.as_secs_f64(),
            gbps = stats.gbps(),
            "KV transfer sent"
        );
        Ok(stats)
    }
}

pub use in_process::{bind_in_process, InProcessReceiverGuard};

/// Which backend moves a disaggregated mocker's KV (`--disaggregation-transfer-backend`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferBackend {
    /// TCP to the decode worker's transfer address (page-aligned buffers, vectored writes).
    Tcp,
    /// A memory copy between workers of one process (`kvgate serve` only).
    InProcess,
}

/// The receiving side (decode worker): accepts transfers on `listener` and reports each landed
/// transfer on `arrivals` (bounded; a full channel pushes back on senders). The task ends (and
/// closes every connection) when `arrivals`' receiver is dropped, or when aborted.
pub fn spawn_receiver(
    listener: tokio::net::TcpListener,
    config: TransferConfig,
    arrivals: mpsc::Sender<Arrival>,
) -> tokio::task::JoinHandle<()> {
    recv::spawn(listener, config, arrivals)
}
