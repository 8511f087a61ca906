//! What every adapter to a real engine over HTTP shares: the HTTP client and its SSE reader,
//! start-up errors that say what to change, and [`HttpAdapter`], the [`Engine`] that runs a
//! [`Dialect`] (SGLang's or vLLM's API) with the engine's ZMQ KV-event stream and load.
//!
//! Per request, one task runs the engine's HTTP call and streams its outputs to the request's
//! reply; when the reply closes (client gone, migration, the other leg failed) the task drops
//! the HTTP stream **and** asks the engine to abort the request by id. The engine's KV events
//! arrive from its own ZMQ stream ([`super::zmq_events`]) and go to the runtime's sink; its
//! load is polled at [`LOAD_POLL_INTERVAL`] and published through the load watch.
//!
//! Concurrency: the adapter's task owns the request tasks (a `JoinSet`, at most
//! [`MAX_INFLIGHT_REQUESTS`] at once: beyond it intake waits, which pushes back on the
//! transport's bounded inbox), the event subscriber's handle and the load poller (its own task, so a poll waiting on a hung engine never holds the intake). Every HTTP
//! call has a timeout ([`CONNECT_TIMEOUT`], [`CALL_TIMEOUT`], and `--engine-timeout-s` for an
//! answer to begin and between a stream's chunks), so an engine that stops answering fails its
//! requests with a clear, retryable error instead of hanging them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::contract::events::KvEventKind;
use crate::contract::{FinishReason, GenerateRequest, LoadReport, TokenId, WorkerError, WorkerOutput};
use crate::worker::engine::{Engine, EngineCard, EngineIo};

use super::zmq_events::{self, Counters, SubscriberConfig, SubscriberHandle};

/// Requests one adapter runs on its engine at once (the engine queues what it cannot batch).
pub const MAX_INFLIGHT_REQUESTS: usize = 4096;
/// Connecting to the engine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole non-streaming call (a prefill leg may wait for its decode peer: SGLang's own
/// bootstrap timeout is 300 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(330);
/// How often the engine's own load is read.
pub const LOAD_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Events forwarded to the runtime as one batch at most (what is ready, without waiting).
pub const MAX_EVENTS_PER_BATCH: usize = 1024;
/// Events read after a response's end before its connection is given up (see [`SseReader::drain`]).
pub const MAX_DRAIN_EVENTS: usize = 16;
/// Bytes one SSE event may take before the stream is refused (a chunk of token ids is small).
pub const MAX_SSE_EVENT_BYTES: usize = 16 << 20;

/// Why an adapter could not start: each says what to change.
#[derive(Debug, Error)]
pub enum EngineStartError {
    #[error("cannot reach the {engine} engine at {url}: {source}; is it running, and is --engine-url right?")]
    Unreachable {
        engine: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the {engine} engine at {url} was not ready after {waited:?} ({last}); wait for it to load or raise --engine-ready-timeout-s")]
    NotReady { engine: &'static str, url: String, waited: Duration, last: String },
    #[error("the {engine} engine at {url} {what} is {engine_value}, kvgate's is {ours}: {fix}")]
    Mismatch { engine: &'static str, url: String, what: &'static str, engine_value: String, ours: String, fix: String },
    #[error("the {engine} engine at {url} answered {what} in a shape kvgate does not understand: {detail}")]
    Protocol { engine: &'static str, url: String, what: &'static str, detail: String },
}

/// The part of an adapter that is the engine's own API.
pub trait Dialect: Send + Sync + 'static {
    /// Runs `request` on the engine until it ends or `reply` closes; on close it aborts the
    /// request on the engine too. Every exit sends a last `Finished` or `Error` if it can.
    fn serve(
        self: Arc<Self>,
        client: reqwest::Client,
        request: GenerateRequest,
        reply: mpsc::Sender<WorkerOutput>,
    ) -> impl Future<Output = ()> + Send;

    /// The engine's own load, when it reports one.
    fn load(&self, client: &reqwest::Client) -> impl Future<Output = Option<LoadReport>> + Send;

    /// Clears the engine's prefix cache (its events report the clearing).
    fn reset(&self, client: &reqwest::Client) -> impl Future<Output = ()> + Send;
}

/// What a worker knows before it meets its engine (the same for every adapter).
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// `http://host:port` of the engine.
    pub url: String,
    pub role: crate::contract::WorkerRole,
    pub page_size: u32,
    /// The model name kvgate serves; the engine must serve the same one.
    pub served_model_name: String,
    pub ready_timeout: Duration,
    /// For an answer to begin, and between a stream's chunks.
    pub timeout: Duration,
    /// Overrides of the discovered KV-event endpoints.
    pub kv_events_endpoint: Option<String>,
    pub replay_endpoint: Option<String>,
}

