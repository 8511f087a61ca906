//! A worker's token stream → text: incremental detokenization, stop strings, token accounting,
//! latency metrics, and (chat requests that need it) the output parser that splits reasoning,
//! content and tool calls; and the SSE body that writes it.
//!
//! Invariant: a [`Generation`] ends exactly once, with `Finished` or `Failed`; afterwards it
//! yields nothing. Dropping it early (client gone) drops the worker stream, which cancels the
//! request on the worker, and the [`LoadGuard`], which releases the router's booking.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Frame;

use crate::contract::{FinishReason, TokenId, WorkerError, WorkerId, WorkerOutput};
use crate::frontend::data::error::ApiError;
use crate::frontend::data::InflightGuard;
use crate::metrics::Metrics;
use crate::openai::parse::{OutputParser, ParseEvent};
use crate::openai::{ChunkWriter, Usage};
use crate::planes::request::ResponseStream;
use crate::preprocess::{IncrementalDecoder, StopMatcher};
use crate::router::LoadGuard;

/// How long a finished response waits for its prefill leg's last reports (see
/// `Generation::awaiting_prefill_report`).
const PREFILL_REPORT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What a generation yields to its writer.
#[derive(Debug)]
pub enum GenEvent {
    /// New text (never empty), when the output is not parsed.
    Text(String),
    /// New pieces of a parsed output (never empty).
    Parsed(Vec<ParseEvent>),
    /// The end: OpenAI's finish reason (`stop` or `length`).
    Finished(&'static str),
    /// The request failed (the error decides the status and says who is at fault).
    Failed(ApiError),
}

/// Why a step of the generation failed: the worker's error (which may migrate) or the
/// frontend's own (which may not).
enum Failure {
    Worker(WorkerError),
    Frontend(ApiError),
}

/// The prefill leg of a disaggregated request, running beside its decode stream.
pub struct PrefillLeg {
    pub rx: ResponseStream,
    /// The prefill worker's booking, released when the leg ends.
    pub guard: LoadGuard,
    pub worker: WorkerId,
}

/// How a request was split over workers.
pub enum Legs {
    /// One worker computes the prompt and generates (aggregated).
    Whole,
    /// A decode worker of a disaggregated model prefills itself (conditional disaggregation, or
    /// no prefill worker left).
    Local,
    /// A prefill worker computes the prompt and pushes its KV to the decode worker.
    Remote(PrefillLeg),
}

/// A request sent: the stream its tokens come from, that worker's booking and id, and how it
/// was split.
pub struct Dispatched {
    pub rx: ResponseStream,
    pub guard: LoadGuard,
    pub worker: WorkerId,
    pub legs: Legs,
}

/// The future of a migration: the request sent again, to other workers.
pub type MigrateFuture = Pin<Box<dyn Future<Output = Result<Dispatched, ApiError>>>>;

/// Re-sends a request whose worker failed mid-stream: the prompt plus the tokens generated so
/// far, to another worker, for the tokens still owed.
pub trait Migrate {
    fn migrate(self: Rc<Self>, generated: Vec<TokenId>, failed: WorkerId) -> MigrateFuture;
}

/// Migration state of one generation (present when `--migration-limit` > 0).
struct Migration {
    dispatch: Rc<dyn Migrate>,
    worker: WorkerId,
    left: u32,
    /// Every token generated so far (the new worker continues from prompt + these).
    generated: Vec<TokenId>,
    pending: Option<MigrateFuture>,
    /// Why the last migration started (the client's error names it if no worker takes over).
    cause: Option<WorkerError>,
}

/// One request's generation, driven by polling.
pub struct Generation {
    rx: ResponseStream,
    /// The running prefill leg of a disaggregated request (until it finishes).
    prefill: Option<PrefillLeg>,
    /// The current dispatch is disaggregated with a remote prefill.
    remote: bool,
    /// Its prefill leg's `Started` (the cached tokens for the usage) has been read.
    prefill_reported: bool,
    /// Set once the decode stream has ended while the prefill leg still runs: how long its
    /// last reports (`Transferred`, `Finished`) are still waited for.
    prefill_grace: Option<Pin<Box<monoio::time::Sleep>>>,
    /// The request migrated after tokens were streamed: `usage.cached_tokens` is final.
    cached_frozen: bool,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    guard: LoadGuard,
    usage: Usage,
    arrived: Instant,
    last_token: Option<Instant>,
    pending_finish: Option<&'static str>,
    ended: bool,
    metrics: Arc<Metrics>,
    inflight: InflightGuard,
    migration: Option<Migration>,
    started: bool,
    /// Splits the text into reasoning, content and tool calls (chat requests that need it).
    parser: Option<Box<OutputParser>>,
    /// Parsed events not yet yielded.
    parsed: Vec<ParseEvent>,
    /// The request's spans, when traced: first token, completion, failure.
    trace: Option<Rc<crate::telemetry::request::RequestTrace>>,
}

impl Generation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sent: Dispatched,
        decoder: IncrementalDecoder,
        stops: Vec<String>,
        prompt_tokens: u32,
        arrived: Instant,
        metrics: Arc<Metrics>,
        inflight: InflightGuard,
    ) -> Self {
        let Dispatched { rx, guard, legs, .. } = sent;
        let (prefill, remote) = match legs {
            Legs::Remote(leg) => (Some(leg), true),
            Legs::Whole | Legs::Local => (None, false),
        };
        Self {
            rx,
            prefill,
            remote,
            prefill_reported: false,
            prefill_grace: None,
            cached_frozen: false,
            decoder,
            stop: StopMatcher::new(stops),
            guard,
            usage: Usage { prompt_tokens, ..Usage::default() },
            arrived,
            last_token: None,
            pending_finish: None,
            ended: false,
            metrics,
            inflight,
            migration: None,
            started: false,
            parser: None,
            parsed: Vec::new(),
            trace: None,
        }
    }

    /// Records the first token, the completion or the failure in the request's trace.
    pub fn set_trace(&mut self, trace: Option<Rc<crate::telemetry::request::RequestTrace>>) {
        self.trace = trace;
    }

    /// Parses the output: the generation then yields [`GenEvent::Parsed`] instead of text.
    pub fn set_parser(&mut self, parser: OutputParser) {
        self.parser = Some(Box::new(parser));
    }

    /// Whether the output is parsed (it then yields [`GenEvent::Parsed`], never text).
    pub fn is_parsed(&self) -> bool {
        self.parser.is_some()
    }

    /// Whether the output is parsed for reasoning (responses then carry `reasoning_content`).
    pub fn parses_reasoning(&self) -> bool {
        self.parser.as_ref().is_some_and(|p| p.parses_reasoning())
    }

    /// Lets a failed worker's stream continue on another worker, up to `limit` times.
    pub fn enable_migration(&mut self, dispatch: Rc<dyn Migrate>, worker: WorkerId, limit: u32) {
        self.migration =
            Some(Migration { dispatch, worker, left: limit, generated: Vec::new(), pending: None, cause: None });
    }

    /// On a worker failure (`failed`, or the decode/whole worker when `None`): start a
    /// migration if one is allowed and can help (true), else false. The other legs are
    /// cancelled. A client's fault is never retried: no other worker would do better.
    fn try_migrate(&mut self, error: &WorkerError, failed: Option<WorkerId>) -> bool {
        let Some(m) = self.migration.as_mut() else { return false };
        m.cause = Some(error.clone());
        if !error.retry || m.left == 0 || m.generated.len() as u64 >= u64::from(u32::MAX) {
            return false;
        }
        let reason = &error.message;
        m.left -= 1;
        self.cached_frozen |= !m.generated.is_empty();
        let failed = failed.unwrap_or(m.worker);
        tracing::warn!(worker = %failed, generated = m.generated.len(), migrations_left = m.left, reason, "worker failed mid-stream; migrating the request");
        self.rx.close();
        self.prefill = None;
        m.pending = Some(m.dispatch.clone().migrate(m.generated.clone(), failed));
        self.shard_metrics().migrations.fetch_add(1, Relaxed);
        true
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    fn shard_metrics(&self) -> &crate::metrics::ShardMetrics {
        self.metrics.shard(self.inflight.0.id)
    }

    fn fail(&mut self, error: ApiError) -> GenEvent {
        self.ended = true;
        self.rx.close();
        self.prefill = None;
        let m = self.shard_metrics();
        let counter =
            if error.status().is_server_error() { &m.requests_server_error } else { &m.requests_client_error };
        counter.fetch_add(1, Relaxed);
        if let Some(t) = &self.trace {
            t.failed(&error);
        }
        GenEvent::Failed(error)
    }

    /// The decode (or whole) stream ended; the event goes out once the usage is complete.
    fn finish(&mut self, reason: &'static str) {
        self.pending_finish = Some(reason);
        self.rx.close();
        if let Some(p) = self.parser.as_mut() {
            p.finish(&mut self.parsed);
            self.usage.reasoning_tokens = p.reasoning_tokens();
        }
    }

    /// New text of `tokens` tokens: yielded as it is, or parsed (the events wait in `parsed`).
    fn output(&mut self, text: String, tokens: usize) -> Option<String> {
        match self.parser.as_mut() {
            None => (!text.is_empty()).then_some(text),
            Some(p) => {
                p.push(&text, tokens.try_into().unwrap_or(u32::MAX), &mut self.parsed);
                None
            }
        }
    }

    /// The prefill leg's reports are still owed: `Started` (cached tokens, for the usage) is
    /// always waited for: it was sent before the KV moved, so the decode stream cannot end long
    /// before it arrives. The rest (`Transferred`, for the transfer metrics, then `Finished`)
    /// travels on the prefill worker's connection and may arrive after the decode worker's last
    /// token; it is waited for at most [`PREFILL_REPORT_GRACE`], so a prefill leg that never
    /// ends cannot hold a finished response. A leg that fails or ends is no longer waited for.
    fn awaiting_prefill_report(&mut self, cx: &mut Context<'_>) -> bool {
        if self.prefill.is_some() {
            let _ = self.poll_prefill(cx);
        }
        if self.prefill.is_none() {
            return false;
        }
        if !self.prefill_reported {
            return true;
        }
        let grace = self.prefill_grace.get_or_insert_with(|| Box::pin(monoio::time::sleep(PREFILL_REPORT_GRACE)));
        if grace.as_mut().poll(cx).is_ready() {
            tracing::debug!("the prefill leg did not end within the grace after the decode stream; not waiting");
            return false;
        }
        true
    }

    fn account_finished(&mut self) {
        self.ended = true;
        self.prefill = None;
        let m = self.shard_metrics();
        m.prompt_tokens.fetch_add(self.usage.prompt_tokens as u64, Relaxed);
        m.cached_tokens.fetch_add(self.usage.cached_tokens as u64, Relaxed);
        m.output_tokens.fetch_add(self.usage.completion_tokens as u64, Relaxed);
        m.e2e.observe(self.arrived.elapsed());
    }

    fn on_tokens(&mut self, ids: &[u32]) -> Result<Option<String>, Failure> {
        let now = Instant::now();
        if !self.started {
            self.started = true;
            self.guard.prefill_done();
        }
        if let Some(m) = self.migration.as_mut() {
            m.generated.extend_from_slice(ids);
        }
        if let (None, Some(t)) = (self.last_token, &self.trace) {
            t.first_token();
        }
        let m = self.shard_metrics();
        match self.last_token {
            None => m.ttft.observe(now - self.arrived),
            Some(t) => m.itl.observe(now - t),
        }
        self.last_token = Some(now);
        self.usage.completion_tokens += ids.len() as u32;
        let text = self.decoder.step(ids).map_err(|e| Failure::Frontend(ApiError::Detokenize(e.to_string())))?;
        let (emit, stopped) = self.stop.push(&text);
        let out = self.output(emit, ids.len());
        if stopped {
            self.finish("stop");
        }
        Ok(out)
    }

    fn on_finished(&mut self, reason: FinishReason) -> Result<Option<String>, Failure> {
        let reason = match reason {
            FinishReason::Eos => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => {
                return Err(Failure::Worker(WorkerError::worker("the worker cancelled the request")))
            }
        };
        let tail = self.decoder.finish().map_err(|e| Failure::Frontend(ApiError::Detokenize(e.to_string())))?;
        let (mut emit, stopped) = self.stop.push(&tail);
        if !stopped {
            emit.push_str(&self.stop.flush());
        }
        let out = self.output(emit, 0);
        self.finish(if stopped { "stop" } else { reason });
        Ok(out)
    }

    /// After a migration mid-stream the earlier figure stands: it is what the client's prompt
    /// found cached. (Not "no token seen yet": a prefill leg's report may arrive after the
    /// decode worker's first tokens, which travel on another connection.)
    fn record_cached(&mut self, cached_tokens: u32) {
        if !self.cached_frozen {
            self.usage.cached_tokens = cached_tokens.min(self.usage.prompt_tokens);
        }
    }

    /// Takes what the prefill leg reported; `Some` when it failed before the decode leg got its
    /// KV (the request must be re-sent or failed).
    fn poll_prefill(&mut self, cx: &mut Context<'_>) -> Option<(WorkerError, WorkerId)> {
        loop {
            let leg = self.prefill.as_mut()?;
            let worker = leg.worker;
            let Poll::Ready(msg) = leg.rx.poll_recv(cx) else { return None };
            match msg {
                Some(WorkerOutput::Started { cached_tokens, computed_tokens }) => {
                    leg.guard.prefill_done();
                    self.prefill_reported = true;
                    let m = self.shard_metrics();
                    m.prompt_tokens_computed_prefill.fetch_add(u64::from(computed_tokens), Relaxed);
                    self.record_cached(cached_tokens);
                }
                Some(WorkerOutput::Transferred { blocks, bytes, micros }) => {
                    let m = self.shard_metrics();
                    m.kv_transfers.fetch_add(1, Relaxed);
                    m.kv_transfer_blocks.fetch_add(u64::from(blocks), Relaxed);
                    m.kv_transfer_bytes.fetch_add(bytes, Relaxed);
                    m.kv_transfer_micros.fetch_add(micros, Relaxed);
                    let gbps = if micros == 0 { 0.0 } else { bytes as f64 / micros as f64 / 1e3 };
                    tracing::debug!(
                        prefill_worker = %worker,
                        blocks,
                        bytes,
                        secs = format_args!("{:.6}", micros as f64 / 1e6),
                        gbps = format_args!("{gbps:.2}"),
                        "kv transfer"
                    );
                }
                // Handoffs were taken by the dispatch (sequential legs).
                Some(WorkerOutput::Tokens(_) | WorkerOutput::Handoff(_)) => {}
                Some(WorkerOutput::Finished { .. }) => {
                    self.prefill = None;
                    return None;
                }
                Some(WorkerOutput::Error(mut e)) => {
                    self.prefill = None;
                    e.message = format!("the prefill worker failed: {}", e.message);
                    return (!self.started).then_some((e, worker));
                }
                None => {
                    self.prefill = None;
                    let e = WorkerError::transport("the prefill worker's stream ended before its KV transfer finished");
                    return (!self.started).then_some((e, worker));
                }
            }
        }
    }

    /// The next event; `Poll::Pending` while the worker has nothing new.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<GenEvent> {
        loop {
            if !self.parsed.is_empty() {
                return Poll::Ready(GenEvent::Parsed(std::mem::take(&mut self.parsed)));
            }
            if let Some(reason) = self.pending_finish {
                if self.awaiting_prefill_report(cx) {
                    return Poll::Pending;
                }
                self.pending_finish = None;
                self.account_finished();
                if let Some(t) = &self.trace {
                    t.finished(&self.usage, reason);
                }
                return Poll::Ready(GenEvent::Finished(reason));
            }
            if self.ended {
                return Poll::Pending;
            }
            if let Some(pending) = self.migration.as_mut().and_then(|m| m.pending.as_mut()) {
                match ready!(pending.as_mut().poll(cx)) {
                    Ok(sent) => {
                        let m = self.migration.as_mut().expect("migrating");
                        m.pending = None;
                        m.worker = sent.worker;
                        tracing::info!(worker = %sent.worker, "request migrated");
                        self.rx = sent.rx;
                        self.guard = sent.guard;
                        self.prefill_reported = false;
                        (self.prefill, self.remote) = match sent.legs {
                            Legs::Remote(leg) => (Some(leg), true),
                            Legs::Whole | Legs::Local => (None, false),
                        };
                        self.started = false;
                        continue;
                    }
                    Err(then) => {
                        let m = self.migration.as_mut().expect("migrating");
                        m.pending = None;
                        let cause = m.cause.take().unwrap_or_else(|| WorkerError::worker("unknown"));
                        return Poll::Ready(self.fail(ApiError::MigrationFailed { cause, then: Box::new(then) }));
                    }
                }
            }
            if let Some(failure) = self.poll_prefill(cx) {
                let (error, worker) = failure;
                if self.try_migrate(&error, Some(worker)) {
                    continue;
                }
                return Poll::Ready(self.fail(ApiError::Worker(error)));
            }
            let step = match ready!(self.rx.poll_recv(cx)) {
                None => Err(Failure::Worker(WorkerError::transport(
                    "the worker's stream ended before the response finished",
                ))),
                Some(WorkerOutput::Started { cached_tokens, computed_tokens }) => {
                    let m = self.shard_metrics();
                    if self.remote {
                        m.prompt_tokens_computed_decode.fetch_add(u64::from(computed_tokens), Relaxed);
                    } else {
                        m.prompt_tokens_computed_aggregated.fetch_add(u64::from(computed_tokens), Relaxed);
                        self.record_cached(cached_tokens);
                    }
                    Ok(None)
                }
                Some(WorkerOutput::Transferred { .. } | WorkerOutput::Handoff(_)) => Ok(None),
                Some(WorkerOutput::Tokens(ids)) => self.on_tokens(&ids),
                Some(WorkerOutput::Finished { reason }) => self.on_finished(reason),
                Some(WorkerOutput::Error(e)) => Err(Failure::Worker(e)),
            };
            match step {
                Ok(Some(text)) => return Poll::Ready(GenEvent::Text(text)),
                Ok(None) => continue,
                Err(Failure::Worker(e)) if self.pending_finish.is_none() && self.try_migrate(&e, None) => continue,
                Err(Failure::Worker(e)) => return Poll::Ready(self.fail(ApiError::Worker(e))),
                Err(Failure::Frontend(e)) => return Poll::Ready(self.fail(e)),
            }
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.ended {
            self.shard_metrics().streams_cancelled.fetch_add(1, Relaxed);
        }
    }
}

