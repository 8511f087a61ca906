//! Metrics: per-shard counters merged on scrape, rendered as Prometheus text.
//!
//! Concurrency: each data-plane shard writes only its own [`ShardMetrics`] (relaxed atomic adds
//! on a cache line no other core writes); the control plane writes [`ControlMetrics`]; a scrape
//! reads and sums everything. Every metric name lives in this file.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::preprocess::token_cache::{TokenCacheStats, MIN_SEGMENT_BYTES};

/// Histogram bucket upper bounds, in seconds (latencies from 100 µs to a minute).
const BUCKETS_S: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];

/// A fixed-bucket latency histogram.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
}

/// Counters of one data-plane shard.
#[derive(Default)]
pub struct ShardMetrics {
    pub requests: AtomicU64,
    pub requests_client_error: AtomicU64,
    pub requests_server_error: AtomicU64,
    pub streams_cancelled: AtomicU64,
    /// Connections answered 503 and closed: their shard had its share of `--max-connections`.
    pub connections_refused: AtomicU64,
    /// Requests refused 401: no or a wrong API key.
    pub unauthorized: AtomicU64,
    /// Streams moved to another worker after theirs failed.
    pub migrations: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// Preprocessing (template + tokenize + hash) and worker selection, per request.
    pub routing_overhead: Histogram,
    /// Disaggregated requests prefilled on a prefill worker (KV transferred).
    pub disagg_remote: AtomicU64,
    /// Requests of a disaggregated model prefilled on their decode worker (conditional
    /// disaggregation, or no prefill worker left).
    pub disagg_local: AtomicU64,
    /// KV transfers reported by prefill workers, their payload bytes and their time.
    pub kv_transfers: AtomicU64,
    pub kv_transfer_bytes: AtomicU64,
    pub kv_transfer_micros: AtomicU64,
    pub kv_transfer_blocks: AtomicU64,
    /// Prompt tokens computed by the workers themselves, by the leg that computed them.
    pub prompt_tokens_computed_prefill: AtomicU64,
    pub prompt_tokens_computed_decode: AtomicU64,
    pub prompt_tokens_computed_aggregated: AtomicU64,
    /// Approximate mode: predictions dropped because the control plane's queue was full.
    pub kv_predictions_dropped: AtomicU64,
    /// Admission: requests waiting on this shard for a worker to free (a gauge).
    pub queue_depth: AtomicU64,
    /// Admission: time spent queued by requests that waited (admitted or timed out).
    pub queue_wait: Histogram,
    /// Admission: refusals because the shard's queue was full, or the wait timed out.
    pub queue_rejected_full: AtomicU64,
    pub queue_rejected_timeout: AtomicU64,
    /// Routing decision quality (issue #16): overlap regret per KV-routed decision.
    pub routing_regret: crate::router::quality::RegretMetrics,
}

/// Counters of the control plane (KV event application).
#[derive(Default)]
pub struct ControlMetrics {
    pub kv_events_applied: AtomicU64,
    pub kv_event_errors: AtomicU64,
    /// Gaps recovered by the worker replaying the events missed.
    pub kv_recoveries_replay: AtomicU64,
    /// Gaps recovered from a dump of the worker's whole cache.
    pub kv_recoveries_dump: AtomicU64,
    /// Recoveries that failed (the worker could not answer).
    pub kv_recoveries_failed: AtomicU64,
    /// Approximate mode: predicted blocks added, evicted beyond a worker's capacity, expired.
    pub kv_predicted_blocks_stored: AtomicU64,
    pub kv_predicted_blocks_evicted: AtomicU64,
    pub kv_predicted_blocks_expired: AtomicU64,
}

/// All metrics of one frontend.
pub struct Metrics {
    shards: Vec<CachePadded<ShardMetrics>>,
    pub control: ControlMetrics,
}

