//! vLLM-like continuous batching over the [`KvCache`]: which sequences compute how many tokens
//! in each engine step.
//!
//! Each step ([`Scheduler::schedule`]): running sequences first, in admission order, each takes
//! what it still needs (one token when decoding, a chunk when prefilling) from the step's token
//! budget; a sequence that cannot get blocks preempts the most recently admitted running one
//! (its blocks are freed but stay cached; it is requeued at the front and recomputed later).
//! Then, if nothing was preempted, waiting sequences are admitted in order while the budget,
//! `max_num_seqs` and free blocks allow; a long prompt is prefilled in chunks over several steps.
//! [`Scheduler::complete`] then commits the computed blocks and samples one token for every
//! sequence whose tokens are all computed.
//!
//! Invariants: every sequence is in exactly one of `waiting` / `running`; only running ones hold
//! blocks, besides finished ones kept by [`Scheduler::hold_on_finish`] (a prefill leg's KV while
//! it is transferred) until [`Scheduler::release`]; a request is never lost (it finishes, is cancelled, or is rejected at [`Scheduler::add`]
//! because it could never fit). A sequence alone always fits (`prompt + max_tokens ≤ capacity`),
//! so preemption always makes progress. Concurrency: owned by one worker task; no locks.

use std::collections::{HashMap, VecDeque};

use thiserror::Error;

use crate::contract::{FinishReason, GenerateRequest, LoadReport, TokenId};
use crate::kv::hash::BlockHasher;

use super::config::MockerConfig;
use super::kv_cache::{KvCache, SeqId};
use super::model::{MockModel, Sample};
use super::sequence::Sequence;
use super::timing::StepWork;

/// Why a request is refused before it is queued.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens is 0: nothing to generate")]
    NothingToGenerate,
    #[error(
        "prompt of {prompt} tokens plus max_tokens {max_tokens} exceeds this worker's KV cache of \
         {capacity} tokens; shorten the request or raise --num-gpu-blocks"
    )]
    TooLong { prompt: usize, max_tokens: u32, capacity: u64 },
}

impl From<Rejected> for crate::contract::WorkerError {
    /// Every refusal is about the request itself: no other worker of the same size would take
    /// it either (the frontend answers 400 at once instead of migrating).
    fn from(e: Rejected) -> Self {
        crate::contract::WorkerError::client(e.to_string())
    }
}

/// What [`Scheduler::add_imported`] made of an imported prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// The queued sequence; `None` when the first token already finished the request.
    pub seq: Option<SeqId>,
    /// The first token (sampled by the prefill worker; `None` is end of sequence).
    pub token: Option<TokenId>,
    pub finish: Option<FinishReason>,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedSeq {
    pub seq: SeqId,
    pub tokens: usize,
}

/// What one step computes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepPlan {
    pub entries: Vec<PlannedSeq>,
    /// Sizes the step for the timing model.
    pub work: StepWork,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a sequence produced in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOutput {
    pub seq: SeqId,
    /// Prompt tokens served from the cache at its first admission.
    pub cached_tokens: u32,
    /// Prompt tokens computed by this worker at its first admission (0 when imported).
    pub computed_tokens: u32,
    /// The generated token (`None` when end-of-sequence was sampled).
    pub token: Option<TokenId>,
    pub finish: Option<FinishReason>,
}

/// The engine's batch scheduler and the cache it allocates from.
pub struct Scheduler {
    cache: KvCache,
    hasher: BlockHasher,
    model: MockModel,
    budget: usize,
    max_running: usize,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    next_id: u64,
    preemptions: u64,
    /// Sequences whose blocks outlive their finish until [`Scheduler::release`] (prefill legs:
    /// their KV is being transferred).
    hold: std::collections::HashSet<SeqId>,
    /// Finished sequences still holding their blocks.
    held: usize,
}

impl Scheduler {
    /// `salt` makes the worker's engine hashes (non-zero).
    pub fn new(config: &MockerConfig, salt: u64, model: MockModel) -> Self {
        let page = config.page_size as usize;
        Self {
            cache: KvCache::new(page, config.num_gpu_blocks, salt),
            hasher: BlockHasher::new(page),
            model,
            budget: config.max_num_batched_tokens as usize,
            max_running: config.max_num_seqs as usize,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            preemptions: 0,
            hold: Default::default(),
            held: 0,
        }
    }

