//! Layer 6 (async): waiting for a call's cancellation — the state shared by
//! the `cancelled()` future and the owned [`CancelWatch`]'s future.
//!
//! # Protocol (register, then re-check)
//!
//! The first `cancelled()` future of a call (it borrows the call, so it can
//! never outlive it) announces itself with the `WAITER` bit of the call's
//! state word and parks its waker in the slot's `AtomicWaker` (the fast
//! path: no lock, no allocation). Every other waiter — further `cancelled()`
//! futures of the same call, and *every* [`CancelWatch`] future, which may
//! be re-polled after its call completed and the slot serves another call —
//! parks in its channel's overflow list (`store/overflow.rs`) *first* and
//! then announces the `OVERFLOW` bit. A watch therefore never touches the
//! slot's waker, and cannot overwrite a later call's primary waiter
//! (issue 12 #1). A canceller's winning RMW returns the state it replaced;
//! if that names `WAITER` it wakes the `AtomicWaker`, if it names `OVERFLOW`
//! it wakes this slot's overflow entries. Either the announcing RMW sees
//! `CANCELLED` (the waiter returns at once), or it comes first in the word's
//! modification order and the canceller sees the bit: no wake-up is lost.
//!
//! A primary future dropped unwoken takes its waker back and clears
//! `WAITER`, so the call's next future is primary again (issue 12 #7).
//! A completing owner wakes the waiters still announced at completion (only
//! watch futures can be), so a watch future never outlives its call unwoken.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use crate::engine::channel::{slot_key, ChannelShared};
use crate::slot::CallSlot;
use crate::state::{OVERFLOW, WAITER};
use crate::store::overflow::Outcome;
use crate::store::slab::SlotRef;
use crate::sync::{Arc, Ordering};
use crate::CancelReason;

/// Which parking place a waiter uses.
#[derive(Debug, Clone, Copy)]
enum Parked {
    Nowhere,
    /// Owns the slot's `AtomicWaker` (the `WAITER` bit).
    Primary,
    /// Parked in the channel's overflow list.
    Overflow,
}

/// What a waiter learned.
pub(crate) enum Woken {
    Cancelled(CancelReason),
    /// The call completed (or the slot moved on) without this waiter seeing a
    /// cancellation.
    Finished,
}

/// Whether a waiter may use the slot's own waker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A `cancelled()` future: borrows the call, may be primary.
    Borrowing,
    /// A watch future: may outlive the call, always overflow.
    Watch,
}

/// The parking state of one waiter; shared by both futures.
#[derive(Debug)]
pub(crate) struct WaitState {
    parked: Parked,
    /// Our id in the overflow list, once assigned.
    id: Option<u64>,
    role: Role,
    /// A watch's mailbox for the reason (allocated when it first parks):
    /// a canceller leaves it there before waking us, so that a poll after
    /// the call completed still reports it (R5).
    outcome: Option<Arc<Outcome>>,
}

impl WaitState {
    pub(crate) const fn new(role: Role) -> Self {
        Self {
            parked: Parked::Nowhere,
            id: None,
            role,
            outcome: None,
        }
    }

    /// The answer once the call is gone: the reason a canceller left us, or
    /// `Finished`.
    pub(crate) fn gone(&self) -> Woken {
        match self.outcome.as_ref().and_then(|o| o.get()) {
            Some(reason) => Woken::Cancelled(reason),
            None => Woken::Finished,
        }
    }

