//! Flags of a real engine behind a worker (`--engine sglang|vllm|llama-cpp|openai`): where it
//! listens, its KV-event endpoints, and how long kvgate waits for it.

use clap::Args;

use super::{invalid, ConfigError};
use crate::contract::{EngineKind, WorkerRole};

/// A real engine behind kvgate (`--engine sglang|vllm|llama-cpp|openai`).
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// The engine's HTTP address. `kvgate serve` takes it repeatedly, one worker per engine,
    /// each optionally prefixed with its role: `prefill=http://10.0.0.1:30000`.
    #[arg(long = "engine-url")]
    pub engine_url: Vec<String>,
    /// ZMQ endpoint of the engine's KV events (default: what the engine advertises).
    #[arg(long)]
    pub engine_kv_events: Option<String>,
    /// ZMQ endpoint of the engine's KV-event replay (default: what the engine advertises).
    #[arg(long)]
    pub engine_replay: Option<String>,
    /// How long to wait for the engine to be ready before giving up, in seconds.
    #[arg(long, default_value_t = 600)]
    pub engine_ready_timeout_s: u64,
    /// Seconds a request waits for the engine's answer to begin, and for each next chunk of a
    /// stream; past it the engine is taken for stuck and the request moves to another worker.
    #[arg(long, default_value_t = 60)]
    pub engine_timeout_s: u64,
}

/// One `--engine-url`: the role (aggregated unless prefixed) and the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineUrl {
    pub role: WorkerRole,
    pub url: String,
}

impl EngineArgs {
    /// Every `--engine-url` with its role.
    pub fn urls(&self) -> Result<Vec<EngineUrl>, ConfigError> {
        self.engine_url.iter().map(|u| parse_engine_url(u)).collect()
    }

    pub fn ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.engine_ready_timeout_s)
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.engine_timeout_s.max(1))
    }

    pub(super) fn validate(&self, engine: EngineKind, many: bool) -> Result<(), ConfigError> {
        let urls = self.urls()?;
        match engine {
            EngineKind::Mocker if !urls.is_empty() => {
                Err(invalid("--engine-url", "the mocker needs no engine URL; add --engine sglang|vllm|llama-cpp|openai"))
            }
            EngineKind::Mocker => Ok(()),
            _ if urls.is_empty() => Err(invalid("--engine-url", format!("--engine {} needs the engine's address: --engine-url http://HOST:PORT", engine.as_str()))),
            _ if !many && urls.len() > 1 => Err(invalid("--engine-url", "a worker fronts one engine; start one kvgate worker per engine")),
            _ if many && (self.engine_kv_events.is_some() || self.engine_replay.is_some()) && urls.len() > 1 => Err(invalid(
                "--engine-kv-events",
                "an endpoint override applies to one engine; with several --engine-url, let each engine advertise its own",
            )),
            EngineKind::LlamaCpp | EngineKind::Openai => self.validate_without_events(engine, &urls),
            _ => Ok(()),
        }
    }

    /// Engines that publish no KV events and cannot disaggregate (llama.cpp, OpenAI API).
    fn validate_without_events(&self, engine: EngineKind, urls: &[EngineUrl]) -> Result<(), ConfigError> {
        let name = engine.as_str();
        if self.engine_kv_events.is_some() || self.engine_replay.is_some() {
            let flag = if self.engine_kv_events.is_some() { "--engine-kv-events" } else { "--engine-replay" };
            return Err(invalid(
                flag,
                format!("--engine {name} publishes no KV events; drop the flag (kvgate predicts its cache)"),
            ));
        }
        if urls.iter().any(|u| u.role != WorkerRole::Aggregated) {
            return Err(invalid(
                "--engine-url",
                format!("--engine {name} does not support disaggregation; give plain URLs without prefill=/decode="),
            ));
        }
        Ok(())
    }
}

fn parse_engine_url(u: &str) -> Result<EngineUrl, ConfigError> {
    let (role, url) = match u.split_once('=') {
        Some((r, url)) => {
            let role = match r {
                "prefill" => WorkerRole::Prefill,
                "decode" => WorkerRole::Decode,
                "aggregated" | "agg" => WorkerRole::Aggregated,
                other => {
                    return Err(invalid(
                        "--engine-url",
                        format!("`{other}` is not a role: use prefill=, decode= or aggregated="),
                    ))
                }
            };
            (role, url)
        }
        None => (WorkerRole::Aggregated, u),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        return Err(invalid("--engine-url", format!("`{url}` is not an http://HOST:PORT address")));
    }
    Ok(EngineUrl { role, url: url.trim_end_matches('/').to_string() })
}