/// The SSE body of a streaming response.
pub struct SseBody {
    gen: Generation,
    writer: ChunkWriter,
    include_usage: bool,
    queued: VecDeque<Bytes>,
    done: bool,
    /// A tool call was streamed: a stop is reported as `tool_calls`.
    called_tools: bool,
}

impl SseBody {
    /// The body of `gen`, whose `first` event was already taken (to decide the status).
    pub fn new(gen: Generation, writer: ChunkWriter, include_usage: bool, first: GenEvent) -> Self {
        let mut queued = VecDeque::with_capacity(4);
        queued.extend(writer.role_chunk());
        let mut body = Self { gen, writer, include_usage, queued, done: false, called_tools: false };
        body.push(first);
        body
    }

    /// Queues the chunks of one event.
    fn push(&mut self, event: GenEvent) {
        match event {
            GenEvent::Text(t) => self.queued.push_back(self.writer.delta_chunk(&t)),
            GenEvent::Parsed(events) => {
                for e in &events {
                    self.called_tools |= matches!(e, ParseEvent::ToolCallStart { .. });
                    self.queued.extend(self.writer.event_chunk(e));
                }
            }
            GenEvent::Finished(reason) => {
                let reason = if reason == "stop" && self.called_tools { "tool_calls" } else { reason };
                self.queued.push_back(self.writer.finish_chunk(reason));
                if self.include_usage {
                    self.queued.push_back(self.writer.usage_chunk(self.gen.usage()));
                }
                self.queued.push_back(Bytes::from_static(crate::openai::DONE));
                self.done = true;
            }
            GenEvent::Failed(e) => {
                self.queued.push_back(ChunkWriter::error_event(&e.to_string(), e.kind()));
                self.queued.push_back(Bytes::from_static(crate::openai::DONE));
                self.done = true;
            }
        }
    }
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let event = ready!(this.gen.poll_event(cx));
            this.push(event);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queued.is_empty()
    }
}
