//! Waiting for a call's cancellation: the `cancelled()` future, the owned
//! [`CancelWatch`] and its future.
//!
//! # Protocol (register, then re-check)
//!
//! The first waiter of a call announces itself with the `WAITER` bit of the
//! call's state word and parks its waker in the slot's `AtomicWaker` (the
//! fast path: no lock, no allocation). Any further waiter of the same call
//! parks in its channel's overflow list (a mutex-guarded `Vec`) *first* and
//! then announces the `OVERFLOW` bit. A canceller's winning RMW returns the
//! state it replaced; if that names `WAITER` it wakes the `AtomicWaker`, if it
//! names `OVERFLOW` it wakes this slot's overflow entries. Either the
//! announcing RMW sees `CANCELLED` (the waiter returns at once), or it comes
//! first in the word's modification order and the canceller sees the bit:
//! no wake-up is lost, and every waiter is woken.
//!
//! A completing owner does the same for waiters still announced at
//! completion (only [`CancelWatch`] futures can be: `cancelled()` borrows the
//! call), so a watch future never outlives its call unwoken.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::ptr::NonNull;
use core::task::{Context, Poll};

use crate::channel::{ChannelShared, OverflowWaiter};
use crate::slot::CallSlot;
use crate::state::{OVERFLOW, WAITER};
use crate::sync::{lock, Arc, Ordering};
use crate::CancelReason;

/// Which parking place a waiter uses.
#[derive(Debug, Clone, Copy)]
enum Parked {
    Nowhere,
    /// Owns the slot's `AtomicWaker` (the `WAITER` bit).
    Primary,
    /// Parked in the channel's overflow list under this id.
    Overflow(u64),
}

/// What a waiter learned.
pub(crate) enum Woken {
    Cancelled(CancelReason),
    /// The call completed (or the slot moved on) without this waiter seeing a
    /// cancellation.
    Finished,
}

/// The parking state of one waiter; shared by both futures.
#[derive(Debug)]
pub(crate) struct WaitState {
    parked: Parked,
}

impl WaitState {
    pub(crate) const fn new() -> Self {
        Self {
            parked: Parked::Nowhere,
        }
    }

    pub(crate) fn poll(
        &mut self,
        channel: &ChannelShared,
        slot: &CallSlot,
        generation: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Woken> {
        // Ordering: Acquire, pairing with the AcqRel cancel RMW (the reason)
        // and the Release `release` (the call finished).
        let snap = slot.state.load(Ordering::Acquire);
        if snap.generation() != generation || !snap.is_occupied() {
            return Poll::Ready(Woken::Finished);
        }
        if let Some(reason) = snap.reason() {
            return Poll::Ready(Woken::Cancelled(reason));
        }
        if let Parked::Nowhere = self.parked {
            // Become the primary waiter if nobody is.
            match slot.state.announce_waiter(generation, WAITER) {
                None => return Poll::Ready(Woken::Finished),
                Some(prev) => {
                    if let Some(reason) = prev.reason() {
                        return Poll::Ready(Woken::Cancelled(reason));
                    }
                    if !prev.has(WAITER) {
                        self.parked = Parked::Primary;
                    }
                }
            }
        }
        let announced = match self.parked {
            Parked::Primary => {
                slot.waker.register(cx.waker());
                // Mutant (ci/mutants.sh): drop the re-check.
                if cfg!(callcancel_mutant = "no_waker_recheck") {
                    return Poll::Pending;
                }
                // Re-check after registering: a wake that found no waker
                // happened-before this load (atomic-waker's contract).
                Some(slot.state.load(Ordering::Acquire))
                    .filter(|s| s.generation() == generation && !s.is_completed())
            }
            _ => {
                // Park first, then announce: a canceller that sees OVERFLOW
                // finds our waker in the list.
                self.park_overflow(channel, slot, cx);
                slot.state.announce_waiter(generation, OVERFLOW)
            }
        };
        match announced {
            None => Poll::Ready(Woken::Finished),
            Some(s) => match s.reason() {
                Some(reason) => Poll::Ready(Woken::Cancelled(reason)),
                None => Poll::Pending,
            },
        }
    }

    fn park_overflow(&mut self, channel: &ChannelShared, slot: &CallSlot, cx: &mut Context<'_>) {
        let target: *const CallSlot = slot;
        let mut overflow = lock(&channel.overflow);
        let id = match self.parked {
            Parked::Overflow(id) => {
                if let Some(w) = overflow.waiters.iter_mut().find(|w| w.id == id) {
                    w.waker.clone_from(cx.waker());
                    return;
                }
                // Woken and removed by a canceller: park again.
                id
            }
            _ => {
                overflow.next_id += 1;
                overflow.next_id
            }
        };
        overflow.waiters.push(OverflowWaiter {
            slot: target,
            id,
            waker: cx.waker().clone(),
        });
        self.parked = Parked::Overflow(id);
    }

    /// Leaves the overflow list, if parked there.
    pub(crate) fn unpark(&mut self, channel: &ChannelShared) {
        if let Parked::Overflow(id) = self.parked {
            lock(&channel.overflow).waiters.retain(|w| w.id != id);
            self.parked = Parked::Nowhere;
        }
    }
}

/// A `'static` handle on one call's cancellation, for tasks that run beside
/// the call (e.g. a spawned task that must stop when the call is cancelled).
///
/// Obtained from [`OperationContext::watch`](crate::OperationContext::watch).
/// It keeps the call's channel alive but not the call: once the call
/// completes, the watch reports it as finished.
///
/// ```
/// use callcancel::{CancelReason, ServiceHost};
/// use std::future::Future;
/// use std::pin::pin;
/// use std::task::{Context, Poll, Waker};
///
/// let host = ServiceHost::new();
/// let call = host.begin_call().unwrap();
/// let watch = call.watch(); // 'static: can move into a spawned task
/// let mut fut = pin!(watch.cancelled());
/// let mut cx = Context::from_waker(Waker::noop());
/// assert!(fut.as_mut().poll(&mut cx).is_pending());
/// host.abort();
/// assert_eq!(fut.poll(&mut cx), Poll::Ready(Some(CancelReason::HostAbort)));
/// ```
#[derive(Clone)]
pub struct CancelWatch {
    channel: Arc<ChannelShared>,
    slot: NonNull<CallSlot>,
    generation: usize,
}

// SAFETY: `slot` points into `channel`'s slab, kept alive by `channel`; the
// watch only touches the slot's atomics, its `AtomicWaker` and the channel's
// mutex-guarded overflow list, all thread-safe.
unsafe impl Send for CancelWatch {}
// SAFETY: as above; `&CancelWatch` offers only atomic reads.
unsafe impl Sync for CancelWatch {}

impl CancelWatch {
    pub(crate) fn new(
        channel: Arc<ChannelShared>,
        slot: NonNull<CallSlot>,
        generation: usize,
    ) -> Self {
        Self {
            channel,
            slot,
            generation,
        }
    }

