//! The worker protocol: what a frontend sends a worker and what it streams back.
//!
//! Invariant: these types are the whole contract between the frontend and an engine worker,
//! whatever carries them (in-process channels today, TCP frames in the distributed build).
//! Workers see token ids only; they never need a tokenizer to serve a request.

use serde::{Deserialize, Serialize};

/// One token id of the served model's vocabulary.
pub type TokenId = u32;

/// A worker instance id: unique per running engine worker, stable for its lifetime.
/// Archived (rkyv) as a little-endian u64 inside KV events.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq, Hash))]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// What a worker does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    /// Prefill and decode on the same worker.
    #[default]
    Aggregated,
    /// Prompt processing only (disaggregated serving).
    Prefill,
    /// Generation only (disaggregated serving).
    Decode,
}

/// Sampling parameters a worker honours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Maximum number of tokens to generate.
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    /// Makes the output deterministic; the worker derives one from the prompt when absent.
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens until `max_tokens`.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_tokens: 16, temperature: 1.0, top_p: 1.0, seed: None, ignore_eos: false }
    }
}

/// A generate request as a worker receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Frontend-assigned id, unique per frontend process; used in logs and cancellation.
    pub request_id: u64,
    pub token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
    /// Token ids that end generation (the model's eos ids), unless `ignore_eos`.
    pub eos_token_ids: Vec<TokenId>,
    /// This request's leg of a disaggregated request; `None` for a whole (aggregated) request.
    pub disagg: Option<DisaggLeg>,
    /// The trace this request is part of, its span id the parent of the worker's span (and the
    /// worker's span's, of the engine's): `None` when the frontend does not trace. Boxed: an
    /// untraced request carries one null pointer.
    #[serde(default)]
    pub trace: Option<Box<crate::contract::TraceContext>>,
}

/// One leg of a disaggregated request, paired with the other by a bootstrap `room` id unique
/// among the requests in flight. How the legs run is the prefill engine's [`DisaggStyle`]:
/// both at once (the mocker's push, SGLang's bootstrap room), or the prefill leg first with
/// what it hands over passed to the decode leg (vLLM's `kv_transfer_params`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisaggLeg {
    /// Compute the prompt (and sample the first token) and make its KV available to the
    /// decode leg as the engine does: the mocker pushes it, with the first token, to
    /// `bootstrap` (the decode worker's transfer address) and reports `Transferred`; SGLang
    /// holds it for the room at its own bootstrap server (`bootstrap` = its `host:port`);
    /// vLLM returns what the decode leg needs as a `Handoff`. Then `Finished`; no `Tokens`.
    /// The first `skip_blocks` full blocks are not sent: the decode worker holds them already.
    Prefill { room: u64, peer: WorkerId, skip_blocks: u32, bootstrap: Option<String> },
    /// Generate from the prompt's KV handed over by the prefill leg, without computing the
    /// prompt: wait for the room's push (mocker), pull it from the prefill worker's
    /// `bootstrap` server (SGLang), or take it as the prefill leg's `handoff` says (vLLM). The
    /// first `skip_blocks` blocks come from the worker's own cache (recomputed if evicted).
    Decode { room: u64, peer: WorkerId, skip_blocks: u32, bootstrap: Option<String>, handoff: Option<String> },
}

/// Why a worker stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An eos token was produced (the eos token itself is not part of the output).
    Eos,
    /// `max_tokens` was reached.
    Length,
    /// The request was cancelled (client gone).
    Cancelled,
}

/// One message of a worker's response stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerOutput {
    /// Sent once, before any token: how many prompt tokens were already cached on the worker,
    /// and how many it computed itself (0 on a decode leg: it received them; the rest of the
    /// prompt was cached or received).
    Started { cached_tokens: u32, computed_tokens: u32 },
    /// A prefill leg pushed its KV blocks to the decode worker (before its `Finished`).
    Transferred { blocks: u32, bytes: u64, micros: u64 },
    /// What a prefill leg hands to its decode leg (engine-specific, e.g. vLLM's
    /// `kv_transfer_params` as JSON), before its `Finished`.
    Handoff(String),
    /// Newly generated tokens, in order (usually one per decode step).
    Tokens(Vec<TokenId>),
    /// The last message of a successful stream.
    Finished { reason: FinishReason },
    /// The request failed; the stream ends here. The error says who is at fault and whether
    /// another worker could serve the request.
    Error(WorkerError),
}