    pub(crate) fn poll(
        &mut self,
        channel: &ChannelShared,
        slot: &CallSlot,
        generation: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Woken> {
        // Ordering: Acquire, pairing with the AcqRel cancel RMW (the reason)
        // and the release swap (the call finished).
        let snap = slot.state.load(Ordering::Acquire);
        if !snap.is_live(generation) {
            return Poll::Ready(self.gone());
        }
        if let Some(reason) = snap.reason() {
            return Poll::Ready(Woken::Cancelled(reason));
        }
        // Mutant (ci/mutants.sh): let a watch take the slot's waker.
        let may_be_primary =
            self.role == Role::Borrowing || cfg!(callcancel_mutant = "watch_primary");
        if let (Parked::Nowhere, true) = (self.parked, may_be_primary) {
            // Become the primary waiter if nobody is.
            match slot.state.announce_waiter(generation, WAITER) {
                None => return Poll::Ready(self.gone()),
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
                    .filter(|s| s.is_live(generation) && !s.is_completed())
            }
            _ => {
                // Park first, then announce: a canceller that sees OVERFLOW
                // finds our waker in the list.
                if self.role == Role::Watch && self.outcome.is_none() {
                    self.outcome = Some(Arc::new(Outcome::default()));
                }
                channel.overflow.park(
                    slot_key(slot),
                    generation,
                    &mut self.id,
                    cx.waker(),
                    self.outcome.as_ref(),
                );
                self.parked = Parked::Overflow;
                slot.state.announce_waiter(generation, OVERFLOW)
            }
        };
        match announced {
            None => Poll::Ready(self.gone()),
            Some(s) => match s.reason() {
                Some(reason) => Poll::Ready(Woken::Cancelled(reason)),
                None => Poll::Pending,
            },
        }
    }

    /// Leaves the parking place (the future is dropped).
    pub(crate) fn unpark(&mut self, channel: &ChannelShared, slot: &CallSlot, generation: u64) {
        match self.parked {
            Parked::Nowhere => {}
            Parked::Overflow => self.unpark_overflow(channel, slot_key(slot)),
            Parked::Primary => {
                // Take our waker back first (dropped here, outside any lock),
                // then free the bit: a later primary registers after that.
                drop(slot.waker.take());
                slot.state.withdraw_waiter(generation);
            }
        }
        self.parked = Parked::Nowhere;
    }

    /// Leaves the overflow list of the slot at `key` (an address only: the
    /// slot's segment may have been given back since).
    pub(crate) fn unpark_overflow(&mut self, channel: &ChannelShared, key: usize) {
        if let (Parked::Overflow, Some(id)) = (self.parked, self.id) {
            channel.overflow.unpark(key, id);
        }
        self.parked = Parked::Nowhere;
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
    /// Dereferenced only while its segment is published (`store/slab.rs`).
    slot: SlotRef,
    generation: u64,
}

impl CancelWatch {
    pub(crate) fn new(channel: Arc<ChannelShared>, slot: SlotRef, generation: u64) -> Self {
        Self {
            channel,
            slot,
            generation,
        }
    }

    /// The state word, if the slot's segment is still published.
    fn word(&self) -> Option<crate::state::Snapshot> {
        // Ordering: Acquire, as in `WaitState::poll`.
        self.slot.with(&self.channel.slab, |slot| {
            slot.state.load(Ordering::Acquire)
        })
    }

    /// The cancel reason, if the call is still in flight and was cancelled.
    /// `None` once the call has completed (the slot may serve another call).
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        let s = self.word()?;
        s.is_live(self.generation).then(|| s.reason()).flatten()
    }

    /// Whether the call has completed (and finished any cancel callback and
    /// free-state).
    pub fn is_finished(&self) -> bool {
        self.word().is_none_or(|s| !s.is_live(self.generation))
    }

    /// Resolves to `Some(reason)` once the call is cancelled, or to `None` if
    /// the call completes first (a cancellation decided and completed before
    /// the future was first polled also reads as `None`).
    pub fn cancelled(&self) -> WatchCancelled {
        WatchCancelled {
            watch: self.clone(),
            wait: WaitState::new(Role::Watch),
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
        let wait = &mut this.wait;
        w.slot
            .with(&w.channel.slab, |slot| {
                wait.poll(&w.channel, slot, w.generation, cx)
            })
            .unwrap_or_else(|| Poll::Ready(wait.gone()))
            .map(|woken| match woken {
                Woken::Cancelled(reason) => Some(reason),
                Woken::Finished => None,
            })
    }
}

impl Drop for WatchCancelled {
    fn drop(&mut self) {
        let w = &self.watch;
        let wait = &mut self.wait;
        if w.slot
            .with(&w.channel.slab, |slot| {
                wait.unpark(&w.channel, slot, w.generation)
            })
            .is_none()
        {
            wait.unpark_overflow(&w.channel, w.slot.addr().as_ptr() as usize);
        }
    }
}

impl fmt::Debug for WatchCancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchCancelled").finish_non_exhaustive()
    }
}
