//! Request tracing (issue #18): W3C trace context in, spans out over OTLP/HTTP.
//!
//! - [`request`]: the frontend's spans of one request (preprocess, admission, route, dispatch,
//!   first token, completion) under one root span, parented on the client's `traceparent`.
//! - [`worker`]: a worker's span of one request leg (queue wait, prefill, decode), parented on
//!   the frontend's dispatch span that the request carries ([`TraceContext`]).
//! - This file: start-up ([`init`]) and the process's one tracer.
//!
//! Invariant: the tracer is set at most once, at start-up, before any request ([`init`]); with
//! no `--otlp-endpoint` it is never set and every tracing call site is one branch on
//! [`tracer`] returning `None`: nothing is allocated, recorded or exported.
//! Concurrency: spans are built on the thread that owns the request (a monoio shard, a tokio
//! task) and handed, when they end, to the SDK's batch processor: one thread of its own with a
//! bounded queue ([`QUEUE_SPANS`] by default, `OTEL_BSP_MAX_QUEUE_SIZE`); a full queue drops
//! the span and counts it (the SDK logs the first drop and the total at shutdown), it never
//! blocks a shard. The exporter posts batches from that thread with a blocking HTTP client.
//!
//! Why the `opentelemetry` crates at 0.31: they share reqwest 0.12 with the engine adapters
//! (0.33 pulls in reqwest 0.13); OTLP/HTTP protobuf needs no gRPC stack, so the footprint is
//! five crates.

pub mod request;
pub mod worker;

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use thiserror::Error;

use crate::config::OtlpArgs;
use crate::contract::TraceContext;

/// The batch processor's queue of ended spans not yet exported (the SDK's default, restated):
/// at ~1 KB a span, 2 MB at most; past it spans are dropped and counted.
pub const QUEUE_SPANS: usize = 2048;
/// How long shutdown waits for the last batch to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The process's tracer, when tracing is on.
#[inline]
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Why tracing could not start.
#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the OTLP exporter could not be built")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("tracing was already started in this process")]
    AlreadyStarted,
}

/// Exports spans while it lives; dropping it flushes the queue (up to [`SHUTDOWN_TIMEOUT`]) and
/// joins the exporter's thread.
#[must_use = "dropping the exporter stops tracing"]
pub struct Exporter {
    provider: SdkTracerProvider,
    pub traces_url: String,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "tracing: the last spans could not be exported");
        }
    }
}

/// Starts tracing when `args` name an endpoint: `None` (and no cost) otherwise.
/// `service` is the default `service.name`; `resource` adds attributes every span carries
/// (a worker's engine). Call once, before serving.
pub fn init(args: &OtlpArgs, service: &str, resource: Vec<KeyValue>) -> Result<Option<Exporter>, TelemetryError> {
    let Some(url) = args.traces_url()? else { return Ok(None) };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(TelemetryError::Exporter)?;
    let name = args.otlp_service_name.clone().unwrap_or_else(|| service.to_owned());
    let resource = Resource::builder().with_service_name(name).with_attributes(resource).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "kvgate");
    TRACER.set(tracer).map_err(|_| TelemetryError::AlreadyStarted)?;
    tracing::info!(url, "tracing: exporting spans over OTLP/HTTP");
    Ok(Some(Exporter { provider, traces_url: url }))
}

/// The SDK's view of a propagated context (remote: it came from another process).
pub fn span_context(t: &TraceContext) -> SpanContext {
    let state = t.state.as_deref().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.span_id),
        TraceFlags::new(t.flags),
        true,
        state,
    )
}

/// The context to propagate with `span` as the parent of what comes next.
pub fn trace_context(span: &SpanContext) -> TraceContext {
    let state = span.trace_state().header();
    TraceContext {
        trace_id: span.trace_id().to_bytes(),
        span_id: span.span_id().to_bytes(),
        flags: span.trace_flags().to_u8(),
        state: (!state.is_empty()).then_some(state),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_survives_the_sdk_and_back() {
        let t =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("a=1,b=2")).unwrap();
        let sc = span_context(&t);
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(trace_context(&sc), t);
    }

    #[test]
    fn no_endpoint_no_tracer() {
        assert!(init(&OtlpArgs::default(), "kvgate", vec![]).unwrap().is_none());
        assert!(tracer().is_none());
    }
}
