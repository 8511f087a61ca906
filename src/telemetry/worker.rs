//! A worker's span of one request leg, seen from the request plane (engine-neutral):
//!
//! ```text
//! worker.request   (server span; parent: the frontend's dispatch span the request carries)
//! ├── queue        until the worker's bounded inbox accepted the request
//! ├── prefill      from the intake to the engine's first output (the engine's own scheduling
//! │                queue is inside: engines do not report it apart)
//! └── decode       from the first token to the end
//! ```
//!
//! The request is handed to the engine with its trace context rewritten to `worker.request`,
//! so an engine that reads `traceparent` (the HTTP adapters send it) nests its own spans under
//! the worker's. Invariant: a [`LegTrace`] exists only when tracing is on and the request came
//! with a context; its spans end exactly once (when the leg ends, or when it is dropped with
//! its stream: status `cancelled`). Concurrency: owned by the task forwarding the leg's outputs.

use std::time::SystemTime;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::contract::{DisaggLeg, FinishReason, GenerateRequest, WorkerId, WorkerOutput};

/// One leg's spans (see the module doc).
pub struct LegTrace {
    tracer: &'static SdkTracer,
    span: Span,
    parent: Context,
    arrived: SystemTime,
    taken: Option<SystemTime>,
    first_output_at: Option<SystemTime>,
    output_tokens: u64,
    ended: bool,
}

impl LegTrace {
    /// The leg's trace, when tracing is on and `request` carries a context; the request's
    /// context then names the worker's span (the engine's parent).
    pub fn start(worker: WorkerId, request: &mut GenerateRequest) -> Option<Self> {
        let tracer = super::tracer()?;
        let incoming = request.trace.as_ref()?;
        let cx = Context::new().with_remote_span_context(super::span_context(incoming));
        let leg = match &request.disagg {
            None => "aggregated",
            Some(DisaggLeg::Prefill { .. }) => "prefill",
            Some(DisaggLeg::Decode { .. }) => "decode",
        };
        let span = tracer
            .span_builder("worker.request")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("kvgate.worker_id", worker.to_string()),
                KeyValue::new("kvgate.leg", leg),
                KeyValue::new("kvgate.request_id", format!("{:x}", request.request_id)),
                KeyValue::new("gen_ai.usage.input_tokens", request.token_ids.len() as i64),
                KeyValue::new("gen_ai.request.max_tokens", i64::from(request.sampling.max_tokens)),
            ])
            .start_with_context(tracer, &cx);
        let own = super::trace_context(span.span_context());
        request.trace = Some(Box::new(own));
        let parent = Context::new().with_remote_span_context(span.span_context().clone());
        Some(Self {
            tracer,
            span,
            parent,
            arrived: SystemTime::now(),
            taken: None,
            first_output_at: None,
            output_tokens: 0,
            ended: false,
        })
    }

    fn phase(&self, name: &'static str, start: SystemTime, end: SystemTime) {
        let mut s = self.tracer.span_builder(name).with_start_time(start).start_with_context(self.tracer, &self.parent);
        s.end_with_timestamp(end);
    }

    /// The worker's bounded inbox accepted the request.
    pub fn taken(&mut self) {
        let now = SystemTime::now();
        self.taken = Some(now);
        self.phase("queue", self.arrived, now);
    }

    /// The engine's first output (`Started` or the first tokens) ends the prefill.
    fn first_output(&mut self, now: SystemTime) {
        if self.first_output_at.is_none() {
            self.first_output_at = Some(now);
            self.phase("prefill", self.taken.unwrap_or(self.arrived), now);
        }
    }

    /// One output of the engine, as it goes to the frontend.
    pub fn output(&mut self, o: &WorkerOutput) {
        let now = SystemTime::now();
        match o {
            WorkerOutput::Started { cached_tokens, computed_tokens } => {
                self.span.set_attribute(KeyValue::new("kvgate.cached_tokens", i64::from(*cached_tokens)));
                self.span.set_attribute(KeyValue::new("kvgate.computed_tokens", i64::from(*computed_tokens)));
                self.first_output(now);
            }
            WorkerOutput::Tokens(t) => {
                self.output_tokens += t.len() as u64;
                self.first_output(now);
            }
            WorkerOutput::Transferred { blocks, bytes, micros } => {
                self.span.set_attribute(KeyValue::new("kvgate.transfer.blocks", i64::from(*blocks)));
                self.span.set_attribute(KeyValue::new("kvgate.transfer.bytes", *bytes as i64));
                self.span.set_attribute(KeyValue::new("kvgate.transfer.micros", *micros as i64));
            }
            WorkerOutput::Handoff(_) => {}
            WorkerOutput::Finished { reason } => {
                if let Some(f) = self.first_output_at {
                    self.phase("decode", f, now);
                }
                let reason = match reason {
                    FinishReason::Eos => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Cancelled => "cancelled",
                };
                self.span.set_attribute(KeyValue::new("gen_ai.response.finish_reasons", reason));
                let error = (reason == "cancelled").then(|| "cancelled".to_owned());
                self.end(now, error);
            }
            WorkerOutput::Error(e) => self.end(now, Some(e.message.clone())),
        }
    }

    fn end(&mut self, at: SystemTime, error: Option<String>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", self.output_tokens as i64));
        if let Some(e) = error {
            self.span.set_status(Status::error(e));
        }
        self.span.end_with_timestamp(at);
    }
}

impl Drop for LegTrace {
    fn drop(&mut self) {
        self.end(SystemTime::now(), Some("cancelled".into()));
    }
}
