//! One snapshot of the router for the page, as JSON.
//!
//! Built from what is already published for the request path and `/metrics`: each model's
//! worker group (one atomic load), the workers' load and index-state cells, the index's block
//! counts, each model's [`super::Recent`] decisions, and the metrics counters. The rolling
//! rates (requests/s, hit rate, TTFT, KV transfer throughput) are differences of those counters
//! over the stream's last [`WINDOW_SNAPSHOTS`] snapshots, kept by the stream ([`Window`]).
//!
//! Concurrency: runs on the shard serving the stream; takes each decision ring's mutex once
//! (shard-owned rings, see [`super`]); allocates one JSON value per snapshot.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde_json::{json, Value};

use super::{unix_ms, Decision, DECISIONS_SHOWN};
use crate::contract::WorkerId;
use crate::frontend::Frontend;

/// Snapshots the rolling rates span (about 5 s at the snapshot period).
pub const WINDOW_SNAPSHOTS: usize = 7;

/// The counters the rolling rates are differences of.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    requests: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    ttft_count: u64,
    ttft_ns: u64,
    transfers: u64,
    transfer_bytes: u64,
}

impl Totals {
    fn read<P>(fe: &Frontend<P>) -> Self {
        let m = &fe.metrics;
        let (ttft_count, ttft_ns) = m.histogram_totals(|s| &s.ttft);
        Self {
            requests: m.total(|s| &s.requests),
            prompt_tokens: m.total(|s| &s.prompt_tokens),
            cached_tokens: m.total(|s| &s.cached_tokens),
            ttft_count,
            ttft_ns,
            transfers: m.total(|s| &s.kv_transfers),
            transfer_bytes: m.total(|s| &s.kv_transfer_bytes),
        }
    }
}

/// One stream's recent counter readings (bounded: [`WINDOW_SNAPSHOTS`]).
#[derive(Default)]
pub struct Window {
    readings: VecDeque<(Instant, Totals)>,
}

