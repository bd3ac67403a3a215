//! One call slot: the state word, the callback cell and the waker.
//!
//! A slot lives in a channel's slab (`registry.rs`) for as long as the
//! channel does and is reused by generation; it is never freed while any
//! thread can reach it. Who may touch the cell is decided by the state word
//! (`state.rs`):
//!
//! * the registrar that won `publish_registration` writes it, once, and then
//!   publishes it with a `Release` store of the slot's vtable pointer;
//! * the thread that runs the cancel callback (the canceller that `CLAIMED`
//!   it, or the registrar itself on `RunInline`) mutates it to take the
//!   `on_cancel` closure out;
//! * the freer (whoever finishes last, decided by `complete` /
//!   `finish_cancel` / `take_free`) takes the registration out and runs the
//!   free-state.
//!
//! These three never overlap in time; the orderings that make each one see
//! the previous one's writes are listed in `state.rs` (pairs 1–3, 2b).
//!
//! # The vtable pointer's word
//!
//! ```text
//!  63 ................................. 1      0
//! +--------------------------------------+----------+
//! | &'static VTable (8-aligned), or null  | RETURNED |
//! +--------------------------------------+----------+
//! ```
//!
//! Null until the registrar publishes the registration (`Release`, pair 1)
//! and again once the freer took it out (before the release). `RETURNED`:
//! a sweep's callback returned (its batched finish, pair 2b in `state.rs`),
//! stored `Release` by the sweeper and read `SeqCst` by the owner's
//! `complete`. One thread writes the word at a time (registrar, then
//! callback runner, then freer): the first two hand over through the state
//! word; the runner hands the word (and the cell) to an owner that frees
//! through the tag itself, read after the owner's own RMW, and to itself
//! as freer through `take_free`. So stores, not RMWs, suffice.

use core::mem::{align_of, size_of, ManuallyDrop, MaybeUninit};
use core::ptr;

use crate::state::CallState;
use crate::sync::{spin_wait, AtomicPtr, AtomicWaker, Ordering, UnsafeCell};
use crate::value::panic::{catch, Panic};
use crate::CancelReason;

/// Machine words of inline registration storage in each slot (P2: a state
/// and closures of up to three words in total are stored without allocating).
const INLINE_WORDS: usize = 3;

/// Raw inline storage for one registration.
#[repr(C)]
struct Buf([MaybeUninit<usize>; INLINE_WORDS]);

/// A registration's parts, as stored (inline in a [`Buf`] or boxed).
pub(crate) struct Parts<S, C, F> {
    state: S,
    /// Taken out (moved) when the callback runs; whether it was is read off
    /// the state word (`CANCELLED` with `REGISTERED` means it ran).
    on_cancel: ManuallyDrop<C>,
    on_free: F,
}

/// The type-erased operations on a stored registration.
///
/// # Safety (of both functions)
/// The `Buf` must hold the registration this vtable was stored with, and the
/// caller must hold the right the state word gives: the callback runner for
/// `cancel` (once), the freer for `free` (once, last).
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
        // The callback's captures go before the state is handed to on_free;
        // a panic while dropping them must not skip on_free (R2): it is
        // re-raised after on_free ran.
        let dropped = if cancel_ran {
            None
        } else {
            catch(|| drop(ManuallyDrop::into_inner(on_cancel)))
        };
        on_free(state);
        if let Some(panic) = dropped {
            std::panic::resume_unwind(panic);
        }
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
        /// Releases the box's memory (not its value, which `free_at`
        /// moves out) when dropped: also when `on_free` panics (no leak, A4).
        struct Dealloc<T>(*mut MaybeUninit<T>);
        impl<T> Drop for Dealloc<T> {
            fn drop(&mut self) {
                // SAFETY: the pointer came from `Box::into_raw`; as
                // `MaybeUninit` only the memory is released.
                drop(unsafe { Box::from_raw(self.0) });
            }
        }
        let _dealloc = Dealloc(boxed.cast::<MaybeUninit<Self>>());
        // SAFETY: the box is live; `free_at` moves the value out once, and
        // `_dealloc` then releases the memory without dropping it again.
        unsafe { Self::free_at(boxed, cancel_ran) }
    }
}

/// A registration built before the registrar's RMW (boxing, if needed, is
/// done here, so the window between winning the RMW and publishing the bytes
/// holds no allocation and no user code).
pub(crate) enum Prepared<S, C, F> {
    Inline(Parts<S, C, F>),
    Boxed(Box<Parts<S, C, F>>),
}

