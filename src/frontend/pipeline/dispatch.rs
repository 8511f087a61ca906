//! Sending a request to workers: routing, disaggregation, retries on unreachable workers.
//!
//! A model with prefill and decode workers runs disaggregated: the decode worker is chosen by
//! load alone (its router has overlap weight 0), then — unless conditional disaggregation keeps
//! the prefill on it ([`DisaggPolicy`](crate::frontend::DisaggPolicy)) — the prefill worker by
//! KV cost among prefill workers. How the legs run is the prefill engine's
//! [`DisaggStyle`]: at once with one bootstrap room id (the decode leg first, as it waits for
//! the KV), the mocker's prefill worker pushing to the decode worker's transfer address or
//! SGLang's decode worker pulling from the prefill worker's bootstrap server; or one after the
//! other (vLLM): the prefill leg runs to its end and its handoff goes with the decode leg. Otherwise
//! the request goes whole to one worker (aggregated workers, plus decode workers, which
//! prefill locally), unless `--enforce-disagg`.
//!
//! Invariants: every [`Dispatched`] holds a booking ([`LoadGuard`](crate::router::LoadGuard)) for each leg it started;
//! a leg that cannot be sent drops the other (cancelling it on its worker). A worker that
//! could not be reached is never chosen again for the request and leaves routing for a while.
//! Approximate mode: a request sent to a worker whose cache is predicted (no KV events) queues
//! its prompt's blocks for the control plane once the send succeeded ([`Frontend::predict`]);
//! the hashes are copied while planning, since the shard's scratch is reused across awaits.
//! The routing debug log says `approx=true` when the chosen worker is approximate.
//!
//! Concurrency: runs on the request's shard; routing decisions are synchronous (the shard's
//! scratch buffers are borrowed only between awaits).

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use rand::Rng;

use super::stream::{Dispatched, Legs, Migrate, MigrateFuture, PrefillLeg};
use crate::contract::{
    DisaggLeg, DisaggStyle, GenerateRequest, SamplingParams, Target, TokenId, WorkerError, WorkerId, WorkerOutput,
};
use crate::frontend::data::error::ApiError;
use crate::frontend::data::ShardCtx;
use crate::frontend::{dashboard, Frontend, ModelState, Prediction, WorkerGroup};
use crate::kv::index::OverlapScores;
use crate::kv::SeqHash;
use crate::planes::request::ResponseStream;
use crate::telemetry::request::{RequestTrace, Routed};

/// Outputs a finished sequential prefill leg reports (`Started`, `Transferred`, `Finished`).
const PREFILL_REPORT_DEPTH: usize = 4;

/// What a sequential prefill leg left: its handoff for the decode leg, its report.
struct Handed {
    handoff: Option<String>,
    report: ResponseStream,
}
use crate::planes::request::RequestPlane;
use crate::router::quality::Recorder;
use crate::router::{Candidate, RouteDecision, RouteRequest, Router};

