//! The long-running commands besides `kvgate serve` ([`crate::serve`]): each parses nothing
//! (the CLI is [`crate::config`]), builds its layers in order, and tears them down in reverse.
//!
//! - [`frontend`]: `kvgate frontend`, the OpenAI endpoint of a distributed deployment.
//! - [`worker`]: `kvgate worker`, one engine (the mocker, or an adapter to SGLang / vLLM) behind
//!   the worker runtime, registered in etcd, publishing KV events over NATS.

pub mod frontend;
pub mod worker;
