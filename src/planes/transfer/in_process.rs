//! In-process transfer plane: `inproc://<name>` receivers in a process-global registry.
//!
//! A send copies the payload once, from the sender's arena into a page-aligned buffer of the
//! receiver (real bytes still move, as over TCP, minus the kernel), then delivers the
//! [`Arrival`] on the receiver's bounded channel. The same header checks as the TCP receiver
//! apply, with the same refusal reasons.
//!
//! Invariants: an address is registered while its [`InProcessReceiverGuard`] lives; each
//! receiver keeps at most [`MAX_IDLE_BUFFERS`] buffers between transfers. Concurrency: the
//! registry and buffer lists are std mutexes held only to look up, insert, push or pop (never
//! across `.await`); concurrent sends copy into distinct buffers, yielding between chunks.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::mpsc;

use super::arena::{first_pattern_mismatch, AlignedBuf, SendArena, PAGE};
use super::{Arrival, TransferConfig, TransferError, TransferHeader, TransferStats};

pub(super) const SCHEME: &str = "inproc://";
const MAX_IDLE_BUFFERS: usize = 4;

struct Receiver {
    config: TransferConfig,
    arrivals: mpsc::Sender<Arrival>,
    buffers: Mutex<Vec<AlignedBuf>>,
}

type Registry = Mutex<HashMap<String, Arc<Receiver>>>;

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);
static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only inserts, removes, pushes and pops happen under these locks: never inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps an in-process receiver registered; dropping it unregisters the address.
#[derive(Debug)]
pub struct InProcessReceiverGuard {
    address: String,
}

impl InProcessReceiverGuard {
    /// The `inproc://…` address senders use.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for InProcessReceiverGuard {
    fn drop(&mut self) {
        lock(&REGISTRY).remove(&self.address);
    }
}

/// Registers an in-process receiver under a fresh `inproc://` address; transfers sent there
/// are reported on `arrivals` (bounded; a full channel pushes back on senders).
pub fn bind_in_process(config: TransferConfig, arrivals: mpsc::Sender<Arrival>) -> InProcessReceiverGuard {
    let address = format!("{SCHEME}transfer-{}", NEXT_NAME.fetch_add(1, Ordering::Relaxed));
    let receiver = Arc::new(Receiver { config, arrivals, buffers: Mutex::new(Vec::new()) });
    lock(&REGISTRY).insert(address.clone(), receiver);
    InProcessReceiverGuard { address }
}

pub(super) async fn send(addr: &str, arena: &SendArena, header: &TransferHeader) -> Result<(), TransferError> {
    let receiver = lock(&REGISTRY).get(addr).cloned().ok_or_else(|| TransferError::Connect {
        addr: addr.to_owned(),
        source: io::Error::new(io::ErrorKind::ConnectionRefused, "no in-process KV transfer receiver has this address"),
    })?;
    let refused = |reason: String| TransferError::Refused { addr: addr.to_owned(), reason };
    let config = &receiver.config;
    let payload = config.accept(header).map_err(refused)?;

    let started = Instant::now();
    let cap = payload.min(config.recv_buffer_bytes.max(PAGE) as u64).div_ceil(PAGE as u64) * PAGE as u64;
    let popped = lock(&receiver.buffers).pop();
    let mut buf = match popped {
        Some(b) if b.len() as u64 >= cap => b,
        _ => AlignedBuf::zeroed(cap as usize),
    };
    let corrupt_at = copy_payload(arena, header, payload, &mut buf, config.verify_payload).await;
    {
        let mut idle = lock(&receiver.buffers);
        if idle.len() < MAX_IDLE_BUFFERS {
            idle.push(buf);
        }
    }
    if let Some(at) = corrupt_at {
        return Err(refused(format!("payload differs from the arena pattern at byte {at}")));
    }
    let stats = TransferStats { blocks: header.num_blocks, bytes: payload, elapsed: started.elapsed() };
    receiver
        .arrivals
        .send(Arrival { header: *header, stats })
        .await
        .map_err(|_| refused("the decode worker is shutting down".to_owned()))?;
    tracing::debug!(
        room = header.room,
        request_id = header.request_id,
        blocks = stats.blocks,
        bytes = stats.bytes,
        secs = stats.elapsed.as_secs_f64(),
        gbps = stats.gbps(),
        "KV transfer received (in process)"
    );
    Ok(())
}

/// Copies the payload into `buf` one buffer-full at a time, yielding between chunks; returns
/// the first byte that differs from the pattern when `verify`.
async fn copy_payload(
    arena: &SendArena,
    header: &TransferHeader,
    payload: u64,
    buf: &mut AlignedBuf,
    verify: bool,
) -> Option<u64> {
    let mut slices = Vec::new();
    let mut corrupt_at = None;
    let mut x = 0u64;
    while x < payload {
        let want = (payload - x).min(buf.len() as u64) as usize;
        let dst = &mut buf.as_mut_slice()[..want];
        slices.clear();
        arena.payload_slices(u64::from(header.num_blocks), x, usize::MAX, want as u64, &mut slices);
        let mut filled = 0;
        for s in &slices {
            let n = s.len().min(want - filled);
            dst[filled..filled + n].copy_from_slice(&s[..n]);
            filled += n;
            if filled == want {
                break;
            }
        }
        if verify && corrupt_at.is_none() {
            corrupt_at = first_pattern_mismatch(&dst[..filled], x % header.bytes_per_block, header.bytes_per_block)
                .map(|i| x + i as u64);
        }
        x += want as u64;
        tokio::task::yield_now().await;
    }
    corrupt_at
}
