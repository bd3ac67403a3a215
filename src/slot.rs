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

use core::mem::{align_of, size_of, ManuallyDrop, MaybeUninit};
use core::ptr;
use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

use crate::state::CallState;
use crate::sync::{AtomicWaker, UnsafeCell};
use crate::CancelReason;

/// A panic payload caught from user code.
pub(crate) type Panic = Box<dyn Any + Send + 'static>;

/// Machine words of inline registration storage in each slot (P2: a state
/// and closures of up to three words in total are stored without allocating).
const INLINE_WORDS: usize = 3;

/// Raw inline storage for one registration.
#[repr(C)]
struct Buf([MaybeUninit<usize>; INLINE_WORDS]);

/// A registration's parts, as stored (inline in a [`Buf`] or boxed).
struct Parts<S, C, F> {
    state: S,
    /// Taken out (moved) when the callback runs; whether it was is read off
    /// the state word (`CANCELLED` with `REGISTERED` means it ran).
    on_cancel: ManuallyDrop<C>,
    on_free: F,
}

/// The type-erased operations on a stored registration.
struct VTable {
    /// Runs the cancel callback (moving it out of storage).
    cancel: unsafe fn(*mut Buf, CancelReason),
    /// Runs the free-state and releases the storage; `cancel_ran` says
    /// whether `cancel` consumed the callback already.
    free: unsafe fn(*mut Buf, bool),
}

impl<S, C, F> Parts<S, C, F>
where
    C: FnOnce(CancelReason, &S),
    F: FnOnce(S),
{
    const FITS_INLINE: bool =
        size_of::<Self>() <= size_of::<Buf>() && align_of::<Self>() <= align_of::<Buf>();

    const INLINE: VTable = VTable {
        cancel: Self::cancel_inline,
        free: Self::free_inline,
    };

    const BOXED: VTable = VTable {
        cancel: Self::cancel_boxed,
        free: Self::free_boxed,
    };

    /// # Safety
    /// `parts` holds a live `Self` whose callback has not run.
    unsafe fn cancel_at(parts: *mut Self, reason: CancelReason) {
        // SAFETY: per the contract, `parts` is live and exclusively ours.
        let parts = unsafe { &mut *parts };
        // SAFETY: the callback has not run, so it is still there; the state
        // word records that it ran from now on.
        let on_cancel = unsafe { ManuallyDrop::take(&mut parts.on_cancel) };
        on_cancel(reason, &parts.state);
    }

    /// # Safety
    /// `parts` holds a live `Self`; `cancel_ran` tells whether the callback
    /// was taken out. The value is moved out: `parts` is dead afterwards.
    unsafe fn free_at(parts: *mut Self, cancel_ran: bool) {
        // SAFETY: per the contract `parts` is live; we move it out once.
        let Parts {
            state,
            on_cancel,
            on_free,
        } = unsafe { ptr::read(parts) };
        if !cancel_ran {
            // The callback's captures go before the state is handed to
            // on_free.
            drop(ManuallyDrop::into_inner(on_cancel));
        }
        on_free(state);
    }

    unsafe fn cancel_inline(buf: *mut Buf, reason: CancelReason) {
        // SAFETY: `store` put an inline `Self` in `buf` (FITS_INLINE); the
        // caller holds the callback-runner's right (see `CallSlot`).
        unsafe { Self::cancel_at(buf.cast::<Self>(), reason) }
    }

    unsafe fn free_inline(buf: *mut Buf, cancel_ran: bool) {
        // SAFETY: as in `cancel_inline`; the caller is the freer.
        unsafe { Self::free_at(buf.cast::<Self>(), cancel_ran) }
    }

    unsafe fn cancel_boxed(buf: *mut Buf, reason: CancelReason) {
        // SAFETY: `store` put a `Box::into_raw` pointer at the start of `buf`.
        let boxed = unsafe { buf.cast::<*mut Self>().read() };
        // SAFETY: that box is live until `free_boxed`.
        unsafe { Self::cancel_at(boxed, reason) }
    }

    unsafe fn free_boxed(buf: *mut Buf, cancel_ran: bool) {
        // SAFETY: `store` put a `Box::into_raw` pointer at the start of `buf`.
        let boxed = unsafe { buf.cast::<*mut Self>().read() };
        // SAFETY: the box is live; after moving the value out we release
        // its allocation without dropping the (moved) value again.
        unsafe {
            Self::free_at(boxed, cancel_ran);
        }
        // SAFETY: `boxed` came from `Box::into_raw`; its value was moved out
        // above, so it is dropped as `MaybeUninit` (memory only).
        drop(unsafe { Box::from_raw(boxed.cast::<MaybeUninit<Self>>()) });
    }
}

