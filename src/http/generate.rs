//! `/v1/chat/completions` and `/v1/completions`: bytes → typed request → validated request →
//! token ids → routed worker → response (one JSON body, or an SSE stream).

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::body::{json_response, Body};
use super::error::ApiError;
use super::stream::{GenEvent, Generation, Migrate, MigrateFuture, SseBody};
use super::{InflightGuard, ShardCtx};
use crate::frontend::{Frontend, ModelState};
use crate::openai::{ChatCompletionRequest, ChunkWriter, CompletionRequest, Prompt, ResponseKind, Validated};
use crate::protocol::{GenerateRequest, SamplingParams, TokenId, WorkerId};
use crate::router::{Candidate, LoadGuard, RouteDecision, RouteRequest};
use crate::transport::{RequestPlane, ResponseStream};

/// The header naming the worker that served a response.
pub const WORKER_HEADER: &str = "x-kvgate-worker";

/// An oversized body is read and discarded up to this many bytes before the 413 goes out, so
/// a client still sending it reads the error instead of a reset; past this, the connection
/// closes.
const MAX_DRAIN_BYTES: usize = 256 * 1024 * 1024;

/// Reads the whole body, refusing more than `limit` bytes with 413.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_none_or(|n| n <= limit as u64) {
        match Limited::new(&mut body, limit).collect().await {
            Ok(c) => return Ok(c.to_bytes()),
            Err(e) => {
                if let Ok(h) = e.downcast::<hyper::Error>() {
                    return Err(ApiError::BodyRead(*h));
                }
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
}

fn prepare<P>(fe: &Frontend<P>, kind: ResponseKind, body: &[u8]) -> Result<Prepared, ApiError> {
    let (validated, model, prompt) = match kind {
        ResponseKind::Chat => {
            let r: ChatCompletionRequest = serde_json::from_slice(body).map_err(ApiError::InvalidJson)?;
            let v = r.validate()?;
            let model = fe.model(&v.model).ok_or_else(|| ApiError::ModelNotFound(v.model.clone()))?;
            let ids = model.preprocessor.encode_chat(&r.messages, r.tools.as_ref())?;
            (v, model, ids)
        }
        ResponseKind::Completion => {
            let r: CompletionRequest = serde_json::from_slice(body).map_err(ApiError::InvalidJson)?;
            let v = r.validate()?;
            let model = fe.model(&v.model).ok_or_else(|| ApiError::ModelNotFound(v.model.clone()))?;
            let ids = match r.prompt {
                Prompt::Text(t) => model.preprocessor.encode(&t, true)?,
                Prompt::TextBatch(mut v) => model.preprocessor.encode(&v.swap_remove(0), true)?,
                Prompt::Tokens(ids) => check_ids(ids, model.preprocessor.vocab_size())?,
                Prompt::TokenBatch(mut v) => check_ids(v.swap_remove(0), model.preprocessor.vocab_size())?,
            };
            (v, model, ids)
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::Invalid(crate::openai::ValidationError {
            param: Some("prompt"),
            message: "the prompt tokenizes to nothing".into(),
        }));
    }
    if let Some(limit) = model.preprocessor.model_config().and_then(|c| c.max_position_embeddings) {
        if prompt.len() >= limit as usize {
            return Err(ApiError::PromptTooLong { prompt: prompt.len(), limit: limit as usize });
        }
    }
    Ok(Prepared { validated, model, prompt })
}

fn check_ids(ids: Vec<TokenId>, vocab: usize) -> Result<Vec<TokenId>, ApiError> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(&id) => Err(ApiError::TokenOutOfRange { id, vocab }),
        None => Ok(ids),
    }
}

fn route(
    shard: &ShardCtx,
    model: &ModelState,
    prompt: &[TokenId],
    exclude: impl Fn(WorkerId) -> bool,
    request_id: u64,
) -> Result<RouteDecision, ApiError> {
    let mut seq = shard.seq_scratch.borrow_mut();
    model.hasher.seq_hashes_into(prompt, &mut seq);
    let group = model.workers.load();
    let filtered: Vec<Candidate>;
    let candidates = if !group.candidates.iter().any(|c| exclude(c.id)) {
        &group.candidates[..]
    } else {
        filtered = group.candidates.iter().filter(|c| !exclude(c.id)).cloned().collect();
        &filtered[..]
    };
    if candidates.is_empty() {
        return Err(ApiError::NoWorkers(model.name.clone()));
    }
    let req = RouteRequest { seq_hashes: &seq[..], prompt_tokens: prompt.len() as u32, candidates, shard: shard.id };
    let decision =
        model.router.select(req, &mut *shard.rng.borrow_mut()).map_err(|_| ApiError::NoWorkers(model.name.clone()))?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        let block = model.hasher.block_size();
        let hit = (decision.overlap_blocks as usize * block) as f64 / prompt.len() as f64;
        let scores: Vec<String> = decision
            .scores
            .iter()
            .map(|s| format!("{}:overlap={} cost={:.3} cached={}", s.worker, s.overlap_blocks, s.cost, s.cached_blocks))
            .collect();
        tracing::debug!(
            request = format_args!("{request_id:x}"),
            model = %model.name,
            prompt_tokens = prompt.len(),
            prompt_blocks = seq.len(),
            chosen = %decision.worker,
            overlap_blocks = decision.overlap_blocks,
            cache_hit_rate = format_args!("{hit:.3}"),
            workers = %scores.join(" "),
            "route"
        );
    }
    Ok(decision)
}