    fn slot(&self) -> &CallSlot {
        // SAFETY: the slot lives in `self.channel`'s slab, kept alive by
        // `self.channel`, which frees segments only when it drops.
        unsafe { self.slot.as_ref() }
    }

    /// The cancel reason, if the call is still in flight and was cancelled.
    /// `None` once the call has completed (the slot may serve another call).
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        // Ordering: Acquire, as in `WaitState::poll`.
        let s = self.slot().state.load(Ordering::Acquire);
        (s.is_occupied() && s.generation() == self.generation)
            .then(|| s.reason())
            .flatten()
    }

    /// Whether the call has completed (and finished any cancel callback and
    /// free-state).
    pub fn is_finished(&self) -> bool {
        // Ordering: Acquire, as in `WaitState::poll`.
        let s = self.slot().state.load(Ordering::Acquire);
        !s.is_occupied() || s.generation() != self.generation
    }

    /// Resolves to `Some(reason)` once the call is cancelled, or to `None` if
    /// the call completes first (a cancellation decided and completed before
    /// the future was first polled also reads as `None`).
    pub fn cancelled(&self) -> WatchCancelled {
        WatchCancelled {
            watch: self.clone(),
            wait: WaitState::new(),
        }
    }
}

impl fmt::Debug for CancelWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelWatch")
            .field("cancel_reason", &self.cancel_reason())
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// The `'static` future of [`CancelWatch::cancelled`].
#[must_use = "futures do nothing unless polled"]
pub struct WatchCancelled {
    watch: CancelWatch,
    wait: WaitState,
}

impl Future for WatchCancelled {
    type Output = Option<CancelReason>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CancelReason>> {
        let this = &mut *self;
        let w = &this.watch;
        this.wait
            .poll(&w.channel, w.slot(), w.generation, cx)
            .map(|woken| match woken {
                Woken::Cancelled(reason) => Some(reason),
                Woken::Finished => None,
            })
    }
}

impl Drop for WatchCancelled {
    fn drop(&mut self) {
        self.wait.unpark(&self.watch.channel);
    }
}

impl fmt::Debug for WatchCancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchCancelled").finish_non_exhaustive()
    }
}
