//! `/v1/chat/completions` and `/v1/completions`: bytes → typed request → validated request →
//! token ids → routed worker → response (one JSON body, or an SSE stream).

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::dispatch::Dispatch;
use super::offload::INLINE_MAX_BODY_BYTES;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use opentelemetry::KeyValue;

use super::stream::{GenEvent, Generation, Legs, SseBody};
use crate::contract::TokenId;
use crate::frontend::data::body::{json_response, Body};
use crate::frontend::data::error::ApiError;
use crate::frontend::data::{InflightGuard, ShardCtx};
use crate::frontend::{Frontend, ModelState};
use crate::openai::parse::{forced_prefill, Message, OutputParser, ParserSpec, PromptEnd};
use crate::openai::{
    ChatCompletionRequest, ChunkWriter, CompletionRequest, Prompt, ResponseKind, ToolChoice, Validated,
};
use crate::planes::request::RequestPlane;
use crate::preprocess::template::ChatExtras;
use crate::telemetry::request::RequestTrace;

/// The header naming the worker that served a response (its decode worker when disaggregated).
pub const WORKER_HEADER: &str = "x-kvgate-worker";
/// Disaggregated models: the worker that computed the prompt (the decode worker itself when it
/// prefilled locally).
pub const PREFILL_WORKER_HEADER: &str = "x-kvgate-prefill-worker";
/// Disaggregated models: the worker that generated the tokens.
pub const DECODE_WORKER_HEADER: &str = "x-kvgate-decode-worker";
/// Disaggregated models: `remote` (KV transferred from a prefill worker) or `local`.
pub const DISAGG_HEADER: &str = "x-kvgate-disagg";

/// An oversized body is read and discarded up to this many bytes before the 413 goes out, so
/// a client still sending it reads the error instead of a reset; past this, the connection
/// closes.
const MAX_DRAIN_BYTES: usize = 256 * 1024 * 1024;

/// A request body as it arrived, in chunks: joining a long one into one buffer (a copy of up to
/// `--max-body-bytes`) is left to whoever prepares it, off the shard when it is long.
#[derive(Default)]
pub(crate) struct BodyChunks {
    chunks: Vec<Bytes>,
    len: usize,
}

