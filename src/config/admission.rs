//! Admission flags (issue #15): Dynamo's busy thresholds, and the queue requests wait in while
//! every worker is busy ([`crate::frontend::pipeline::admission`]).

use clap::Args;

use super::{invalid, ConfigError};
use crate::frontend::pipeline::admission::{AdmissionConfig, BusyThresholds, MAX_QUEUED_CEILING};

/// Default of `--queue-timeout-s`: long enough to ride out a burst, short enough that a client
/// retries elsewhere before its own timeout.
pub const DEFAULT_QUEUE_TIMEOUT_S: f64 = 30.0;
/// Ceiling of `--queue-timeout-s` (ten minutes).
pub const MAX_QUEUE_TIMEOUT_S: f64 = 600.0;
/// Default of `--max-queued-requests`.
pub const DEFAULT_MAX_QUEUED: usize = 1024;

/// When requests wait for a worker, and for how long.
#[derive(Args, Debug, Clone)]
pub struct AdmissionArgs {
    /// A worker is busy when its active KV blocks exceed this fraction (0..=1) of its capacity
    /// (Dynamo's flag). When every worker of the model is busy, requests queue. Unset: off.
    #[arg(long)]
    pub active_decode_blocks_threshold: Option<f64>,
    /// A worker is busy when its prompt tokens not yet prefilled exceed this count (Dynamo's
    /// flag). Unset: off.
    #[arg(long)]
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Requests that may wait for a busy fleet, split evenly over the shards (each holds at most
    /// ceil(N / shards)); past it, 503 with Retry-After (SGLang's flag).
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUED)]
    pub max_queued_requests: usize,
    /// Seconds a request may wait for a busy fleet before a 503 with Retry-After.
    #[arg(long, default_value_t = DEFAULT_QUEUE_TIMEOUT_S)]
    pub queue_timeout_s: f64,
}

impl AdmissionArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(f) = self.active_decode_blocks_threshold {
            if !f.is_finite() || !(0.0..=1.0).contains(&f) {
                return Err(invalid(
                    "--active-decode-blocks-threshold",
                    format!("{f} is not in 0..=1 (a fraction of KV blocks)"),
                ));
            }
        }
        let n = self.max_queued_requests;
        if n > MAX_QUEUED_CEILING {
            return Err(invalid("--max-queued-requests", format!("{n} is more than {MAX_QUEUED_CEILING}")));
        }
        let t = self.queue_timeout_s;
        if !t.is_finite() || !(0.0..=MAX_QUEUE_TIMEOUT_S).contains(&t) {
            return Err(invalid("--queue-timeout-s", format!("{t} is not in 0..={MAX_QUEUE_TIMEOUT_S} (seconds)")));
        }
        Ok(())
    }

    /// The admission settings of a frontend of `shards` shards (validated flags).
    pub fn config(&self, shards: usize) -> AdmissionConfig {
        AdmissionConfig {
            thresholds: BusyThresholds {
                decode_blocks_frac: self.active_decode_blocks_threshold,
                prefill_tokens: self.active_prefill_tokens_threshold,
            },
            max_queued: self.max_queued_requests.div_ceil(shards.max(1)),
            queue_timeout: std::time::Duration::from_secs_f64(self.queue_timeout_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<AdmissionArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: AdmissionArgs,
        }
        let argv = std::iter::once("kvgate").chain(extra.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.a)
    }

    #[test]
    fn flags_parse_validate_and_split_over_shards() {
        let a = args(&[]).unwrap();
        assert!(a.validate().is_ok() && !a.config(2).thresholds.enabled(), "off by default");
        let a = args(&["--active-decode-blocks-threshold", "0.85", "--max-queued-requests", "5"]).unwrap();
        let c = a.config(2);
        assert_eq!((c.thresholds.decode_blocks_frac, c.max_queued), (Some(0.85), 3));
        for bad in [
            &["--active-decode-blocks-threshold", "1.5"][..],
            &["--queue-timeout-s", "700"],
            &["--max-queued-requests", "1000000"],
        ] {
            let e = args(bad).unwrap().validate().unwrap_err();
            assert_eq!(e.flag, bad[0]);
        }
    }
}