/// Picks a worker among `candidates` with `router`, logging the decision at debug level.
/// `overlaps`: the index lookup of `seq`, if already made. KV-routed legs (`whole`, `prefill`)
/// have their overlap regret recorded by `quality` ([`crate::router::quality`]); the decode
/// leg, chosen by load alone, does not.
#[allow(clippy::too_many_arguments)]
fn route_among(
    quality: Recorder<'_>,
    shard: &ShardCtx,
    model: &ModelState,
    group: &WorkerGroup,
    router: &Router,
    candidates: &[Candidate],
    seq: &[SeqHash],
    overlaps: Option<&OverlapScores>,
    prompt_tokens: usize,
    request_id: u64,
    leg: &'static str,
) -> Result<RouteDecision, ApiError> {
    let req =
        RouteRequest { seq_hashes: seq, prompt_tokens: prompt_tokens as u32, candidates, shard: shard.id, overlaps };
    let kv_routed = leg != "decode";
    let loads = if kv_routed { quality.loads_before(candidates) } else { None };
    let decision =
        router.select(req, &mut *shard.rng.borrow_mut()).map_err(|_| ApiError::NoWorkers(model.name.clone()))?;
    let q = kv_routed.then(|| {
        let (per, q) = quality.assess(router, &decision, candidates, seq, overlaps);
        quality.log(&model.name, leg, request_id, prompt_tokens, seq, &decision, candidates, &per, loads, q);
        q
    });
    if tracing::enabled!(tracing::Level::DEBUG) {
        let block = model.hasher.block_size();
        let hit = (decision.overlap_blocks as usize * block) as f64 / prompt_tokens.max(1) as f64;
        let scores: Vec<String> = decision
            .scores
            .iter()
            .map(|s| {
                let (w, o, c, n) = (s.worker, s.overlap_blocks, s.cost, s.cached_blocks);
                format!("{w}:overlap={o} cost={c:.3} cached={n} index={}", group.kv_state(w))
            })
            .collect();
        tracing::debug!(
            request = format_args!("{request_id:x}"),
            model = %model.name,
            leg,
            prompt_tokens,
            prompt_blocks = seq.len(),
            chosen = %decision.worker,
            overlap_blocks = decision.overlap_blocks,
            chosen_overlap_blocks = q.map(|q| q.chosen_overlap_blocks),
            best_overlap_blocks = q.map(|q| q.best_overlap_blocks),
            regret_blocks = q.map(|q| q.regret_blocks()),
            cache_hit_rate = format_args!("{hit:.3}"),
            workers = %scores.join(" "),
            approx = group.is_approximate(decision.worker),
            index = group.kv_state(decision.worker),
            "route"
        );
    }
    let block = model.hasher.block_size();
    model.recent.record(shard.id, || dashboard::decision(request_id, leg, &decision, group, prompt_tokens, block));
    Ok(decision)
}

/// What to send where.
enum Plan {
    /// The whole request to one worker (`local`: a decode worker prefilling itself).
    Whole { decision: RouteDecision, local: bool, to: Target, predicted: Option<Prediction> },
    /// Prefill and decode legs, run as `style` says; `bootstrap` goes with the legs that need
    /// it (the decode worker's transfer address on the prefill leg for a push, the prefill
    /// worker's bootstrap server on both for a pull).
    Split {
        prefill: RouteDecision,
        decode: RouteDecision,
        /// Where the prefill and the decode leg go.
        targets: (Target, Target),
        style: DisaggStyle,
        bootstrap: Option<Arc<str>>,
        skip_blocks: u32,
        /// Approximate workers' predicted blocks (both legs' workers hold the prompt's KV).
        predicted: Vec<Prediction>,
    },
}

/// `worker`'s prediction of blocks `seq` when its cache is predicted (approximate mode).
fn prediction(group: &WorkerGroup, worker: WorkerId, seq: &[SeqHash]) -> Option<Prediction> {
    (group.is_approximate(worker) && !seq.is_empty()).then(|| Prediction::of(worker, seq))
}

/// Everything needed to send (or re-send) one request to workers.
pub struct Dispatch<P> {
    pub fe: Arc<Frontend<P>>,
    pub shard: Rc<ShardCtx>,
    pub model: Arc<ModelState>,
    pub prompt: Rc<[TokenId]>,
    pub sampling: SamplingParams,
    pub request_id: u64,
    /// Workers that failed this request; never chosen again for it.
    pub failed: RefCell<Vec<WorkerId>>,
    /// The request's spans, when traced: a route span per leg routed, a dispatch span per send.
    pub trace: Option<Rc<RequestTrace>>,
}

