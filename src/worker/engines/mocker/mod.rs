//! The mocker: a simulated LLM engine with a paged KV cache, prefix caching, LRU eviction,
//! continuous batching with chunked prefill and preemption, and a step-time model — no GPU.
//!
//! Layout (data structures apart from the task that drives them):
//! - [`config`]: flags and their validation.
//! - [`kv_cache`]: blocks, prefix sharing, eviction, the KV events they cause.
//! - [`sequence`]: one request's tokens and block hashes.
//! - [`scheduler`]: which sequences compute what in each step.
//! - [`model`]: the deterministic mock language model.
//! - [`timing`]: how long a step takes.
//! - [`disagg`]: prefill legs that push their KV, decode legs that wait for it.
//! - [`transfer`]: the worker's part of kvgate's KV transfer plane, by role.
//! - [`engine`]: the mocker's task: intake, step loop, replies, events to the runtime, load.
//!
//! [`Mocker`] is the [`Engine`] the worker runtime runs.
//!
//! Concurrency: all engine state is owned by one tokio task per worker ([`engine`]); nothing is
//! shared but the immutable corpus (`Arc`) and the channels.

pub mod config;
pub mod disagg;
pub mod engine;
pub mod kv_cache;
pub mod model;
pub mod scheduler;
pub mod sequence;
pub mod timing;
pub mod transfer;

#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
pub(crate) mod test_util;

pub use config::{MockerArgs, MockerConfig, MockerConfigError};
pub use disagg::DisaggIo;

use std::future::Future;
use std::sync::Arc;

use crate::contract::{DisaggStyle, EngineKind, TokenId, WorkerId};
use crate::worker::engine::{Engine, EngineCard, EngineIo};

use engine::MockerTask;
use model::MockModel;
use scheduler::Scheduler;

/// A simulated engine: one [`MockerTask`] generating from a fixed corpus.
pub struct Mocker {
    id: WorkerId,
    config: MockerConfig,
    corpus: Arc<[TokenId]>,
    disagg: DisaggIo,
    /// The decode role's transfer address (advertised so prefill workers can push to it).
    transfer_address: Option<String>,
    /// Whether it publishes KV events (`--no-kv-events`: no, and it registers so).
    kv_events: bool,
}

impl Mocker {
    /// An aggregated mocker; `corpus` is the text (as token ids) the mock model generates from.
    pub fn new(id: WorkerId, config: MockerConfig, corpus: Arc<[TokenId]>) -> Self {
        Self { id, config, corpus, disagg: DisaggIo::default(), transfer_address: None, kv_events: true }
    }

    /// A mocker in a disaggregated role (see [`transfer::setup`]).
    pub fn disaggregated(
        id: WorkerId,
        config: MockerConfig,
        corpus: Arc<[TokenId]>,
        setup: transfer::TransferSetup,
    ) -> Self {
        Self { id, config, corpus, disagg: setup.io, transfer_address: setup.address, kv_events: true }
    }

    /// Whether it publishes KV events; without, it registers `kv_events: false` and the worker
    /// runtime publishes nothing (the frontend predicts its cache: approximate mode).
    pub fn with_kv_events(mut self, kv_events: bool) -> Self {
        self.kv_events = kv_events;
        self
    }
}

impl Engine for Mocker {
    fn card(&self) -> EngineCard {
        EngineCard {
            kind: EngineKind::Mocker,
            kv_capacity_blocks: self.config.num_gpu_blocks,
            max_num_seqs: self.config.max_num_seqs,
            max_num_batched_tokens: self.config.max_num_batched_tokens,
            disagg: DisaggStyle::Push,
            bootstrap: self.transfer_address.clone(),
            kv_events: self.kv_events,
        }
    }

    fn run(self, io: EngineIo) -> impl Future<Output = ()> + Send {
        let Self { id, config, corpus, disagg, .. } = self;
        log_capacity(id, &config);
        let sched = Scheduler::new(&config, engine_salt(id), MockModel::new(corpus));
        io.load.send_replace(sched.load());
        MockerTask::new(id, sched, config.speedup_ratio, disagg, io).run()
    }
}

/// Logs the simulated KV capacity (bytes only when the model's size is known).
fn log_capacity(id: WorkerId, config: &MockerConfig) {
    tracing::info!(
        worker = %id,
        kv_blocks = config.num_gpu_blocks,
        kv_tokens = config.capacity_tokens(),
        page_size = config.page_size,
        kv_bytes = config.capacity_bytes(),
        kv_bytes_per_token = config.kv_bytes_per_token,
        kv_bytes_per_block = config.kv_bytes_per_block(),
        "mocker KV capacity"
    );
}

/// A per-worker non-zero salt: engine hashes are `seq_hash ^ salt` (splitmix64 of the id).
fn engine_salt(id: WorkerId) -> u64 {
    let mut z = id.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}
