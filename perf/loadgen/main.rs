//! `kvgate-bench`: a load generator for kvgate (or any OpenAI-compatible server that streams
//! `/v1/completions` with token-id prompts and `/v1/chat/completions`).
//!
//! ## Module map
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`workload`] | Mooncake trace replay, shared-prefix and multi-turn workloads; request bodies |
//! | [`driver`] | open loop (arrival times) or closed loop (concurrency); per-request measurement |
//! | [`http`] | a minimal HTTP/1.1 client with keep-alive and an SSE line reader |
//! | [`report`] | percentiles, throughput, hit rate, CPU per request; table and JSON |
//! | [`cpu`] | CPU time of this process and of the server (`--server-pid`) |
//!
//! The generator is one thread (a current-thread tokio runtime): on a 2-core machine it must
//! not take the server's CPU. Every request streams (`stream_options.include_usage`), so TTFT,
//! inter-token gaps and `usage.prompt_tokens_details.cached_tokens` come from the stream.

mod cpu;
mod driver;
mod http;
mod report;
mod workload;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::{Args, Parser, Subcommand};

use driver::{Driver, Loop};
use workload::{Arrivals, TokenSpace};

/// Requests (or sessions) in flight at once in an open loop when `--max-inflight` is not given:
/// beyond it arrivals wait and the schedule lag shows it.
const DEFAULT_MAX_INFLIGHT: usize = 2048;
/// Hard ceiling on `--max-inflight` / `--concurrency`: each in-flight request holds a socket
/// and its rendered body.
const MAX_INFLIGHT: usize = 65_536;

#[derive(Parser, Debug)]
#[command(
    name = "kvgate-bench",
    about = "Load generator for kvgate: trace replay, shared prefixes, multi-turn sessions"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    workload: WorkloadCmd,
}

#[derive(Args, Debug)]
struct Common {
    /// Server base URL (http only). Several (repeated, or comma-separated): requests go to
    /// them in turn, like a round-robin load balancer in front of several frontends.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8000", value_delimiter = ',')]
    url: Vec<String>,
    /// Model name sent in every request.
    #[arg(long, global = true, default_value = "kvgate-mock")]
    model: String,
    /// Closed loop: keep this many requests (sessions) in flight; arrival times are ignored.
    #[arg(long, global = true)]
    concurrency: Option<usize>,
    /// Open loop at this many requests (sessions) per second, Poisson arrivals (replaces a
    /// trace's timestamps).
    #[arg(long, global = true)]
    request_rate: Option<f64>,
    /// Open loop: most requests (sessions) in flight; later arrivals wait.
    #[arg(long, global = true, default_value_t = DEFAULT_MAX_INFLIGHT)]
    max_inflight: usize,
    /// A request with no end of stream after this many seconds counts as a `timeout` error.
    #[arg(long, global = true, default_value_t = 600.0)]
    request_timeout_s: f64,
    /// Smallest token id in generated prompts.
    #[arg(long, global = true, default_value_t = 0)]
    token_id_min: u32,
    /// Largest token id in generated prompts (255 fits the built-in mock model's byte vocabulary).
    #[arg(long, global = true, default_value_t = 255)]
    token_id_max: u32,
    /// Seed of the synthetic workloads and Poisson arrivals.
    #[arg(long, global = true, default_value_t = 42)]
    seed: u64,
    /// The server's pid: its CPU time over the run (from /proc) is reported beside ours.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Write the summary as JSON here.
    #[arg(long, global = true)]
    output: Option<PathBuf>,
    /// Write one JSON line per request here.
    #[arg(long, global = true)]
    requests_out: Option<PathBuf>,
    /// Write each request's prompt as sent, one JSON line per request in send order:
    /// `{"t_s", "session", "turn", "max_tokens", "segments": [[block id, tokens], ...]}` (token-id
    /// workloads only: `mooncake`, `shared-prefix` without `--chat`). `perf/oracle.py` reads it.
    #[arg(long, global = true)]
    dump_blocks: Option<PathBuf>,
    /// A label stored in the JSON (e.g. the router mode).
    #[arg(long, global = true)]
    label: Option<String>,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, global = true, default_value_t = 10)]
    progress_s: u64,
}

