//! The frontend's spans of one request.
//!
//! ```text
//! POST /v1/chat/completions            (server span; parent: the client's traceparent, if valid)
//! ├── preprocess                       parse, chat template, tokenize
//! ├── admission                        the wait for a worker below the busy thresholds
//! ├── route                            one per leg routed: chosen worker, overlap, cost, mode
//! ├── dispatch                         (client span) from the send to the end of the worker's
//! │   │                                stream; its id goes to the workers as their parent
//! │   ├── worker.request (on a worker) one per leg: prefill and decode legs are siblings
//! ├── first_token                      from the send to the first token
//! └── completion                       from the first token to the end: tokens, finish reason
//! ```
//!
//! A migrated request gets a second `route` and `dispatch` under the same root. Invariant: the
//! root ends exactly once, when the request ends (finished, failed, or dropped with its client:
//! then with an error status `cancelled`). Concurrency: one [`RequestTrace`] per request, owned
//! by its shard (`Rc`, `Cell`, `RefCell`), never shared across threads; spans leave the shard
//! only when they end, into the SDK's bounded queue ([`super`]).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::SystemTime;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::contract::{TraceContext, WorkerId};
use crate::openai::Usage;
use crate::router::{RouteDecision, RouterMode};

/// The W3C headers read from a request.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// One request's spans (see the module doc).
pub struct RequestTrace {
    tracer: &'static SdkTracer,
    root: RefCell<Span>,
    /// The root as the parent of the phases.
    parent: Context,
    /// The dispatch in progress: the workers' parent, and its context as the legs carry it.
    dispatch: RefCell<Option<Span>>,
    dispatch_cx: RefCell<Option<TraceContext>>,
    /// The end of the last phase: where the next one starts.
    mark: Cell<SystemTime>,
    sent_at: Cell<Option<SystemTime>>,
    first_token_at: Cell<Option<SystemTime>>,
    ended: Cell<bool>,
    /// The sampler kept this trace. When it did not (the caller's `traceparent` says unsampled,
    /// or `OTEL_TRACES_SAMPLER` drops it), nothing is built or recorded: the legs carry the
    /// root's context, unsampled, so the workers record nothing either.
    recording: bool,
}

/// What a route span says about one routing decision.
pub struct Routed<'a> {
    pub leg: &'static str,
    pub decision: &'a RouteDecision,
    pub candidates: usize,
    pub mode: RouterMode,
    pub approx: bool,
    pub started: SystemTime,
}