/// A registration in its slot: the bytes and how to use them.
struct Stored {
    buf: Buf,
    vtable: Option<&'static VTable>,
}

/// Runs user code, catching a panic so the caller can finish its protocol
/// step first (A4).
pub(crate) fn catch(f: impl FnOnce()) -> Option<Panic> {
    panic::catch_unwind(AssertUnwindSafe(f)).err()
}

/// One call's slot: 64 bytes, aligned to a cache line so two calls never
/// share one (P3): the state word (8), inline registration storage (24) and
/// its vtable pointer (8), and the `AtomicWaker` (24).
#[repr(align(64))]
pub(crate) struct CallSlot {
    pub(crate) state: CallState,
    cell: UnsafeCell<Stored>,
    pub(crate) waker: AtomicWaker,
}

// SAFETY: the only non-`Sync` field is `cell`, and every access to it is
// exclusive by the state-word protocol described in the module docs (one
// registrar writes, then one callback runner, then one freer, each ordered
// after the previous by an acquire/release pair on `state`). Registrations
// are `Send` (enforced by `store_registration`'s bounds), so handing them
// between threads is sound.
unsafe impl Sync for CallSlot {}
// SAFETY: as above: the stored registration is `Send`; the atomics are.
unsafe impl Send for CallSlot {}

impl CallSlot {
    pub(crate) fn new() -> Self {
        Self {
            state: CallState::new(),
            cell: UnsafeCell::new(Stored {
                buf: Buf([MaybeUninit::uninit(); INLINE_WORDS]),
                vtable: None,
            }),
            waker: AtomicWaker::new(),
        }
    }