impl AdapterOptions {
    /// Refuses a prefill or decode role for an engine that has no disaggregation of its own;
    /// `fix` says how to run it instead.
    #[allow(clippy::result_large_err)] // start-up only, once per engine: the size costs nothing
    pub fn aggregated_only(&self, engine: &'static str, url: &str, fix: &str) -> Result<(), EngineStartError> {
        if self.role == crate::contract::WorkerRole::Aggregated {
            return Ok(());
        }
        Err(EngineStartError::Mismatch {
            engine,
            url: url.to_string(),
            what: "disaggregation support",
            engine_value: "none".into(),
            ours: format!("{:?}", self.role).to_lowercase(),
            fix: fix.into(),
        })
    }
}

/// An OpenAI-API completion choice's `finish_reason` (vLLM and any OpenAI server): `None` while
/// the stream goes on; an unknown reason is the engine's fault (`who` names it in the message).
pub fn openai_finish(choice: &serde_json::Value, who: &str) -> Option<Result<FinishReason, WorkerError>> {
    match choice["finish_reason"].as_str()? {
        "length" => Some(Ok(FinishReason::Length)),
        "stop" => Some(Ok(FinishReason::Eos)),
        other => Some(Err(WorkerError::worker(format!("{who} finished the request with `{other}`")))),
    }
}

/// An OpenAI-API chunk's `usage` as (prompt tokens, cached prompt tokens), when it has one.
pub fn openai_usage(chunk: &serde_json::Value) -> Option<(u32, u32)> {
    let u = &chunk["usage"];
    u.is_object().then(|| {
        let prompt = u["prompt_tokens"].as_u64().unwrap_or(0) as u32;
        let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) as u32;
        (prompt, cached)
    })
}

