//! Deadlines (R7): the crate's one timer (`store/timer.rs`, a sharded hashed
//! wheel with its own lazily started thread) and what its entries do.
//!
//! * A call begun with a deadline arms one entry naming its channel, slot and
//!   generation (O(1), one shard lock: no host-wide lock). When it expires,
//!   the timer thread cancels that generation with `DeadlineExceeded`
//!   through `decide_cancel`, the same claim as every other reason (R1–R6
//!   hold), handing the callback to a runner thread, and
//!   never before the deadline (the wheel compares exact instants).
//! * The call's completion disarms the entry *before* it completes (O(1)):
//!   a call that completes first leaves nothing in the timer. If the timer
//!   took the entry first, it did so under the shard lock while the call
//!   still occupied its slot, and took a strong reference to the channel
//!   there (`Expiry::take`); its late cancel then meets a completed or
//!   reused slot and is skipped by generation (R6).
//! * A deadline already past at `begin` cancels the call at once, on the
//!   caller's thread (nothing is registered yet: no user code runs).
//! * `close_async` sleeps on the same timer ([`Sleep`]), so it needs no
//!   async runtime's timer.
//!
//! A cancel callback run by the timer thread that panics is caught there; the
//! panic is dropped after the batch (there is nobody to re-raise it to).
//! No thread is started by a process that never arms a deadline.

use core::future::Future;
use core::pin::Pin;
use core::ptr::NonNull;
use core::task::{Context, Poll};
use std::time::Instant;

use crate::engine::channel::ChannelShared;
use crate::slot::CallSlot;
use crate::store::slab::SlotRef;
use crate::store::timer::{Expiry, Timer, TimerKey};
use crate::sync::{Arc, AtomicU8, AtomicWaker, Ordering};
use crate::value::panic::FirstPanic;
use crate::CancelReason;

/// What the crate's timer carries.
pub(crate) enum TimerEntry {
    /// A call's deadline.
    Deadline {
        /// The keepalive pointer of the call's channel.
        channel: NonNull<ChannelShared>,
        slot: SlotRef,
        generation: u64,
    },
    /// A [`Sleep`] to wake.
    Wake(Arc<SleepShared>),
}

// SAFETY: the pointers are only dereferenced under the rules of `take` and
// `fire` below (the channel is kept alive by the occupied call, then by the
// strong reference `take` takes); everything they reach is `Sync`.
unsafe impl Send for TimerEntry {}

/// [`TimerEntry`] once taken out of the wheel.
pub(crate) enum Fired {
    Deadline {
        channel: Arc<ChannelShared>,
        slot: SlotRef,
        generation: u64,
    },
    Wake(Arc<SleepShared>),
}

impl Expiry for TimerEntry {
    type Fired = Fired;

    fn take(self) -> Fired {
        match self {
            TimerEntry::Deadline {
                channel,
                slot,
                generation,
            } => Fired::Deadline {
                // SAFETY: the entry is still in the wheel and we hold its
                // shard lock, so the call has not passed its `disarm` (which
                // comes before its completion): it occupies its slot, so the
                // keepalive is held and `channel` is its pointer.
                channel: unsafe { ChannelShared::hold(channel.as_ptr()) },
                slot,
                generation,
            },
            TimerEntry::Wake(sleep) => Fired::Wake(sleep),
        }
    }

    fn fire(fired: Fired) {
        match fired {
            Fired::Deadline {
                channel,
                slot,
                generation,
            } => {
                let mut panics = FirstPanic::default();
                // Decided here, on time (R7); a segment given back means the
                // call is long finished. A claimed callback may block: it
                // runs on a runner thread, never on the timer's.
                let claimed = slot.with(&channel.slab, |slot| {
                    channel.decide_cancel(
                        slot,
                        generation,
                        CancelReason::DeadlineExceeded,
                        &mut panics,
                    )
                });
                if let Some(Some(claimed)) = claimed {
                    runners::submit(Job {
                        channel,
                        slot,
                        claimed,
                    });
                }
                panics.resume();
            }
            Fired::Wake(sleep) => sleep.fire(),
        }
    }

    fn batch_done() {
        runners::flush();
    }
}

/// A deadline's claimed callback, to run off the timer thread.
pub(crate) struct Job {
    channel: Arc<ChannelShared>,
    slot: SlotRef,
    claimed: crate::engine::channel::Claimed,
}

