//! Layer 7 (public face): [`Call`], [`OperationContext`], the
//! [`Cancelled`] future and the [`Canceller`]. Delegation and docs only: the
//! protocols live in `engine/channel.rs` and `wait/`.

use core::fmt;
use core::future::Future;
use core::ops::Deref;
use core::pin::Pin;
use core::ptr::NonNull;
use core::task::{Context, Poll};

use crate::engine::channel::ChannelShared;
use crate::engine::deadline::{self, Deadline};
use crate::slot::CallSlot;
use crate::store::slab::SlotRef;
use crate::sync::{Arc, Ordering};
use crate::wait::cancel::{CancelWatch, Role, WaitState, Woken};
use crate::{CancelReason, RegisterError};
use std::time::Instant;

/// The context of a running call (WWSAPI `WS_OPERATION_CONTEXT`): register a
/// cancel callback, ask whether the call was cancelled, or await it.
///
/// Reached through a [`Call`] (`Deref`). It is `Sync`: other threads may
/// register, poll or cancel while the call runs.
pub struct OperationContext {
    /// Kept alive by the channel's keepalive reference while this call
    /// occupies its slot (see `ChannelShared`); no per-call reference count.
    channel: NonNull<ChannelShared>,
    slot: NonNull<CallSlot>,
    /// The call's deadline and its timer entry, if it has one.
    deadline: Option<Deadline>,
}

// SAFETY: `channel` and `slot` stay valid while the call occupies its slot
// (the channel's keepalive); every access through them goes through atomics,
// mutexes, or the cell under the state-word protocol (`slot.rs`), all
// thread-safe.
unsafe impl Send for OperationContext {}
// SAFETY: as above; `&OperationContext` only offers atomic operations and
// registrations that the `REGISTERED` bit makes exclusive.
unsafe impl Sync for OperationContext {}

impl OperationContext {
    #[inline]
    fn slot(&self) -> &CallSlot {
        // SAFETY: the slot lives in the channel's slab, which never frees a
        // segment before the channel drops, and the channel is kept alive by
        // its keepalive while this call occupies the slot (until `finish`).
        unsafe { self.slot.as_ref() }
    }

    /// This call's generation: stable while the call occupies its slot.
    #[inline]
    fn generation(&self) -> u64 {
        // Ordering: Relaxed; only this call's own `try_occupy` (or the
        // release before it) wrote the generation bits.
        self.slot().state.load(Ordering::Relaxed).generation()
    }

    #[inline]
    fn channel(&self) -> &ChannelShared {
        // SAFETY: as for `slot`: valid while this call occupies its slot.
        unsafe { self.channel.as_ref() }
    }

    /// Registers the call's one cancel callback, with `state`; the state is
    /// dropped when the call completes (WWSAPI `WsRegisterOperationForCancel`
    /// without a free-state callback). See
    /// [`register_for_cancel_with_free`](Self::register_for_cancel_with_free).
    pub fn register_for_cancel<S, C>(&self, state: S, on_cancel: C) -> Result<(), RegisterError<S>>
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
    {
        self.register_for_cancel_with_free(state, on_cancel, drop::<S>)
    }