/// GETs `path` of the engine at `url` as JSON (start-up only).
pub async fn get_json(client: &reqwest::Client, url: &str, path: &str) -> Result<serde_json::Value, String> {
    let r =
        client.get(format!("{url}{path}")).timeout(Duration::from_secs(30)).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("{path} answered {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

/// Where an engine publishes its KV events (one rank).
#[derive(Debug, Clone)]
pub struct EventSource {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
}

/// An [`Engine`] over HTTP: a dialect, its client, its registration, and its event stream.
pub struct HttpAdapter<D> {
    pub dialect: Arc<D>,
    pub client: reqwest::Client,
    pub card: EngineCard,
    pub events: Option<EventSource>,
    pub block_size: u32,
    /// Shared with whoever exports the event stream's counters.
    pub counters: Arc<Counters>,
}

/// Sends one generate call: a whole (non-streaming) call is bounded by [`CALL_TIMEOUT`], a
/// stream's answer must begin within `timeout`; an HTTP error status becomes the request's
/// failure ([`status_error`]).
pub async fn send_call(
    call: reqwest::RequestBuilder,
    whole: bool,
    timeout: Duration,
    engine: &str,
    url: &str,
) -> Result<reqwest::Response, WorkerError> {
    let (call, wait) = if whole { (call.timeout(CALL_TIMEOUT), CALL_TIMEOUT) } else { (call, timeout) };
    let resp = match tokio::time::timeout(wait, call.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(WorkerError::worker(format!("{engine} at {url} is unreachable: {e}"))),
        Err(_) => {
            return Err(WorkerError::worker(format!(
                "{engine} at {url} did not answer within {wait:?} (--engine-timeout-s)"
            )))
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(status_error(engine, status, &resp.text().await.unwrap_or_default()));
    }
    Ok(resp)
}

/// `call` with the request's W3C trace context (`traceparent`, and `tracestate` when it has
/// one), so an engine that traces nests its spans under the worker's; unchanged when the
/// request is not traced.
pub fn with_trace(call: reqwest::RequestBuilder, r: &GenerateRequest) -> reqwest::RequestBuilder {
    let Some(t) = &r.trace else { return call };
    let call = call.header("traceparent", t.traceparent());
    match &t.state {
        Some(state) => call.header("tracestate", state.as_str()),
        None => call,
    }
}

/// The host part of `http://host:port`.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// The client every adapter uses (no proxies: engines are addressed directly).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .expect("a plain HTTP client builds")
}

impl<D: Dialect> Engine for HttpAdapter<D> {
    fn card(&self) -> EngineCard {
        self.card.clone()
    }

    fn run(self, io: EngineIo) -> impl Future<Output = ()> + Send {
        run_adapter(self, io)
    }
}

async fn run_adapter<D: Dialect>(adapter: HttpAdapter<D>, io: EngineIo) {
    let EngineIo { mut intake, events: sink, load, mut resets } = io;
    let HttpAdapter { dialect, client, card, events, block_size, counters } = adapter;
    let (events_tx, mut events_rx) = zmq_events::event_channel::<()>();
    let mut subscriber: Option<SubscriberHandle> = None;
    if let Some(src) = events {
        let mut config = SubscriberConfig::new((), src.endpoint, block_size);
        config.replay_endpoint = src.replay_endpoint;
        config.topic = src.topic;
        match zmq_events::spawn(config, events_tx, counters) {
            Ok(h) => subscriber = Some(h),
            Err(e) => {
                tracing::error!(error = %e, "KV events cannot be followed; routing to this worker is approximate")
            }
        }
    } else {
        drop(events_tx);
    }
    let permits = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let mut tasks = JoinSet::new();
    // The load poll runs on its own: an engine that stops answering holds each poll up to its
    // timeout, which must not hold the intake (a request migrated here from another hung
    // engine waited for it).
    let poller = {
        let (d, c) = (dialect.clone(), client.clone());
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(LOAD_POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                poll.tick().await;
                if let Some(report) = d.load(&c).await {
                    load.send_if_modified(|cur| std::mem::replace(cur, report) != report);
                }
            }
        })
    };
    let mut events_open = subscriber.is_some();
    loop {
        tokio::select! {
            item = intake.recv(), if intake.is_open() && permits.available_permits() > 0 => {
                let Some(item) = item else { continue };
                // Only this loop takes permits, and one was available.
                let permit = permits.clone().try_acquire_owned().expect("a permit is available");
                let d = dialect.clone();
                let c = client.clone();
                tasks.spawn(async move {
                    d.serve(c, item.request, item.reply).await;
                    drop(permit);
                });
            }
            Some(first) = events_rx.recv(), if events_open => {
                let mut batch: Vec<KvEventKind> = vec![first.kind];
                while batch.len() < MAX_EVENTS_PER_BATCH {
                    match events_rx.try_recv() {
                        Ok(e) => batch.push(e.kind),
                        Err(_) => break,
                    }
                }
                sink.send(batch).await;
            }
            Some(reply) = resets.recv() => {
                dialect.reset(&client).await;
                sink.ack(reply).await;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
        if !intake.is_open() && tasks.is_empty() {
            break;
        }
        events_open &= !events_rx.is_closed() || !events_rx.is_empty();
    }
    poller.abort();
    if let Some(s) = subscriber {
        s.stop().await;
    }
    tracing::debug!(engine = card.kind.as_str(), "adapter stopped");
}

/// What ended one request's call: `Err(Some)` a failure to report, `Err(None)` a closed reply.
pub type CallOutcome = Result<(), Option<WorkerError>>;

/// Runs `call` until it ends or `reply` closes: a failure goes to the client as the stream's
/// last message; a closed reply (client gone, migration, the other leg failed) runs `abort`,
/// so the engine stops the request too.
pub async fn run_call(
    engine: &str,
    rid: &str,
    call: impl Future<Output = CallOutcome>,
    reply: &mpsc::Sender<WorkerOutput>,
    abort: impl Future<Output = ()>,
) {
    let outcome = tokio::select! {
        r = call => r,
        () = reply.closed() => Err(None),
    };
    match outcome {
        Ok(()) => {}
        Err(Some(e)) => {
            tracing::debug!(engine, rid, error = %e, "engine request failed");
            let _ = reply.send(WorkerOutput::Error(e)).await;
        }
        Err(None) => abort.await,
    }
}

/// Holds back a trailing end-of-sequence token until the engine says why it stopped: the eos
/// token that ended a generation is not output (kvgate's contract), but an engine may send it
/// one chunk before its finish (llama.cpp) or in the same chunk (vLLM).
#[derive(Debug)]
pub struct EosHold<'a> {
    eos: &'a [TokenId],
    on: bool,
    held: Option<TokenId>,
}

impl<'a> EosHold<'a> {
    /// `on`: eos ends the request (not `ignore_eos`).
    pub fn new(eos: &'a [TokenId], on: bool) -> Self {
        Self { eos, on, held: None }
    }

    /// The tokens to send now: what was held, then `tokens` minus a trailing eos candidate.
    pub fn push(&mut self, tokens: Vec<TokenId>) -> Vec<TokenId> {
        if tokens.is_empty() {
            return tokens;
        }
        let mut out: Vec<TokenId> = self.held.take().into_iter().collect();
        out.extend(tokens);
        if self.on && out.last().is_some_and(|t| self.eos.contains(t)) {
            self.held = out.pop();
        }
        out
    }

    /// At the finish: the held token is dropped when it was the eos that stopped generation.
    pub fn finish(&mut self, reason: FinishReason) -> Option<TokenId> {
        let held = self.held.take();
        if reason == FinishReason::Eos {
            None
        } else {
            held
        }
    }
}

/// Reads a streaming response as SSE `data:` payloads, one call per event.
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: BytesMut,
    /// Longest silence between chunks before the engine is taken for stuck.
    idle: Duration,
}

