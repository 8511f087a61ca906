//! TCP sending side: a pool of idle connections per destination, and one transfer on one
//! connection (vectored writes straight from the arena, then the receiver's status byte).
//!
//! Invariants: a connection is pooled only after a clean acknowledgement, so a pooled
//! connection is at a transfer boundary; at most `max_idle_per_addr` are kept per destination.
//! A transfer on a reused connection that fails before the receiver's TCP stack acknowledged
//! any of its bytes is retried once on a fresh connection (the receiver cannot have seen it).
//! Concurrency: the pool's std mutex is held only to push or pop, never across `.await`.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::Mutex;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::arena::SendArena;
use super::wire::{self, HEADER_LEN, STATUS_OK, TRAILER_LEN};
use super::{TransferConfig, TransferError, TransferHeader};

/// Slices per `writev` (well under IOV_MAX) and bytes offered per call.
const MAX_SLICES: usize = 64;
const MAX_WRITE_BYTES: u64 = 64 << 20;
/// How long a sender whose write failed waits for a refusal that may explain it.
const REFUSAL_GRACE: Duration = Duration::from_millis(500);

pub(super) struct Pool {
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    max_idle: usize,
}

impl Pool {
    pub(super) fn new(max_idle: usize) -> Self {
        Self { idle: Mutex::new(HashMap::new()), max_idle }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<TcpStream>>> {
        // A panic while holding the lock cannot leave the map inconsistent (push/pop only).
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection to `addr` that the receiver has not closed meanwhile.
    fn take(&self, addr: &str) -> Option<TcpStream> {
        loop {
            let stream = self.lock().get_mut(addr)?.pop()?;
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit()];
            match SockRef::from(&stream).peek(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(stream),
                // Closed (0), unexpected bytes, or an error: not reusable.
                _ => tracing::debug!(addr, "dropping a pooled KV transfer connection the receiver closed"),
            }
        }
    }

    fn put(&self, addr: &str, stream: TcpStream) {
        let mut idle = self.lock();
        let conns = idle.entry(addr.to_owned()).or_default();
        if conns.len() < self.max_idle {
            conns.push(stream);
        }
    }

    pub(super) fn idle(&self, addr: &str) -> usize {
        self.lock().get(addr).map_or(0, Vec::len)
    }
}

/// Why one attempt failed, before it is tied to an address.
enum Failure {
    Io(io::Error),
    Refused(String),
}

impl Failure {
    fn into_error(self, addr: &str) -> TransferError {
        match self {
            Self::Io(source) => TransferError::Io { addr: addr.to_owned(), source },
            Self::Refused(reason) => TransferError::Refused { addr: addr.to_owned(), reason },
        }
    }
}

pub(super) async fn send(
    pool: &Pool,
    config: &TransferConfig,
    addr: &str,
    arena: &SendArena,
    header: &TransferHeader,
) -> Result<(), TransferError> {
    if let Some(mut stream) = pool.take(addr) {
        let acked_before = bytes_acked(&stream);
        match transfer(&mut stream, arena, header).await {
            Ok(()) => {
                pool.put(addr, stream);
                return Ok(());
            }
            Err(Failure::Io(e)) if acked_before.is_some() && bytes_acked(&stream) == acked_before => {
                tracing::debug!(addr, error = %e, "pooled KV transfer connection failed unseen; retrying on a new one");
            }
            Err(failure) => return Err(failure.into_error(addr)),
        }
    }
    let mut stream = connect(config, addr).await?;
    transfer(&mut stream, arena, header).await.map_err(|f| f.into_error(addr))?;
    pool.put(addr, stream);
    Ok(())
}

/// Bytes of this connection the peer's TCP stack acknowledged (Linux `TCP_INFO`).
fn bytes_acked(stream: &TcpStream) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: valid fd, pointer and length for the duration of the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(info.tcpi_bytes_acked)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        None
    }
}

