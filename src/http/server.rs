//! The per-shard accept loop: hyper HTTP/1.1 (keep-alive) over monoio-compat's poll-io bridge.
//!
//! Concurrency: runs on one shard thread; every connection it accepts is served by a task on
//! the same thread. Shutdown: stop accepting when the signal flips, then wait for this shard's
//! in-flight requests to drain (bounded by [`DRAIN_TIMEOUT`]).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use monoio_compat::hyper::{MonoioIo, MonoioTimer};
use tokio::sync::watch;

use super::routes;
use super::ShardCtx;
use crate::frontend::Frontend;
use crate::transport::RequestPlane;

/// How long in-flight streams may keep running after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A client has this long to send its request headers (slowloris bound).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts and serves connections until `shutdown` becomes true.
pub async fn serve_shard<P: RequestPlane>(
    fe: Arc<Frontend<P>>,
    shard: Rc<ShardCtx>,
    listener: std::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(listener)?;
    loop {
        if *shutdown.borrow() {
            break;
        }
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    match stream.try_into_poll_io() {
                        Ok(io) => {
                            monoio::spawn(serve_connection(fe.clone(), shard.clone(), io));
                        }
                        Err((e, _)) => tracing::warn!(error = %e, "could not set up a connection"),
                    }
                }
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
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    while shard.inflight.get() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn serve_connection<P: RequestPlane>(
    fe: Arc<Frontend<P>>,
    shard: Rc<ShardCtx>,
    io: monoio::net::tcp::stream_poll::TcpStreamPoll,
) {
    let service = service_fn(move |req| {
        let fe = fe.clone();
        let shard = shard.clone();
        async move { Ok::<_, std::convert::Infallible>(routes::handle(fe, shard, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(MonoioTimer)
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(MonoioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