impl<S, C, F> Prepared<S, C, F>
where
    C: FnOnce(CancelReason, &S),
    F: FnOnce(S),
{
    pub(crate) fn new(state: S, on_cancel: C, on_free: F) -> Self {
        let parts = Parts {
            state,
            on_cancel: ManuallyDrop::new(on_cancel),
            on_free,
        };
        if Parts::<S, C, F>::FITS_INLINE {
            Prepared::Inline(parts)
        } else {
            Prepared::Boxed(Box::new(parts))
        }
    }

    /// A refused registration: give the state back, drop the closures
    /// unrun (R2).
    pub(crate) fn into_state(self) -> S {
        let parts = match self {
            Prepared::Inline(parts) => parts,
            Prepared::Boxed(boxed) => *boxed,
        };
        drop(ManuallyDrop::into_inner(parts.on_cancel));
        drop(parts.on_free);
        parts.state
    }
}

/// One call's slot: 64 bytes, aligned to a cache line so two calls never
/// share one (P3): the state word (8), inline registration storage (24) and
/// its vtable pointer (8), and the `AtomicWaker` (24).
#[repr(align(64))]
pub(crate) struct CallSlot {
    pub(crate) state: CallState,
    /// The registration's bytes (inline `Parts`, or a `Box<Parts>` pointer).
    cell: UnsafeCell<Buf>,
    /// How to use `cell`: null until the registrar has written it. Published
    /// with `Release` after the write, read with `Acquire` before any use,
    /// tagged `RETURNED` by a sweep whose callback returned (pair 2b),
    /// reset to null by the freer before `release`. See "The vtable
    /// pointer's word" in the module docs.
    vtable: AtomicPtr<VTable>,
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
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::at_generation(0)
    }

    /// A free slot whose first call has generation `gen`.
    pub(crate) fn at_generation(gen: u64) -> Self {
        Self {
            state: CallState::at_generation(gen),
            cell: UnsafeCell::new(Buf([MaybeUninit::uninit(); INLINE_WORDS])),
            vtable: AtomicPtr::new(ptr::null_mut()),
            waker: AtomicWaker::new(),
        }
    }

    /// Stores a prepared registration and publishes it.
    ///
    /// # Safety
    /// The caller's `publish_registration` returned `Armed` or `RunInline`
    /// for the current generation, and it has not stored anything yet.
    pub(crate) unsafe fn store_registration<S, C, F>(&self, prepared: Prepared<S, C, F>)
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        let vtable: &'static VTable = self.cell.with_mut(|buf| match prepared {
            Prepared::Inline(parts) => {
                // SAFETY: `FITS_INLINE` (checked by `Prepared::new`) gives
                // size and alignment; per this function's contract nobody
                // reads the cell until the vtable pointer is published below.
                unsafe { buf.cast::<Parts<S, C, F>>().write(parts) };
                &Parts::<S, C, F>::INLINE
            }
            Prepared::Boxed(boxed) => {
                // SAFETY: a pointer fits in (and is aligned for) `Buf`; no
                // reader yet, as above.
                unsafe {
                    buf.cast::<*mut Parts<S, C, F>>()
                        .write(Box::into_raw(boxed))
                };
                &Parts::<S, C, F>::BOXED
            }
        });
        // Ordering: Relaxed; the registrar owns the (empty) pointer here.
        debug_assert!(self.vtable.load(Ordering::Relaxed).is_null());
        // Ordering: Release publishes the bytes to the claimer's Acquire
        // load in `published` (pair 1 in `state.rs`).
        // Mutant (ci/mutants.sh): publish with Relaxed.
        let order = if cfg!(callcancel_mutant = "relaxed_publish") {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        self.vtable.store(ptr::from_ref(vtable).cast_mut(), order);
    }

    /// The published vtable. A canceller may claim between the registrar's
    /// RMW and its publication: then it waits here for a few instructions
    /// (the registrar runs no user code and allocates nothing in between:
    /// `Prepared::new` boxed a large registration before the RMW).
    ///
    /// What remains (issue 12 #13): this wait is not lock-free. If the
    /// registrar is descheduled inside that window, the canceller (a sweep,
    /// `cancel()`, a deadline runner) waits until it runs again; the spin
    /// yields to the scheduler after 64 rounds, so it costs little CPU, but
    /// its length is the registrar's scheduling delay. Removing the window
    /// needs a second RMW on every registration (publish, then announce) or
    /// handing the run to the registrar (a re-check RMW after publishing):
    /// both put an RMW back on the hot path, so the window stays, bounded
    /// by the registrar's next few instructions.
    fn published(&self) -> &'static VTable {
        let mut spins = 0u32;
        loop {
            // Ordering: Acquire pairs with the Release store in
            // `store_registration`.
            let p = untagged(self.vtable.load(Ordering::Acquire));
            if !p.is_null() {
                // SAFETY: only `&'static VTable`s are stored here (perhaps
                // tagged `RETURNED` in the low bit, cleared above).
                return unsafe { &*p };
            }
            spins = spins.wrapping_add(1);
            spin_wait(spins);
        }
    }

    /// Runs the cancel callback, catching a panic.
    ///
    /// # Safety
    /// The caller holds the right to run the callback (`STARTED`): its claim
    /// took it (`request_cancel` with `run_now`), it won
    /// `CallState::try_start` on a callback claimed without it, or it is the
    /// registrar whose `publish_registration` returned `RunInline` (after
    /// storing and `mark_started`); and the claim is not finished yet
    /// (neither `finish_cancel` nor the `RETURNED` tag).
    pub(crate) unsafe fn run_callback(&self, reason: CancelReason) -> Option<Panic> {
        let vtable = self.published();
        self.cell.with_mut(|buf| {
            // SAFETY: `vtable` matches the bytes in `buf` (published after
            // them); per the contract this thread alone runs the callback,
            // which has not run yet.
            catch(|| unsafe { (vtable.cancel)(buf, reason) })
        })
    }

    /// Takes the registration out and runs its free-state, catching a panic.
    /// `cancel_ran`: whether the cancel callback ran (the state word says).
    ///
    /// # Safety
    /// The caller is the freer of the current generation (its `complete`
    /// returned `OwnerFrees` for a registered call, its `finish_cancel`
    /// returned `CancellerFrees`, or it won `take_free`) and has not yet
    /// called `release`.
    pub(crate) unsafe fn free_registration(&self, cancel_ran: bool) -> Option<Panic> {
        // The registration returned (owner) or the callback ran (canceller):
        // either way the vtable is published.
        let vtable = self.published();
        // Ordering: Relaxed; `release` (Release) publishes the reset to the
        // next generation.
        self.vtable.store(ptr::null_mut(), Ordering::Relaxed);
        self.cell.with_mut(|buf| {
            // SAFETY: we are the freer: no other thread touches the cell in
            // this generation any more; the bytes match `vtable`, and we reset
            // the vtable above so they are freed exactly once.
            catch(|| unsafe { (vtable.free)(buf, cancel_ran) })
        })
    }

    /// A sweeping canceller's callback returned (the batched finish,
    /// `ChannelShared::sweep`): instead of a `finish_cancel` RMW on the
    /// state word, tag the vtable pointer `RETURNED`. The canceller touches
    /// neither the cell nor the waker afterwards. Then, after one
    /// `fence(SeqCst)` for its whole batch, it re-reads the state word for
    /// `COMPLETED`; the owner's `complete` RMW is followed by a `SeqCst`
    /// load of this pointer ([`CallSlot::callback_returned`]). Dekker: at
    /// least one of the two sees the other, and both race for the freer's
    /// right with `CallState::take_free` (pair 2b in `state.rs`).
    ///
    /// Ordering: Release: an owner that reads the tag and frees sees the
    /// cell as the callback left it.
    pub(crate) fn mark_returned(&self) {
        let p = untagged(self.vtable.load(Ordering::Relaxed));
        debug_assert!(!p.is_null());
        self.vtable.store(tagged(p, RETURNED), Ordering::Release);
    }

    /// The owner's side of [`CallSlot::mark_returned`]: read right after its
    /// `complete` RMW (and `dekker_fence`). Ordering: `SeqCst`, the load half
    /// of the owner's side of the Dekker pair (the `SeqCst` fence of the
    /// canceller's batch orders its store before it, or its later state
    /// load after the owner's RMW).
    pub(crate) fn callback_returned(&self) -> bool {
        // Mutant (ci/mutants.sh): the owner never sees the batched finish
        // (a leak: nobody frees when only the owner could see the other).
        if cfg!(callcancel_mutant = "owner_ignores_returned") {
            return false;
        }
        tag_of(self.vtable.load(Ordering::SeqCst)) & RETURNED != 0
    }
}

