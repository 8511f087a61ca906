//! Path dispatch and the small routes.
//!
//! Before any route runs, a request passes two gates: its API key ([`super::auth`]) and the
//! shard's drain (while draining, everything but the probes is answered 503 `Retry-After`).

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::body::{full, json_response, Body, DrainableSse};
use super::error::ApiError;
use super::ShardCtx;
use crate::frontend::pipeline::tokenize::Direction;
use crate::frontend::pipeline::{generate, tokenize};
use crate::frontend::Frontend;
use crate::openai::ResponseKind;
use crate::planes::request::RequestPlane;

/// Every request of a shard enters here.
pub async fn handle<P: RequestPlane>(
    fe: Arc<Frontend<P>>,
    shard: Rc<ShardCtx>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Err(e) = gate(&fe, &shard, &path, req.headers()) {
        return refused(&fe, &shard, e);
    }
    let result = match (&method, path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => generate::handle(&fe, &shard, ResponseKind::Chat, req).await,
        (&Method::POST, "/v1/completions") => generate::handle(&fe, &shard, ResponseKind::Completion, req).await,
        (&Method::POST, "/tokenize" | "/v1/tokenize") => tokenize::handle(&fe, Direction::Tokenize, req).await,
        (&Method::POST, "/detokenize" | "/v1/detokenize") => tokenize::handle(&fe, Direction::Detokenize, req).await,
        (&Method::GET, "/v1/models") => Ok(models(&fe)),
        (&Method::GET, "/health") => Ok(health(&fe, shard.draining.get())),
        (&Method::GET, "/live") => Ok(json_response(br#"{"status":"live"}"#.to_vec())),
        (&Method::GET, "/metrics") => Ok(metrics(&fe)),
        (
            _,
            "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/models"
            | "/health"
            | "/live"
            | "/metrics"
            | "/tokenize"
            | "/v1/tokenize"
            | "/detokenize"
            | "/v1/detokenize",
        ) => Err(ApiError::MethodNotAllowed { method: method.to_string(), path }),
        _ => Err(ApiError::NotFound { method: method.to_string(), path }),
    };
    match result {
        Ok(r) => r.map(|b| cut_on_drain(b, &shard)),
        Err(e) => refused(&fe, &shard, e),
    }
}

/// The API key, then the drain: the first refusal, if any.
fn gate<P>(fe: &Frontend<P>, shard: &ShardCtx, path: &str, headers: &http::HeaderMap) -> Result<(), ApiError> {
    if shard.auth.needs_key(path) {
        if let Err(f) = shard.auth.check(headers) {
            fe.metrics.shard(shard.id).unauthorized.fetch_add(1, Relaxed);
            return Err(ApiError::Unauthorized(f));
        }
    }
    if shard.draining.get() && !matches!(path, "/health" | "/live" | "/metrics") {
        return Err(ApiError::ShuttingDown);
    }
    Ok(())
}

fn refused<P>(fe: &Frontend<P>, shard: &ShardCtx, e: ApiError) -> Response<Body> {
    let m = fe.metrics.shard(shard.id);
    let counter = if e.status().is_server_error() { &m.requests_server_error } else { &m.requests_client_error };
    counter.fetch_add(1, Relaxed);
    e.into_response()
}

/// A stream ends early, cleanly, when the shard's drain runs out of time.
fn cut_on_drain(b: Body, shard: &Rc<ShardCtx>) -> Body {
    match b {
        Body::Sse(s) => Body::Drainable(Box::new(DrainableSse::new(s, shard.clone()))),
        other => other,
    }
}

fn models<P>(fe: &Frontend<P>) -> Response<Body> {
    let data: Vec<_> = fe
        .models()
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "kvgate"}))
        .collect();
    json_response(serde_json::to_vec(&json!({"object": "list", "data": data})).expect("json"))
}

/// 200 when every served model has a worker; 503 otherwise, and while no model is served at
/// all (a `kvgate frontend` before its first worker registers), so that a load balancer sends
/// no traffic to a frontend that could only answer 503. 503 `draining` once shutdown began.
fn health<P>(fe: &Frontend<P>, draining: bool) -> Response<Body> {
    let served = fe.models();
    let mut healthy = !served.is_empty() && !draining;
    let models: Vec<_> = served
        .iter()
        .map(|m| {
            let g = m.workers.load();
            healthy &= !g.is_empty();
            let workers: Vec<_> = g
                .infos()
                .into_iter()
                .map(|w| json!({"id": w.id.to_string(), "role": w.role, "page_size": w.page_size, "kv_capacity_blocks": w.kv_capacity_blocks, "kv_state": g.kv_state(w.id)}))
                .collect();
            json!({"model": m.name, "disaggregated": g.disaggregated(), "workers": workers})
        })
        .collect();
    let status = match (draining, healthy) {
        (true, _) => "draining",
        (false, true) => "healthy",
        (false, false) => "unhealthy",
    };
    let body = json!({"status": status, "models": models});
    let mut r = json_response(serde_json::to_vec(&body).expect("json"));
    if !healthy {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    r
}

fn metrics<P>(fe: &Frontend<P>) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(fe.render_metrics())));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