impl SseReader {
    pub fn new(resp: reqwest::Response, idle: Duration) -> Self {
        Self { body: resp.bytes_stream().boxed(), buf: BytesMut::new(), idle }
    }

    /// The next event's data (its `data:` lines joined); `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<String>, WorkerError> {
        loop {
            if let Some(data) = self.take_event()? {
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Ok(Some(data));
            }
            let chunk = tokio::time::timeout(self.idle, self.body.next())
                .await
                .map_err(|_| WorkerError::worker(format!("the engine sent nothing for {:?}", self.idle)))?;
            match chunk {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(e)) => return Err(WorkerError::worker(format!("the engine's stream broke: {e}"))),
                None => return Ok(None),
            }
            if self.buf.len() > MAX_SSE_EVENT_BYTES {
                return Err(WorkerError::worker("the engine sent an oversized stream event"));
            }
        }
    }

    /// Reads what is left of the response (the `[DONE]` after a finish chunk, the body's end),
    /// at most [`MAX_DRAIN_EVENTS`] events: a body read to its end lets the client reuse the
    /// connection; one left unread costs a new connection per request.
    pub async fn drain(mut self) {
        for _ in 0..MAX_DRAIN_EVENTS {
            if !matches!(self.next().await, Ok(Some(_))) {
                return;
            }
        }
    }

    fn take_event(&mut self) -> Result<Option<String>, WorkerError> {
        let Some(end) = find_event_end(&self.buf) else { return Ok(None) };
        let (len, sep) = end;
        let raw = self.buf.split_to(len);
        self.buf.advance(sep);
        let text = std::str::from_utf8(&raw).map_err(|_| WorkerError::worker("the engine sent a non-UTF-8 event"))?;
        let mut data = String::new();
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        Ok(Some(data))
    }
}

/// Where the first event in `b` ends: (its length, the separator's length).
fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(c)) => Some(if a.0 <= c.0 { a } else { c }),
        (a, c) => a.or(c),
    }
}

/// An HTTP error answer as a request failure: 4xx is the request's fault (no retry), the rest
/// the engine's.
pub fn status_error(engine: &str, status: reqwest::StatusCode, body: &str) -> WorkerError {
    let detail = error_message(body);
    if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
        WorkerError::client(format!("{engine} refused the request ({status}): {detail}"))
    } else {
        WorkerError::worker(format!("{engine} failed the request ({status}): {detail}"))
    }
}

/// The message of an engine's JSON error body (`{"error": {"message"}}`, `{"error": "…"}`,
/// `{"message"}`), else the body itself, cut short.
pub fn error_message(body: &str) -> String {
    let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let from_json = v.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .and_then(|m| m.as_str().map(str::to_string))
    });
    from_json.unwrap_or_else(|| body.chars().take(300).collect())
}

