//! The preprocessing pool: heavy request preparation (JSON parse, chat template, tokenization)
//! runs here, off the shards, so a long prompt never stalls the other streams of its shard.
//!
//! Why a pool rather than chunk-and-yield on the shard: a 10 MB body is one `serde_json` parse
//! and one template render (~26 ms together on one core, perf/RESULTS.md, "Long prompts and the
//! shard"), neither of which can yield, and its encode took 1.4 s (8 s in the issue); a
//! 60k-token prompt's encode takes 6–16 ms. Measured with one shard, a stream's largest gap while
//! such requests arrive is ~10 ms with the pool against 55–236 ms on the shard. Requests whose
//! body is at most [`INLINE_MAX_BODY_BYTES`] stay inline: their preparation takes about a
//! millisecond at most, and the hop would cost more than it saves. The body's chunks are
//! joined into one buffer on the pool thread too (a copy of up to `--max-body-bytes`).
//!
//! Concurrency: `threads` std threads (`--preprocess-threads`) take jobs from one bounded queue
//! ([`PrepPool::new`]'s `queue`); a shard submits a job and awaits its answer on a oneshot, so
//! the shard keeps serving its other streams meanwhile. The threads run at a lower priority
//! (nice [`POOL_NICE`]): on a machine with one shard per core, a shard that wakes preempts
//! them, so a long tokenization borrows idle CPU rather than a shard's. When the queue is full
//! the request is refused 503 with `Retry-After` (by the one error mapping): waiting would hold
//! each waiter's body in memory without bound. A job that panics answers 500 and the thread
//! keeps serving. With 0 threads the pool runs every job inline (the in-process, single-thread
//! implementation, and the behaviour before the pool). Threads are joined on drop.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;
use tokio::sync::oneshot;

/// Bodies up to this size are prepared inline on the shard: at most ~4k tokens, whose encode
/// costs ~1 ms cold on the worst text measured (made-up words, 3.9M tokens/s on one core;
/// English prose is ~3× faster), the stall budget; the hop would cost more than it saves.
pub const INLINE_MAX_BODY_BYTES: usize = 8 * 1024;
/// Jobs waiting per pool thread before new ones are refused: bounds the bodies held waiting.
pub const QUEUE_PER_THREAD: usize = 64;
/// The pool threads' nice value: above the shards' 0, so a shard that wakes runs first.
pub const POOL_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job got no answer.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    #[error("the preprocessing queue is full ({queue} requests waiting; --preprocess-threads); retry later")]
    Full { queue: usize },
    #[error("preprocessing failed unexpectedly (the job panicked)")]
    Lost,
}

/// A bounded pool of std threads for preparing long requests.
pub struct PrepPool {
    tx: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    queue: usize,
}

impl PrepPool {
    /// A pool that runs every job inline on the caller's thread.
    pub fn inline() -> Self {
        Self { tx: None, threads: Vec::new(), queue: 0 }
    }

    /// Starts `threads` threads (0: [`Self::inline`]) sharing a queue of `queue` jobs.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        if threads == 0 {
            return Ok(Self::inline());
        }
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            handles.push(std::thread::Builder::new().name(format!("kvgate-prep-{i}")).spawn(move || run(&rx))?);
        }
        Ok(Self { tx: Some(tx), threads: handles, queue })
    }

    /// Threads serving the queue (0: inline).
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Runs `f` on the pool and answers its result; inline when the pool has no threads or
    /// `small` says the job is too cheap to move.
    pub async fn run<T, F>(&self, small: bool, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let Some(tx) = self.tx.as_ref().filter(|_| !small) else {
            return Ok(f());
        };
        let (done, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(PoolError::Full { queue: self.queue }),
            // The threads are gone only once the pool is dropped, which needs every shard gone.
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Lost),
        }
        answer.await.map_err(|_| PoolError::Lost)
    }
}

/// A pool thread: lower its priority, then serve jobs until the queue closes.
fn run(rx: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        // The lock is held only to take one job.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(job) = job else { return };
        // A panicking job drops its oneshot sender: its request answers 500, the thread lives on.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a preprocessing job panicked");
        }
    }
}

fn lower_priority() {
    // SAFETY: setpriority only reads its arguments; on Linux, `who = 0` with PRIO_PROCESS names
    // the calling thread (nice values are per thread).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, POOL_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the preprocessing threads' priority");
    }
}

impl Drop for PrepPool {
    fn drop(&mut self) {
        drop(self.tx.take());
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A job holding the last reference to the frontend drops the pool on a pool thread.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn runs_off_the_caller_and_inline_when_small() {
        let pool = PrepPool::new(1, 4).unwrap();
        let here = std::thread::current().id();
        let there = block_on(pool.run(false, || std::thread::current().id())).unwrap();
        assert_ne!(there, here);
        assert_eq!(block_on(pool.run(true, || std::thread::current().id())).unwrap(), here);
        let inline = PrepPool::inline();
        assert_eq!(block_on(inline.run(false, || std::thread::current().id())).unwrap(), here);
    }

    #[test]
    fn a_full_queue_refuses_and_a_panic_is_lost() {
        use futures::FutureExt;
        let pool = PrepPool::new(1, 1).unwrap();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        // Submitted and left running (its answer is not awaited): it holds the only thread.
        let blocker = pool.run(false, move || {
            started_tx.send(()).unwrap();
            wait.recv_timeout(Duration::from_secs(10)).ok();
        });
        assert!(blocker.now_or_never().is_none());
        started.recv().unwrap();
        // One job fits the queue; the next is refused.
        assert!(pool.run(false, || 7).now_or_never().is_none());
        assert_eq!(pool.run(false, || 0).now_or_never(), Some(Err(PoolError::Full { queue: 1 })));
        release.send(()).unwrap();
        // The queue drains (the held job, then the queued one) and takes jobs again.
        while block_on(pool.run(false, || ())).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let lost = block_on(pool.run(false, || -> u8 { panic!("boom") }));
        assert_eq!(lost, Err(PoolError::Lost));
        assert_eq!(block_on(pool.run(false, || 3)), Ok(3));
    }
}
