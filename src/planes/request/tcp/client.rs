//! Frontend side of the TCP request plane: [`TcpRequestPlane`].
//!
//! Concurrency: the plane keeps no worker table: each call's [`Target`](crate::contract::Target)
//! carries the worker's address from the frontend's worker snapshot. Connections live in a thread-local table keyed by (plane, worker), so
//! each monoio shard dials and owns its own connection to each worker, lazily, and never shares
//! it (on a tokio runtime each worker thread does the same). A connection is one task on the
//! thread that dialled it, running the frame reader (which owns the table of open streams) and
//! the writer (bounded queue, [`WRITE_QUEUE_DEPTH`]) side by side; each stream adds a relay
//! task that moves outputs to the consumer's [`ResponseStream`], grants credit back as the
//! consumer takes them, and sends `Cancel` as soon as the consumer drops the stream.
//!
//! Invariants: a stream holds one of its connection's [`MAX_STREAMS_PER_CONNECTION`] permits
//! until the worker's terminal frame (or the connection's end), so the worker never refuses a
//! correct frontend. Every stream ends with a terminal output: the worker's, or
//! `WorkerOutput::Error` when the connection breaks. A dead connection is replaced by the
//! next `generate`; a worker that cannot be reached within [`CONNECT_TIMEOUT`] is
//! [`TransportError::WorkerGone`].
//!
//! `generate` must run inside a tokio runtime or a monoio runtime with its timer enabled; the
//! connection and relay tasks are spawned on whichever it is.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::io::{put_frame, write_loop, FrameReader};
use super::{is_last, ConnError, CREDIT_BATCH, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW, WRITE_QUEUE_DEPTH};
use crate::contract::frame::{Frame, StreamId};
use crate::contract::{GenerateRequest, Target, WorkerError, WorkerId, WorkerOutput};
use crate::planes::request::{RequestPlane, ResponseStream, TransportError, RESPONSE_STREAM_DEPTH};

/// How long dialling a worker may take before it counts as gone (same rack: a live worker
/// answers in well under a millisecond).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Dials per `generate`: a cached connection found dead is replaced once.
const CONNECT_ATTEMPTS: usize = 2;
/// What a stream receives when its connection breaks before its last output.
const CONNECTION_LOST: &str = "connection to the worker was lost";

static NEXT_PLANE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's connections, by (plane, worker). Bounded by the planes × workers this
    /// thread has talked to; dead entries and unlisted workers are pruned on each dial (a
    /// dropped plane's entries stay until their workers close them).
    static CONNECTIONS: RefCell<HashMap<(u64, WorkerId), Connection>> = RefCell::new(HashMap::new());
}

/// The frontend's TCP request plane (see the module doc). Cheap to clone; clones share (on one
/// thread) the connections. Workers' addresses come with each call, from the frontend's
/// worker snapshot: the plane keeps no table of its own.
#[derive(Clone)]
pub struct TcpRequestPlane {
    shared: Arc<Shared>,
}

struct Shared {
    /// Distinguishes planes in the thread-local connection table.
    id: u64,
}

impl Default for TcpRequestPlane {
    fn default() -> Self {
        let id = NEXT_PLANE.fetch_add(1, Ordering::Relaxed);
        Self { shared: Arc::new(Shared { id }) }
    }
}

impl TcpRequestPlane {
    pub fn new() -> Self {
        Self::default()
    }

    /// A live (or dialling) connection to `worker` at `addr` on this thread, and whether it
    /// was just made.
    fn connection(&self, worker: WorkerId, addr: SocketAddr) -> (Connection, bool) {
        CONNECTIONS.with_borrow_mut(|conns| {
            let key = (self.shared.id, worker);
            if let Some(c) = conns.get(&key).filter(|c| c.addr == addr && !c.is_down()) {
                return (c.clone(), false);
            }
            // Rare (a dial): drop dead connections; a worker that left closes its own (a dropped
            // handle's connection closes once its open streams end).
            conns.retain(|_, c| !c.is_down());
            let c = Connection::dial(addr);
            conns.insert(key, c.clone());
            (c, true)
        })
    }

    fn forget(&self, worker: WorkerId, dead: &Connection) {
        CONNECTIONS.with_borrow_mut(|conns| {
            let key = (self.shared.id, worker);
            if conns.get(&key).is_some_and(|c| Arc::ptr_eq(&c.streams, &dead.streams)) {
                conns.remove(&key);
            }
        });
    }

