//! The per-shard accept loop: hyper HTTP/1.1 (keep-alive) over monoio-compat's poll-io bridge.
//!
//! Concurrency: runs on one shard thread; every connection it accepts is served by a task on
//! the same thread. Bounded: the shard serves at most its share of `--max-connections` at once,
//! each connection task holding a [`SlotGuard`]; past that, a new connection is answered 503
//! (OpenAI's error shape, `Connection: close`) and closed by a refusal task, at most
//! [`MAX_REFUSING`] at once (beyond, it is closed unanswered). Connections already open are
//! never touched.
//!
//! Shutdown (the drain): when the signal flips the shard closes its listener (a load balancer's
//! next connect is refused and goes to another replica), marks itself draining (a request that
//! still arrives on an open connection is answered 503 `Retry-After: 1`, `Connection: close`;
//! `/health` answers 503 `draining`), and asks hyper to close every connection once its current
//! response is written. In-flight requests run on for up to `--drain-timeout-s`; then the
//! streams still open end with an error event and `[DONE]` at their next chunk, and after
//! [`CUT_GRACE`] the shard stops whatever is left.
//!
//! Why answer rather than just close: a bare close reads to a client as a crashed server
//! ("connection reset", "empty reply"), and most clients do not retry a POST after it; a 503
//! with a message names the limit, and OpenAI clients retry it with backoff (`Retry-After`).

use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio_compat::hyper::{MonoioIo, MonoioTimer};
use tokio::sync::watch;

use super::body::{full, Body};
use super::error::ApiError;
use super::routes;
use super::ShardCtx;
use crate::frontend::Frontend;
use crate::planes::request::RequestPlane;

/// After the drain timeout, how long cut streams get to write their last event (a stream whose
/// worker sends nothing is not polled again, and is dropped with its shard after this).
const CUT_GRACE: Duration = Duration::from_secs(2);
/// A client has this long to send its request headers (slowloris bound).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Refusals in progress per shard: a flood of connections past the bound must not become a
/// flood of refusal tasks.
const MAX_REFUSING: usize = 256;
/// A refused connection gets this long to send its request and read the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Request body bytes a refusal reads (and drops) before answering: closing a socket with
/// unread bytes makes the kernel reset it, which can destroy the answer before it is read.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// Open connections (or refusals) of one shard, counted against a bound.
struct Slots {
    open: Cell<usize>,
    limit: usize,
}

impl Slots {
    fn new(limit: usize) -> Rc<Self> {
        Rc::new(Self { open: Cell::new(0), limit })
    }

    fn try_take(self: &Rc<Self>) -> Option<SlotGuard> {
        if self.open.get() >= self.limit {
            return None;
        }
        self.open.set(self.open.get() + 1);
        Some(SlotGuard(self.clone()))
    }
}

/// One taken slot, given back when its connection task ends, however it ends.
struct SlotGuard(Rc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
    }
}

/// The answer to a connection past the bound, built once per shard.
#[derive(Clone)]
struct Refusal {
    status: StatusCode,
    body: Bytes,
}

impl Refusal {
    fn new(limit: usize) -> Self {
        let e = ApiError::TooManyConnections { limit };
        Self { status: e.status(), body: Bytes::from(e.body_json()) }
    }

    fn response(&self) -> Response<Body> {
        let mut r = Response::new(full(self.body.clone()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

/// What the accept loop admits against.
struct Bounds {
    connections: Rc<Slots>,
    refusing: Rc<Slots>,
    refusal: Refusal,
}

/// Accepts and serves connections until `shutdown` becomes true, at most `max_connections`
/// at once.
pub async fn serve_shard<P: RequestPlane>(
    fe: Arc<Frontend<P>>,
    shard: Rc<ShardCtx>,
    listener: std::net::TcpListener,
    max_connections: usize,
    drain_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(listener)?;
    let bounds = Bounds {
        connections: Slots::new(max_connections),
        refusing: Slots::new(MAX_REFUSING),
        refusal: Refusal::new(max_connections),
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => admit(&fe, &shard, &bounds, stream, &shutdown),
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shutdown.changed() => {}
        }
    }
    drop(listener);
    shard.draining.set(true);
    if shard.inflight.get() > 0 {
        tracing::info!(shard = shard.id, inflight = shard.inflight.get(), "draining in-flight requests");
    }
    if !wait_drained(&shard, drain_timeout).await {
        tracing::warn!(
            shard = shard.id,
            inflight = shard.inflight.get(),
            "drain timed out (--drain-timeout-s); ending the streams left"
        );
        shard.cut.set(true);
        wait_drained(&shard, CUT_GRACE).await;
    }
    Ok(())
}

/// Waits up to `limit` for the shard's in-flight requests to end; whether they did.
async fn wait_drained(shard: &ShardCtx, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while shard.inflight.get() > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn shutting_down(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Serves a new connection if the shard has a slot for it, else refuses it.
fn admit<P: RequestPlane>(
    fe: &Arc<Frontend<P>>,
    shard: &Rc<ShardCtx>,
    bounds: &Bounds,
    stream: monoio::net::TcpStream,
    shutdown: &watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = match stream.try_into_poll_io() {
        Ok(io) => io,
        Err((e, _)) => {
            tracing::warn!(error = %e, "could not set up a connection");
            return;
        }
    };
    if let Some(slot) = bounds.connections.try_take() {
        monoio::spawn(serve_connection(fe.clone(), shard.clone(), io, slot, shutdown.clone()));
        return;
    }
    fe.metrics.shard(shard.id).connections_refused.fetch_add(1, Relaxed);
    match bounds.refusing.try_take() {
        Some(slot) => {
            tracing::debug!(limit = bounds.connections.limit, "connection refused: --max-connections reached");
            monoio::spawn(refuse(io, bounds.refusal.clone(), slot));
        }
        None => tracing::debug!("connection closed unanswered: --max-connections reached, refusals busy"),
    }
}

/// Answers the connection's first request 503 and closes it.
async fn refuse(io: TcpStreamPoll, refusal: Refusal, _slot: SlotGuard) {
    let service = service_fn(move |req: Request<Incoming>| {
        let refusal = refusal.clone();
        async move {
            let _ = Limited::new(req.into_body(), REFUSAL_DRAIN_BYTES).collect().await;
            Ok::<_, Infallible>(refusal.response())
        }
    });
    let conn = http1::Builder::new()
        .timer(MonoioTimer)
        .keep_alive(false)
        .header_read_timeout(REFUSAL_TIMEOUT)
        .serve_connection(MonoioIo::new(io), service);
    let _ = monoio::time::timeout(REFUSAL_TIMEOUT, conn).await;
}

async fn serve_connection<P: RequestPlane>(
    fe: Arc<Frontend<P>>,
    shard: Rc<ShardCtx>,
    io: TcpStreamPoll,
    _slot: SlotGuard,
    shutdown: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| {
        let fe = fe.clone();
        let shard = shard.clone();
        async move { Ok::<_, Infallible>(routes::handle(fe, shard, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(MonoioTimer)
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(MonoioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let ended = monoio::select! {
        r = conn.as_mut() => Some(r),
        _ = shutting_down(shutdown) => None,
    };
    // Draining: an idle connection closes now, a busy one after its response.
    let result = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