    /// Queues a request (its prompt is hashed once here).
    pub fn add(&mut self, request: GenerateRequest) -> Result<SeqId, Rejected> {
        self.check(&request)?;
        let generation = self.model.start(&request.token_ids, &request.sampling);
        let seq = Sequence::new(&self.hasher, request.token_ids, generation, request.eos_token_ids);
        Ok(self.queue(seq, false))
    }

    fn check(&self, request: &GenerateRequest) -> Result<(), Rejected> {
        let prompt = request.token_ids.len();
        let max_tokens = request.sampling.max_tokens;
        if prompt == 0 {
            return Err(Rejected::EmptyPrompt);
        }
        if max_tokens == 0 {
            return Err(Rejected::NothingToGenerate);
        }
        let capacity = self.cache.capacity() * self.cache.page_size() as u64;
        if prompt as u64 + u64::from(max_tokens) > capacity {
            return Err(Rejected::TooLong { prompt, max_tokens, capacity });
        }
        Ok(())
    }

    fn queue(&mut self, seq: Sequence, front: bool) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, seq);
        if front {
            self.waiting.push_front(id);
        } else {
            self.waiting.push_back(id);
        }
        id
    }

    /// Queues a disaggregated decode whose prompt KV arrived from a prefill worker: the first
    /// token was sampled there, so the sequence starts decoding (its prompt is admitted as
    /// computed, not recomputed). Returns the first token (`None`: end of sequence) and whether
    /// the request is already finished, in which case nothing is queued (`SeqId` is `None`).
    /// `skip_tokens` leading prompt tokens were not sent: they must be in this worker's cache.
    pub fn add_imported(&mut self, request: GenerateRequest, skip_tokens: usize) -> Result<Imported, Rejected> {
        self.check(&request)?;
        let mut generation = self.model.start(&request.token_ids, &request.sampling);
        let first = self.model.sample(&mut generation, &request.eos_token_ids).expect("a new generation samples");
        let finish = generation.finished(first);
        let token = match first {
            Sample::Token(t) => Some(t),
            Sample::Eos => None,
        };
        if finish.is_some() {
            return Ok(Imported { seq: None, token, finish });
        }
        let prompt = request.token_ids.len();
        let mut seq = Sequence::new(&self.hasher, request.token_ids, generation, request.eos_token_ids);
        if let Some(t) = token {
            seq.push(&self.hasher, t);
        }
        seq.imported = Some(skip_tokens.min(prompt)..prompt);
        seq.cached_tokens = Some(0);
        // Ahead of queued prompts: its KV is here, and holding it waiting wastes the transfer.
        Ok(Imported { seq: Some(self.queue(seq, true)), token, finish })
    }

    /// Keeps `id`'s blocks held after it finishes, until [`Self::release`].
    pub fn hold_on_finish(&mut self, id: SeqId) {
        self.hold.insert(id);
    }

    /// Frees the blocks of a finished sequence kept by [`Self::hold_on_finish`] (they stay
    /// cached, evictable).
    pub fn release(&mut self, id: SeqId) {
        self.cache.free(id);
        self.held = self.held.saturating_sub(1);
    }

    /// Finished sequences whose blocks are still held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Drops a sequence wherever it is; its blocks stay cached (evictable). False if unknown.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        self.hold.remove(&id);
        if self.seqs.remove(&id).is_none() {
            return false;
        }
        self.cache.free(id);
        self.running.retain(|s| *s != id);
        self.waiting.retain(|s| *s != id);
        true
    }

    /// No sequence is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Sequences waiting plus running.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The engine's load; `prefill_tokens` counts tokens still to compute before each
    /// sequence's next sample (for a waiting one, before its cache hits are known).
    pub fn load(&self) -> LoadReport {
        let prefill: usize = self.seqs.values().filter(|s| !s.is_decoding()).map(Sequence::remaining).sum();
        LoadReport {
            active_blocks: self.cache.active_blocks(),
            total_blocks: self.cache.capacity(),
            waiting_requests: self.waiting.len() as u64,
            running_requests: self.running.len() as u64,
            prefill_tokens: prefill as u64,
            blocks_known: true,
            prefill_known: true,
        }
    }

    /// Decides the next step and reserves its blocks (preempting if needed).
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.budget;
        let preempted = self.schedule_running(&mut plan, &mut budget);
        if !preempted {
            self.admit_waiting(&mut plan, &mut budget);
        }
        plan.work.kv_usage = self.cache.usage();
        plan
    }

    /// Returns whether anything was preempted.
    fn schedule_running(&mut self, plan: &mut StepPlan, budget: &mut usize) -> bool {
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let tokens = seq.remaining().min(*budget);
            let (target, decoding) = (seq.computed + tokens, seq.is_decoding());
            while self.cache.reserve(id, target).is_err() {
                let victim = self.running.pop().expect("the sequence itself is running");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    return true;
                }
            }
            record(plan, PlannedSeq { seq: id, tokens }, decoding);
            *budget -= tokens;
            i += 1;
        }
        preempted
    }

    fn admit_waiting(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        let page = self.cache.page_size();
        while *budget > 0 && self.running.len() < self.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
            // At least one token is computed, so a fully cached prompt still yields a sample.
            let max_hits = (seq.num_tokens() - 1) / page;
            let hits = self.cache.prefix_hits(&seq.hashes()[..max_hits]);
            // An imported prompt's KV is all here (received, or cached before the received
            // range): only the tokens after it are computed.
            let start = match seq.imported.clone() {
                Some(r) if hits * page >= r.start => r.end.max(hits * page),
                Some(r) => {
                    tracing::warn!(
                        recompute = r.end - hits * page,
                        "the cached prefix of an imported prompt was evicted: recomputing it locally"
                    );
                    seq.imported = None;
                    seq.cached_tokens = Some((hits * page) as u32);
                    hits * page
                }
                None => hits * page,
            };
            let tokens = (seq.num_tokens() - start).min(*budget);
            let partial = ((start + tokens).div_ceil(page) - hits) as u64;
            if self.cache.admit(id, &seq.hashes()[..hits], partial).is_err() {
                break;
            }
            seq.computed = start;
            seq.cached_tokens.get_or_insert(start as u32);
            let decoding = seq.is_decoding();
            self.waiting.pop_front();
            self.running.push(id);
            record(plan, PlannedSeq { seq: id, tokens }, decoding);
            *budget -= tokens;
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.cache.free(id);
        let seq = self.seqs.get_mut(&id).expect("running sequences exist");
        seq.computed = 0;
        seq.imported = None;
        self.waiting.push_front(id);
        self.preemptions += 1;
        tracing::debug!(seq = id.0, "preempted: out of KV blocks, will recompute");
    }

    /// Applies a finished step: commits the blocks it computed, samples, and retires finished
    /// sequences (their blocks stay cached). Outputs are appended to `out` in plan order.
    pub fn complete(&mut self, plan: &StepPlan, out: &mut Vec<StepOutput>) {
        let mut finished = Vec::new();
        for e in &plan.entries {
            // Cancelled since it was planned: its blocks are already released.
            let Some(seq) = self.seqs.get_mut(&e.seq) else {
                continue;
            };
            seq.computed += e.tokens;
            debug_assert!(seq.computed <= seq.num_tokens());
            self.cache.commit(e.seq, &seq.hashes()[..seq.computed / self.hasher.block_size()]);
            if seq.remaining() > 0 {
                continue; // a prefill chunk: no sample yet
            }
            let sample =
                self.model.sample(&mut seq.generation, &seq.eos_ids).expect("running sequences are unfinished");
            let token = match sample {
                Sample::Token(t) => {
                    seq.push(&self.hasher, t);
                    Some(t)
                }
                Sample::Eos => None,
            };
            let finish = seq.generation.finished(sample);
            let cached_tokens = seq.cached_tokens.unwrap_or(0);
            let computed_tokens = if seq.imported.is_some() { 0 } else { seq.computed_prompt_tokens() };
            out.push(StepOutput { seq: e.seq, cached_tokens, computed_tokens, token, finish });
            if finish.is_some() {
                finished.push(e.seq);
            }
        }
        for id in finished {
            if self.hold.remove(&id) {
                // Out of the scheduler, its blocks still referenced until released.
                self.seqs.remove(&id);
                self.running.retain(|s| *s != id);
                self.held += 1;
            } else {
                self.cancel(id);
            }
        }
    }
}

fn record(plan: &mut StepPlan, entry: PlannedSeq, decoding: bool) {
    if decoding {
        plan.work.decode_seqs += 1;
    } else {
        plan.work.prefill_tokens += entry.tokens as u64;
    }
    plan.entries.push(entry);
}

#[cfg(test)]
mod tests;
