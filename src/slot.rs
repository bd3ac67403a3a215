//! One call slot: the state word, the callback cell and the waker.
//!
//! A slot lives in a channel's slab (`registry.rs`) for as long as the
//! channel does and is reused by generation; it is never freed while any
//! thread can reach it. Who may touch the cell is decided by the state word
//! (`state.rs`):
//!
//! * the registrar that won `begin_register` writes it, once;
//! * the thread that runs the cancel callback (the canceller that `CLAIMED`
//!   it, or the registrar itself on `RunInline`) mutates it to take the
//!   `on_cancel` closure out;
//! * the freer (whoever finishes last, decided by `complete` /
//!   `finish_cancel`) takes the registration out and runs the free-state.
//!
//! These three never overlap in time; the orderings that make each one see
//! the previous one's writes are listed in `state.rs` (pairs 1–3).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

use crate::state::CallState;
use crate::sync::{AtomicWaker, UnsafeCell};
use crate::CancelReason;

/// A panic payload caught from user code.
pub(crate) type Panic = Box<dyn Any + Send + 'static>;

/// A type-erased registration: the state, the cancel callback (until it ran)
/// and the free-state hook.
pub(crate) trait Registered: Send {
    /// Runs the cancel callback if it has not run yet.
    fn cancel(&mut self, reason: CancelReason);
    /// Runs the free-state hook (consumes the state).
    fn free(self: Box<Self>);
}

pub(crate) struct Registration<S, C, F> {
    pub(crate) state: S,
    pub(crate) on_cancel: Option<C>,
    pub(crate) on_free: F,
}

impl<S, C, F> Registered for Registration<S, C, F>
where
    S: Send,
    C: FnOnce(CancelReason, &S) + Send,
    F: FnOnce(S) + Send,
{
    fn cancel(&mut self, reason: CancelReason) {
        if let Some(on_cancel) = self.on_cancel.take() {
            on_cancel(reason, &self.state);
        }
    }

    fn free(self: Box<Self>) {
        let Registration {
            state,
            on_cancel,
            on_free,
        } = *self;
        // The callback's captures go before the state is handed to on_free.
        drop(on_cancel);
        on_free(state);
    }
}

/// Runs user code, catching a panic so the caller can finish its protocol
/// step first (A4).
pub(crate) fn catch(f: impl FnOnce()) -> Option<Panic> {
    panic::catch_unwind(AssertUnwindSafe(f)).err()
}

/// One call's slot. Aligned to a cache line so two calls never share one
/// (P3: 64 bytes per call before what does not fit inline).
#[repr(align(64))]
pub(crate) struct CallSlot {
    pub(crate) state: CallState,
    cell: UnsafeCell<Option<Box<dyn Registered>>>,
    pub(crate) waker: AtomicWaker,
}

// SAFETY: the only non-`Sync` field is `cell`, and every access to it is
// exclusive by the state-word protocol described in the module docs (one
// registrar writes, then one callback runner, then one freer, each ordered
// after the previous by an acquire/release pair on `state`). The boxed
// registration is `Send`, so handing it between threads is sound.
unsafe impl Sync for CallSlot {}
// SAFETY: the registration inside is `Send`; the atomics are `Send`.
unsafe impl Send for CallSlot {}

impl CallSlot {
    pub(crate) fn new() -> Self {
        Self {
            state: CallState::new(),
            cell: UnsafeCell::new(None),
            waker: AtomicWaker::new(),
        }
    }

    /// Stores the registration.
    ///
    /// # Safety
    /// The caller won `begin_register` for the current generation and has not
    /// yet called `publish_registration`.
    pub(crate) unsafe fn store_registration(&self, reg: Box<dyn Registered>) {
        self.cell.with_mut(|cell| {
            // SAFETY: per this function's contract no other thread may touch
            // the cell until `publish_registration` publishes it.
            let cell = unsafe { &mut *cell };
            debug_assert!(cell.is_none());
            *cell = Some(reg);
        });
    }

    /// Runs the cancel callback, catching a panic.
    ///
    /// # Safety
    /// The caller holds the right to run the callback: it is the canceller
    /// whose `request_cancel` returned `Claimed`, or the registrar whose
    /// `publish_registration` returned `RunInline`; and it has not yet
    /// called `finish_cancel`.
    pub(crate) unsafe fn run_callback(&self, reason: CancelReason) -> Option<Panic> {
        self.cell.with_mut(|cell| {
            // SAFETY: per the contract, this thread has exclusive access to
            // the cell until it publishes `CB_DONE` (or, inline, until the
            // owner can complete, which needs the registration to return).
            let cell = unsafe { &mut *cell };
            match cell.as_mut() {
                Some(reg) => catch(|| reg.cancel(reason)),
                None => {
                    debug_assert!(false, "claimed a slot without a registration");
                    None
                }
            }
        })
    }

    /// Takes the registration out and runs its free-state, catching a panic.
    ///
    /// # Safety
    /// The caller is the freer of the current generation (its `complete`
    /// returned `OwnerFrees { registered: true }` or its `finish_cancel`
    /// returned `CancellerFrees`) and has not yet called `release`.
    pub(crate) unsafe fn free_registration(&self) -> Option<Panic> {
        let reg = self.cell.with_mut(|cell| {
            // SAFETY: per the contract, no other thread touches the cell any
            // more in this generation; the next one starts after `release`.
            unsafe { (*cell).take() }
        });
        reg.and_then(|reg| catch(|| reg.free()))
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        // A slot is dropped with its slab, when no call can be in flight (a
        // call holds its channel alive). Drop any leftover registration all
        // the same, so nothing can leak.
        self.cell.with_mut(|cell| {
            // SAFETY: `&mut self`: nobody else can reach the slot.
            let leftover = unsafe { (*cell).take() };
            debug_assert!(leftover.is_none(), "slot dropped with a live registration");
            if let Some(reg) = leftover {
                let _ = catch(|| reg.free());
            }
        });
    }
}