impl Job {
    fn run(self) {
        let mut panics = FirstPanic::default();
        let Job {
            channel,
            slot,
            claimed,
        } = self;
        // The slot stays occupied until the job's `finish_cancel`, so its
        // segment is still published.
        let _ = slot.with(&channel.slab, |slot| {
            // Waiters were woken when the timer decided: nothing to wake.
            // Ordering: Relaxed; only the generation is used, and the word's
            // waiter bits are dropped (`run_claimed`'s `try_start` is the
            // synchronising step).
            let quiet = slot
                .state
                .load(crate::sync::Ordering::Relaxed)
                .without_waiters();
            channel.run_claimed(slot, claimed.generation, claimed.reason, quiet, &mut panics)
        });
        // Nobody to re-raise to: a callback's panic is dropped here (and a
        // payload whose drop panics is leaked, not unwound into the runner).
        if let Some(p) = panics.into_inner() {
            if let Err(again) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(p))) {
                core::mem::forget(again);
            }
        }
    }
}

/// The threads that run deadline callbacks. The timer collects the claimed
/// callbacks of one expiry batch and hands them on together (`flush`: one
/// lock, one wake). The first job starts a runner; another is started only
/// when every runner is busy and the last job started `STUCK` ago or more (a
/// callback that blocks), up to `MAX`; idle runners leave after `IDLE_EXIT`.
/// So a burst of expiries costs one thread, and a callback that blocks
/// delays neither the timer (every other deadline's decision and
/// `close_async`'s timeout) nor, from the next batch on, other callbacks
/// (the rest of its own batch may wait for it). Under loom the job runs
/// inline (no threads).
mod runners {
    use super::Job;

    #[cfg(loom)]
    pub(super) fn submit(job: Job) {
        job.run();
    }

    #[cfg(loom)]
    pub(super) fn flush() {}

    #[cfg(not(loom))]
    pub(super) use pool::{flush, submit};

    #[cfg(not(loom))]
    mod pool {
        use super::Job;
        use std::collections::VecDeque;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Condvar, Mutex, PoisonError};
        use std::time::{Duration, Instant};

        const MAX: usize = 256;
        const STUCK: Duration = Duration::from_millis(1);
        const IDLE_EXIT: Duration = Duration::from_secs(10);

        struct Queue {
            jobs: VecDeque<Job>,
            idle: usize,
            threads: usize,
        }

        static QUEUE: Mutex<Queue> = Mutex::new(Queue {
            jobs: VecDeque::new(),
            idle: 0,
            threads: 0,
        });
        static WORK: Condvar = Condvar::new();
        /// When a runner last started a job (`now_nanos`), for the stuck
        /// check. Relaxed: a hint.
        static STARTED_AT: AtomicU64 = AtomicU64::new(0);
        static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

        fn now_nanos() -> u64 {
            u64::try_from(BASE.elapsed().as_nanos()).unwrap_or(u64::MAX)
        }

        fn lock() -> std::sync::MutexGuard<'static, Queue> {
            QUEUE.lock().unwrap_or_else(PoisonError::into_inner)
        }

        std::thread_local! {
            /// The jobs of the timer's current batch (handed on together by
            /// `flush`, so a burst of expiries costs one lock and one wake).
            static PENDING: std::cell::RefCell<Vec<Job>> = const {
                std::cell::RefCell::new(Vec::new())
            };
        }

        pub(in super::super) fn submit(job: Job) {
            let mut job = Some(job);
            let _ = PENDING.try_with(|p| p.borrow_mut().extend(job.take()));
            if let Some(job) = job {
                job.run(); // this thread's locals are gone: run it here
            }
        }

        /// Hands the batch to the runners (see the module docs).
        pub(in super::super) fn flush() {
            let batch = PENDING
                .try_with(|p| core::mem::take(&mut *p.borrow_mut()))
                .unwrap_or_default();
            if batch.is_empty() {
                return;
            }
            let mut q = lock();
            q.jobs.extend(batch);
            if q.idle > 0 {
                drop(q);
                WORK.notify_one();
                return;
            }
            let spawn = if q.threads == 0 {
                true
            } else if q.threads >= MAX {
                false
            } else {
                // Every runner busy: start another only if the last job
                // started `STUCK` ago or more (a callback that blocks).
                // Ordering: Relaxed, a hint (see `STARTED_AT`).
                let started = STARTED_AT.load(Ordering::Relaxed);
                now_nanos().saturating_sub(started) >= STUCK.as_nanos() as u64
            };
            if !spawn {
                return;
            }
            q.threads += 1;
            drop(q);
            let spawned = std::thread::Builder::new()
                .name("callcancel-deadline".into())
                .spawn(work);
            if spawned.is_err() {
                // No thread to be had: run what is queued here, on the
                // timer thread (late rather than never).
                lock().threads -= 1;
                loop {
                    let job = lock().jobs.pop_front();
                    match job {
                        Some(job) => job.run(),
                        None => break,
                    }
                }
            }
        }

        fn work() {
            let mut q = lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    drop(q);
                    // Ordering: Relaxed, a hint (see `STARTED_AT`).
                    STARTED_AT.store(now_nanos(), Ordering::Relaxed);
                    // `run` catches the callback's panics itself.
                    job.run();
                    q = lock();
                    continue;
                }
                q.idle += 1;
                let (g, timeout) = WORK
                    .wait_timeout(q, IDLE_EXIT)
                    .unwrap_or_else(PoisonError::into_inner);
                q = g;
                q.idle -= 1;
                if timeout.timed_out() && q.jobs.is_empty() {
                    q.threads -= 1;
                    return;
                }
            }
        }
    }
}

