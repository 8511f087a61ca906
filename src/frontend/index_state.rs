//! Each worker's index state: how far the router's view of its cache can be trusted.
//!
//! | state | meaning | routed |
//! | --- | --- | --- |
//! | `exact` | its KV events arrive contiguously; the index is what the worker holds | on its blocks |
//! | `recovering` | a gap (or a join) is being repaired by a replay or a dump | on its blocks |
//! | `approximate` | it publishes no events (`--no-kv-events`, or registered without) | on predictions |
//! | `blind` | its event stream broke while it is alive: busy and silent for [`SILENT_BOUND`] and events it published never arrived, or a recovery failed | on predictions |
//!
//! The rule for `blind`, exactly: workers send no heartbeat on the event plane (an idle
//! worker is silent, and that is normal), so silence alone says nothing. The control plane looks
//! at each worker every [`CHECK_INTERVAL`]: a worker that has had requests in flight the whole
//! time (its load as the router counts it: its last fresh load report plus this frontend's
//! bookings) and no KV event for [`SILENT_BOUND`] is asked, over the request plane, for the events
//! after the last one applied (a busy engine writes KV blocks, so publishes, at every step; but a
//! worker serving prompts it holds whole may write none). No event: it was just quiet, it stays
//! exact and its silence is timed anew. Events (applied at once) or a dump: its stream is losing
//! them, so it is blind. A recovery that fails (the worker cannot say what it holds) also makes
//! it blind. A blind worker is routed as an approximate one: its known blocks stay, and
//! what is routed to it is added as predicted blocks. It leaves `blind` through a full resync
//! (its blocks and predictions dropped, then a replay from event 0 or a dump): `recovering`,
//! then `exact`. Started by its next event, or by the periodic sync when it stays silent.
//!
//! Concurrency: the control plane is the only writer of a [`KvTracking`] cell (the state, when
//! it was entered, the last event's time, the transition counts); shards, `/health`, `/metrics`
//! and the dashboard read it with relaxed loads. A request racing a transition may route one
//! request on the previous state; the control plane then ignores its prediction.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::time::{Duration, Instant};

/// A busy worker silent this long is blind: a busy engine publishes at every step (tens of ms),
/// and the event plane reconnects within 2 s ([`crate::planes::events::nats::MAX_RECONNECT_DELAY`]).
pub const SILENT_BOUND: Duration = Duration::from_secs(5);
/// How often the control plane looks for silent workers: a worker turns blind at most this long
/// after [`SILENT_BOUND`].
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IndexState {
    Exact = 0,
    Recovering = 1,
    Approximate = 2,
    Blind = 3,
}

impl IndexState {
    pub const ALL: [IndexState; 4] = [Self::Exact, Self::Recovering, Self::Approximate, Self::Blind];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Recovering => "recovering",
            Self::Approximate => "approximate",
            Self::Blind => "blind",
        }
    }

    /// Whether its cache is predicted from what is routed to it.
    pub fn routes_approximately(self) -> bool {
        matches!(self, Self::Approximate | Self::Blind)
    }

    fn from_u8(v: u8) -> Self {
        Self::ALL.get(v as usize).copied().unwrap_or(Self::Blind)
    }
}

/// The process's time origin for the cells' stamps.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], plus 1 (0 means "never").
fn stamp(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

fn since(stamp_ms: u64) -> Option<Duration> {
    (stamp_ms != 0).then(|| Duration::from_millis((epoch().elapsed().as_millis() as u64 + 1).saturating_sub(stamp_ms)))
}

/// One worker's index state, shared by the control plane (writer) and every reader. Survives
/// worker-group swaps.
#[derive(Debug)]
pub struct KvTracking {
    state: AtomicU8,
    /// When the state was entered ([`stamp`]).
    entered_ms: AtomicU64,
    /// When its last KV event arrived (0: never).
    last_event_ms: AtomicU64,
    /// Transitions into each state, by [`IndexState`] order.
    transitions: [AtomicU64; 4],
}

impl KvTracking {
    /// A new worker: approximate when it has no events, else recovering until its first sync.
    pub fn new(approximate: bool) -> Self {
        let first = if approximate { IndexState::Approximate } else { IndexState::Recovering };
        let t = Self {
            state: AtomicU8::new(first as u8),
            entered_ms: AtomicU64::new(stamp(Instant::now())),
            last_event_ms: AtomicU64::new(0),
            transitions: Default::default(),
        };
        t.transitions[first as usize].store(1, Relaxed);
        t
    }

    pub fn get(&self) -> IndexState {
        IndexState::from_u8(self.state.load(Relaxed))
    }

    /// Whether its cache is predicted (approximate or blind).
    pub fn is_approximate(&self) -> bool {
        self.get().routes_approximately()
    }

    /// The state's name, as `/health` says it.
    pub fn state(&self) -> &'static str {
        self.get().as_str()
    }

    /// Moves to `to` (control plane only). Returns whether it changed.
    pub fn set(&self, to: IndexState) -> bool {
        if self.get() == to {
            return false;
        }
        self.state.store(to as u8, Relaxed);
        self.entered_ms.store(stamp(Instant::now()), Relaxed);
        self.transitions[to as usize].fetch_add(1, Relaxed);
        true
    }

    /// The worker's events began (control plane only).
    pub fn set_exact(&self) {
        self.set(IndexState::Exact);
    }

    /// A KV event of the worker arrived at `at` (control plane only).
    pub fn event_at(&self, at: Instant) {
        self.last_event_ms.store(stamp(at), Relaxed);
    }

    /// How long since its last KV event (`None`: none yet).
    pub fn since_event(&self) -> Option<Duration> {
        since(self.last_event_ms.load(Relaxed))
    }

    /// How long it has been in its state.
    pub fn in_state_for(&self) -> Duration {
        since(self.entered_ms.load(Relaxed)).unwrap_or_default()
    }

    /// Transitions into `to` so far.
    pub fn transitions(&self, to: IndexState) -> u64 {
        self.transitions[to as usize].load(Relaxed)
    }
}

