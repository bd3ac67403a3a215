//! Layer 4: what every channel of a host shares — the host state word, the
//! idle wake-up, the counters of [`HostStats`](crate::HostStats), and the
//! marker that tells a wait it runs inside one of this host's callbacks.
//!
//! # Host state word
//!
//! One `AtomicU8`: `OPEN → CLOSING → CLOSED`, `OPEN | CLOSING → ABORTED →
//! CLOSED`. Every change is a `SeqCst` CAS; `abort` sets `ABORTED` before it
//! sweeps (the first half of the R4 Dekker pair, `state.rs`). The hot path
//! only *reads* it (`begin_call`'s check and re-check), so the line stays
//! shared in every core's cache.
//!
//! # Idle wake-up (A2)
//!
//! There is no host-wide in-flight counter (a line written by every call).
//! A waiter announces itself in `idle_waiters` (`SeqCst`), reads the
//! `idle_epoch`, takes a census *without* any lock, and then — under the
//! `idle` mutex, only if the epoch has not moved — sleeps on the condvar or
//! parks its waker. A freer that saw a waiter (right after its deciding
//! `SeqCst` RMW, or through a `DUTY` request on its finishing slot:
//! `state.rs`) bumps the epoch after its release and then notifies under
//! the mutex. Either the waiter's census sees the slot released, or the
//! freer's bump comes after the waiter read the epoch and the waiter either
//! sees the bump (and looks again) or is already asleep when the freer
//! notifies. Nobody polls; a completion holds the mutex only to notify.
//!
//! # Counters
//!
//! Cancellations by reason and refusals are counted where they are decided
//! (sweeps, `cancel`, deadline expiry, refused begins), never on the
//! uncontended lifecycle. They are striped over a few cache lines by thread
//! so that two threads faulting different channels do not share one.

use core::task::Waker;
use std::cell::Cell;

use crate::sync::{lock, thread_shard, AtomicU64, AtomicU8, AtomicUsize, Condvar, Mutex, Ordering};
use crate::value::panic::{catch, FirstPanic, Panic};
use crate::value::stats::reason_index;
use crate::{CancelReason, Error, HostState};

pub(crate) const OPEN: u8 = 0;
pub(crate) const CLOSING: u8 = 1;
pub(crate) const ABORTED: u8 = 2;
pub(crate) const CLOSED: u8 = 3;

/// Keeps a hot, read-mostly field off its neighbours' cache lines (128 bytes:
/// the adjacent-line prefetcher pairs 64-byte lines on x86).
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

/// Stripes of the counters.
const STRIPES: usize = 4;

#[derive(Default)]
struct CounterStripe {
    /// Per [`CancelReason`] (`reason_index`).
    cancelled: [AtomicU64; 4],
    refused: AtomicU64,
    /// Of `refused`: `begin_call`s refused because their channel was faulted.
    refused_faulted: AtomicU64,
    /// Channels opened on this stripe minus those of them disposed of (a
    /// channel is disposed of on its opening stripe, so never below zero).
    channels: AtomicU64,
}

/// The parked async idle waiters.
#[derive(Default)]
pub(crate) struct IdleWakers {
    next_id: u64,
    wakers: Vec<(u64, Waker)>,
}

/// What every channel of a host needs.
pub(crate) struct HostCore {
    state: Padded<AtomicU8>,
    idle_waiters: Padded<AtomicUsize>,
    /// Bumped by every freer that notifies (see the module docs).
    idle_epoch: Padded<AtomicU64>,
    idle: Mutex<IdleWakers>,
    idle_cv: Condvar,
    counters: [Padded<CounterStripe>; STRIPES],
}

impl HostCore {
    pub(crate) fn new() -> Self {
        Self {
            state: Padded(AtomicU8::new(OPEN)),
            idle_waiters: Padded(AtomicUsize::new(0)),
            idle_epoch: Padded(AtomicU64::new(0)),
            idle: Mutex::new(IdleWakers::default()),
            idle_cv: Condvar::new(),
            counters: core::array::from_fn(|_| Padded(CounterStripe::default())),
        }
    }

