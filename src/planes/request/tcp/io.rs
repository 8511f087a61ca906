//! Frame I/O shared by both sides: a buffered, cancel-safe frame reader and a batching writer
//! loop, generic over tokio's `AsyncRead`/`AsyncWrite` (which monoio's poll-io streams
//! implement too, so the same code serves tokio workers and monoio shards).
//!
//! Concurrency: each value is owned by one connection's task. The reader's buffer holds at most
//! one partial frame plus [`READ_CHUNK_BYTES`]; the writer's queue is the caller's bounded
//! channel.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{ConnError, READ_CHUNK_BYTES, WRITE_BATCH_BYTES};
use crate::contract::frame::{self, Frame};

/// Reads frames off a byte stream.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R) -> Self {
        Self { io, buf: BytesMut::with_capacity(READ_CHUNK_BYTES) }
    }

    /// The next frame; `None` on a clean end of stream (between frames). Cancel-safe: bytes
    /// already read stay buffered for the next call.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ConnError> {
        loop {
            if let Some(f) = frame::decode_from(&mut self.buf)? {
                return Ok(Some(f));
            }
            if self.buf.is_empty() && self.buf.capacity() > 16 * READ_CHUNK_BYTES {
                // A one-off large frame does not pin its buffer.
                self.buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
            }
            self.buf.reserve(READ_CHUNK_BYTES);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(ConnError::Protocol("connection closed inside a frame")),
                };
            }
        }
    }
}

/// Writes what `rx` yields until every sender is gone, coalescing queued messages into writes
/// of up to [`WRITE_BATCH_BYTES`]; `put` appends one message's bytes. Then shuts the write side.
pub(crate) async fn write_loop<W, M>(
    mut io: W,
    mut rx: mpsc::Receiver<M>,
    mut put: impl FnMut(M, &mut BytesMut),
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    while let Some(m) = rx.recv().await {
        put(m, &mut buf);
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) => put(m, &mut buf),
                Err(_) => break,
            }
        }
        io.write_all(&buf).await?;
        io.flush().await?;
        buf.clear();
        if buf.capacity() > 4 * WRITE_BATCH_BYTES {
            // A one-off large frame (a recovery chunk) does not pin its buffer.
            buf = BytesMut::with_capacity(WRITE_BATCH_BYTES);
        }
    }
    io.shutdown().await
}

/// Appends `f`; a frame too large to send becomes an `Error` frame for its stream instead.
pub(crate) fn put_frame(f: Frame, buf: &mut BytesMut) {
    if let Err(e) = f.encode(buf) {
        tracing::warn!(stream = f.stream().0, error = %e, "frame not sent");
        let message = format!("frame not sent: {e}");
        let _ = Frame::Error { stream: f.stream(), message }.encode(buf);
    }
}