/// Who caused a failure. It decides, in one place each, whether the frontend migrates the
/// request and which HTTP status the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// The request itself (too long for any worker, invalid for the engine): 400, never retried.
    Client,
    /// The worker or its engine (crashed, refused, timed out): another worker may serve it.
    Worker,
    /// The request plane between frontend and worker (connection lost).
    Transport,
}

impl Fault {
    /// The wire byte.
    pub fn code(self) -> u8 {
        match self {
            Fault::Client => 0,
            Fault::Worker => 1,
            Fault::Transport => 2,
        }
    }

    pub fn from_code(b: u8) -> Option<Self> {
        Some(match b {
            0 => Fault::Client,
            1 => Fault::Worker,
            2 => Fault::Transport,
            _ => return None,
        })
    }
}

/// A failed request, as data: who is at fault, whether a retry elsewhere can help, and what
/// happened (for the client and the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WorkerError {
    pub fault: Fault,
    /// Whether sending the request to another worker can succeed.
    pub retry: bool,
    pub message: String,
}

impl WorkerError {
    /// The request cannot succeed anywhere as it is.
    pub fn client(message: impl Into<String>) -> Self {
        Self { fault: Fault::Client, retry: false, message: message.into() }
    }

    /// This worker failed it; another may not.
    pub fn worker(message: impl Into<String>) -> Self {
        Self { fault: Fault::Worker, retry: true, message: message.into() }
    }

    /// The request plane lost it; another worker may serve it.
    pub fn transport(message: impl Into<String>) -> Self {
        Self { fault: Fault::Transport, retry: true, message: message.into() }
    }
}

/// A worker's load as it reports it (engine-side truth; the router also books its own view).
/// Published on the load plane ([`crate::planes::load`]) in [`crate::contract::codec`]'s
/// encoding. An engine that cannot tell its blocks or its pending prefill leaves the `*_known`
/// flag false, and the frontend keeps its own bookings for that quantity.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct LoadReport {
    pub active_blocks: u64,
    pub total_blocks: u64,
    pub waiting_requests: u64,
    pub running_requests: u64,
    pub prefill_tokens: u64,
    /// `active_blocks` is the engine's count (false: the engine does not say).
    #[serde(default)]
    pub blocks_known: bool,
    /// `prefill_tokens` is the engine's count (false: the engine does not say).
    #[serde(default)]
    pub prefill_known: bool,
}

/// Which engine a worker runs (registered in discovery; selects the engine's own flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum EngineKind {
    /// kvgate's simulated engine (no GPU).
    #[default]
    Mocker,
    /// A stock SGLang server (`/generate`, ZMQ KV events).
    Sglang,
    /// A stock vLLM server (`/inference/v1/generate`, ZMQ KV events).
    Vllm,
    /// llama.cpp's `llama-server` (`/completion` with token ids; no KV events).
    LlamaCpp,
    /// Any server taking token-id prompts on OpenAI's `/v1/completions` (no KV events).
    Openai,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Mocker => "mocker",
            EngineKind::Sglang => "sglang",
            EngineKind::Vllm => "vllm",
            EngineKind::LlamaCpp => "llama-cpp",
            EngineKind::Openai => "openai",
        }
    }
}

/// How the two legs of a disaggregated request run, as the engines require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DisaggStyle {
    /// Both legs at once; the prefill worker pushes the KV to the decode worker's advertised
    /// bootstrap address (the mocker, over kvgate's transfer plane).
    #[default]
    Push,
    /// Both legs at once, with the prefill worker's advertised bootstrap `host:port`; the decode
    /// worker pulls the KV from it (SGLang).
    Pull,
    /// The prefill leg first; its `Handoff` goes with the decode leg (vLLM).
    Sequential,
}

/// What a worker receives: the request and where to stream its outputs.
#[derive(Debug)]
pub struct WorkItem {
    pub request: GenerateRequest,
    /// Closed by the frontend when the client goes away: the worker must stop and free.
    pub reply: tokio::sync::mpsc::Sender<WorkerOutput>,
}
