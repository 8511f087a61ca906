//! The KV transfer plane of disaggregated serving: a prefill worker pushes the KV blocks of a
//! prompt it computed to the decode worker that will generate from them.
//!
//! (Interface fixed here; implementation in progress.)
//!
//! Wire (TCP, one transfer at a time per connection, connections reused per destination):
//! header (magic, version, room, request id, block count, bytes per block, first token),
//! then `blocks × bytes_per_block` payload bytes sent from the sender's page-aligned arena,
//! then an 8-byte trailer (the room) so framing errors are caught; the receiver answers one
//! status byte once every byte has landed in its page-aligned receive buffer.

use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::protocol::TokenId;

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
        u64::from(self.num_blocks) * self.bytes_per_block
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
}

impl TransferConfig {
    /// Defaults: 30 s per transfer, transfers up to 64 GiB (a 128k-token prompt of a large model).
    pub fn new(bytes_per_block: u64) -> Self {
        Self { bytes_per_block, timeout: Duration::from_secs(30), max_transfer_bytes: 64 << 30 }
    }
}

/// The sending side (prefill worker). Cheap to clone; clones share the arena and connections.
#[derive(Clone)]
pub struct TransferSender {
    _config: TransferConfig,
}

impl TransferSender {
    pub fn new(config: TransferConfig) -> Self {
        Self { _config: config }
    }

    /// Pushes `header.num_blocks` blocks to the receiver at `addr` (`host:port`) and waits for
    /// its acknowledgement.
    pub async fn send(&self, addr: &str, header: TransferHeader) -> Result<TransferStats, TransferError> {
        let _ = (addr, header);
        todo!("transfer plane in progress")
    }
}

/// The receiving side (decode worker): accepts transfers on `listener` and reports each landed
/// transfer on `arrivals` (bounded; a full channel pushes back on senders).
pub fn spawn_receiver(
    listener: tokio::net::TcpListener,
    config: TransferConfig,
    arrivals: mpsc::Sender<Arrival>,
) -> tokio::task::JoinHandle<()> {
    let _ = (listener, config, arrivals);
    todo!("transfer plane in progress")
}