#[cfg(not(loom))]
static TIMER: std::sync::LazyLock<Timer<TimerEntry>> = std::sync::LazyLock::new(Timer::new);

#[cfg(loom)]
loom::lazy_static! {
    static ref TIMER: Timer<TimerEntry> = Timer::new();
}

/// The crate's timer.
pub(crate) fn timer() -> &'static Timer<TimerEntry> {
    &TIMER
}

/// A call's deadline as its context keeps it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    /// The armed entry; `None` if the deadline had passed at `begin`.
    pub(crate) key: Option<TimerKey>,
}

/// Arms the deadline of the call in `slot` (generation `generation`), or
/// cancels it at once if `at` has passed.
pub(crate) fn arm(
    channel: &ChannelShared,
    slot: &CallSlot,
    generation: u64,
    at: Instant,
) -> Deadline {
    let entry = TimerEntry::Deadline {
        channel: channel.self_ptr(),
        slot: SlotRef::new(&channel.slab, slot),
        generation,
    };
    match timer().arm(at, entry) {
        Ok(key) => Deadline { at, key: Some(key) },
        Err(_) => {
            // Past already: in flight and cancelled now. Nothing can be
            // registered yet, so no user code runs here.
            let mut panics = FirstPanic::default();
            let _ = channel.cancel_slot(
                slot,
                generation,
                CancelReason::DeadlineExceeded,
                &mut panics,
            );
            panics.resume();
            Deadline { at, key: None }
        }
    }
}

/// Disarms a call's deadline; called before the call completes.
#[inline]
pub(crate) fn disarm(deadline: &Deadline) {
    if let Some(key) = deadline.key {
        drop(timer().disarm(key));
    }
}

const SLEEPING: u8 = 0;
const FIRED: u8 = 1;

/// The shared half of a [`Sleep`].
pub(crate) struct SleepShared {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl SleepShared {
    fn fire(&self) {
        // Ordering: Release, pairing with the Acquire load in `Sleep::poll`.
        self.state.store(FIRED, Ordering::Release);
        self.waker.wake();
    }

    fn fired(&self) -> bool {
        // Ordering: Acquire, see `fire`.
        self.state.load(Ordering::Acquire) == FIRED
    }
}

/// A runtime-agnostic sleep on the crate's timer (used by `close_async`).
pub(crate) struct Sleep {
    at: Option<Instant>,
    shared: Arc<SleepShared>,
    key: Option<TimerKey>,
    armed: bool,
}

impl Sleep {
    /// Sleeps until `at`; `None` sleeps forever.
    pub(crate) fn until(at: Option<Instant>) -> Self {
        Self {
            at,
            shared: Arc::new(SleepShared {
                state: AtomicU8::new(SLEEPING),
                waker: AtomicWaker::new(),
            }),
            key: None,
            armed: false,
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(at) = this.at else {
            return Poll::Pending;
        };
        if this.shared.fired() {
            return Poll::Ready(());
        }
        this.shared.waker.register(cx.waker());
        if !this.armed {
            this.armed = true;
            match timer().arm(at, TimerEntry::Wake(Arc::clone(&this.shared))) {
                Ok(key) => this.key = Some(key),
                Err(_) => return Poll::Ready(()),
            }
        }
        // Re-check after registering (atomic-waker's contract).
        if this.shared.fired() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            drop(timer().disarm(key));
        }
    }
}
