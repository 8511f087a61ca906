//! Worker side of the TCP request plane (tokio): accepts frontends' connections and turns their
//! streams into [`WorkItem`]s on the worker's inbox, and their recovery requests into
//! [`WorkerControl::recover`] calls.
//!
//! Concurrency, per connection: one task reads frames and owns the stream table; one writer
//! drains a bounded queue ([`WRITE_QUEUE_DEPTH`]) to the socket; each stream (or recovery) runs
//! as its own task in the connection's `JoinSet`, forwarding the engine's outputs as frames
//! while it holds credit. The reader never waits on a stream, so `Cancel` and `Credit` are
//! handled however slow any one stream is. Cancel (or the connection closing) drops the
//! stream's reply receiver, which the engine sees as its client gone: it stops and frees the
//! request's blocks. Bounds: [`MAX_CONNECTIONS`] per worker, [`MAX_STREAMS_PER_CONNECTION`]
//! streams each (beyond it a request gets an `Error` frame).
//!
//! Shutdown: on the signal the listener closes; each connection refuses new streams, lets its
//! streams finish and then closes. Dropping the [`serve_worker`] future (or aborting its task)
//! aborts every connection and stream at once, which their frontends see as a broken stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use super::io::{put_frame, write_loop, FrameReader};
use super::recover::recovery_chunks;
use super::{error_chain, is_last, ConnError, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW, WRITE_QUEUE_DEPTH};
use crate::contract::control::WorkerControl;
use crate::contract::frame::{Frame, StreamId};
use crate::contract::{FinishReason, GenerateRequest, WorkerOutput};
use crate::planes::request::{WorkItem, RESPONSE_STREAM_DEPTH};
use crate::telemetry::worker::LegTrace;

/// Connections one worker serves at once: frontends × shards, plus recoveries. Beyond it the
/// worker stops accepting until one closes.
pub const MAX_CONNECTIONS: usize = 4096;
/// Pause after a failed accept (EMFILE and friends) rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// What every connection of one worker reaches.
struct Worker {
    inbox: mpsc::Sender<WorkItem>,
    control: WorkerControl,
}