    /// An established connection to `worker`, dialling if needed.
    async fn ready(&self, worker: WorkerId, addr: SocketAddr) -> Option<Connection> {
        for _ in 0..CONNECT_ATTEMPTS {
            let (conn, fresh) = self.connection(worker, addr);
            let mut state = conn.state.clone();
            let up = matches!(state.wait_for(|s| *s != ConnState::Dialling).await.map(|s| *s), Ok(ConnState::Up));
            if up {
                return Some(conn);
            }
            self.forget(worker, &conn);
            if fresh {
                return None;
            }
        }
        None
    }
}

impl RequestPlane for TcpRequestPlane {
    async fn generate(&self, to: Target, request: GenerateRequest) -> Result<ResponseStream, TransportError> {
        let worker = to.worker;
        let gone = || TransportError::WorkerGone(worker);
        let addr = to.endpoint.ok_or_else(gone)?;
        let conn = self.ready(worker, addr).await.ok_or_else(gone)?;
        // Waits while this connection has MAX_STREAMS_PER_CONNECTION streams open.
        let permit = conn.streams.clone().acquire_owned().await.map_err(|_| gone())?;
        let stream = StreamId(conn.next_stream.fetch_add(1, Ordering::Relaxed));
        let mut frame = BytesMut::new();
        if let Err(e) = (Frame::Request { stream, request }).encode(&mut frame) {
            return Ok(failed_stream(format!("request not sent: {e}")));
        }
        let (to_relay, from_reader) = mpsc::channel(STREAM_WINDOW as usize + 1);
        let (to_consumer, consumer) = mpsc::channel(RESPONSE_STREAM_DEPTH);
        let slot = Slot { tx: to_relay, _permit: permit };
        let open = Outgoing::Open { stream, slot, frame: frame.freeze() };
        conn.tx.send(open).await.map_err(|_| gone())?;
        spawn(relay(stream, from_reader, to_consumer, conn.tx.clone()));
        Ok(consumer)
    }
}

/// A stream that only says why it failed.
fn failed_stream(message: String) -> ResponseStream {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(WorkerOutput::Error(WorkerError::transport(message)));
    rx
}

/// Spawns on the current runtime: tokio if there is one, else monoio.
fn spawn<F: Future<Output = ()> + Send + 'static>(f: F) {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(f);
    } else {
        monoio::spawn(f);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Dialling,
    Up,
    Down,
}

/// A handle on one connection (cloned out of the thread-local table).
#[derive(Clone)]
struct Connection {
    addr: SocketAddr,
    state: watch::Receiver<ConnState>,
    tx: mpsc::Sender<Outgoing>,
    /// Stream permits; closed when the connection ends.
    streams: Arc<Semaphore>,
    next_stream: Arc<AtomicU64>,
}

impl Connection {
    /// Starts dialling `addr` on the current runtime.
    fn dial(addr: SocketAddr) -> Self {
        let (state_tx, state) = watch::channel(ConnState::Dialling);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let streams = Arc::new(Semaphore::new(MAX_STREAMS_PER_CONNECTION));
        let task = ConnTask { rx, down: DownOnDrop { state: state_tx, streams: streams.clone() } };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(dial_tokio(addr, task));
        } else {
            monoio::spawn(dial_monoio(addr, task));
        }
        Self { addr, state, tx, streams, next_stream: Arc::new(AtomicU64::new(1)) }
    }

    fn is_down(&self) -> bool {
        *self.state.borrow() == ConnState::Down
    }
}

/// What a connection's writer is asked to send.
enum Outgoing {
    /// A new stream: registered with the reader, then its `Request` frame written.
    Open { stream: StreamId, slot: Slot, frame: Bytes },
    /// `Cancel` or `Credit`.
    Frame(Frame),
}

/// The reader's end of one stream.
struct Slot {
    /// To the stream's relay; holds at most the window plus one uncredited final frame.
    tx: mpsc::Sender<WorkerOutput>,
    _permit: OwnedSemaphorePermit,
}

/// Marks the connection down (and refuses new streams) however its task ends.
struct DownOnDrop {
    state: watch::Sender<ConnState>,
    streams: Arc<Semaphore>,
}

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        self.streams.close();
        self.state.send_replace(ConnState::Down);
    }
}

struct ConnTask {
    rx: mpsc::Receiver<Outgoing>,
    down: DownOnDrop,
}

async fn dial_tokio(addr: SocketAddr, task: ConnTask) {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            task.run(addr, r, w).await;
        }
        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "request plane: connect failed"),
        Err(_) => tracing::debug!(%addr, "request plane: connect timed out"),
    }
}