async fn connect(config: &TransferConfig, addr: &str) -> Result<TcpStream, TransferError> {
    let connect_error = |source| TransferError::Connect { addr: addr.to_owned(), source };
    let attempt = async {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolved to nothing");
        for sa in tokio::net::lookup_host(addr).await? {
            let socket = if sa.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            if let Some(bytes) = config.socket_buffer_bytes {
                tune_buffers(&SockRef::from(&socket), bytes);
            }
            match socket.connect(sa).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(config.connect_timeout, attempt).await {
        Ok(result) => result.map_err(connect_error),
        Err(_) => Err(connect_error(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {:?}", config.connect_timeout),
        ))),
    }
}

/// Best effort: the kernel caps (or refuses) sizes above `net.core.[rw]mem_max`.
pub(super) fn tune_buffers(socket: &SockRef<'_>, bytes: usize) {
    if let Err(e) = socket.set_send_buffer_size(bytes).and_then(|()| socket.set_recv_buffer_size(bytes)) {
        tracing::debug!(error = %e, bytes, "cannot size KV transfer socket buffers");
    }
}

/// One transfer: header, payload and trailer written while watching for an early refusal,
/// then the status byte.
async fn transfer(stream: &mut TcpStream, arena: &SendArena, header: &TransferHeader) -> Result<(), Failure> {
    let head = wire::encode_header(header);
    let trailer = header.room.to_le_bytes();
    let (mut rd, mut wr) = stream.split();
    let write = write_all(&mut wr, arena, header, &head, &trailer);
    let status = read_status(&mut rd);
    tokio::pin!(write, status);
    tokio::select! {
        biased;
        early = &mut status => match early {
            Ok(()) => Err(Failure::Io(io::Error::new(io::ErrorKind::InvalidData, "acknowledged before the whole transfer was sent"))),
            Err(failure) => Err(failure),
        },
        written = &mut write => match written {
            Ok(()) => status.await,
            // A receiver that refuses stops reading: its reason explains the write error.
            Err(e) => match tokio::time::timeout(REFUSAL_GRACE, status).await {
                Ok(Err(Failure::Refused(reason))) => Err(Failure::Refused(reason)),
                _ => Err(Failure::Io(e)),
            },
        },
    }
}

async fn write_all<W: AsyncWriteExt + Unpin>(
    wr: &mut W,
    arena: &SendArena,
    header: &TransferHeader,
    head: &[u8; HEADER_LEN],
    trailer: &[u8; TRAILER_LEN],
) -> io::Result<()> {
    let (h, payload) = (HEADER_LEN as u64, header.payload_bytes());
    let total = h + payload + TRAILER_LEN as u64;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_SLICES + 2);
    let mut x = 0u64;
    while x < total {
        slices.clear();
        if x < h {
            slices.push(IoSlice::new(&head[x as usize..]));
        }
        let from = x.max(h) - h;
        arena.payload_slices(u64::from(header.num_blocks), from, MAX_SLICES, MAX_WRITE_BYTES, &mut slices);
        let offered: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if x + offered >= h + payload {
            let t = (x.max(h + payload) - h - payload) as usize;
            slices.push(IoSlice::new(&trailer[t..]));
        }
        let n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        x += n as u64;
    }
    wr.flush().await
}

/// The receiver's answer: `Ok` for accepted, `Refused` with its reason, or an I/O failure.
async fn read_status<R: AsyncReadExt + Unpin>(rd: &mut R) -> Result<(), Failure> {
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => Failure::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the receiver closed the connection without acknowledging",
        )),
        _ => Failure::Io(e),
    };
    let status = rd.read_u8().await.map_err(closed)?;
    if status == STATUS_OK {
        return Ok(());
    }
    let len = rd.read_u16_le().await.map_err(closed)?;
    let mut reason = vec![0u8; usize::from(len)];
    rd.read_exact(&mut reason).await.map_err(closed)?;
    Err(Failure::Refused(String::from_utf8_lossy(&reason).into_owned()))
}