    /// Registers the call's one cancel callback, with `state` and a
    /// free-state hook (WWSAPI `WsRegisterOperationForCancel`).
    ///
    /// * `on_cancel(reason, &state)` runs **at most once** (R1): when the
    ///   host aborts or the call's channel faults while the call is in
    ///   flight. If cancellation was already decided, it runs *here*, on this
    ///   thread, before this returns `Ok` (R4).
    /// * `on_free(state)` runs **exactly once** (R2), after `on_cancel` has
    ///   returned if it ran (R3): at completion, or — if the call completed
    ///   while `on_cancel` was still running — on the canceller's thread when
    ///   `on_cancel` returns. Completion never blocks on a running callback.
    /// * Only the first registration of a call succeeds. A refused one gives
    ///   the state back in the [`RegisterError`] and runs neither closure.
    ///
    /// Callbacks run on arbitrary threads and should be quick: they run
    /// inside the aborting/faulting thread's sweep. They may call `abort`,
    /// `fault`, or anything else of this crate (A3).
    ///
    /// # Panics
    ///
    /// If `on_cancel` runs inline here and panics, the panic propagates out of
    /// this call; the registration stays recorded and `on_free` still runs
    /// once at completion.
    ///
    /// ```
    /// use callcancel::{CancelReason, ServiceHost};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    ///
    /// let host = ServiceHost::new();
    /// let call = host.begin_call().unwrap();
    /// host.abort(); // cancellation decided before registration...
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let r = Arc::clone(&ran);
    /// call.register_for_cancel_with_free(
    ///     42u64,
    ///     move |reason, state| {
    ///         assert_eq!((reason, *state), (CancelReason::HostAbort, 42));
    ///         r.store(true, Ordering::SeqCst);
    ///     },
    ///     |state| assert_eq!(state, 42), // ...freed at completion
    /// )
    /// .unwrap();
    /// assert!(ran.load(Ordering::SeqCst)); // ...so the callback ran inside
    /// call.complete();
    /// ```
    pub fn register_for_cancel_with_free<S, C, F>(
        &self,
        state: S,
        on_cancel: C,
        on_free: F,
    ) -> Result<(), RegisterError<S>>
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        self.channel()
            .register(self.slot(), state, on_cancel, on_free)
    }

    /// Whether the call was cancelled. One `Acquire` load (P4).
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        // Ordering: Acquire pairs with the AcqRel RMW that set CANCELLED.
        self.slot().state.load(Ordering::Acquire).is_cancelled()
    }

    /// The reason the call was cancelled, if it was (the first one, R5).
    #[inline]
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        // Ordering: as in `is_cancelled`.
        self.slot().state.load(Ordering::Acquire).reason()
    }

    /// Resolves with the cancel reason once the call is cancelled.
    ///
    /// Built on `atomic-waker`, registering and then re-checking so no
    /// wake-up is lost. The first future of a call waits in the call's slot;
    /// further futures on the same call wait in a per-channel list: every one
    /// is woken.
    ///
    /// ```
    /// use callcancel::{CancelReason, ServiceHost};
    /// use std::future::Future;
    /// use std::pin::pin;
    /// use std::task::{Context, Poll, Waker};
    ///
    /// let host = ServiceHost::new();
    /// let call = host.begin_call().unwrap();
    /// let mut fut = pin!(call.cancelled());
    /// let mut cx = Context::from_waker(Waker::noop());
    /// assert!(fut.as_mut().poll(&mut cx).is_pending());
    /// host.abort();
    /// assert_eq!(fut.poll(&mut cx), Poll::Ready(CancelReason::HostAbort));
    /// ```
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            ctx: self,
            wait: WaitState::new(Role::Borrowing),
        }
    }

    /// Runs `fut` until it finishes (`Ok(output)`) or the call is cancelled
    /// (`Err(reason)`, and `fut` is dropped unfinished). Cancellation is
    /// checked first on every poll. Runtime-agnostic.
    ///
    /// ```
    /// use callcancel::{CancelReason, ServiceHost};
    /// use std::future::Future;
    /// use std::pin::pin;
    /// use std::task::{Context, Poll, Waker};
    ///
    /// let host = ServiceHost::new();
    /// let call = host.begin_call().unwrap();
    /// let mut cx = Context::from_waker(Waker::noop());
    /// let mut work = pin!(call.run_until_cancelled(std::future::pending::<u32>()));
    /// assert!(work.as_mut().poll(&mut cx).is_pending());
    /// host.abort();
    /// assert_eq!(work.poll(&mut cx), Poll::Ready(Err(CancelReason::HostAbort)));
    /// ```
    pub async fn run_until_cancelled<F: Future>(&self, fut: F) -> Result<F::Output, CancelReason> {
        let mut fut = core::pin::pin!(fut);
        let mut cancelled = core::pin::pin!(self.cancelled());
        core::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = cancelled.as_mut().poll(cx) {
                return Poll::Ready(Err(reason));
            }
            fut.as_mut().poll(cx).map(Ok)
        })
        .await
    }

    /// A `'static` handle on this call's cancellation, for a task that runs
    /// beside the call (see [`CancelWatch`]).
    pub fn watch(&self) -> CancelWatch {
        // SAFETY: this call occupies its slot, so the keepalive is held.
        let channel = unsafe { ChannelShared::hold(self.channel.as_ptr()) };
        let slot = SlotRef::new(&channel.slab, self.slot());
        CancelWatch::new(channel, slot, self.generation())
    }

    /// Cancels this call alone with [`CancelReason::CallCancelled`] (R1–R6
    /// hold as for any reason): its callback runs now, on this thread (or
    /// inside a later registration), its waiters wake, and the host's other
    /// calls are untouched. Returns `true` if this request decided the
    /// cancellation, `false` if the call was already cancelled (the first
    /// reason stays, R5).
    ///
    /// Costs one RMW on the call's own state word plus the callback; no
    /// lock, no process-wide barrier.
    ///
    /// # Panics
    ///
    /// If the cancel callback panics, after the waiters were woken.
    ///
    /// ```
    /// use callcancel::{CancelReason, ServiceHost};
    /// let host = ServiceHost::new();
    /// let channel = host.open_channel().unwrap();
    /// let (a, b) = (channel.begin_call().unwrap(), channel.begin_call().unwrap());
    /// assert!(a.cancel());
    /// assert!(!a.cancel()); // decided already
    /// assert_eq!(a.cancel_reason(), Some(CancelReason::CallCancelled));
    /// assert!(!b.is_cancelled()); // its sibling runs on
    /// ```
    pub fn cancel(&self) -> bool {
        self.channel().cancel_call(self.slot(), self.generation())
    }

    /// The call's deadline, if it was begun with one
    /// ([`Channel::begin_call_with_deadline`](crate::Channel::begin_call_with_deadline)).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.map(|d| d.at)
    }

    /// A `'static` handle that cancels this call (and only this call) from
    /// anywhere, e.g. from the task that notices the client went away. Once
    /// the call completed, [`Canceller::cancel`] does nothing and returns
    /// `false`, even if the call's storage serves a later call.
    pub fn canceller(&self) -> Canceller {
        // SAFETY: this call occupies its slot, so the keepalive is held.
        let channel = unsafe { ChannelShared::hold(self.channel.as_ptr()) };
        let slot = SlotRef::new(&channel.slab, self.slot());
        Canceller {
            channel,
            slot,
            generation: self.generation(),
        }
    }
}