impl RequestTrace {
    /// The trace of a request arriving with `headers`, when tracing is on; a missing or invalid
    /// `traceparent` starts a new trace.
    pub fn start(headers: &http::HeaderMap, method: &str, path: &str) -> Option<Rc<Self>> {
        let tracer = super::tracer()?;
        let now = SystemTime::now();
        let header = |n| headers.get(n).and_then(|v| v.to_str().ok());
        let incoming = header(TRACEPARENT).and_then(|tp| TraceContext::parse(tp, header(TRACESTATE)));
        let cx = match &incoming {
            Some(t) => Context::new().with_remote_span_context(super::span_context(t)),
            None => Context::new(),
        };
        let root = tracer
            .span_builder(format!("{method} {path}"))
            .with_kind(SpanKind::Server)
            .with_start_time(now)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("http.route", path.to_owned()),
                KeyValue::new("kvgate.traceparent_valid", incoming.is_some()),
            ])
            .start_with_context(tracer, &cx);
        let parent = Context::new().with_remote_span_context(root.span_context().clone());
        let recording = root.is_recording();
        Some(Rc::new(Self {
            recording,
            tracer,
            root: RefCell::new(root),
            parent,
            dispatch: RefCell::new(None),
            dispatch_cx: RefCell::new(None),
            mark: Cell::new(now),
            sent_at: Cell::new(None),
            first_token_at: Cell::new(None),
            ended: Cell::new(false),
        }))
    }

    /// The trace id, as viewers show it.
    pub fn trace_id(&self) -> String {
        self.root.borrow().span_context().trace_id().to_string()
    }

    fn child(&self, name: &'static str, kind: SpanKind, start: SystemTime, attrs: Vec<KeyValue>) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(self.tracer, &self.parent)
    }

    /// Whether the sampler kept this trace (else every call records nothing).
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// A phase that ran from `start` until now.
    pub fn phase(&self, name: &'static str, start: SystemTime, attrs: Vec<KeyValue>) {
        if !self.recording {
            return;
        }
        let now = SystemTime::now();
        self.child(name, SpanKind::Internal, start, attrs).end_with_timestamp(now);
        self.mark.set(now);
    }

    /// The next phase: from the end of the last one (or the request's arrival) until now.
    /// `attrs` are built only when the trace is recorded.
    pub fn next_phase(&self, name: &'static str, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if self.recording {
            self.phase(name, self.mark.get(), attrs());
        }
    }

    /// The context the legs of the current dispatch carry (the dispatch span as their parent).
    pub fn dispatch_context(&self) -> Option<Box<TraceContext>> {
        self.dispatch_cx.borrow().clone().map(Box::new)
    }

    /// Attributes of the whole request (built only when the trace is recorded).
    pub fn set(&self, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if self.recording {
            self.root.borrow_mut().set_attributes(attrs());
        }
    }

    /// One routing decision, made from `r.started` until now.
    pub fn routed(&self, r: Routed<'_>) {
        if !self.recording {
            return;
        }
        let d = r.decision;
        let mut attrs = vec![
            KeyValue::new("kvgate.leg", r.leg),
            KeyValue::new("kvgate.route.worker", d.worker.to_string()),
            KeyValue::new("kvgate.route.overlap_blocks", i64::from(d.overlap_blocks)),
            KeyValue::new("kvgate.route.candidates", r.candidates as i64),
            KeyValue::new("kvgate.route.mode", mode_name(r.mode)),
            KeyValue::new("kvgate.route.approximate", r.approx),
        ];
        if let Some(s) = d.scores.iter().find(|s| s.worker == d.worker) {
            attrs.push(KeyValue::new("kvgate.route.cost", s.cost));
            attrs.push(KeyValue::new("kvgate.route.cached_blocks", s.cached_blocks as i64));
        }
        if !d.scores.is_empty() {
            let all: Vec<String> = d
                .scores
                .iter()
                .map(|s| format!("{}:overlap={} cost={:.3}", s.worker, s.overlap_blocks, s.cost))
                .collect();
            attrs.push(KeyValue::new("kvgate.route.scores", all.join(" ")));
        }
        self.phase("route", r.started, attrs);
    }

    /// Starts a dispatch to `workers` (attribute name, worker), ending the previous one when
    /// the request is sent again (a worker unreachable, or a migration);
    /// [`Self::dispatch_context`] then names it.
    pub fn dispatching(&self, workers: &[(&'static str, WorkerId)]) {
        if !self.recording {
            if self.dispatch_cx.borrow().is_none() {
                *self.dispatch_cx.borrow_mut() = Some(super::trace_context(self.root.borrow().span_context()));
            }
            return;
        }
        let now = SystemTime::now();
        let attrs = workers.iter().map(|(key, w)| KeyValue::new(*key, w.to_string())).collect();
        let span = self.child("dispatch", SpanKind::Client, now, attrs);
        *self.dispatch_cx.borrow_mut() = Some(super::trace_context(span.span_context()));
        if let Some(mut old) = self.dispatch.borrow_mut().replace(span) {
            old.set_status(Status::error("sent again"));
            old.end_with_timestamp(now);
        }
        self.sent_at.set(Some(now));
    }

    /// The first token arrived (later ones are ignored).
    pub fn first_token(&self) {
        if !self.recording || self.first_token_at.get().is_some() {
            return;
        }
        let now = SystemTime::now();
        self.first_token_at.set(Some(now));
        if let Some(sent) = self.sent_at.get() {
            self.child("first_token", SpanKind::Internal, sent, vec![]).end_with_timestamp(now);
        }
    }

    /// The request finished: the completion span, and the root with the usage.
    pub fn finished(&self, usage: &Usage, reason: &str) {
        if !self.recording {
            return self.end(None);
        }
        let attrs = vec![
            KeyValue::new("gen_ai.usage.input_tokens", i64::from(usage.prompt_tokens)),
            KeyValue::new("gen_ai.usage.output_tokens", i64::from(usage.completion_tokens)),
            KeyValue::new("kvgate.cached_tokens", i64::from(usage.cached_tokens)),
            KeyValue::new("gen_ai.response.finish_reasons", reason.to_owned()),
        ];
        let start = self.first_token_at.get().or(self.sent_at.get()).unwrap_or_else(SystemTime::now);
        self.child("completion", SpanKind::Internal, start, attrs.clone()).end();
        self.root.borrow_mut().set_attributes(attrs);
        self.end(None);
    }

    /// The request failed (before or after its first token).
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        self.end(Some(error.to_string()));
    }

    fn end(&self, error: Option<String>) {
        if self.ended.replace(true) {
            return;
        }
        let now = SystemTime::now();
        if let Some(mut d) = self.dispatch.borrow_mut().take() {
            if let Some(e) = &error {
                d.set_status(Status::error(e.clone()));
            }
            d.end_with_timestamp(now);
        }
        let mut root = self.root.borrow_mut();
        if let Some(e) = error {
            root.set_status(Status::error(e));
        }
        root.end_with_timestamp(now);
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        // The client went away before the end (or the handler returned early on an error
        // already recorded): the spans still end, once.
        self.end(Some("cancelled".into()));
    }
}

fn mode_name(m: RouterMode) -> &'static str {
    match m {
        RouterMode::Kv => "kv",
        RouterMode::RoundRobin => "round-robin",
        RouterMode::Random => "random",
    }
}