impl BodyChunks {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// One buffer (no copy when the body came in one chunk).
    pub(crate) fn into_bytes(mut self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.swap_remove(0),
            _ => {
                let mut v = Vec::with_capacity(self.len);
                self.chunks.iter().for_each(|c| v.extend_from_slice(c));
                Bytes::from(v)
            }
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes with 413.
pub(crate) async fn read_body(req: Request<Incoming>, limit: usize) -> Result<BodyChunks, ApiError> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_none_or(|n| n <= limit as u64) {
        let mut limited = Limited::new(&mut body, limit);
        let mut read = BodyChunks::default();
        loop {
            match limited.frame().await {
                None => return Ok(read),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        read.len += data.len();
                        read.chunks.push(data);
                    }
                }
                Some(Err(e)) => match e.downcast::<hyper::Error>() {
                    Ok(h) => return Err(ApiError::BodyRead(*h)),
                    Err(_) => break,
                },
            }
        }
    }
    let mut drained = 0usize;
    while drained < MAX_DRAIN_BYTES {
        match body.frame().await {
            Some(Ok(f)) => drained += f.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
    Err(ApiError::BodyTooLarge { limit })
}

/// A request parsed, validated and tokenized.
struct Prepared {
    validated: Validated,
    model: Arc<ModelState>,
    prompt: Vec<TokenId>,
    /// Chat requests whose output is parsed (reasoning, tool calls).
    parser: Option<OutputParser>,
}

/// A chat request's prompt and the parser of its output: the model's template renders the
/// messages with the tools it may call and the request's `chat_template_kwargs`; a forced
/// `tool_choice` starts the answer with the call ([`forced_prefill`]).
fn prepare_chat<P>(
    fe: &Frontend<P>,
    model: &ModelState,
    r: &ChatCompletionRequest,
    v: &Validated,
) -> Result<(Vec<TokenId>, Option<OutputParser>), ApiError> {
    let pre = &model.preprocessor;
    let (reasoning, tool_call) = fe.parsers.resolve(pre.chat_conventions());
    let offers_tools = v.tool_choice != ToolChoice::None;
    // `tool_choice: none`: the model is not shown the tools, so it answers in text.
    let extras =
        ChatExtras { tools: r.offered_tools().filter(|_| offers_tools), kwargs: r.chat_template_kwargs.as_ref() };
    let mut text = pre.render_chat_request(&r.messages, extras)?;
    let prompt_end = PromptEnd::of(&text);
    let tool_call = tool_call.filter(|_| offers_tools);
    let prefill =
        tool_call.map(|k| forced_prefill(k, &v.tool_choice, reasoning.is_some(), prompt_end)).unwrap_or_default();
    text.push_str(&prefill);
    refuse_unfit(model, &text)?;
    let ids = pre.encode_with(&text, false, fe.token_cache.as_deref())?;
    let spec = ParserSpec { reasoning, tool_call, prompt_end, prefill, id_seed: rand::random() };
    Ok((ids, OutputParser::new(spec)))
}

fn prepare<P>(fe: &Frontend<P>, kind: ResponseKind, body: &[u8]) -> Result<Prepared, ApiError> {
    let (validated, model, prompt, parser) = match kind {
        ResponseKind::Chat => {
            let r: ChatCompletionRequest = serde_json::from_slice(body).map_err(ApiError::InvalidJson)?;
            let v = r.validate()?;
            let model = fe.model(&v.model).ok_or_else(|| ApiError::ModelNotFound(v.model.clone()))?;
            let (ids, parser) = prepare_chat(fe, &model, &r, &v)?;
            (v, model, ids, parser)
        }
        ResponseKind::Completion => {
            let r: CompletionRequest = serde_json::from_slice(body).map_err(ApiError::InvalidJson)?;
            let v = r.validate()?;
            let model = fe.model(&v.model).ok_or_else(|| ApiError::ModelNotFound(v.model.clone()))?;
            let encode = |t: &str| -> Result<Vec<TokenId>, ApiError> {
                refuse_unfit(&model, t)?;
                Ok(model.preprocessor.encode_with(t, true, fe.token_cache.as_deref())?)
            };
            let ids = match r.prompt {
                Prompt::Text(t) => encode(&t)?,
                Prompt::TextBatch(mut v) => encode(&v.swap_remove(0))?,
                Prompt::Tokens(ids) => check_ids(ids, model.preprocessor.vocab_size(), "prompt")?,
                Prompt::TokenBatch(mut v) => check_ids(v.swap_remove(0), model.preprocessor.vocab_size(), "prompt")?,
            };
            (v, model, ids, None)
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::Invalid(crate::openai::ValidationError {
            param: Some("prompt".into()),
            message: "the prompt tokenizes to nothing".into(),
        }));
    }
    if let Some(limit) = context_limit(&model) {
        if prompt.len() >= limit {
            return Err(ApiError::PromptTooLong { prompt: prompt.len(), limit });
        }
    }
    Ok(Prepared { validated, model, prompt, parser })
}

/// The model's context in tokens, when its `config.json` says.
pub(crate) fn context_limit(model: &ModelState) -> Option<usize> {
    model.preprocessor.model_config().and_then(|c| c.max_position_embeddings).map(|l| l as usize)
}

/// Refuses, before encoding it, a prompt whose text has more tokens than the context holds by
/// a lower bound alone ([`crate::preprocess::budget`]); the same 400 as a counted prompt.
fn refuse_unfit(model: &ModelState, text: &str) -> Result<(), ApiError> {
    let Some(limit) = context_limit(model) else { return Ok(()) };
    let at_least = model.preprocessor.min_tokens(text);
    if at_least >= limit {
        return Err(ApiError::PromptCannotFit { bytes: text.len(), at_least, limit });
    }
    Ok(())
}

pub(crate) fn check_ids(ids: Vec<TokenId>, vocab: usize, param: &'static str) -> Result<Vec<TokenId>, ApiError> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(&id) => Err(ApiError::TokenOutOfRange { id, vocab, param }),
        None => Ok(ids),
    }
}

/// Handles one generate request end to end; traced when tracing is on ([`crate::telemetry`]).
pub async fn handle<P: RequestPlane>(
    fe: &Arc<Frontend<P>>,
    shard: &Rc<ShardCtx>,
    kind: ResponseKind,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let trace = RequestTrace::start(req.headers(), req.method().as_str(), req.uri().path());
    let result = Box::pin(serve(fe, shard, kind, req, &trace)).await;
    if let (Err(e), Some(t)) = (&result, &trace) {
        t.failed(e);
    }
    result
}