/// Everything needed to send (or re-send) one request to a worker.
struct Dispatch<P> {
    fe: Arc<Frontend<P>>,
    shard: Rc<ShardCtx>,
    model: Arc<ModelState>,
    prompt: Rc<[TokenId]>,
    sampling: SamplingParams,
    request_id: u64,
    /// Workers that failed this request; never chosen again for it.
    failed: RefCell<Vec<WorkerId>>,
}

impl<P: RequestPlane> Dispatch<P> {
    /// Routes `prompt` and sends it, trying another worker (up to `attempts` in all) when the
    /// chosen one is unreachable.
    async fn send(
        &self,
        prompt: &[TokenId],
        max_tokens: u32,
        attempts: u32,
    ) -> Result<(ResponseStream, LoadGuard, WorkerId), ApiError> {
        let mut left = attempts.max(1);
        loop {
            let decision = {
                let failed = self.failed.borrow();
                let exclude = |w| failed.contains(&w) || self.fe.is_down(w);
                route(&self.shard, &self.model, prompt, exclude, self.request_id)?
            };
            let worker = decision.worker;
            let req = GenerateRequest {
                request_id: self.request_id,
                token_ids: prompt.to_vec(),
                sampling: SamplingParams { max_tokens, ..self.sampling.clone() },
                eos_token_ids: self.model.preprocessor.eos_token_ids().to_vec(),
            };
            match self.fe.plane.generate(worker, req).await {
                Ok(rx) => return Ok((rx, decision.guard, worker)),
                Err(e) => {
                    left -= 1;
                    self.failed.borrow_mut().push(worker);
                    self.fe.mark_down(worker);
                    if left == 0 {
                        return Err(ApiError::Transport(e));
                    }
                    tracing::warn!(request = format_args!("{:x}", self.request_id), worker = %worker, error = %e, "worker unreachable; trying another");
                }
            }
        }
    }
}

impl<P: RequestPlane> Migrate for Dispatch<P> {
    fn migrate(self: Rc<Self>, generated: Vec<TokenId>, failed: WorkerId) -> MigrateFuture {
        Box::pin(async move {
            self.failed.borrow_mut().push(failed);
            let mut tokens = Vec::with_capacity(self.prompt.len() + generated.len());
            tokens.extend_from_slice(&self.prompt);
            tokens.extend_from_slice(&generated);
            let remaining = self.sampling.max_tokens.saturating_sub(generated.len() as u32).max(1);
            self.send(&tokens, remaining, 1).await.map_err(|e| e.to_string())
        })
    }
}

/// Handles one generate request end to end.
pub async fn handle<P: RequestPlane>(
    fe: &Arc<Frontend<P>>,
    shard: &Rc<ShardCtx>,
    kind: ResponseKind,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let arrived = Instant::now();
    let inflight = InflightGuard::new(shard);
    let m = fe.metrics.shard(shard.id);
    m.requests.fetch_add(1, Relaxed);
    let body = read_body(req, fe.limits.max_body_bytes).await?;
    let p = prepare(fe, kind, &body)?;
    let request_id = shard.next_request_id();
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
    });
    let (rx, guard, worker) =
        dispatch.send(&dispatch.prompt.clone(), dispatch.sampling.max_tokens, migration_limit + 1).await?;
    m.routing_overhead.observe(arrived.elapsed());
    let decoder = p.model.preprocessor.decoder();
    let mut gen = Generation::new(
        rx,
        decoder,
        p.validated.stop.clone(),
        guard,
        prompt_tokens,
        arrived,
        fe.metrics.clone(),
        inflight,
    );
    if migration_limit > 0 {
        gen.enable_migration(dispatch, worker, migration_limit);
    }
    let writer = ChunkWriter::new(kind, request_id, &p.validated.model);
    let mut resp = if p.validated.stream {
        let mut r = Response::new(Body::Sse(Box::new(SseBody::new(gen, writer, p.validated.include_usage))));
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut text = String::new();
        let reason = loop {
            match poll_fn(|cx| gen.poll_event(cx)).await {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Finished(reason) => break reason,
                GenEvent::Failed(msg) => return Err(ApiError::Worker(msg)),
            }
        };
        json_response(writer.full_response(&text, reason, gen.usage()))
    };
    if let Ok(v) = HeaderValue::from_str(&worker.to_string()) {
        resp.headers_mut().insert(WORKER_HEADER, v);
    }
    Ok(resp)
}
