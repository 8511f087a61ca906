//! Wake-ups when booked load is released: a [`LoadGuard`](super::LoadGuard) that drops, or
//! releases its prefill tokens, calls [`released`], which wakes every data-plane shard that has
//! requests waiting for a worker to free ([`crate::frontend::pipeline::admission`]).
//!
//! Invariant: a shard whose queue holds a waiter has its bit in `WAITING` (set by the shard
//! before its waiter first checks the load, cleared when its queue empties), so a release after
//! that check finds the bit, sets the shard's `FIRED` flag and wakes its registered waker; the
//! waiter ([`Released`]) registers before it reads `FIRED`, so no release is lost between the
//! check and the sleep.
//!
//! Concurrency: one [`AtomicWaker`] per shard (its head waiters are on that shard's thread;
//! several models' heads waiting on one shard share it, the last to register is woken and the
//! others fall back to their periodic re-check); `released` runs on any thread and costs one
//! relaxed load when no shard waits. Bounded: [`MAX_SHARDS`] slots, fixed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use super::load::MAX_SHARDS;

const _: () = assert!(MAX_SHARDS <= 64, "one bit per shard in WAITING");

/// Bit `i`: shard `i` has waiters.
static WAITING: AtomicU64 = AtomicU64::new(0);
static FIRED: [AtomicBool; MAX_SHARDS] = [const { AtomicBool::new(false) }; MAX_SHARDS];
static WAKERS: [AtomicWaker; MAX_SHARDS] = [const { AtomicWaker::new() }; MAX_SHARDS];

/// Booked load was released somewhere: wakes the shards with waiters.
pub fn released() {
    let mut mask = WAITING.load(Ordering::Acquire);
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        FIRED[i].store(true, Ordering::Release);
        WAKERS[i].wake();
    }
}

/// Whether shard `shard` (`< MAX_SHARDS`) has waiters; set before its waiters check the load.
pub fn set_waiting(shard: usize, waiting: bool) {
    let bit = 1u64 << shard;
    if waiting {
        WAITING.fetch_or(bit, Ordering::AcqRel);
    } else {
        WAITING.fetch_and(!bit, Ordering::AcqRel);
        FIRED[shard].store(false, Ordering::Relaxed);
    }
}

/// Resolves at the next release after the previous one this shard consumed.
pub struct Released {
    shard: usize,
}

/// Waits for a release (shard `shard`'s waiters only).
pub fn next_release(shard: usize) -> Released {
    Released { shard }
}

impl Future for Released {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        WAKERS[self.shard].register(cx.waker());
        if FIRED[self.shard].swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test touches the process-wide statics (a shard index no other test uses).
    #[test]
    fn a_release_wakes_a_waiting_shard_and_only_while_it_waits() {
        const SHARD: usize = 63;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut f = next_release(SHARD);
        released();
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending(), "not waiting: nothing fired");
        set_waiting(SHARD, true);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        released();
        assert!(Pin::new(&mut f).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending(), "one release, one wake-up");
        released();
        set_waiting(SHARD, false);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending(), "leaving clears what fired");
    }
}