async fn serve<P: RequestPlane>(
    fe: &Arc<Frontend<P>>,
    shard: &Rc<ShardCtx>,
    kind: ResponseKind,
    req: Request<Incoming>,
    trace: &Option<Rc<RequestTrace>>,
) -> Result<Response<Body>, ApiError> {
    let arrived = Instant::now();
    let inflight = InflightGuard::new(shard);
    let m = fe.metrics.shard(shard.id);
    m.requests.fetch_add(1, Relaxed);
    let body = read_body(req, fe.limits.max_body_bytes).await?;
    // A long body is parsed, rendered and tokenized off the shard ([`super::offload`]).
    let small = body.len() <= INLINE_MAX_BODY_BYTES;
    let shared = fe.clone();
    let mut p = fe
        .prep_pool
        .run(small, move || prepare(&shared, kind, &body.into_bytes()))
        .await
        .map_err(ApiError::Offload)??;
    if let Some(t) = trace {
        t.next_phase("preprocess", || preprocess_attrs(&p, small));
    }
    // Every worker busy: wait in the shard's queue, or 503 ([`super::admission`]).
    let waited = super::admission::admit(fe, shard.id, &p.model, p.validated.priority).await?;
    let request_id = shard.next_request_id();
    if let Some(t) = trace {
        t.next_phase("admission", || vec![KeyValue::new("kvgate.admission.wait_ms", waited.as_secs_f64() * 1e3)]);
        t.set(|| {
            vec![
                KeyValue::new("kvgate.request_id", format!("{request_id:x}")),
                KeyValue::new("gen_ai.request.model", p.validated.model.clone()),
            ]
        });
    }
    let prompt_tokens = p.prompt.len() as u32;
    let migration_limit = fe.limits.migration_limit;
    let dispatch = Rc::new(Dispatch {
        fe: fe.clone(),
        shard: shard.clone(),
        model: p.model.clone(),
        prompt: Rc::from(p.prompt),
        sampling: p.validated.sampling.clone(),
        request_id,
        failed: RefCell::new(Vec::new()),
        trace: trace.clone(),
    });
    let sent = dispatch.send(&dispatch.prompt.clone(), dispatch.sampling.max_tokens, migration_limit + 1).await?;
    m.routing_overhead.observe(arrived.elapsed().saturating_sub(waited));
    let worker = sent.worker;
    let headers = legs_headers(worker, &sent.legs);
    let decoder = p.model.preprocessor.decoder();
    let mut gen =
        Generation::new(sent, decoder, p.validated.stop.clone(), prompt_tokens, arrived, fe.metrics.clone(), inflight);
    if migration_limit > 0 {
        gen.enable_migration(dispatch, worker, migration_limit);
    }
    if let Some(parser) = p.parser.take() {
        gen.set_parser(parser);
    }
    gen.set_trace(trace.clone());
    let writer = ChunkWriter::new(kind, request_id, &p.validated.model);
    let mut resp = if p.validated.stream {
        // The status is decided by the worker's first answer: a request that fails before its
        // first token (a prompt the workers cannot hold, no worker left) gets a real error
        // status, not a 200 with an error event.
        let first = match poll_fn(|cx| gen.poll_event(cx)).await {
            GenEvent::Failed(e) => return Err(e),
            first => first,
        };
        let body = SseBody::new(gen, writer, p.validated.include_usage, first);
        let mut r = Response::new(Body::Sse(Box::new(body)));
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut text = String::new();
        let mut parsed: Option<Message> = None;
        let reason = loop {
            match poll_fn(|cx| gen.poll_event(cx)).await {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Parsed(events) => {
                    let m = parsed.get_or_insert_with(Message::default);
                    events.into_iter().for_each(|e| m.apply(e));
                }
                GenEvent::Finished(reason) => break reason,
                GenEvent::Failed(e) => return Err(e),
            }
        };
        match parsed.or_else(|| gen.is_parsed().then(Message::default)) {
            Some(m) => json_response(writer.full_chat_response(
                &m,
                gen.parses_reasoning(),
                m.finish_reason(reason),
                gen.usage(),
            )),
            None => json_response(writer.full_response(&text, reason, gen.usage())),
        }
    };
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    Ok(resp)
}

/// What the preprocess span says: the model, the prompt's tokens, where it was prepared.
fn preprocess_attrs(p: &Prepared, small: bool) -> Vec<KeyValue> {
    vec![
        KeyValue::new("gen_ai.request.model", p.validated.model.clone()),
        KeyValue::new("gen_ai.usage.input_tokens", p.prompt.len() as i64),
        KeyValue::new("gen_ai.request.max_tokens", i64::from(p.validated.sampling.max_tokens)),
        KeyValue::new("kvgate.stream", p.validated.stream),
        KeyValue::new("kvgate.offloaded", !small),
    ]
}

/// The response headers naming the workers of a request.
fn legs_headers(worker: crate::contract::WorkerId, legs: &Legs) -> Vec<(&'static str, String)> {
    let w = worker.to_string();
    match legs {
        Legs::Whole => vec![(WORKER_HEADER, w)],
        Legs::Local => vec![
            (WORKER_HEADER, w.clone()),
            (PREFILL_WORKER_HEADER, w.clone()),
            (DECODE_WORKER_HEADER, w),
            (DISAGG_HEADER, "local".into()),
        ],
        Legs::Remote(leg) => vec![
            (WORKER_HEADER, w.clone()),
            (PREFILL_WORKER_HEADER, leg.worker.to_string()),
            (DECODE_WORKER_HEADER, w),
            (DISAGG_HEADER, "remote".into()),
        ],
    }
}
