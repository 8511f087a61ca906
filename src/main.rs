//! The `kvgate` command: parse, validate, start, wait for a shutdown signal.

use std::io::IsTerminal;

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

/// Colour codes only for a person watching: stderr is a terminal and `NO_COLOR`
/// (<https://no-color.org>) is unset or empty. A file, a pipe or journald gets plain text.
fn log_colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr; stdout carries only the start-up lines that say where kvgate listens.
    let colours = log_colours(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .init();
    // Request spans over OTLP, only with --otlp-endpoint; dropping it flushes the last ones.
    let _spans = match start_tracing(&cli.command) {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("kvgate: {e}");
            std::process::exit(2);
        }
    };
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
            let mut server = match kvgate::launch::frontend::start(&args) {
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
            if let Err(e) = rt.block_on(kvgate::launch::worker::run(args, async {
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

/// Tracing export for this command (issue #18), named after the process's role.
fn start_tracing(command: &Command) -> Result<Option<kvgate::telemetry::Exporter>, kvgate::telemetry::TelemetryError> {
    use opentelemetry::KeyValue;
    let (args, service, resource) = match command {
        Command::Serve(a) => (&a.otlp, "kvgate", vec![KeyValue::new("kvgate.engine", a.engine.as_str())]),
        Command::Frontend(a) => (&a.otlp, "kvgate-frontend", vec![]),
        Command::Worker(a) => (&a.otlp, "kvgate-worker", vec![KeyValue::new("kvgate.engine", a.engine.as_str())]),
    };
    kvgate::telemetry::init(args, service, resource)
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

#[cfg(test)]
mod tests {
    use super::log_colours;
    use std::ffi::OsStr;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(log_colours(true, None));
        assert!(log_colours(true, Some(OsStr::new(""))));
        assert!(!log_colours(true, Some(OsStr::new("1"))));
        assert!(!log_colours(false, None));
    }
}