/// A per-worker gauge row, gathered by the frontend at scrape time.
pub struct WorkerGauge {
    pub model: String,
    pub worker: String,
    pub active_requests: u64,
    pub active_prefill_tokens: u64,
    pub active_decode_blocks: u64,
    pub cached_blocks: u64,
    /// Its cache is predicted (approximate mode), not known from its KV events.
    pub kv_approximate: bool,
}

impl Metrics {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| CachePadded::new(ShardMetrics::default())).collect(),
            control: ControlMetrics::default(),
        }
    }

    /// The counters shard `i` writes.
    pub fn shard(&self, i: usize) -> &ShardMetrics {
        &self.shards[i]
    }

    fn sum(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
    }

    /// One counter summed over the shards (the dashboard's rolling rates).
    pub fn total(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.sum(f)
    }

    /// One histogram's observation count and sum in nanoseconds, over the shards.
    pub fn histogram_totals(&self, f: impl Fn(&ShardMetrics) -> &Histogram) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(n, ns), s| (n + f(s).count.load(Relaxed), ns + f(s).sum_ns.load(Relaxed)))
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self, workers: &[WorkerGauge], index_entries: u64, token_cache: &TokenCacheStats) -> String {
        let mut out = String::with_capacity(8192);
        let counters: [(&str, &str, u64); 19] = [
            (
                "kvgate_disagg_remote_prefill_total",
                "Disaggregated requests prefilled on a prefill worker, their KV transferred.",
                self.sum(|s| &s.disagg_remote),
            ),
            (
                "kvgate_disagg_local_prefill_total",
                "Requests of a disaggregated model prefilled on their decode worker (conditional disaggregation, or no prefill worker left).",
                self.sum(|s| &s.disagg_local),
            ),
            ("kvgate_kv_transfers_total", "KV transfers from prefill to decode workers.", self.sum(|s| &s.kv_transfers)),
            (
                "kvgate_kv_transfer_bytes_total",
                "KV bytes moved from prefill to decode workers.",
                self.sum(|s| &s.kv_transfer_bytes),
            ),
            (
                "kvgate_kv_transfer_blocks_total",
                "KV blocks moved from prefill to decode workers.",
                self.sum(|s| &s.kv_transfer_blocks),
            ),
            (
                "kvgate_kv_transfer_microseconds_total",
                "Time spent in KV transfers, as the prefill workers measured it (send to acknowledgement).",
                self.sum(|s| &s.kv_transfer_micros),
            ),
            (
                "kvgate_prefill_prompt_tokens_computed_total",
                "Prompt tokens computed by prefill workers.",
                self.sum(|s| &s.prompt_tokens_computed_prefill),
            ),
            (
                "kvgate_decode_prompt_tokens_computed_total",
                "Prompt tokens decode workers computed themselves for remotely prefilled requests (0 when every prompt's KV was received).",
                self.sum(|s| &s.prompt_tokens_computed_decode),
            ),
            (
                "kvgate_aggregated_prompt_tokens_computed_total",
                "Prompt tokens computed by workers serving whole requests (aggregated, or local prefill on a decode worker).",
                self.sum(|s| &s.prompt_tokens_computed_aggregated),
            ),
            (
                "kvgate_migrations_total",
                "Streams moved to another worker after theirs failed.",
                self.sum(|s| &s.migrations),
            ),
            ("kvgate_requests_total", "Requests received on the OpenAI endpoints.", self.sum(|s| &s.requests)),
            (
                "kvgate_requests_client_error_total",
                "Requests answered with a 4xx error.",
                self.sum(|s| &s.requests_client_error),
            ),
            (
                "kvgate_requests_server_error_total",
                "Requests answered with a 5xx error or failed mid-stream.",
                self.sum(|s| &s.requests_server_error),
            ),
            (
                "kvgate_http_connections_refused_total",
                "Connections answered 503 and closed because their shard had its share of --max-connections open.",
                self.sum(|s| &s.connections_refused),
            ),
            (
                "kvgate_http_unauthorized_total",
                "Requests refused 401 for a missing or wrong API key (--api-key).",
                self.sum(|s| &s.unauthorized),
            ),
            (
                "kvgate_streams_cancelled_total",
                "Responses abandoned by their client before the end.",
                self.sum(|s| &s.streams_cancelled),
            ),
            ("kvgate_prompt_tokens_total", "Prompt tokens routed to workers.", self.sum(|s| &s.prompt_tokens)),
            (
                "kvgate_cached_prompt_tokens_total",
                "Prompt tokens the chosen worker already had cached.",
                self.sum(|s| &s.cached_tokens),
            ),
            ("kvgate_output_tokens_total", "Tokens generated.", self.sum(|s| &s.output_tokens)),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let (bytes, micros) = (self.sum(|s| &s.kv_transfer_bytes), self.sum(|s| &s.kv_transfer_micros));
        let gbps = if micros == 0 { 0.0 } else { bytes as f64 / micros as f64 / 1e3 };
        let _ = writeln!(out, "# HELP kvgate_kv_transfer_gbps Mean KV transfer throughput since start (GB/s, payload bytes over transfer time).\n# TYPE kvgate_kv_transfer_gbps gauge\nkvgate_kv_transfer_gbps {gbps}");
        let prompt = self.sum(|s| &s.prompt_tokens);
        let hit = if prompt == 0 { 0.0 } else { self.sum(|s| &s.cached_tokens) as f64 / prompt as f64 };
        let _ = writeln!(out, "# HELP kvgate_kv_hit_rate Cached prompt tokens / prompt tokens since start.\n# TYPE kvgate_kv_hit_rate gauge\nkvgate_kv_hit_rate {hit}");
        let hists: [(&str, &str, HistogramOf); 4] = [
            ("kvgate_time_to_first_token_seconds", "Time from request arrival to the first token.", |s| &s.ttft),
            ("kvgate_inter_token_latency_seconds", "Time between consecutive tokens of a stream.", |s| &s.itl),
            ("kvgate_request_duration_seconds", "Time from request arrival to its last byte.", |s| &s.e2e),
            ("kvgate_routing_overhead_seconds", "Preprocessing and worker selection per request.", |s| {
                &s.routing_overhead
            }),
        ];
        for (name, help, f) in hists {
            self.render_histogram(&mut out, name, help, f);
        }
        let _ = writeln!(out, "# HELP kvgate_kv_events_applied_total KV events applied to the index.\n# TYPE kvgate_kv_events_applied_total counter\nkvgate_kv_events_applied_total {}", self.control.kv_events_applied.load(Relaxed));
        let _ = writeln!(out, "# HELP kvgate_kv_event_errors_total KV events rejected or out of order.\n# TYPE kvgate_kv_event_errors_total counter\nkvgate_kv_event_errors_total {}", self.control.kv_event_errors.load(Relaxed));
        for (name, help, v) in [
            (
                "kvgate_kv_recoveries_replay_total",
                "Event gaps recovered by a worker's replay.",
                &self.control.kv_recoveries_replay,
            ),
            (
                "kvgate_kv_recoveries_dump_total",
                "Event gaps recovered from a worker's cache dump.",
                &self.control.kv_recoveries_dump,
            ),
            (
                "kvgate_kv_recoveries_failed_total",
                "Event gaps whose recovery failed.",
                &self.control.kv_recoveries_failed,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        render_token_cache(&mut out, token_cache);
        let _ = writeln!(out, "# HELP kvgate_kv_index_entries Block-holder pairs in the KV index.\n# TYPE kvgate_kv_index_entries gauge\nkvgate_kv_index_entries {index_entries}");
        let gauges: [(&str, &str, GaugeOf); 4] = [
            ("kvgate_worker_active_requests", "Requests in flight per worker, as booked by the router.", |w| {
                w.active_requests
            }),
            ("kvgate_worker_active_prefill_tokens", "Uncached prompt tokens in flight per worker.", |w| {
                w.active_prefill_tokens
            }),
            ("kvgate_worker_active_decode_blocks", "KV blocks of requests in flight per worker.", |w| {
                w.active_decode_blocks
            }),
            ("kvgate_worker_cached_blocks", "Blocks each worker holds, per the KV index.", |w| w.cached_blocks),
        ];
        for (name, help, f) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for w in workers {
                let _ = writeln!(out, "{name}{{model=\"{}\",worker=\"{}\"}} {}", escape(&w.model), w.worker, f(w));
            }
        }
        self.render_approx(&mut out, workers);
        self.render_queue(&mut out);
        self.render_routing_quality(&mut out);
        out
    }

    /// Admission (issue #15): the queue's depth, waits and refusals.
    fn render_queue(&self, out: &mut String) {
        let depth = self.sum(|s| &s.queue_depth);
        let _ = writeln!(out, "# HELP kvgate_queue_depth Requests waiting for a worker below the busy thresholds.\n# TYPE kvgate_queue_depth gauge\nkvgate_queue_depth {depth}");
        self.render_histogram(out, "kvgate_queue_wait_seconds", "Time requests waited in the admission queue.", |s| {
            &s.queue_wait
        });
        let name = "kvgate_queue_rejected_total";
        let _ = writeln!(out, "# HELP {name} Requests refused 503 by admission: the queue was full, or the wait timed out.\n# TYPE {name} counter");
        let _ = writeln!(out, "{name}{{reason=\"full\"}} {}", self.sum(|s| &s.queue_rejected_full));
        let _ = writeln!(out, "{name}{{reason=\"timeout\"}} {}", self.sum(|s| &s.queue_rejected_timeout));
    }

    /// Routing decision quality (issue #16): what each decision gave away in prefix overlap.
    fn render_routing_quality(&self, out: &mut String) {
        use crate::router::quality::REGRET_BUCKETS_BLOCKS;
        let name = "kvgate_routing_overlap_regret_blocks";
        let _ = writeln!(out, "# HELP {name} Per routing decision: the best prefix overlap any candidate worker had minus the chosen worker's, in KV blocks.\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, b) in REGRET_BUCKETS_BLOCKS.iter().enumerate() {
            cumulative += self.sum(|s| &s.routing_regret.buckets[i]);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.sum(|s| &s.routing_regret.decisions);
        let total = self.sum(|s| &s.routing_regret.regret_blocks);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {total}\n{name}_count {count}");
        for (name, help, v) in [
            (
                "kvgate_routing_overlap_regret_blocks_total",
                "Sum over routing decisions of best minus chosen prefix overlap, in KV blocks.",
                total,
            ),
            (
                "kvgate_routing_best_overlap_blocks_total",
                "Sum over routing decisions of the best prefix overlap any candidate had, in KV blocks.",
                self.sum(|s| &s.routing_regret.best_overlap_blocks),
            ),
            (
                "kvgate_routing_chosen_overlap_blocks_total",
                "Sum over routing decisions of the chosen worker's prefix overlap, in KV blocks.",
                self.sum(|s| &s.routing_regret.chosen_overlap_blocks),
            ),
            (
                "kvgate_routing_decision_log_dropped_total",
                "Decision-log records dropped because the writer's queue was full (--decision-log).",
                self.sum(|s| &s.routing_regret.log_dropped),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
    }

    fn render_histogram(&self, out: &mut String, name: &str, help: &str, f: fn(&ShardMetrics) -> &Histogram) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, b) in BUCKETS_S.iter().enumerate() {
            cumulative += self.shards.iter().map(|s| f(s).buckets[i].load(Relaxed)).sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count: u64 = self.shards.iter().map(|s| f(s).count.load(Relaxed)).sum();
        let sum_ns: u64 = self.shards.iter().map(|s| f(s).sum_ns.load(Relaxed)).sum();
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
            sum_ns as f64 / 1e9
        );
    }
}

/// The token cache's counters and gauges (all 0 when `--token-cache-mb 0`).
fn render_token_cache(out: &mut String, s: &TokenCacheStats) {
    let misses = format!(
        "Prompt text segments of {MIN_SEGMENT_BYTES} bytes or more tokenized because the token cache lacked them."
    );
    let counters = [
        (
            "kvgate_token_cache_hits_total",
            "Prompt text segments whose token ids came from the token cache.".into(),
            s.hits,
        ),
        ("kvgate_token_cache_misses_total", misses, s.misses),
        ("kvgate_token_cache_hit_tokens_total", "Prompt tokens taken from the token cache.".into(), s.hit_tokens),
        (
            "kvgate_token_cache_evictions_total",
            "Token cache entries evicted to stay within --token-cache-mb.".into(),
            s.evictions,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let gauges = [
        ("kvgate_token_cache_bytes", "Bytes the token cache holds (token ids and per-entry overhead).", s.bytes),
        ("kvgate_token_cache_capacity_bytes", "The token cache's budget, --token-cache-mb.", s.capacity_bytes),
        ("kvgate_token_cache_entries", "Text segments the token cache holds.", s.entries),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
}

/// Picks one histogram out of a shard's metrics.
type HistogramOf = fn(&ShardMetrics) -> &Histogram;
/// Picks one value out of a worker's gauges.
type GaugeOf = fn(&WorkerGauge) -> u64;

impl Metrics {
    /// Approximate mode: which workers are approximate, and what their predictions did.
    fn render_approx(&self, out: &mut String, workers: &[WorkerGauge]) {
        let name = "kvgate_worker_kv_approximate";
        let _ = writeln!(out, "# HELP {name} 1 when the worker's cache is predicted from what was routed to it (no KV events), 0 when its KV events keep it exact.\n# TYPE {name} gauge");
        for w in workers {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\",worker=\"{}\"}} {}",
                escape(&w.model),
                w.worker,
                u8::from(w.kv_approximate)
            );
        }
        let c = &self.control;
        let dropped = self.sum(|s| &s.kv_predictions_dropped);
        for (name, help, v) in [
            (
                "kvgate_kv_predicted_blocks_stored_total",
                "Approximate mode: blocks predicted on a worker when a prompt was sent to it.",
                c.kv_predicted_blocks_stored.load(Relaxed),
            ),
            (
                "kvgate_kv_predicted_blocks_evicted_total",
                "Approximate mode: predicted blocks evicted beyond a worker's KV capacity (least recently sent first).",
                c.kv_predicted_blocks_evicted.load(Relaxed),
            ),
            (
                "kvgate_kv_predicted_blocks_expired_total",
                "Approximate mode: predicted blocks expired (--approx-ttl-s after the last request that sent them).",
                c.kv_predicted_blocks_expired.load(Relaxed),
            ),
            (
                "kvgate_kv_predictions_dropped_total",
                "Approximate mode: predictions dropped because the control plane's queue was full.",
                dropped,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_shards_and_renders_cumulative_buckets() {
        let m = Metrics::new(2);
        m.shard(0).requests.fetch_add(2, Relaxed);
        m.shard(1).requests.fetch_add(3, Relaxed);
        m.shard(0).prompt_tokens.fetch_add(100, Relaxed);
        m.shard(1).cached_tokens.fetch_add(25, Relaxed);
        m.shard(0).ttft.observe(Duration::from_millis(3));
        m.shard(1).ttft.observe(Duration::from_secs(100));
        let cache = TokenCacheStats { hits: 3, bytes: 4096, ..Default::default() };
        let text = m.render(&[], 0, &cache);
        assert!(text.contains("kvgate_token_cache_hits_total 3\n"));
        assert!(text.contains("# TYPE kvgate_token_cache_bytes gauge\nkvgate_token_cache_bytes 4096\n"));
        assert!(text.contains("kvgate_requests_total 5\n"));
        assert!(text.contains("kvgate_kv_hit_rate 0.25\n"));
        assert!(text.contains("kvgate_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("kvgate_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
    }
}
