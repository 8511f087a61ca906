//! The request plane over TCP: one connection per (frontend thread, worker), carrying many
//! multiplexed streams as length-prefixed [`frame`](crate::contract::frame)s.
//!
//! - [`client`]: the frontend side, [`TcpRequestPlane`] (a [`RequestPlane`] and a
//!   [`RecoverySource`]). Connections are thread-local, so a monoio shard holds its own
//!   connection to every worker it talks to and shares no lock with another core.
//! - [`server`]: the worker side, [`serve_worker`] (tokio), feeding the worker's inbox.
//! - [`recover`]: recovery replies split into bounded chunks and put back together.
//!
//! Protocol: the frontend opens a stream with `Request` (ids from 1, never reused on a
//! connection); the worker answers `Output`s and ends the stream with exactly one terminal
//! frame (`Output(Finished | Error)` or `Error`). Flow control is per stream: a worker sends at
//! most [`STREAM_WINDOW`] outputs beyond what the frontend has handed to its consumer, who
//! grants more with `Credit`; so one slow client never stalls the other streams of its
//! connection (its worker-side reply channel fills and the engine coalesces its tokens).
//! `Cancel` (the consumer dropped its stream) makes the worker drop the request, freeing its
//! KV blocks, and answer `Finished { Cancelled }`. A connection that breaks cancels all its
//! streams on the worker and ends every open stream on the frontend with
//! [`WorkerOutput::Error`](crate::contract::WorkerOutput::Error).
//!
//! Bounds: [`MAX_STREAMS_PER_CONNECTION`] live streams, [`WRITE_QUEUE_DEPTH`] frames queued per
//! writer, [`STREAM_WINDOW`] outputs in flight per stream, `MAX_FRAME_BYTES` per frame.
//!
//! [`RequestPlane`]: crate::planes::request::RequestPlane
//! [`RecoverySource`]: crate::contract::control::RecoverySource

pub mod client;
mod io;
pub mod recover;
pub mod server;

use std::net::SocketAddr;

use thiserror::Error;

use crate::contract::frame::FrameError;
use crate::contract::WorkerOutput;

pub use client::{TcpRequestPlane, CONNECT_TIMEOUT};
pub use server::{serve_worker, MAX_CONNECTIONS};

/// Live streams per connection: a shard rarely has more requests at one worker than the
/// worker's batch (`max_num_seqs`, 256 by default) plus its queue; beyond it, `generate` waits
/// for a stream to end (the frontend) or the stream is refused (the worker).
pub const MAX_STREAMS_PER_CONNECTION: usize = 1024;
/// Frames queued for one connection's writer before senders wait (the socket is the real
/// buffer; this only decouples the tasks that produce frames from the one that writes).
pub const WRITE_QUEUE_DEPTH: usize = 1024;
/// Outputs a worker may send on a stream beyond what the frontend's consumer has taken: enough
/// to keep a fast stream busy for a network round trip of decode steps.
pub const STREAM_WINDOW: u32 = 32;
/// Outputs the frontend hands its consumer before granting them back in one `Credit` frame.
pub const CREDIT_BATCH: u32 = STREAM_WINDOW / 2;
/// Bytes coalesced into one socket write.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Bytes a reader asks the socket for at a time (a larger frame grows its buffer as it arrives).
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

const _: () = assert!(CREDIT_BATCH > 0 && CREDIT_BATCH <= STREAM_WINDOW);

/// Why a request-plane connection (or one recovery call) failed. Retrying on a new connection
/// helps for `Io`, `Closed` and `ConnectTimeout`; the others are a peer's bug or refusal.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("request-plane i/o failed")]
    Io(#[from] std::io::Error),
    #[error("undecodable frame from the peer")]
    Frame(#[from] FrameError),
    #[error("the peer broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("the peer reported: {0}")]
    Remote(String),
    #[error("the peer closed the connection")]
    Closed,
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
}

/// `e` and its sources, joined: what a peer is told in an `Error` frame.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Whether `o` is the last output of its stream.
fn is_last(o: &WorkerOutput) -> bool {
    matches!(o, WorkerOutput::Finished { .. } | WorkerOutput::Error(_))
}