/// Whether a worker's event stream went silent while it was busy (control plane only; a plain
/// structure with no clock of its own).
#[derive(Debug, Default, Clone, Copy)]
pub struct Silence {
    /// Since when it has had requests in flight without a break (checked every
    /// [`CHECK_INTERVAL`]); `None` while idle.
    busy_since: Option<Instant>,
}

impl Silence {
    /// One check at `now`: `busy` (requests in flight), `last_event` (its last event, or when it
    /// was first tracked). Returns `true` when it has been busy and silent for `bound`.
    pub fn check(&mut self, now: Instant, busy: bool, last_event: Instant, bound: Duration) -> bool {
        if !busy {
            self.busy_since = None;
            return false;
        }
        let busy_since = *self.busy_since.get_or_insert(now);
        let quiet_since = busy_since.max(last_event);
        now.saturating_duration_since(quiet_since) >= bound
    }
}

/// One worker's row of the index-state gauges.
pub struct StateRow<'a> {
    pub model: &'a str,
    pub worker: String,
    pub kv: &'a KvTracking,
}

/// The index-state gauges of `/metrics`: one 0/1 gauge per state, the seconds since the last
/// event, and the transitions into each state.
pub fn render(rows: &[StateRow<'_>], out: &mut String) {
    let esc = |m: &str| m.replace(['"', '\\', '\n'], "_");
    let name = "kvgate_worker_index_state";
    let _ = writeln!(out, "# HELP {name} 1 for the worker's index state (exact: events contiguous; recovering: a gap being repaired; approximate: no events, predicted; blind: its event stream broke, predicted).\n# TYPE {name} gauge");
    for r in rows {
        let now = r.kv.get();
        for s in IndexState::ALL {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\",worker=\"{}\",state=\"{}\"}} {}",
                esc(r.model),
                r.worker,
                s.as_str(),
                u8::from(now == s)
            );
        }
    }
    let name = "kvgate_worker_kv_event_age_seconds";
    let _ =
        writeln!(out, "# HELP {name} Seconds since the worker's last KV event (-1: none yet).\n# TYPE {name} gauge");
    for r in rows {
        let age = r.kv.since_event().map_or(-1.0, |d| d.as_secs_f64());
        let _ = writeln!(out, "{name}{{model=\"{}\",worker=\"{}\"}} {age:.3}", esc(r.model), r.worker);
    }
    let name = "kvgate_worker_index_transitions_total";
    let _ = writeln!(out, "# HELP {name} Times the worker's index entered each state.\n# TYPE {name} counter");
    for r in rows {
        for s in IndexState::ALL {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\",worker=\"{}\",state=\"{}\"}} {}",
                esc(r.model),
                r.worker,
                s.as_str(),
                r.kv.transitions(s)
            );
        }
    }
}

/// [`render`] for every worker of `fe`'s models.
pub fn render_frontend<P>(fe: &crate::frontend::Frontend<P>, out: &mut String) {
    let models = fe.models();
    let groups: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.workers.load_full())).collect();
    let mut rows = Vec::new();
    for (model, group) in &groups {
        for info in group.infos() {
            if let Some(e) = group.entries.get(&info.id) {
                rows.push(StateRow { model, worker: info.id.to_string(), kv: &e.kv });
            }
        }
    }
    render(&rows, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_needs_busy_and_quiet_for_the_whole_bound() {
        let b = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut s = Silence::default();
        assert!(!s.check(t0, true, t0, b));
        assert!(!s.check(t0 + Duration::from_secs(4), true, t0, b));
        assert!(s.check(t0 + Duration::from_secs(5), true, t0, b));
        // An event resets the clock.
        assert!(!s.check(t0 + Duration::from_secs(6), true, t0 + Duration::from_secs(6), b));
        // Idle: never blind, however long silent; busy again: the clock restarts.
        assert!(!s.check(t0 + Duration::from_secs(60), false, t0, b));
        assert!(!s.check(t0 + Duration::from_secs(61), true, t0, b));
        assert!(!s.check(t0 + Duration::from_secs(65), true, t0, b));
        assert!(s.check(t0 + Duration::from_secs(66), true, t0, b));
    }

    #[test]
    fn cells_count_transitions_and_render_one_state() {
        let kv = KvTracking::new(false);
        assert_eq!(kv.get(), IndexState::Recovering);
        assert!(!kv.is_approximate());
        assert!(kv.set(IndexState::Exact));
        assert!(!kv.set(IndexState::Exact));
        assert!(kv.set(IndexState::Blind));
        assert!(kv.is_approximate(), "blind is routed as approximate");
        assert_eq!(kv.transitions(IndexState::Recovering), 1);
        assert_eq!(kv.transitions(IndexState::Blind), 1);
        assert!(kv.since_event().is_none());
        kv.event_at(Instant::now());
        assert!(kv.since_event().unwrap() < Duration::from_secs(5));
        let mut out = String::new();
        render(&[StateRow { model: "m", worker: "2a".into(), kv: &kv }], &mut out);
        assert!(out.contains("kvgate_worker_index_state{model=\"m\",worker=\"2a\",state=\"blind\"} 1\n"));
        assert!(out.contains("kvgate_worker_index_state{model=\"m\",worker=\"2a\",state=\"exact\"} 0\n"));
        assert!(out.contains("kvgate_worker_index_transitions_total{model=\"m\",worker=\"2a\",state=\"exact\"} 1\n"));
        assert_eq!(KvTracking::new(true).get(), IndexState::Approximate);
    }
}
