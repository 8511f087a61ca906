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
use crate::frontend::{dashboard, Frontend};
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
        (&Method::GET, "/dashboard") => Ok(page()),
        (&Method::GET, "/dashboard/events") => dashboard_events(&fe, &shard),
        (&Method::GET, "/") if accepts_html(req.headers()) => Ok(to_dashboard()),
        (
            _,
            "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/models"
            | "/health"
            | "/live"
            | "/metrics"
            | "/dashboard"
            | "/dashboard/events"
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
                .map(|w| {
                    let kv = g.entries.get(&w.id).map(|e| &e.kv);
                    let event_age_s = kv.and_then(|k| k.since_event()).map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
                    let state_for_s = kv.map(|k| (k.in_state_for().as_secs_f64() * 10.0).round() / 10.0);
                    let load = g.entries.get(&w.id).map(|e| worker_load(&e.load));
                    json!({"id": w.id.to_string(), "role": w.role, "page_size": w.page_size, "kv_capacity_blocks": w.kv_capacity_blocks, "kv_state": g.kv_state(w.id), "kv_state_for_s": state_for_s, "kv_event_age_s": event_age_s, "load": load})
                })
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

/// A worker's load in `/health`: what this frontend booked, the worker's last report (its
/// quantities, `null` where the engine does not say, and its age), and what the router counts
/// (the report plus the bookings it does not cover yet, [`crate::router::load`]).
fn worker_load(load: &crate::router::WorkerLoad) -> serde_json::Value {
    let booked = json!({"requests": load.active_requests(), "decode_blocks": load.active_decode_blocks(), "prefill_tokens": load.active_prefill_tokens()});
    let reported = load.last_report().map(|r| {
        json!({"requests": r.requests, "decode_blocks": r.decode_blocks, "prefill_tokens": r.prefill_tokens, "age_s": (r.age.as_secs_f64() * 1000.0).round() / 1000.0})
    });
    let v = load.view();
    let counted = json!({"requests": v.requests, "decode_blocks": v.decode_blocks, "prefill_tokens": v.prefill_tokens, "from_report": v.reported});
    json!({"booked": booked, "reported": reported, "counted": counted})
}

/// The live routing page ([`crate::frontend::dashboard`]).
fn page() -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(dashboard::PAGE_HTML.as_bytes())));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    r
}

/// The page's snapshots over SSE; 503 past [`dashboard::MAX_VIEWERS`] open pages.
fn dashboard_events<P: 'static>(fe: &Arc<Frontend<P>>, shard: &Rc<ShardCtx>) -> Result<Response<Body>, ApiError> {
    let viewer = fe.dashboard.viewers.join().ok_or(ApiError::TooManyViewers { limit: dashboard::MAX_VIEWERS })?;
    let stream = dashboard::stream::EventStream::new(fe.clone(), shard.clone(), viewer);
    let mut r = Response::new(Body::Events(Box::new(stream)));
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    Ok(r)
}

/// A browser asking for `/` (it accepts HTML) is sent to the page; API clients still get 404.
fn accepts_html(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/html"))
}

fn to_dashboard() -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut().insert(http::header::LOCATION, http::HeaderValue::from_static("/dashboard"));
    r
}

fn metrics<P>(fe: &Frontend<P>) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(fe.render_metrics())));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