/// Waits until `url` answers 200 (polling every 500 ms) for at most `timeout`.
pub async fn wait_ready(
    client: &reqwest::Client,
    engine: &'static str,
    base: &str,
    path: &str,
    timeout: Duration,
) -> Result<(), EngineStartError> {
    let url = format!("{base}{path}");
    let started = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        let last = match client.get(&url).timeout(Duration::from_secs(30)).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("{path} answered {}", r.status()),
            Err(e) if started.elapsed() >= timeout && e.is_connect() => {
                return Err(EngineStartError::Unreachable { engine, url: base.to_string(), source: e })
            }
            Err(e) => format!("{path}: {e}"),
        };
        if started.elapsed() >= timeout {
            return Err(EngineStartError::NotReady { engine, url: base.to_string(), waited: timeout, last });
        }
        if !logged {
            tracing::info!(engine, url = base, %last, "waiting for the engine to be ready");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `tcp://*:5557` as reachable from here: a wildcard host becomes the engine URL's host.
pub fn reachable_endpoint(endpoint: &str, engine_host: &str) -> String {
    let Some(rest) = endpoint.strip_prefix("tcp://") else { return endpoint.to_string() };
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, ""));
    let host = match host {
        "*" | "0.0.0.0" | "::" | "[::]" | "" => engine_host,
        h => h,
    };
    format!("tcp://{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traced_request_carries_its_context_to_the_engine() {
        let client = reqwest::Client::new();
        let mut r = crate::worker::engines::mocker::test_util::request(1, vec![1, 2], 4);
        let untraced = with_trace(client.post("http://e/generate"), &r).build().unwrap();
        assert!(untraced.headers().get("traceparent").is_none());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        r.trace = crate::contract::TraceContext::parse(tp, Some("k=v")).map(Box::new);
        let traced = with_trace(client.post("http://e/generate"), &r).build().unwrap();
        assert_eq!(traced.headers()["traceparent"], tp);
        assert_eq!(traced.headers()["tracestate"], "k=v");
    }

    #[test]
    fn sse_events_split_on_blank_lines_of_either_ending() {
        let mut r = SseReader { body: futures::stream::empty().boxed(), buf: BytesMut::new(), idle: Duration::ZERO };
        r.buf
            .extend_from_slice(b"data: {\"a\":1}\n\n: keep-alive\n\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\npartial");
        assert_eq!(r.take_event().unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(r.take_event().unwrap().as_deref(), Some(""));
        assert_eq!(r.take_event().unwrap().as_deref(), Some("x\ny"));
        assert_eq!(r.take_event().unwrap().as_deref(), Some("[DONE]"));
        assert_eq!(r.take_event().unwrap(), None);
        assert_eq!(&r.buf[..], b"partial");
    }

    #[test]
    fn wildcard_hosts_become_the_engines_host() {
        assert_eq!(reachable_endpoint("tcp://*:5557", "10.1.2.3"), "tcp://10.1.2.3:5557");
        assert_eq!(reachable_endpoint("tcp://127.0.0.1:5557", "10.1.2.3"), "tcp://127.0.0.1:5557");
        assert_eq!(reachable_endpoint("ipc:///tmp/x", "h"), "ipc:///tmp/x");
    }

    #[test]
    fn a_trailing_eos_is_held_until_the_finish_says_why() {
        let eos = [9];
        let mut h = EosHold::new(&eos, true);
        assert_eq!(h.push(vec![1, 9]), vec![1]);
        assert_eq!(h.push(vec![]), Vec::<TokenId>::new());
        assert_eq!(h.finish(FinishReason::Eos), None);
        let mut h = EosHold::new(&eos, true);
        assert_eq!(h.push(vec![9]), Vec::<TokenId>::new());
        assert_eq!(h.push(vec![2]), vec![9, 2]);
        assert_eq!(h.push(vec![9]), Vec::<TokenId>::new());
        assert_eq!(h.finish(FinishReason::Length), Some(9));
        let mut h = EosHold::new(&eos, false);
        assert_eq!(h.push(vec![9]), vec![9]);
    }

    #[test]
    fn client_errors_are_not_retried() {
        let e = status_error("sglang", reqwest::StatusCode::BAD_REQUEST, r#"{"error":{"message":"too long"}}"#);
        assert!(!e.retry && e.message.contains("too long"));
        let e = status_error("vllm", reqwest::StatusCode::INTERNAL_SERVER_ERROR, "boom");
        assert!(e.retry && e.message.contains("boom"));
        assert_eq!(error_message(r#"{"error":"plain"}"#), "plain");
    }
}