impl fmt::Debug for OperationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperationContext")
            .field("generation", &self.generation())
            .field("cancel_reason", &self.cancel_reason())
            .finish()
    }
}

/// A call in flight: a service operation or a host callback running with an
/// operation context. Completing (or dropping) it ends the call.
///
/// `Send` (a call may move between threads), not `Clone`; derefs to its
/// [`OperationContext`].
pub struct Call {
    ctx: OperationContext,
}

impl Call {
    /// A call occupying `slot` of `channel`.
    #[inline]
    pub(crate) fn new(channel: &ChannelShared, slot: NonNull<CallSlot>) -> Self {
        Self {
            ctx: OperationContext {
                channel: channel.self_ptr(),
                slot,
                deadline: None,
            },
        }
    }

    /// Begins a call on `channel` (delegates to the engine's `begin`).
    #[inline(always)]
    pub(crate) fn begin(channel: &ChannelShared) -> Result<Self, crate::Error> {
        let slot = channel.begin()?;
        Ok(Self::new(channel, slot))
    }

    /// Begins a call with a deadline (the engine's `begin`, then
    /// `deadline::arm`).
    pub(crate) fn begin_with_deadline(
        channel: &ChannelShared,
        at: Instant,
    ) -> Result<Self, crate::Error> {
        let mut call = Self::begin(channel)?;
        let ctx = &mut call.ctx;
        // SAFETY: the call occupies its slot (see `OperationContext::slot`).
        let slot = unsafe { ctx.slot.as_ref() };
        ctx.deadline = Some(deadline::arm(channel, slot, ctx.generation(), at));
        Ok(call)
    }

    /// Completes the call (the same as dropping it).
    ///
    /// Runs the free-state of a registration (R2) unless a cancel callback of
    /// this call is still running on another thread: then that thread frees
    /// when the callback returns, and `complete` returns at once (R3). After
    /// this, no abort or fault runs anything for this call (R6).
    ///
    /// # Panics
    ///
    /// If the free-state panics, the call is still released (it no longer
    /// counts as in flight) and the panic propagates from here; when the call
    /// is dropped during unwinding, that panic is swallowed instead.
    #[inline]
    pub fn complete(self) {
        drop(self);
    }