#[derive(Subcommand, Debug)]
enum WorkloadCmd {
    /// Replay a Mooncake-format trace (`timestamp` ms, `input_length`, `output_length`,
    /// `hash_ids`) at its timestamps × --time-scale.
    Mooncake {
        #[arg(long)]
        trace: PathBuf,
        /// Tokens per hash id.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Replay only the first N requests.
        #[arg(long)]
        max_requests: Option<usize>,
        /// Multiplies every timestamp: 0.25 replays four times faster.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Cap each request's `max_tokens` (the trace's output_length).
        #[arg(long)]
        max_output_tokens: Option<u32>,
        /// Cut each prompt to this many tokens (keeps its prefix structure).
        #[arg(long)]
        max_input_tokens: Option<u32>,
        /// Replay conversations instead of single requests: group the trace into conversations
        /// (a request continues the latest one whose hash ids, but perhaps its last, begin its
        /// own, sharing at least 2) and replay the N with the most turns, each turn when the
        /// previous one finished (`--concurrency` conversations at once).
        #[arg(long)]
        sessions: Option<usize>,
    },
    /// Groups of requests sharing a system prompt (prefix) followed by a unique part.
    SharedPrefix {
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        #[arg(long, default_value_t = 16)]
        groups: u32,
        /// Prefix length: tokens (completions) or words (--chat).
        #[arg(long, default_value_t = 2048)]
        prefix_tokens: u32,
        /// Unique part: tokens (completions) or words (--chat).
        #[arg(long, default_value_t = 256)]
        suffix_tokens: u32,
        #[arg(long, default_value_t = 64)]
        output_tokens: u32,
        /// Send chat messages (system + user text) instead of token ids.
        #[arg(long)]
        chat: bool,
    },
    /// Multi-turn sessions; each turn resends the whole history plus a new user message.
    Sessions {
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        #[arg(long, default_value_t = 5)]
        turns: u32,
        /// Sessions of one group share their system prompt.
        #[arg(long, default_value_t = 8)]
        groups: u32,
        #[arg(long, default_value_t = 300)]
        system_words: u32,
        #[arg(long, default_value_t = 50)]
        user_words: u32,
        #[arg(long, default_value_t = 64)]
        output_tokens: u32,
        /// Send text prompts to /v1/completions instead of messages to /v1/chat/completions.
        #[arg(long)]
        completions: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
    let c = &cli.common;
    ensure!(c.token_id_min <= c.token_id_max, "--token-id-min must not exceed --token-id-max");
    ensure!(c.request_timeout_s.is_finite() && c.request_timeout_s > 0.0, "--request-timeout-s must be > 0");
    if let Some(r) = c.request_rate {
        ensure!(r.is_finite() && r > 0.0, "--request-rate must be a number > 0");
    }
    let mode = match c.concurrency {
        Some(n) => {
            ensure!((1..=MAX_INFLIGHT).contains(&n), "--concurrency must be in 1..={MAX_INFLIGHT}");
            Loop::Closed { concurrency: n }
        }
        None => {
            ensure!((1..=MAX_INFLIGHT).contains(&c.max_inflight), "--max-inflight must be in 1..={MAX_INFLIGHT}");
            Loop::Open { max_inflight: c.max_inflight }
        }
    };
    let jobs = build_jobs(&cli)?;
    if c.dump_blocks.is_some() {
        let tokens_only = match &cli.workload {
            WorkloadCmd::Mooncake { .. } => true,
            WorkloadCmd::SharedPrefix { chat, .. } => !chat,
            WorkloadCmd::Sessions { .. } => false,
        };
        ensure!(tokens_only, "--dump-blocks needs token-id prompts: mooncake, or shared-prefix without --chat");
    }
    tracing::info!("{} jobs, {:?}", jobs.len(), mode);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(&cli.common, jobs, mode))
}