async fn dial_monoio(addr: SocketAddr, task: ConnTask) {
    match monoio::time::timeout(CONNECT_TIMEOUT, monoio::net::TcpStream::connect_addr(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            match s.try_into_poll_io() {
                Ok(io) => {
                    let (r, w) = tokio::io::split(io);
                    task.run(addr, r, w).await;
                }
                Err((e, _)) => {
                    tracing::debug!(%addr, error = %e, "request plane: no poll-io stream")
                }
            }
        }
        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "request plane: connect failed"),
        Err(_) => tracing::debug!(%addr, "request plane: connect timed out"),
    }
}

impl ConnTask {
    /// Runs reader and writer until either ends; then every open stream's relay sees its
    /// channel close (and reports the loss) and queued opens are dropped the same way.
    async fn run<R, W>(self, addr: SocketAddr, r: R, w: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let ConnTask { rx, down } = self;
        down.state.send_replace(ConnState::Up);
        let (register, registered) = mpsc::channel(MAX_STREAMS_PER_CONNECTION);
        let writer = write_loop(w, rx, move |m, buf| match m {
            // Registered before its request is written, so the reader knows it before any reply.
            Outgoing::Open { stream, slot, frame } => {
                if register.try_send((stream, slot)).is_ok() {
                    buf.extend_from_slice(&frame);
                }
            }
            Outgoing::Frame(f) => put_frame(f, buf),
        });
        let error = tokio::select! {
            r = read_loop(FrameReader::new(r), registered) => r.err(),
            w = writer => w.err().map(ConnError::from),
        };
        if let Some(e) = error {
            tracing::warn!(%addr, error = %e, "request plane: connection to worker ended");
        }
        drop(down);
    }
}

/// Routes the worker's frames to their streams' relays.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    mut registered: mpsc::Receiver<(StreamId, Slot)>,
) -> Result<(), ConnError> {
    let mut streams: HashMap<StreamId, Slot> = HashMap::new();
    loop {
        let frame = tokio::select! {
            f = reader.next() => f?,
            Some((id, slot)) = registered.recv() => {
                streams.insert(id, slot);
                continue;
            }
        };
        let Some(frame) = frame else {
            return Err(ConnError::Closed);
        };
        while let Ok((id, slot)) = registered.try_recv() {
            streams.insert(id, slot);
        }
        match frame {
            Frame::Output { stream, output } => {
                let last = is_last(&output);
                let Some(slot) = streams.get(&stream) else {
                    continue;
                };
                if let Err(TrySendError::Full(_)) = slot.tx.try_send(output) {
                    return Err(ConnError::Protocol("worker sent beyond the stream window"));
                }
                if last {
                    streams.remove(&stream);
                }
            }
            Frame::Error { stream, message } if stream == StreamId::CONNECTION => {
                return Err(ConnError::Remote(message));
            }
            Frame::Error { stream, message } => {
                if let Some(slot) = streams.remove(&stream) {
                    let _ = slot.tx.try_send(WorkerOutput::Error(WorkerError::worker(message)));
                }
            }
            _ => return Err(ConnError::Protocol("a worker sent a frontend's frame")),
        }
    }
}

/// Moves one stream's outputs to its consumer, granting credit as they are taken; cancels the
/// stream on the worker when the consumer goes away.
async fn relay(
    stream: StreamId,
    mut from_reader: mpsc::Receiver<WorkerOutput>,
    to_consumer: mpsc::Sender<WorkerOutput>,
    conn: mpsc::Sender<Outgoing>,
) {
    let mut uncredited = 0;
    loop {
        let output = tokio::select! {
            o = from_reader.recv() => o,
            () = to_consumer.closed() => break,
        };
        let Some(output) = output else {
            let message = CONNECTION_LOST.to_owned();
            let _ = to_consumer.send(WorkerOutput::Error(WorkerError::transport(message))).await;
            return;
        };
        let last = is_last(&output);
        if to_consumer.send(output).await.is_err() {
            break;
        }
        if last {
            return;
        }
        uncredited += 1;
        if uncredited == CREDIT_BATCH {
            let credit = Frame::Credit { stream, outputs: uncredited };
            // A closed connection ends `from_reader` too; nothing to do here.
            let _ = conn.send(Outgoing::Frame(credit)).await;
            uncredited = 0;
        }
    }
    let _ = conn.send(Outgoing::Frame(Frame::Cancel { stream })).await;
}