impl<P: RequestPlane> Dispatch<P> {
    /// Where this shard records routing decision quality.
    fn quality(&self) -> Recorder<'_> {
        Recorder {
            index: &self.fe.index,
            metrics: &self.fe.metrics.shard(self.shard.id).routing_regret,
            log: self.fe.decision_log.as_deref(),
        }
    }

    /// `workers` without those that failed this request or are down: borrowed (no allocation)
    /// in the usual case where none is excluded.
    fn filter<'a>(&self, group: &WorkerGroup, workers: &'a [Candidate]) -> Cow<'a, [Candidate]> {
        let failed = self.failed.borrow();
        let keep = |c: &Candidate| !failed.contains(&c.id) && !group.is_down(c.id);
        if workers.iter().all(keep) {
            Cow::Borrowed(workers)
        } else {
            Cow::Owned(workers.iter().filter(|c| keep(c)).cloned().collect())
        }
    }

    /// Decides where `prompt` goes (synchronous: no await while the scratch is borrowed).
    fn plan(&self, prompt: &[TokenId]) -> Result<Plan, ApiError> {
        let group = self.model.workers.load();
        let policy = &self.fe.limits.disagg;
        let mut seq = self.shard.seq_scratch.borrow_mut();
        self.model.hasher.seq_hashes_into(prompt, &mut seq);
        let (prefill, decode) = (self.filter(&group, &group.prefill), self.filter(&group, &group.decode));
        if !prefill.is_empty() && !decode.is_empty() {
            let (model, id) = (&self.model, self.request_id);
            let d = route_among(
                self.quality(),
                &self.shard,
                model,
                &group,
                &model.decode_router,
                &decode,
                &seq,
                None,
                prompt.len(),
                id,
                "decode",
            )?;
            // One index lookup serves both: blocks the decode worker holds already are not sent
            // again, and the prefill worker is chosen by its overlap.
            let overlaps = self.fe.index.find_matches(&seq);
            let skip_blocks = overlaps.overlap(d.worker);
            let cached = (skip_blocks as usize * model.hasher.block_size()).min(prompt.len());
            if policy.prefill_locally(prompt.len() as u32, cached as u32) {
                let predicted = prediction(&group, d.worker, &seq);
                return Ok(Plan::Whole { to: group.target(d.worker), decision: d, local: true, predicted });
            }
            let p = route_among(
                self.quality(),
                &self.shard,
                model,
                &group,
                &model.router,
                &prefill,
                &seq,
                Some(&overlaps),
                prompt.len(),
                id,
                "prefill",
            )?;
            let style = group.peer(p.worker).style;
            let bootstrap = match style {
                DisaggStyle::Push => group.peer(d.worker).bootstrap,
                DisaggStyle::Pull => group.peer(p.worker).bootstrap,
                DisaggStyle::Sequential => None,
            };
            if bootstrap.is_none() && style != DisaggStyle::Sequential {
                let (who, worker) =
                    if style == DisaggStyle::Push { ("decode", d.worker) } else { ("prefill", p.worker) };
                tracing::warn!(%worker, "{who} worker advertises no bootstrap address; prefilling on the decode worker");
                let predicted = prediction(&group, d.worker, &seq);
                return Ok(Plan::Whole { to: group.target(d.worker), decision: d, local: true, predicted });
            }
            let targets = (group.target(p.worker), group.target(d.worker));
            let predicted = [p.worker, d.worker].into_iter().filter_map(|w| prediction(&group, w, &seq)).collect();
            return Ok(Plan::Split { prefill: p, decode: d, targets, style, bootstrap, skip_blocks, predicted });
        }
        if policy.enforce {
            let missing = if prefill.is_empty() { "prefill" } else { "decode" };
            return Err(ApiError::DisaggUnavailable(self.model.name.clone(), missing));
        }
        let whole = self.filter(&group, &group.candidates);
        if whole.is_empty() {
            return Err(ApiError::NoWorkers(self.model.name.clone()));
        }
        let decision = route_among(
            self.quality(),
            &self.shard,
            &self.model,
            &group,
            &self.model.router,
            &whole,
            &seq,
            None,
            prompt.len(),
            self.request_id,
            "whole",
        )?;
        let local = group.decode.iter().any(|c| c.id == decision.worker);
        let predicted = prediction(&group, decision.worker, &seq);
        Ok(Plan::Whole { to: group.target(decision.worker), decision, local, predicted })
    }

    fn request(&self, prompt: &[TokenId], max_tokens: u32, disagg: Option<DisaggLeg>) -> GenerateRequest {
        GenerateRequest {
            request_id: self.request_id,
            token_ids: prompt.to_vec(),
            sampling: SamplingParams { max_tokens, ..self.sampling.clone() },
            eos_token_ids: self.model.preprocessor.eos_token_ids().to_vec(),
            disagg,
            trace: self.trace.as_ref().and_then(|t| t.dispatch_context()),
        }
    }

    /// Records where `plan` (made since `started`) sends the request: its route spans, and a
    /// new dispatch span whose context the legs carry.
    fn trace_plan(&self, t: &RequestTrace, started: SystemTime, plan: &Plan) {
        if !t.recording() {
            // Sampled out: the legs still carry the context (unsampled), nothing is recorded.
            return t.dispatching(&[]);
        }
        let group = self.model.workers.load();
        let routed = |leg, decision: &RouteDecision, router: &Router, pool: &[Candidate]| {
            let candidates = if decision.scores.is_empty() { pool.len() } else { decision.scores.len() };
            let (mode, approx) = (router.config().mode, group.is_approximate(decision.worker));
            t.routed(Routed { leg, decision, candidates, mode, approx, started });
        };
        match plan {
            Plan::Whole { decision, local, .. } => {
                let (leg, pool) = if *local { ("local", &group.decode) } else { ("whole", &group.candidates) };
                let router = if *local { &self.model.decode_router } else { &self.model.router };
                routed(leg, decision, router, pool);
                t.dispatching(&[("kvgate.worker", decision.worker)]);
            }
            Plan::Split { prefill, decode, .. } => {
                routed("decode", decode, &self.model.decode_router, &group.decode);
                routed("prefill", prefill, &self.model.router, &group.prefill);
                t.dispatching(&[("kvgate.prefill_worker", prefill.worker), ("kvgate.decode_worker", decode.worker)]);
            }
        }
    }

    /// Runs a sequential prefill leg to its end: what it hands over, and a stream that replays
    /// its report (`Started`, `Transferred`) for the generation's accounting.
    async fn run_prefill(
        &self,
        to: Target,
        prompt: &[TokenId],
        max_tokens: u32,
        leg: DisaggLeg,
    ) -> Result<Handed, WorkerError> {
        let mut rx = self
            .fe
            .plane
            .generate(to, self.request(prompt, max_tokens, Some(leg)))
            .await
            .map_err(|e| WorkerError::transport(e.to_string()))?;
        let (tx, report) = tokio::sync::mpsc::channel(PREFILL_REPORT_DEPTH);
        let mut handoff = None;
        loop {
            match rx.recv().await {
                Some(o @ (WorkerOutput::Started { .. } | WorkerOutput::Transferred { .. })) => {
                    let _ = tx.try_send(o);
                }
                Some(WorkerOutput::Handoff(h)) => handoff = Some(h),
                Some(WorkerOutput::Tokens(_)) => {}
                Some(o @ WorkerOutput::Finished { .. }) => {
                    let _ = tx.try_send(o);
                    return Ok(Handed { handoff, report });
                }
                Some(WorkerOutput::Error(mut e)) => {
                    e.message = format!("the prefill worker failed: {}", e.message);
                    return Err(e);
                }
                None => return Err(WorkerError::transport("the prefill worker's stream ended before it finished")),
            }
        }
    }

    /// Router replica sync: tells the other frontends that `workers` were sent `prompt`
    /// (hashed again here: the plan's hashes live in the shard's scratch, reused across awaits).
    fn sync(&self, workers: &[WorkerId], prompt: &[TokenId]) {
        let Some(r) = &self.fe.replica else { return };
        let mut seq = self.shard.seq_scratch.borrow_mut();
        self.model.hasher.seq_hashes_into(prompt, &mut seq);
        if !seq.is_empty() {
            for &w in workers {
                r.decided(crate::planes::replica::Decision::of(w, &self.model.name, &seq));
            }
        }
    }

    /// A worker could not be reached: never again for this request, and out of routing for now.
    fn unreachable(&self, worker: WorkerId, left: &mut u32, e: impl std::fmt::Display) -> bool {
        *left -= 1;
        self.failed.borrow_mut().push(worker);
        self.model.workers.load().mark_down(worker);
        if *left > 0 {
            tracing::warn!(request = format_args!("{:x}", self.request_id), worker = %worker, error = %e, "worker unreachable; trying another");
        }
        *left > 0
    }

    /// Routes `prompt` and sends it, trying other workers (up to `attempts` in all) when a
    /// chosen one is unreachable.
    pub async fn send(&self, prompt: &[TokenId], max_tokens: u32, attempts: u32) -> Result<Dispatched, ApiError> {
        let mut left = attempts.max(1);
        let m = self.fe.metrics.shard(self.shard.id);
        loop {
            let started = self.trace.as_ref().map(|_| SystemTime::now());
            let plan = self.plan(prompt)?;
            if let (Some(t), Some(started)) = (&self.trace, started) {
                self.trace_plan(t, started, &plan);
            }
            match plan {
                Plan::Whole { decision, local, to, predicted } => {
                    let worker = decision.worker;
                    match self.fe.plane.generate(to, self.request(prompt, max_tokens, None)).await {
                        Ok(rx) => {
                            if let Some(p) = predicted {
                                self.fe.predict(self.shard.id, p);
                            }
                            self.sync(&[worker], prompt);
                            if local {
                                m.disagg_local.fetch_add(1, Relaxed);
                            }
                            let legs = if local { Legs::Local } else { Legs::Whole };
                            return Ok(Dispatched { rx, guard: decision.guard, worker, legs });
                        }
                        Err(e) if self.unreachable(worker, &mut left, &e) => continue,
                        Err(e) => return Err(ApiError::Transport(e)),
                    }
                }
                Plan::Split { prefill, decode, targets: (p_to, d_to), style, bootstrap, skip_blocks, predicted } => {
                    // A 63-bit room, as SGLang draws its own (it travels as a signed integer).
                    let room: u64 = self.shard.rng.borrow_mut().random::<u64>() >> 1;
                    let (p, d) = (prefill.worker, decode.worker);
                    let bootstrap = bootstrap.map(|b| b.to_string());
                    let (rx, prefill_rx) = if style == DisaggStyle::Sequential {
                        let prefill_leg = DisaggLeg::Prefill { room, peer: d, skip_blocks, bootstrap: None };
                        let handed = match self.run_prefill(p_to, prompt, max_tokens, prefill_leg).await {
                            Ok(h) => h,
                            Err(e) if e.retry && self.unreachable(p, &mut left, &e) => continue,
                            Err(e) => return Err(ApiError::Worker(e)),
                        };
                        let decode_leg =
                            DisaggLeg::Decode { room, peer: p, skip_blocks, bootstrap: None, handoff: handed.handoff };
                        match self.fe.plane.generate(d_to, self.request(prompt, max_tokens, Some(decode_leg))).await {
                            Ok(rx) => (rx, handed.report),
                            Err(e) if self.unreachable(d, &mut left, &e) => continue,
                            Err(e) => return Err(ApiError::Transport(e)),
                        }
                    } else {
                        let (to_decode, to_prefill) = match style {
                            DisaggStyle::Push => (None, bootstrap),
                            _ => (bootstrap.clone(), bootstrap),
                        };
                        let decode_leg =
                            DisaggLeg::Decode { room, peer: p, skip_blocks, bootstrap: to_decode, handoff: None };
                        let rx = match self
                            .fe
                            .plane
                            .generate(d_to, self.request(prompt, max_tokens, Some(decode_leg)))
                            .await
                        {
                            Ok(rx) => rx,
                            Err(e) if self.unreachable(d, &mut left, &e) => continue,
                            Err(e) => return Err(ApiError::Transport(e)),
                        };
                        let prefill_leg = DisaggLeg::Prefill { room, peer: d, skip_blocks, bootstrap: to_prefill };
                        // Dropping `rx` on failure cancels the decode leg.
                        match self.fe.plane.generate(p_to, self.request(prompt, max_tokens, Some(prefill_leg))).await {
                            Ok(prx) => (rx, prx),
                            Err(e) if self.unreachable(p, &mut left, &e) => continue,
                            Err(e) => return Err(ApiError::Transport(e)),
                        }
                    };
                    tracing::debug!(
                        request = format_args!("{:x}", self.request_id),
                        room = format_args!("{room:x}"),
                        prefill_worker = %p,
                        decode_worker = %d,
                        skip_blocks,
                        style = ?style,
                        "disaggregated: both legs sent"
                    );
                    m.disagg_remote.fetch_add(1, Relaxed);
                    for p in predicted {
                        self.fe.predict(self.shard.id, p);
                    }
                    self.sync(&[p, d], prompt);
                    // The decode worker computes no prompt: only its decode blocks stay booked.
                    let mut guard = decode.guard;
                    guard.prefill_done();
                    let leg = PrefillLeg { rx: prefill_rx, guard: prefill.guard, worker: p };
                    return Ok(Dispatched { rx, guard, worker: d, legs: Legs::Remote(leg) });
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
            self.send(&tokens, remaining, 1).await
        })
    }
}
