//! Deadlines (R7): the crate's one timer (`store/timer.rs`, a sharded hashed
//! wheel with its own lazily started thread) and what its entries do.
//!
//! * A call begun with a deadline arms one entry naming its channel, slot and
//!   generation (O(1), one shard lock: no host-wide lock). When it expires,
//!   the timer thread cancels that generation with `DeadlineExceeded`
//!   through the same `cancel_slot` as every other reason (R1–R6 hold), and
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
        slot: NonNull<CallSlot>,
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
        slot: NonNull<CallSlot>,
        generation: u64,
    },
    Wake(Arc<SleepShared>),
}

// SAFETY: as for `TimerEntry`; `slot` lives as long as `channel`'s slab.
unsafe impl Send for Fired {}

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
                // SAFETY: the slab lives as long as `channel`.
                let slot = unsafe { slot.as_ref() };
                let mut panics = FirstPanic::default();
                let _ = channel.cancel_slot(
                    slot,
                    generation,
                    CancelReason::DeadlineExceeded,
                    &mut panics,
                );
                panics.resume();
            }
            Fired::Wake(sleep) => sleep.fire(),
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
        slot: NonNull::from(slot),
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