    /// Stores a registration: inline when it fits in three words, else boxed.
    ///
    /// # Safety
    /// The caller won `begin_register` for the current generation and has not
    /// yet called `publish_registration`.
    pub(crate) unsafe fn store_registration<S, C, F>(&self, state: S, on_cancel: C, on_free: F)
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        let parts = Parts {
            state,
            on_cancel: ManuallyDrop::new(on_cancel),
            on_free,
        };
        self.cell.with_mut(|cell| {
            // SAFETY: per this function's contract no other thread may touch
            // the cell until `publish_registration` publishes it.
            let cell = unsafe { &mut *cell };
            debug_assert!(cell.vtable.is_none());
            let buf: *mut Buf = &mut cell.buf;
            if Parts::<S, C, F>::FITS_INLINE {
                // SAFETY: `FITS_INLINE` checked size and alignment.
                unsafe { buf.cast::<Parts<S, C, F>>().write(parts) };
                cell.vtable = Some(&Parts::<S, C, F>::INLINE);
            } else {
                let boxed = Box::into_raw(Box::new(parts));
                // SAFETY: a pointer fits in (and is aligned for) `Buf`.
                unsafe { buf.cast::<*mut Parts<S, C, F>>().write(boxed) };
                cell.vtable = Some(&Parts::<S, C, F>::BOXED);
            }
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
            let vtable = cell.vtable?;
            let buf: *mut Buf = &mut cell.buf;
            // SAFETY: `vtable` matches what `store_registration` put in
            // `buf`, and the callback has not run (one runner per generation).
            catch(|| unsafe { (vtable.cancel)(buf, reason) })
        })
    }

    /// Takes the registration out and runs its free-state, catching a panic.
    /// `cancel_ran`: whether the cancel callback ran (the state word says).
    ///
    /// # Safety
    /// The caller is the freer of the current generation (its `complete`
    /// returned `OwnerFrees` or its `finish_cancel` returned
    /// `CancellerFrees`) and has not yet called `release`.
    pub(crate) unsafe fn free_registration(&self, cancel_ran: bool) -> Option<Panic> {
        self.cell.with_mut(|cell| {
            // SAFETY: per the contract, no other thread touches the cell any
            // more in this generation; the next one starts after `release`.
            let cell = unsafe { &mut *cell };
            let vtable = cell.vtable.take()?;
            let buf: *mut Buf = &mut cell.buf;
            // SAFETY: `vtable` matches the stored value, freed exactly once
            // (we just took the vtable out).
            catch(|| unsafe { (vtable.free)(buf, cancel_ran) })
        })
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        // A slot is dropped with its slab, when no call can be in flight (a
        // call holds its channel alive), so the cell is empty. Free any
        // leftover all the same, so nothing can leak.
        let leftover = self.cell.with_mut(|cell| {
            // SAFETY: `&mut self`: nobody else can reach the slot.
            unsafe { (*cell).vtable.is_some() }
        });
        debug_assert!(!leftover, "slot dropped with a live registration");
        if leftover {
            let cancel_ran = self
                .state
                .load(crate::sync::Ordering::Relaxed)
                .is_cancelled();
            // SAFETY: `&mut self` makes us the only possible freer.
            let _ = unsafe { self.free_registration(cancel_ran) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::state::{BeginRegister, Published};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(size_of::<CallSlot>(), 64);
    }

    fn store<S, C, F>(slot: &CallSlot, state: S, on_cancel: C, on_free: F)
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        assert!(slot.state.try_occupy().is_some());
        assert_eq!(slot.state.begin_register(), BeginRegister::Proceed);
        // SAFETY: we won `begin_register` and have not published.
        unsafe { slot.store_registration(state, on_cancel, on_free) };
        assert_eq!(slot.state.publish_registration(), Published::Armed);
    }

    /// Inline (small) and boxed (large) registrations: the callback runs
    /// once with the state, the free gets the state, captures drop once.
    #[test]
    fn inline_and_boxed_registrations_run_and_free_once() {
        for big in [false, true] {
            let slot = CallSlot::new();
            let hits = Arc::new(AtomicUsize::new(0));
            let (h1, h2) = (Arc::clone(&hits), Arc::clone(&hits));
            let state: Box<dyn Fn() -> u64 + Send> = Box::new(|| 7);
            if big {
                let pad = [1u64; 4];
                store(
                    &slot,
                    state,
                    move |r, s| {
                        assert_eq!((r, s(), pad[3]), (CancelReason::HostAbort, 7, 1));
                        h1.fetch_add(1, Ordering::SeqCst);
                    },
                    move |s| {
                        assert_eq!(s(), 7);
                        h2.fetch_add(10, Ordering::SeqCst);
                    },
                );
            } else {
                store(
                    &slot,
                    state,
                    move |r, s| {
                        assert_eq!((r, s()), (CancelReason::HostAbort, 7));
                        h1.fetch_add(1, Ordering::SeqCst);
                    },
                    move |s| {
                        assert_eq!(s(), 7);
                        h2.fetch_add(10, Ordering::SeqCst);
                    },
                );
            }
            // SAFETY: single-threaded test: we act as the claimer.
            assert!(unsafe { slot.run_callback(CancelReason::HostAbort) }.is_none());
            // SAFETY: and then as the freer; the callback ran.
            assert!(unsafe { slot.free_registration(true) }.is_none());
            assert_eq!(hits.load(Ordering::SeqCst), 11, "big = {big}");
            // on_cancel ran and on_free consumed everything: only ours left.
            assert_eq!(Arc::strong_count(&hits), 1, "big = {big}");
        }
    }

    fn fits<S, C, F>(_: &S, _: &C, _: &F) -> bool
    where
        C: FnOnce(CancelReason, &S),
        F: FnOnce(S),
    {
        Parts::<S, C, F>::FITS_INLINE
    }

    #[test]
    fn three_words_fit_inline_four_do_not() {
        let a = Arc::new(AtomicUsize::new(0));
        let b = Arc::clone(&a);
        let on_cancel = move |_: CancelReason, s: &u64| {
            b.fetch_add(*s as usize, Ordering::SeqCst);
        };
        let on_free = move |s: u64| {
            a.fetch_add(s as usize, Ordering::SeqCst);
        };
        assert!(fits(&0u64, &on_cancel, &on_free));
        assert!(fits(&0u64, &|_: CancelReason, _: &u64| {}, &drop::<u64>));
        let c = Arc::new(0u64);
        let big_cancel = move |_: CancelReason, s: &[u64; 3]| assert_eq!(s[0], *c);
        assert!(!fits(&[0u64; 3], &big_cancel, &drop::<[u64; 3]>));
    }

    #[test]
    fn free_without_cancel_drops_the_callback_captures() {
        let slot = CallSlot::new();
        let token = Arc::new(());
        let t = Arc::clone(&token);
        store(&slot, 5u32, move |_, _| drop(t), |s| assert_eq!(s, 5));
        assert_eq!(Arc::strong_count(&token), 2);
        // SAFETY: single-threaded test: we are the freer; no cancel ran.
        assert!(unsafe { slot.free_registration(false) }.is_none());
        assert_eq!(Arc::strong_count(&token), 1);
    }
}
