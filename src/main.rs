//! The `kvgate` command: parse, validate, start, wait for a shutdown signal.

use clap::Parser;
use kvgate::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `DYN_LOG` (Dynamo's), `KVGATE_LOG`, then `RUST_LOG`; a bare level such as `debug` applies to
/// kvgate itself with everything else at `info`.
fn log_filter() -> EnvFilter {
    let spec = ["DYN_LOG", "KVGATE_LOG", "RUST_LOG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "info".to_string());
    let spec = match spec.trim() {
        l @ ("trace" | "debug") => format!("info,kvgate={l}"),
        other => other.to_string(),
    };
    EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("ignoring invalid log filter {spec:?}: {e}");
        EnvFilter::new("info")
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_env_filter(log_filter()).with_target(false).init();
    match cli.command {
        Command::Serve(args) => {
            let mut server = match kvgate::serve::start(&args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("kvgate: {e}");
                    std::process::exit(2);
                }
            };
            println!("kvgate listening on http://{} (model {})", server.addr, server.model_name);
            wait_for_signal()?;
            tracing::info!("shutting down: draining in-flight requests");
            server.shutdown();
        }
        Command::Frontend(args) => {
            let mut server = match kvgate::frontend::launch::start(&args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("kvgate frontend: {e}");
                    std::process::exit(2);
                }
            };
            println!("kvgate frontend listening on http://{}", server.addr);
            wait_for_signal()?;
            tracing::info!("shutting down: draining in-flight requests");
            server.shutdown();
        }
        Command::Worker(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kvgate-worker")
                .enable_all()
                .build()?;
            if let Err(e) = rt.block_on(kvgate::worker::launch::run(args, async {
                if let Err(e) = signal().await {
                    tracing::error!(error = %e, "signal handling failed; shutting down");
                }
            })) {
                eprintln!("kvgate worker: {e}");
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

async fn signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(signal())?;
    Ok(())
}