/// Serves the request plane on `listener` until `shutdown` becomes true (or its sender is
/// dropped), then waits for open connections to drain (see the module doc).
pub async fn serve_worker(
    listener: TcpListener,
    inbox: mpsc::Sender<WorkItem>,
    control: WorkerControl,
    mut shutdown: watch::Receiver<bool>,
) {
    let worker = Arc::new(Worker { inbox, control });
    let mut conns = JoinSet::new();
    while !*shutdown.borrow_and_update() {
        tokio::select! {
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_connection(stream, worker.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "request plane: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next() => {}
            changed = shutdown.changed() => if changed.is_err() { break },
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(stream: TcpStream, worker: Arc<Worker>, shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
    let conn = Conn { worker, tx, streams: HashMap::new(), tasks: JoinSet::new(), draining: false };
    let (read, write) = tokio::join!(conn.run(FrameReader::new(r), shutdown), write_loop(w, rx, put_frame));
    if let Err(e) = read {
        tracing::debug!(error = %e, "request plane: connection closed");
    }
    if let Err(e) = write {
        tracing::debug!(error = %e, "request plane: write failed");
    }
}

/// A live stream, as the reader sees it.
struct StreamCtl {
    /// Fired (or dropped) to cancel the stream.
    cancel: oneshot::Sender<()>,
    /// Outputs the stream may still send.
    credit: Arc<Semaphore>,
}

/// One connection's reader: owns the stream table and the stream tasks.
struct Conn {
    worker: Arc<Worker>,
    tx: mpsc::Sender<Frame>,
    streams: HashMap<StreamId, StreamCtl>,
    tasks: JoinSet<StreamId>,
    draining: bool,
}

enum Job {
    Generate(GenerateRequest),
    Recover { since_event_id: u64 },
}

impl Conn {
    /// Reads until the peer closes, a bad frame, or a drained shutdown. Dropping `self` at the
    /// end aborts what is left of the stream tasks (and so cancels their requests).
    async fn run<R>(mut self, mut reader: FrameReader<R>, mut shutdown: watch::Receiver<bool>) -> Result<(), ConnError>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        loop {
            if self.draining && self.tasks.is_empty() {
                return Ok(());
            }
            tokio::select! {
                frame = reader.next() => match frame {
                    Ok(Some(f)) => self.on_frame(f).await?,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let message = error_chain(&e);
                        let _ = self.tx.try_send(Frame::Error { stream: StreamId::CONNECTION, message });
                        return Err(e);
                    }
                },
                Some(done) = self.tasks.join_next() => match done {
                    Ok(stream) => { self.streams.remove(&stream); }
                    // A stream task panicked: forget every stream whose task is gone.
                    Err(_) => self.streams.retain(|_, s| !s.cancel.is_closed()),
                },
                changed = shutdown.changed(), if !self.draining => {
                    self.draining = changed.is_err() || *shutdown.borrow();
                }
                () = self.tx.closed() => return Err(ConnError::Closed),
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), ConnError> {
        match frame {
            Frame::Request { stream, request } => self.open(stream, Job::Generate(request)).await,
            Frame::RecoverRequest { stream, since_event_id } => {
                self.open(stream, Job::Recover { since_event_id }).await
            }
            Frame::Cancel { stream } => {
                if let Some(s) = self.streams.remove(&stream) {
                    let _ = s.cancel.send(());
                }
                Ok(())
            }
            Frame::Credit { stream, outputs } => {
                let Some(s) = self.streams.get(&stream) else {
                    return Ok(());
                };
                // Granted ≤ sent, so a correct frontend never lifts a window past its size.
                if s.credit.available_permits() + outputs as usize > STREAM_WINDOW as usize {
                    return Err(ConnError::Protocol("credit beyond the stream window"));
                }
                s.credit.add_permits(outputs as usize);
                Ok(())
            }
            Frame::Output { .. } | Frame::RecoverChunk { .. } | Frame::Error { .. } => {
                Err(ConnError::Protocol("a frontend sent a worker's frame"))
            }
        }
    }

    async fn open(&mut self, stream: StreamId, job: Job) -> Result<(), ConnError> {
        if stream == StreamId::CONNECTION || self.streams.contains_key(&stream) {
            return Err(ConnError::Protocol("stream id 0 or already open"));
        }
        let refusal = if self.draining {
            Some("worker is shutting down")
        } else if self.tasks.len() >= MAX_STREAMS_PER_CONNECTION {
            Some("too many streams on this connection")
        } else {
            None
        };
        if let Some(message) = refusal {
            let message = message.to_owned();
            return self.tx.send(Frame::Error { stream, message }).await.map_err(|_| ConnError::Closed);
        }
        let (cancel, cancelled) = oneshot::channel();
        let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
        self.streams.insert(stream, StreamCtl { cancel, credit: credit.clone() });
        let (worker, tx) = (self.worker.clone(), self.tx.clone());
        self.tasks.spawn(async move {
            match job {
                Job::Generate(mut request) => {
                    // Traced when tracing is on and the frontend sent a trace context.
                    let trace = LegTrace::start(worker.control.worker(), &mut request);
                    run_stream(stream, request, &worker.inbox, tx, credit, cancelled, trace).await
                }
                Job::Recover { since_event_id } => {
                    run_recover(stream, since_event_id, &worker.control, tx, cancelled).await
                }
            }
            stream
        });
        Ok(())
    }
}

/// How a stream's forwarding ended.
enum End {
    /// The terminal output was sent, or the connection is gone.
    Done,
    Cancelled,
    Failed(&'static str),
}

/// Hands the request to the worker and forwards its outputs, one credit each.
async fn run_stream(
    stream: StreamId,
    request: GenerateRequest,
    inbox: &mpsc::Sender<WorkItem>,
    tx: mpsc::Sender<Frame>,
    credit: Arc<Semaphore>,
    mut cancelled: oneshot::Receiver<()>,
    mut trace: Option<LegTrace>,
) {
    let (reply, mut outputs) = mpsc::channel(RESPONSE_STREAM_DEPTH);
    let item = WorkItem { request, reply };
    let end = forward(stream, item, inbox, &mut outputs, (&tx, &credit), &mut cancelled, &mut trace).await;
    // The engine sees the closed channel and frees the request before the frontend hears back.
    drop(outputs);
    let last = match end {
        End::Done => return,
        End::Cancelled => Frame::Output { stream, output: WorkerOutput::Finished { reason: FinishReason::Cancelled } },
        End::Failed(message) => Frame::Error { stream, message: message.to_owned() },
    };
    let _ = tx.send(last).await;
}

async fn forward(
    stream: StreamId,
    item: WorkItem,
    inbox: &mpsc::Sender<WorkItem>,
    outputs: &mut mpsc::Receiver<WorkerOutput>,
    (tx, credit): (&mpsc::Sender<Frame>, &Semaphore),
    cancelled: &mut oneshot::Receiver<()>,
    trace: &mut Option<LegTrace>,
) -> End {
    tokio::select! {
        biased;
        _ = &mut *cancelled => return End::Cancelled,
        sent = inbox.send(item) => if sent.is_err() { return End::Failed("worker is not accepting requests") },
    }
    if let Some(t) = trace.as_mut() {
        t.taken();
    }
    loop {
        let output = tokio::select! {
            biased;
            _ = &mut *cancelled => return End::Cancelled,
            o = outputs.recv() => o,
        };
        let Some(output) = output else {
            return End::Failed("worker dropped the request");
        };
        tokio::select! {
            biased;
            _ = &mut *cancelled => return End::Cancelled,
            permit = credit.acquire() => match permit {
                Ok(p) => p.forget(),
                Err(_) => return End::Cancelled,
            },
        }
        let last = is_last(&output);
        if let Some(t) = trace.as_mut() {
            t.output(&output);
        }
        if tx.send(Frame::Output { stream, output }).await.is_err() || last {
            return End::Done;
        }
    }
}

/// Answers a recovery request in chunks (or with an `Error` frame).
async fn run_recover(
    stream: StreamId,
    since_event_id: u64,
    control: &WorkerControl,
    tx: mpsc::Sender<Frame>,
    mut cancelled: oneshot::Receiver<()>,
) {
    let recovery = tokio::select! {
        _ = &mut cancelled => return,
        r = control.recover(since_event_id) => r,
    };
    let chunks = match recovery {
        Ok(r) => recovery_chunks(r).map_err(|e| error_chain(&e)),
        Err(e) => Err(error_chain(&e)),
    };
    match chunks {
        Ok(chunks) => {
            for chunk in chunks {
                if tx.send(Frame::RecoverChunk { stream, chunk }).await.is_err() {
                    return;
                }
            }
        }
        Err(message) => {
            let _ = tx.send(Frame::Error { stream, message }).await;
        }
    }
}
