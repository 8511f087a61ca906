//! Publishes a worker's [`LoadReport`] on the load plane ([`crate::planes::load`]) at a bounded
//! rate: when it changes, at most once per [`LOAD_PUBLISH_MIN_INTERVAL`] (once per
//! [`FINISH_PUBLISH_MIN_INTERVAL`] when a request ended); and, changed or not, at
//! least once per [`LOAD_HEARTBEAT`], so a frontend started late (or one that lost a message)
//! knows an idle worker's load within a heartbeat.
//!
//! Each message carries a sequence number (from 1) so a frontend keeps only the newest.
//!
//! Concurrency: one task per worker reads the engine's `watch` ([`super::EngineIo::load`]); it
//! never blocks the engine (a watch holds only the latest value) and ends when the engine drops
//! the sender.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::contract::codec::LoadMessage;
use crate::contract::{LoadReport, WorkerId};
use crate::planes::load::LoadPublisher;

/// The shortest time between two reports of one worker: 20 per second bounds the plane's
/// traffic (a fleet of 1,000 workers: 20 k small messages/s at most), while a frontend's view
/// of a busy worker is at most this stale plus its own bookings on top.
pub const LOAD_PUBLISH_MIN_INTERVAL: Duration = Duration::from_millis(50);
/// The longest time between two reports, even unchanged: how soon a new frontend knows an idle
/// worker's load, and how a frontend tells a live report from a stale one.
pub const LOAD_HEARTBEAT: Duration = Duration::from_secs(1);

const _: () = assert!(LOAD_PUBLISH_MIN_INTERVAL.as_millis() < LOAD_HEARTBEAT.as_millis());

/// A request that ended is published after this, not [`LOAD_PUBLISH_MIN_INTERVAL`]: a
/// session's next turn follows its previous one within milliseconds, often through another
/// frontend, which must not see the worker still busy with the turn that just ended (it would
/// route the turn away from the worker holding its prefix). Bounds the rate at 200 per second.
pub const FINISH_PUBLISH_MIN_INTERVAL: Duration = Duration::from_millis(5);

const _: () = assert!(FINISH_PUBLISH_MIN_INTERVAL.as_millis() < LOAD_PUBLISH_MIN_INTERVAL.as_millis());

/// Whether `now` has fewer requests than `published` (one ended).
fn ended(published: &LoadReport, now: &LoadReport) -> bool {
    now.running_requests + now.waiting_requests < published.running_requests + published.waiting_requests
}

/// Publishes `worker`'s load from `load` until its sender is dropped.
pub async fn publish_load(worker: WorkerId, mut load: watch::Receiver<LoadReport>, publisher: impl LoadPublisher) {
    let mut seq = 0u64;
    loop {
        let report = *load.borrow_and_update();
        seq += 1;
        publisher.publish(LoadMessage { worker, seq, issued_at_us: now_us(), report }).await;
        let at = tokio::time::Instant::now();
        // Within the interval, changes wait for its end, except a request that ended, which goes
        // out after the shorter interval.
        let mut changed = false;
        loop {
            match tokio::time::timeout_at(at + LOAD_PUBLISH_MIN_INTERVAL, load.changed()).await {
                Err(_) => break,
                Ok(Err(_)) => return,
                Ok(Ok(())) => {
                    changed = true;
                    if ended(&report, &load.borrow()) {
                        tokio::time::sleep_until(at + FINISH_PUBLISH_MIN_INTERVAL).await;
                        break;
                    }
                }
            }
        }
        if changed {
            continue;
        }
        // A change or the heartbeat: publish again; the sender gone: the engine has ended.
        if let Ok(Err(_)) = tokio::time::timeout(LOAD_HEARTBEAT - LOAD_PUBLISH_MIN_INTERVAL, load.changed()).await {
            break;
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planes::load::{in_process, LoadSubscriber};

    #[tokio::test(start_paused = true)]
    async fn rate_is_bounded_and_idle_workers_heartbeat() {
        let (tx, rx) = watch::channel(LoadReport::default());
        let (p, mut s) = in_process();
        let task = tokio::spawn(publish_load(WorkerId(3), rx, p));
        assert_eq!(s.next_report().await.unwrap().seq, 1);
        // 100 changes at once: one more report, once the interval has passed.
        for i in 0..100 {
            tx.send_replace(LoadReport { running_requests: i, ..LoadReport::default() });
            tokio::task::yield_now().await;
        }
        let start = tokio::time::Instant::now();
        let m = s.next_report().await.unwrap();
        assert_eq!((m.seq, m.report.running_requests), (2, 99));
        assert!(start.elapsed() <= LOAD_PUBLISH_MIN_INTERVAL);
        // Unchanged: the next comes after a heartbeat.
        let start = tokio::time::Instant::now();
        assert_eq!(s.next_report().await.unwrap().seq, 3);
        assert!(start.elapsed() >= LOAD_HEARTBEAT - LOAD_PUBLISH_MIN_INTERVAL);
        drop(tx);
        tokio::time::timeout(LOAD_HEARTBEAT * 2, task).await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_ended_is_published_within_the_short_interval() {
        let busy = LoadReport { running_requests: 2, ..LoadReport::default() };
        let (tx, rx) = watch::channel(busy);
        let (p, mut s) = in_process();
        let task = tokio::spawn(publish_load(WorkerId(3), rx, p));
        let start = tokio::time::Instant::now();
        assert_eq!(s.next_report().await.unwrap().report.running_requests, 2);
        tx.send_replace(LoadReport { running_requests: 1, ..LoadReport::default() });
        let m = s.next_report().await.unwrap();
        assert_eq!((m.seq, m.report.running_requests), (2, 1));
        let took = start.elapsed();
        assert!(took >= FINISH_PUBLISH_MIN_INTERVAL && took < LOAD_PUBLISH_MIN_INTERVAL, "{took:?}");
        // A new request right after: the long interval again.
        let start = tokio::time::Instant::now();
        tx.send_replace(busy);
        assert_eq!(s.next_report().await.unwrap().seq, 3);
        assert!(start.elapsed() >= LOAD_PUBLISH_MIN_INTERVAL - FINISH_PUBLISH_MIN_INTERVAL);
        drop(tx);
        tokio::time::timeout(LOAD_HEARTBEAT * 2, task).await.unwrap().unwrap();
    }
}