fn build_jobs(cli: &Cli) -> anyhow::Result<Vec<workload::Scheduled>> {
    let c = &cli.common;
    let mut arrivals = Arrivals::new(c.request_rate, c.seed);
    let closed_or_rate = c.concurrency.is_some() || c.request_rate.is_some();
    Ok(match &cli.workload {
        WorkloadCmd::Mooncake {
            trace,
            block_size,
            max_requests,
            time_scale,
            max_output_tokens,
            max_input_tokens,
            sessions,
        } => {
            ensure!(*block_size > 0, "--block-size must be > 0");
            ensure!(time_scale.is_finite() && *time_scale >= 0.0, "--time-scale must be a number >= 0");
            let o = workload::TraceOptions {
                block_size: *block_size,
                max_requests: max_requests.unwrap_or(usize::MAX),
                time_scale: *time_scale,
                max_output_tokens: *max_output_tokens,
                max_input_tokens: *max_input_tokens,
                timestamps: !closed_or_rate,
            };
            let mut jobs = match sessions {
                Some(0) => anyhow::bail!("--sessions must be > 0"),
                Some(n) => workload::mooncake_sessions(trace, &o, *n)?,
                None => workload::mooncake(trace, &o)?,
            };
            if c.request_rate.is_some() && c.concurrency.is_none() {
                for j in &mut jobs {
                    j.at = arrivals.next_at();
                }
            }
            jobs
        }
        WorkloadCmd::SharedPrefix { requests, groups, prefix_tokens, suffix_tokens, output_tokens, chat } => {
            ensure!(closed_or_rate, "give --concurrency (closed loop) or --request-rate (open loop)");
            let o = workload::SharedPrefixOptions {
                requests: *requests,
                groups: *groups,
                prefix_tokens: *prefix_tokens,
                suffix_tokens: *suffix_tokens,
                output_tokens: *output_tokens,
                chat: *chat,
                seed: c.seed,
            };
            workload::shared_prefix(&o, &mut arrivals)
        }
        WorkloadCmd::Sessions { sessions, turns, groups, system_words, user_words, output_tokens, completions } => {
            ensure!(closed_or_rate, "give --concurrency (closed loop) or --request-rate (open loop)");
            let o = workload::SessionOptions {
                sessions: *sessions,
                turns: *turns,
                groups: *groups,
                system_words: *system_words,
                user_words: *user_words,
                output_tokens: *output_tokens,
                chat: !completions,
                seed: c.seed,
            };
            workload::sessions(&o, &mut arrivals)
        }
    })
}

async fn run(c: &Common, jobs: Vec<workload::Scheduled>, mode: Loop) -> anyhow::Result<()> {
    let clients = c.url.iter().map(|u| http::Client::new(u)).collect::<anyhow::Result<Vec<_>>>()?;
    let probe = c.server_pid.map(cpu::ServerProbe::start).transpose().context("--server-pid")?;
    let cpu0 = cpu::self_cpu();
    let start = Instant::now();
    let driver = Rc::new(Driver {
        clients,
        next_client: std::cell::Cell::new(0),
        model: c.model.clone(),
        space: TokenSpace { lo: c.token_id_min, hi: c.token_id_max },
        timeout: Duration::from_secs_f64(c.request_timeout_s),
        start,
        results: RefCell::new(Default::default()),
        dump: RefCell::new(match &c.dump_blocks {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("--dump-blocks {}", p.display()))?,
            )),
            None => None,
        }),
    });
    let progress = (c.progress_s > 0).then(|| {
        let d = driver.clone();
        let every = Duration::from_secs(c.progress_s);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(every).await;
                let r = d.results.borrow();
                let errors = r.records.iter().filter(|x| x.error.is_some()).count();
                tracing::info!("{:.0} s: {} done, {} errors", d.start.elapsed().as_secs_f64(), r.records.len(), errors);
            }
        })
    });
    driver.run(jobs, mode).await;
    let duration_s = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    if let Some(w) = driver.dump.borrow_mut().as_mut() {
        use std::io::Write;
        w.flush().context("--dump-blocks")?;
    }
    let loadgen_cpu_s = (cpu::self_cpu() - cpu0).as_secs_f64();
    let server = probe.map(|p| p.finish()).transpose().context("--server-pid")?;
    let results = driver.results.borrow();
    let cpu = report::Cpu::new(loadgen_cpu_s, c.server_pid, server, results.records.len());
    let summary = report::summarize(c.label.clone(), &results, duration_s, cpu);
    print!("{}", report::table(&summary));
    if let Some(path) = &c.output {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("--output {}", path.display()))?;
    }
    if let Some(path) = &c.requests_out {
        use std::io::Write;
        let f = std::fs::File::create(path).with_context(|| format!("--requests-out {}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        for r in &results.records {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    ensure!(summary.ok > 0 || summary.requests == 0, "no request succeeded");
    Ok(())
}