    /// The raw state (`OPEN`, `CLOSING`, `ABORTED`, `CLOSED`).
    #[inline]
    pub(crate) fn raw_state(&self, order: Ordering) -> u8 {
        self.state.0.load(order)
    }

    pub(crate) fn state(&self) -> HostState {
        // Ordering: Acquire pairs with the SeqCst state changes.
        match self.raw_state(Ordering::Acquire) {
            OPEN => HostState::Open,
            CLOSING => HostState::Closing,
            ABORTED => HostState::Aborted,
            _ => HostState::Closed,
        }
    }

    /// Moves the state from anything in `from` to `to` (`SeqCst` CAS loop:
    /// every transition is part of a Dekker pair with `begin_call`'s
    /// re-check). Returns the state found.
    pub(crate) fn transition(&self, from: &[u8], to: u8) -> u8 {
        let mut cur = self.state.0.load(Ordering::SeqCst);
        while from.contains(&cur) {
            match self
                .state
                .0
                .compare_exchange(cur, to, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return cur,
                Err(actual) => cur = actual,
            }
        }
        cur
    }

    /// `Err` unless the host accepts new channels and calls.
    #[inline]
    pub(crate) fn check_accepting(&self, order: Ordering) -> Result<(), Error> {
        match self.state.0.load(order) {
            OPEN => Ok(()),
            ABORTED => Err(Error::HostAborted),
            _ => Err(Error::HostClosed),
        }
    }

    fn stripe(&self) -> &CounterStripe {
        &self.counters[thread_shard(STRIPES)].0
    }