    /// The call's operation context.
    pub fn context(&self) -> &OperationContext {
        &self.ctx
    }
}

impl Deref for Call {
    type Target = OperationContext;

    #[inline]
    fn deref(&self) -> &OperationContext {
        &self.ctx
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let ctx = &self.ctx;
        // Before completing: the timer may hold the entry only while the
        // call occupies its slot (`engine/deadline.rs`).
        if let Some(d) = &ctx.deadline {
            deadline::disarm(d);
        }
        // Nothing touches the channel or slot after the release inside
        // `complete` except through a reference it takes itself.
        // SAFETY: this call occupies its slot (it completes it here, once);
        // `ctx.channel` is the keepalive pointer.
        let (panic, _, keep) = unsafe { ChannelShared::complete(ctx.channel, ctx.slot) };
        // No reference to the channel is live here: this may free it.
        drop(keep);
        if let Some(panic) = panic {
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Call").field(&self.ctx).finish()
    }
}

/// The future of [`OperationContext::cancelled`].
#[must_use = "futures do nothing unless polled"]
pub struct Cancelled<'a> {
    ctx: &'a OperationContext,
    wait: WaitState,
}

impl Future for Cancelled<'_> {
    type Output = CancelReason;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CancelReason> {
        let this = &mut *self;
        let ctx = this.ctx;
        match this
            .wait
            .poll(ctx.channel(), ctx.slot(), ctx.generation(), cx)
        {
            Poll::Ready(Woken::Cancelled(reason)) => Poll::Ready(reason),
            // The future borrows the call, so the call cannot have completed.
            Poll::Ready(Woken::Finished) => unreachable!("call completed under a borrow"),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        let ctx = self.ctx;
        self.wait
            .unpark(ctx.channel(), ctx.slot(), ctx.generation());
    }
}

impl fmt::Debug for Cancelled<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancelled").finish_non_exhaustive()
    }
}

/// Cancels one call from anywhere: `Clone + Send + Sync + 'static`. Taken
/// with [`OperationContext::canceller`].
///
/// It names the call by its slot and generation, so once that call has
/// completed, [`cancel`](Canceller::cancel) returns `false` and touches
/// nothing, even if a later call reuses the storage. It keeps the call's
/// channel's memory alive (not the call, and not the channel's handles).
///
/// ```
/// use callcancel::{CancelReason, ServiceHost};
/// let host = ServiceHost::new();
/// let call = host.begin_call().unwrap();
/// let canceller = call.canceller();
/// std::thread::spawn(move || assert!(canceller.cancel())).join().unwrap();
/// assert_eq!(call.cancel_reason(), Some(CancelReason::CallCancelled));
/// let late = call.canceller();
/// call.complete();
/// assert!(!late.cancel()); // completed: nothing to do
/// ```
#[derive(Clone)]
pub struct Canceller {
    channel: Arc<ChannelShared>,
    /// Dereferenced only while its segment is published (`store/slab.rs`).
    slot: SlotRef,
    generation: u64,
}

impl Canceller {
    /// Cancels the call with [`CancelReason::CallCancelled`], as
    /// [`OperationContext::cancel`]: `true` if this request decided the
    /// cancellation; `false` if it was already cancelled or has completed.
    ///
    /// # Panics
    ///
    /// If the call's cancel callback panics (it runs on this thread).
    pub fn cancel(&self) -> bool {
        let channel = &self.channel;
        self.slot
            .with(&channel.slab, |slot| {
                // Mutant (ci/mutants.sh): cancel whatever call occupies the
                // slot now.
                let generation = if cfg!(callcancel_mutant = "canceller_current_gen") {
                    slot.state.load(Ordering::Relaxed).generation()
                } else {
                    self.generation
                };
                channel.cancel_call(slot, generation)
            })
            .unwrap_or(false)
    }

    /// Whether the call this canceller names has completed.
    pub fn is_finished(&self) -> bool {
        // Ordering: Acquire, pairing with the freer's release swap.
        self.slot.with(&self.channel.slab, |slot| {
            slot.state.load(Ordering::Acquire).is_live(self.generation)
        }) != Some(true)
    }
}

impl fmt::Debug for Canceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Canceller")
            .field("generation", &self.generation)
            .field("finished", &self.is_finished())
            .finish()
    }
}