/// The low bit of the slot's vtable pointer (a `VTable` is pointer-aligned):
/// a sweep's callback returned (`CallSlot::mark_returned`).
const RETURNED: usize = 1;
const _: () = assert!(align_of::<VTable>() > RETURNED);

fn tagged(p: *mut VTable, tag: usize) -> *mut VTable {
    p.map_addr(|a| a | tag)
}

fn untagged(p: *mut VTable) -> *mut VTable {
    p.map_addr(|a| a & !RETURNED)
}

fn tag_of(p: *mut VTable) -> usize {
    p.addr() & RETURNED
}

impl CallSlot {
    /// Whether a registration is stored (exclusive access: a slab's drop).
    pub(crate) fn has_registration(&mut self) -> bool {
        // Ordering: Relaxed; `&mut self` orders us after every other user.
        !self.vtable.load(Ordering::Relaxed).is_null()
    }

    /// Drops a leftover waker (exclusive access: a block readied for
    /// another slab, `store/slab.rs`).
    pub(crate) fn clear_waker(&mut self) {
        self.waker = AtomicWaker::new();
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        // A slot is dropped with its slab, when no call can be in flight (the
        // channel's keepalive outlives its calls), so nothing is stored. Free any
        // leftover all the same, so nothing can leak.
        #[cfg(loom)]
        self.state.sync_before_drop();
        // Ordering: `&mut self` orders us after every other user; Acquire
        // (and Relaxed below) only for form.
        let leftover = !self.vtable.load(Ordering::Acquire).is_null();
        debug_assert!(!leftover, "slot dropped with a live registration");
        if leftover {
            let cancel_ran = self.state.load(Ordering::Relaxed).is_cancelled();
            // SAFETY: `&mut self` makes us the only possible freer.
            let _ = unsafe { self.free_registration(cancel_ran) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::state::Published;
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
        assert_eq!(slot.state.publish_registration(), Published::Armed);
        // SAFETY: we won `publish_registration` and have not stored.
        unsafe { slot.store_registration(Prepared::new(state, on_cancel, on_free)) };
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
            let g = slot.state.load(Ordering::Relaxed).generation();
            assert!(matches!(
                slot.state.request_cancel(g, CancelReason::HostAbort, false),
                crate::state::CancelOutcome::Claimed { .. }
            ));
            assert!(slot.state.try_start(g));
            // SAFETY: single-threaded test: we are the claimer and started.
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

    /// Issue 12 #9: a panicking `on_free` of a boxed registration leaked the
    /// box, and a panic while dropping an unrun callback's captures skipped
    /// `on_free` (R2).
    #[test]
    fn panics_in_a_free_neither_leak_nor_skip_on_free() {
        struct PanicOnDrop(#[allow(dead_code)] Arc<()>);
        impl Drop for PanicOnDrop {
            fn drop(&mut self) {
                panic!("capture drop");
            }
        }
        // A boxed registration whose on_free panics: its captures and state
        // are still released.
        let slot = CallSlot::new();
        let token = Arc::new(());
        let (t1, t2) = (Arc::clone(&token), Arc::clone(&token));
        store(
            &slot,
            [Arc::clone(&token), Arc::clone(&token)],
            move |_, _| drop(t1),
            move |_s| {
                let _keep = &t2;
                panic!("on_free");
            },
        );
        // SAFETY: single-threaded test: we are the freer; no cancel ran.
        assert!(unsafe { slot.free_registration(false) }.is_some());
        assert_eq!(Arc::strong_count(&token), 1, "everything was dropped");
        // An unrun callback whose captures panic on drop: on_free still runs.
        let slot = CallSlot::new();
        let freed = Arc::new(AtomicUsize::new(0));
        let f = Arc::clone(&freed);
        let bomb = PanicOnDrop(Arc::clone(&token));
        store(
            &slot,
            1u8,
            move |_, _| drop(bomb),
            move |_| {
                f.fetch_add(1, Ordering::SeqCst);
            },
        );
        // SAFETY: as above.
        assert!(unsafe { slot.free_registration(false) }.is_some());
        assert_eq!(freed.load(Ordering::SeqCst), 1, "on_free ran");
        assert_eq!(Arc::strong_count(&token), 1);
    }
}