    /// A cancellation with `reason` was decided.
    pub(crate) fn count_cancel(&self, reason: CancelReason) {
        // Ordering: Relaxed: a statistic, monotone per counter.
        self.stripe().cancelled[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// `n` cancellations with `reason` at once (a sweep counts its own once,
    /// at its end: one RMW per sweep, not per call).
    pub(crate) fn count_cancels(&self, reason: CancelReason, n: u64) {
        if n != 0 {
            // Ordering: Relaxed, as above.
            self.stripe().cancelled[reason_index(reason)].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Takes back a cancellation counted for a call that was then refused.
    pub(crate) fn uncount_cancel(&self, reason: CancelReason) {
        // Ordering: Relaxed, as above. Stripes may go below zero alone
        // (another thread's stripe counted it): sums wrap back.
        self.stripe().cancelled[reason_index(reason)].fetch_sub(1, Ordering::Relaxed);
    }

    /// A `begin_call` or `open_channel` was refused with `why`.
    #[cold]
    pub(crate) fn count_refused(&self, why: Error) {
        let stripe = self.stripe();
        // Ordering: Relaxed, as above.
        stripe.refused.fetch_add(1, Ordering::Relaxed);
        if why == Error::ChannelFaulted {
            // Ordering: Relaxed, as above.
            stripe.refused_faulted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A channel was opened: counted on this thread's stripe, whose index
    /// the channel keeps for [`HostCore::count_channel_disposed`].
    pub(crate) fn count_channel_opened(&self) -> u8 {
        let index = thread_shard(STRIPES);
        // Ordering: Relaxed, as above (the count's own modification order
        // puts a channel's -1 after its +1: the opening happens before the
        // disposal).
        self.counters[index]
            .0
            .channels
            .fetch_add(1, Ordering::Relaxed);
        u8::try_from(index).expect("STRIPES fits a u8")
    }

    /// A channel opened on stripe `stripe` was disposed of.
    pub(crate) fn count_channel_disposed(&self, stripe: u8) {
        // Ordering: Relaxed, as above.
        self.counters[usize::from(stripe)]
            .0
            .channels
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Channels opened and not yet disposed of. Each stripe counts its own
    /// channels, so a channel open during the whole read is always counted
    /// (as a walk of the table would); one opened or disposed of meanwhile
    /// may or may not be.
    pub(crate) fn channels(&self) -> usize {
        self.counters
            .iter()
            // Ordering: Relaxed, as above.
            .map(|stripe| stripe.0.channels.load(Ordering::Relaxed))
            .sum::<u64>()
            .try_into()
            .unwrap_or(usize::MAX)
    }

    /// Sums the stripes: (refused, of those for a faulted channel,
    /// cancelled by reason).
    pub(crate) fn counts(&self) -> (u64, u64, [u64; 4]) {
        let mut refused = 0;
        let mut refused_faulted = 0;
        let mut cancelled = [0u64; 4];
        for stripe in &self.counters {
            // Ordering: Relaxed, as above.
            refused += stripe.0.refused.load(Ordering::Relaxed);
            // Ordering: Relaxed, as above.
            refused_faulted += stripe.0.refused_faulted.load(Ordering::Relaxed);
            for (sum, c) in cancelled.iter_mut().zip(&stripe.0.cancelled) {
                *sum = u64::wrapping_add(*sum, c.load(Ordering::Relaxed));
            }
        }
        // A refusal's take-back may land before the sweep's count (stripes
        // wrap below zero): read such a transient as zero, never as 2^64.
        for sum in &mut cancelled {
            if (*sum as i64) < 0 {
                *sum = 0;
            }
        }
        // The two refusal counters are read one after the other: never
        // report more faulted-channel refusals than refusals.
        (refused, refused_faulted.min(refused), cancelled)
    }

    /// Whether anybody waits for idle: read by a freer right after its
    /// deciding `SeqCst` RMW or its `DUTY`-carrying release (the freer's
    /// half of the idle Dekker pair; see the module docs).
    #[inline]
    pub(crate) fn idle_watched(&self) -> bool {
        crate::sync::dekker_fence();
        self.idle_waiters.0.load(Ordering::SeqCst) != 0
    }

    /// Announces an idle waiter until the guard drops (also on unwind:
    /// issue 12 #14).
    pub(crate) fn watch_idle(&self) -> IdleWatch<'_> {
        self.announce_idle_waiter();
        IdleWatch { core: self }
    }

    /// An idle waiter announces itself (before its first census); the
    /// caller must [`withdraw_idle_waiter`](Self::withdraw_idle_waiter)
    /// exactly once.
    pub(crate) fn announce_idle_waiter(&self) {
        // Ordering: SeqCst, the waiter's half of the idle Dekker pair.
        self.idle_waiters.0.fetch_add(1, Ordering::SeqCst);
        crate::sync::dekker_fence();
    }

    /// See [`announce_idle_waiter`](Self::announce_idle_waiter).
    pub(crate) fn withdraw_idle_waiter(&self) {
        // Ordering: SeqCst like the increment; it only stops notifications.
        self.idle_waiters.0.fetch_sub(1, Ordering::SeqCst);
    }

    /// The epoch a waiter reads before its census.
    pub(crate) fn idle_epoch(&self) -> u64 {
        // Ordering: SeqCst: read after the waiter's announcement, before
        // its census (module docs).
        self.idle_epoch.0.load(Ordering::SeqCst)
    }

    /// Sleeps until a freer notifies after `epoch`, or `timeout` passes.
    pub(crate) fn sleep_idle(&self, epoch: u64, timeout: std::time::Duration) {
        let guard = lock(&self.idle);
        if self.idle_epoch() != epoch {
            return;
        }
        #[cfg(loom)]
        {
            let _ = timeout;
            drop(self.idle_cv.wait(guard));
        }
        #[cfg(not(loom))]
        drop(self.idle_cv.wait_timeout(guard, timeout));
    }

    /// Parks an async waiter's waker under `id` unless a freer notified
    /// after `epoch`; returns whether it parked. The waker is cloned, and a
    /// replaced one dropped, outside the mutex (no user code under our
    /// locks, issue 12 #8).
    pub(crate) fn park_idle(&self, id: &mut Option<u64>, epoch: u64, waker: &Waker) -> bool {
        let fresh = waker.clone();
        let replaced = {
            let mut idle = lock(&self.idle);
            if self.idle_epoch() != epoch {
                // `fresh` is dropped after the guard (reverse declaration
                // order).
                return false;
            }
            let key = *id.get_or_insert_with(|| {
                idle.next_id += 1;
                idle.next_id
            });
            match idle.wakers.iter_mut().find(|(i, _)| *i == key) {
                Some((_, w)) => Some(core::mem::replace(w, fresh)),
                None => {
                    idle.wakers.push((key, fresh));
                    None
                }
            }
        };
        drop(replaced);
        true
    }

    /// Removes a parked async waiter (its future was dropped or is done).
    pub(crate) fn unpark_idle(&self, id: u64) {
        let removed = {
            let mut idle = lock(&self.idle);
            idle.wakers
                .iter()
                .position(|(i, _)| *i == id)
                .map(|pos| idle.wakers.swap_remove(pos))
        };
        drop(removed);
    }

    /// Wakes every idle waiter so it takes a new census. A waker that
    /// panics does not stop the others; the first panic is returned.
    #[must_use]
    pub(crate) fn notify_idle(&self) -> Option<Panic> {
        // Ordering: SeqCst: after the freer's release, before the lock (see
        // the module docs).
        self.idle_epoch.0.fetch_add(1, Ordering::SeqCst);
        let wakers = {
            let mut idle = lock(&self.idle);
            self.idle_cv.notify_all();
            core::mem::take(&mut idle.wakers)
        };
        let mut first = FirstPanic::default();
        for (_, w) in wakers {
            first.record(catch(|| w.wake()));
        }
        first.into_inner()
    }
}

/// An announced idle waiter (see [`HostCore::watch_idle`]).
pub(crate) struct IdleWatch<'a> {
    core: &'a HostCore,
}

impl Drop for IdleWatch<'_> {
    fn drop(&mut self) {
        self.core.withdraw_idle_waiter();
    }
}

/// How many nested hosts' user code a thread tracks (deeper nesting is
/// counted but not remembered: such a wait is then not recognised as one on
/// itself, and waits out its timeout).
const NESTING: usize = 8;

struct Running {
    hosts: [Cell<*const HostCore>; NESTING],
    depth: Cell<usize>,
}

std::thread_local! {
    /// The hosts whose user code (a cancel callback, a free-state) this
    /// thread runs now, outermost first (a callback of host A may abort
    /// host B, whose callback then runs nested: issue found in review).
    static RUNNING: Running = const {
        Running {
            hosts: [const { Cell::new(core::ptr::null()) }; NESTING],
            depth: Cell::new(0),
        }
    };
}

/// Marks this thread as running user code for a host until dropped.
pub(crate) struct UserCode {
    entered: bool,
}

impl UserCode {
    #[inline]
    pub(crate) fn enter(core: &HostCore) -> Self {
        let entered = RUNNING
            .try_with(|r| {
                let d = r.depth.get();
                if d < NESTING {
                    r.hosts[d].set(core);
                }
                r.depth.set(d + 1);
            })
            .is_ok();
        Self { entered }
    }
}

impl Drop for UserCode {
    #[inline]
    fn drop(&mut self) {
        if self.entered {
            let _ = RUNNING.try_with(|r| r.depth.set(r.depth.get() - 1));
        }
    }
}

/// Whether this thread runs a callback or free-state of one of `core`'s
/// calls, at any nesting depth (then waiting for that host to be idle
/// would wait for itself).
pub(crate) fn running_for(core: &HostCore) -> bool {
    RUNNING
        .try_with(|r| {
            let d = r.depth.get().min(NESTING);
            r.hosts[..d].iter().any(|h| core::ptr::eq(h.get(), core))
        })
        .unwrap_or(false)
}
