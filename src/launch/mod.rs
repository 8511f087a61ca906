//! The long-running commands besides `kvgate serve` ([`crate::serve`]): each parses nothing
//! (the CLI is [`crate::config`]), builds its layers in order, and tears them down in reverse.
//!
//! - [`frontend`]: `kvgate frontend`, the OpenAI endpoint of a distributed deployment.
//! - [`worker`]: `kvgate worker`, one engine (the mocker, or an adapter to SGLang / vLLM /
//!   llama.cpp / an OpenAI-API server) behind the worker runtime, registered in etcd, publishing KV events over NATS.

pub mod frontend;
pub mod worker;

use crate::config::EngineArgs;
use crate::contract::WorkerRole;
use crate::worker::engines::http::AdapterOptions;

/// What an engine adapter is told, from the `--engine-*` flags (shared by `kvgate serve` and
/// `kvgate worker`).
pub(crate) fn adapter_options(
    args: &EngineArgs,
    url: String,
    role: WorkerRole,
    page_size: u32,
    served_model_name: &str,
) -> AdapterOptions {
    AdapterOptions {
        url,
        role,
        page_size,
        served_model_name: served_model_name.to_string(),
        ready_timeout: args.ready_timeout(),
        timeout: args.timeout(),
        kv_events_endpoint: args.engine_kv_events.clone(),
        replay_endpoint: args.engine_replay.clone(),
    }
}
