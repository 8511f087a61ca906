//! TCP receiving side: an accept loop and one task per connection, which serves transfers one
//! after another until the peer closes.
//!
//! Invariants: at most `max_connections` connections are served (more are closed on accept);
//! a payload is read straight into the connection's page-aligned buffer (reused, grown up to
//! `recv_buffer_bytes`), the one kernel → user copy; an [`Arrival`] is reported (awaiting room
//! in the bounded channel) before the status byte, so an acknowledged transfer was delivered.
//! Wire input never panics: a bad header is refused with a reason, a wrong trailer or a stall
//! closes the connection. Concurrency: connection tasks share only the config and the channel;
//! dropping the accept task's `JoinSet` aborts them all.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::arena::{first_pattern_mismatch, AlignedBuf, PAGE};
use super::send::tune_buffers;
use super::wire::{self, HEADER_LEN, STATUS_OK, TRAILER_LEN};
use super::{Arrival, TransferConfig, TransferStats};

/// How long a refusing receiver keeps reading (and discarding) so its reason reaches the sender.
const DRAIN_AFTER_REFUSAL: Duration = Duration::from_secs(1);

pub(super) fn spawn(listener: TcpListener, config: TransferConfig, arrivals: mpsc::Sender<Arrival>) -> JoinHandle<()> {
    if let Some(bytes) = config.socket_buffer_bytes {
        // Accepted sockets inherit it, and the window scale is chosen from it at the handshake.
        tune_buffers(&SockRef::from(&listener), bytes);
    }
    tokio::spawn(accept_loop(listener, Arc::new(config), arrivals))
}

async fn accept_loop(listener: TcpListener, config: Arc<TransferConfig>, arrivals: mpsc::Sender<Arrival>) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = arrivals.closed() => {
                tracing::debug!("KV transfer receiver stops: nobody takes arrivals any more");
                return;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        conns.spawn(serve(stream, peer, config.clone(), arrivals.clone(), permit));
                    }
                    Err(_) => tracing::warn!(%peer, limit = config.max_connections, "too many KV transfer connections; closing"),
                },
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "KV transfer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// How serving a connection ends.
enum End {
    /// The peer closed at a transfer boundary.
    Done,
    /// Answer with a refusal, then close.
    Refuse(String),
    /// Close without answering (framing lost, stalled, or the peer went away).
    Close(String),
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: Arc<TransferConfig>,
    arrivals: mpsc::Sender<Arrival>,
    _permit: OwnedSemaphorePermit,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY on a KV transfer connection");
    }
    let mut buf = AlignedBuf::zeroed(0);
    let end = loop {
        match serve_one(&mut stream, &config, &arrivals, &mut buf).await {
            Ok(()) => continue,
            Err(end) => break end,
        }
    };
    match end {
        End::Done => {}
        End::Refuse(reason) => {
            tracing::warn!(%peer, reason, "refusing a KV transfer");
            refuse(stream, &reason).await;
        }
        End::Close(why) => tracing::warn!(%peer, why, "closing a KV transfer connection"),
    }
}

/// Serves one transfer; `Err` ends the connection.
async fn serve_one(
    stream: &mut TcpStream,
    config: &TransferConfig,
    arrivals: &mpsc::Sender<Arrival>,
    buf: &mut AlignedBuf,
) -> Result<(), End> {
    let idle = config.idle_timeout;
    let mut head = [0u8; HEADER_LEN];
    // The first byte may take up to the idle timeout; EOF there is a clean close.
    match tokio::time::timeout(idle, stream.read(&mut head)).await {
        Err(_) => return Err(End::Done),
        Ok(Ok(0)) => return Err(End::Done),
        Ok(Ok(n)) => read_exact(stream, &mut head[n..], idle).await?,
        Ok(Err(e)) => return Err(End::Close(format!("read failed: {e}"))),
    }
    let header = wire::decode_header(&head).map_err(|e| End::Refuse(e.to_string()))?;
    let started = Instant::now();
    let payload = config.accept(&header).map_err(End::Refuse)?;

    if payload > buf.len() as u64 && buf.len() < config.recv_buffer_bytes {
        let want = payload.min(config.recv_buffer_bytes.max(PAGE) as u64) as usize;
        *buf = AlignedBuf::zeroed(want.div_ceil(PAGE) * PAGE);
    }
    let mut got = 0u64;
    let mut corrupt_at = None;
    while got < payload {
        let want = (payload - got).min(buf.len() as u64) as usize;
        let chunk = &mut buf.as_mut_slice()[..want];
        let n = match tokio::time::timeout(idle, stream.read(chunk)).await {
            Err(_) => return Err(End::Close(format!("stalled for {idle:?} after {got} of {payload} payload bytes"))),
            Ok(Err(e)) => return Err(End::Close(format!("read failed after {got} of {payload} payload bytes: {e}"))),
            Ok(Ok(0)) => return Err(End::Close(format!("peer closed after {got} of {payload} payload bytes"))),
            Ok(Ok(n)) => n,
        };
        if config.verify_payload && corrupt_at.is_none() {
            let offset = got % header.bytes_per_block;
            corrupt_at = first_pattern_mismatch(&chunk[..n], offset, header.bytes_per_block).map(|i| got + i as u64);
        }
        got += n as u64;
    }
    let mut trailer = [0u8; TRAILER_LEN];
    read_exact(stream, &mut trailer, idle).await?;
    if trailer != header.room.to_le_bytes() {
        return Err(End::Close(format!(
            "wrong trailer {:#018x} after room {} (framing lost)",
            u64::from_le_bytes(trailer),
            header.room
        )));
    }
    let stats = TransferStats { blocks: header.num_blocks, bytes: payload, elapsed: started.elapsed() };
    if let Some(at) = corrupt_at {
        return Err(End::Refuse(format!("payload differs from the arena pattern at byte {at}")));
    }
    arrivals
        .send(Arrival { header, stats })
        .await
        .map_err(|_| End::Refuse("the decode worker is shutting down".to_owned()))?;
    tracing::debug!(
        room = header.room,
        request_id = header.request_id,
        blocks = stats.blocks,
        bytes = stats.bytes,
        secs = stats.elapsed.as_secs_f64(),
        gbps = stats.gbps(),
        "KV transfer received"
    );
    match tokio::time::timeout(idle, stream.write_all(&[STATUS_OK])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Close(format!("cannot acknowledge room {}: {e}", header.room))),
        Err(_) => Err(End::Close(format!("cannot acknowledge room {} within {idle:?}", header.room))),
    }
}

async fn read_exact(stream: &mut TcpStream, buf: &mut [u8], idle: Duration) -> Result<(), End> {
    match tokio::time::timeout(idle, stream.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(End::Close("peer closed mid-frame".to_owned())),
        Ok(Err(e)) => Err(End::Close(format!("read failed: {e}"))),
        Err(_) => Err(End::Close(format!("stalled mid-frame for {idle:?}"))),
    }
}

/// Sends the refusal, stops writing, and discards what the sender still had in flight for a
/// moment (closing with unread bytes would reset the connection and could lose the reason).
async fn refuse(mut stream: TcpStream, reason: &str) {
    let answer = async {
        stream.write_all(&wire::encode_refusal(reason)).await?;
        stream.shutdown().await?;
        let mut sink = vec![0u8; 64 << 10];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(DRAIN_AFTER_REFUSAL, answer).await;
}