impl Window {
    /// Adds a reading; returns the rates since the oldest one kept.
    fn rates(&mut self, now: Instant, t: Totals) -> Value {
        let rates = match self.readings.front() {
            Some((then, old)) if now > *then => {
                let s = now.duration_since(*then).as_secs_f64();
                let d = |new: u64, old: u64| new.saturating_sub(old) as f64;
                let prompt = d(t.prompt_tokens, old.prompt_tokens);
                let ttft_n = d(t.ttft_count, old.ttft_count);
                json!({
                    "window_s": round(s, 1),
                    "requests_per_s": round(d(t.requests, old.requests) / s, 1),
                    "hit_rate": (prompt > 0.0).then(|| round(d(t.cached_tokens, old.cached_tokens) / prompt, 3)),
                    "ttft_ms": (ttft_n > 0.0).then(|| round(d(t.ttft_ns, old.ttft_ns) / ttft_n / 1e6, 1)),
                    "transfers_per_s": round(d(t.transfers, old.transfers) / s, 1),
                    "transfer_mib_per_s": round(d(t.transfer_bytes, old.transfer_bytes) / s / (1 << 20) as f64, 2),
                })
            }
            _ => json!({"window_s": 0.0}),
        };
        if self.readings.len() == WINDOW_SNAPSHOTS {
            self.readings.pop_front();
        }
        self.readings.push_back((now, t));
        rates
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The snapshot as one JSON document.
pub fn build<P>(fe: &Frontend<P>, window: &mut Window) -> Value {
    let rates = window.rates(Instant::now(), Totals::read(fe));
    let models: Vec<Value> = fe
        .models()
        .iter()
        .map(|m| {
            let group = m.workers.load();
            let workers: Vec<Value> = group
                .infos()
                .into_iter()
                .filter_map(|info| {
                    let e = group.entries.get(&info.id)?;
                    let view = e.load.view();
                    Some(json!({
                        "id": info.id.to_string(),
                        "role": info.role,
                        "engine": info.engine.as_str(),
                        "state": e.kv.state(),
                        "state_for_s": round(e.kv.in_state_for().as_secs_f64(), 1),
                        "event_age_s": e.kv.since_event().map(|d| round(d.as_secs_f64(), 1)),
                        "cached_blocks": fe.index.cached_blocks(info.id),
                        "capacity_blocks": info.kv_capacity_blocks,
                        "booked_requests": e.load.active_requests(),
                        "booked_blocks": e.load.active_decode_blocks(),
                        "reported_blocks": e.load.reported_blocks(),
                        "load_blocks": view.decode_blocks,
                        "load_requests": view.requests,
                        "report_fresh": view.reported,
                        "down": e.health.is_down(),
                    }))
                })
                .collect();
            let decisions = m.recent.last(DECISIONS_SHOWN);
            let routed: Vec<&Decision> = decisions.iter().filter(|d| d.leg != "decode").collect();
            let hit = (!routed.is_empty())
                .then(|| round(routed.iter().map(|d| f64::from(d.hit)).sum::<f64>() / routed.len() as f64, 3));
            json!({
                "name": m.name,
                "disaggregated": group.disaggregated(),
                "routed_hit_rate": hit,
                "workers": workers,
                "pairs": pairs(&decisions),
                "decisions": decisions.iter().map(decision_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"t": unix_ms(), "viewers": fe.dashboard.viewers.count(), "frontend": rates, "models": models})
}

fn decision_json(d: &Decision) -> Value {
    let cands: Vec<Value> = d
        .candidates
        .iter()
        .map(|c| json!([c.worker.to_string(), c.overlap_blocks, round(f64::from(c.cost), 3), c.state.as_str()]))
        .collect();
    json!({
        "t": d.at_ms,
        "request": format!("{:x}", d.request_id),
        "leg": d.leg,
        "chosen": d.chosen.to_string(),
        "prompt_tokens": d.prompt_tokens,
        "overlap_blocks": d.overlap_blocks,
        "hit": round(f64::from(d.hit), 3),
        "candidates": cands,
    })
}

/// Disaggregated pairs among `decisions`: a request's prefill and decode legs, counted per
/// (prefill, decode) worker pair, most frequent first.
fn pairs(decisions: &[Decision]) -> Vec<Value> {
    let mut decode: HashMap<u64, WorkerId> = HashMap::new();
    for d in decisions.iter().filter(|d| d.leg == "decode") {
        decode.insert(d.request_id, d.chosen);
    }
    let mut counts: HashMap<(WorkerId, WorkerId), u32> = HashMap::new();
    for d in decisions.iter().filter(|d| d.leg == "prefill") {
        if let Some(&to) = decode.get(&d.request_id) {
            *counts.entry((d.chosen, to)).or_default() += 1;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|((p, d), n)| json!({"prefill": p.to_string(), "decode": d.to_string(), "requests": n})).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn leg(request_id: u64, leg: &'static str, chosen: u64) -> Decision {
        Decision {
            at_ms: 0,
            request_id,
            leg,
            chosen: WorkerId(chosen),
            prompt_tokens: 32,
            overlap_blocks: 1,
            hit: 0.5,
            candidates: vec![],
        }
    }

    #[test]
    fn pairs_join_a_requests_legs() {
        let ds = [
            leg(1, "decode", 10),
            leg(1, "prefill", 20),
            leg(2, "decode", 10),
            leg(2, "prefill", 20),
            leg(3, "whole", 10),
        ];
        let p = pairs(&ds);
        assert_eq!(p, vec![json!({"prefill": "14", "decode": "a", "requests": 2})]);
    }

    #[test]
    fn rates_are_differences_over_the_window() {
        let mut w = Window::default();
        let t0 = Instant::now();
        let first = w.rates(t0, Totals::default());
        assert_eq!(first["window_s"], 0.0);
        let t = Totals {
            requests: 20,
            prompt_tokens: 1000,
            cached_tokens: 250,
            ttft_count: 20,
            ttft_ns: 20 * 5_000_000,
            transfers: 0,
            transfer_bytes: 2 << 20,
        };
        let r = w.rates(t0 + Duration::from_secs(2), t);
        assert_eq!(r["requests_per_s"], 10.0);
        assert_eq!(r["hit_rate"], 0.25);
        assert_eq!(r["ttft_ms"], 5.0);
        assert_eq!(r["transfer_mib_per_s"], 1.0);
        for i in 0..20 {
            w.rates(t0 + Duration::from_secs(3 + i), t);
        }
        assert_eq!(w.readings.len(), WINDOW_SNAPSHOTS);
    }
}
