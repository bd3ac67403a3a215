//! The one synchronisation seam of the crate.
//!
//! Every other module imports its atomics, cells, locks and the snapshot
//! primitive from here and never names `std::sync::atomic`,
//! `loom`, `atomic_waker` or `arc_swap` directly. Building
//! with `RUSTFLAGS="--cfg loom"` swaps the atomics, the `UnsafeCell` and the
//! locks for loom's model-checked versions, so the same protocol code runs
//! under the model checker unchanged (the pattern of tokio's `src/loom/` and
//! crossbeam's `primitive` module).
//!
//! What loom sees and what it does not (today):
//!
//! * **Seen:** every atomic of the call state word, of the channel flags and
//!   of the host state; the callback cell (`UnsafeCell`, so loom checks that
//!   the registrar's write happens-before the canceller's read); the mutexes
//!   and condition variable of the idle and overflow-waiter slow paths.
//! * **Seen through a stand-in:** `atomic_waker::AtomicWaker` is replaced
//!   under loom by `loom_waker.rs`, a line-for-line copy of its state machine
//!   on loom atomics (tokio keeps such a copy for the same reason).
//! * **Seen, with a shadow:** the channel table's reclamation handshake
//!   (`store/table.rs`: a walker count and a limbo, on these atomics and
//!   mutexes); since loom does not see `Weak`, under loom a released weak
//!   reference is recorded and leaked, and walkers assert they never read
//!   a released one.
//! * **Seen through a stand-in:** `arc_swap` (the host channel-table
//!   snapshot, written only when the table grows or compacts) is, under
//!   loom, a `SeqCst` loom atomic pointer to the current snapshot with
//!   writers serialised on a loom mutex ([`ArcSwap`]): loom sees a chunk
//!   appended by a channel's first call happen before another thread's
//!   walk reads it, and readers do not synchronise with each other (as with
//!   arc-swap). arc-swap's own miri/TSan coverage stands for its internals.
//! * `Arc`/`Weak` stay std's: loom's `Arc` has no `Weak`. Where the last
//!   `Arc` drop is the only synchronisation loom would need to see, a
//!   loom-only acquire RMW stands in (`CallState::sync_before_drop`).
//! * loom treats `SeqCst` *accesses* as `AcqRel`; the protocol's Dekker
//!   pairs rely on the single `SeqCst` order, so under loom a
//!   `fence(SeqCst)` sits between the two accesses of each side
//!   ([`dekker_fence`], a no-op in normal builds).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

pub(crate) use std::sync::{Arc, Weak};

/// Sits between the two `SeqCst` accesses of each side of a Dekker pair (R4:
/// claim then re-check vs flag then sweep; idle: release then waiter check vs
/// announce then count). A no-op in normal builds, where the accesses are
/// `SeqCst` already. loom treats `SeqCst` *accesses* as `AcqRel` (loom README,
/// "Unsupported features") and would report impossible store-buffering
/// outcomes; it does model `fence(SeqCst)`, so under loom this fence restores
/// the single total order the protocol relies on.
#[inline(always)]
pub(crate) fn dekker_fence() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// The single-waiter fast path of `OperationContext::cancelled()`.
#[cfg(not(loom))]
pub(crate) use atomic_waker::AtomicWaker;

/// Under loom, a loom-visible copy of atomic-waker's state machine
/// (`loom_waker.rs`), so loom explores the waiter protocol inside it.
#[cfg(loom)]
pub(crate) use crate::loom_waker::AtomicWaker;

/// The host's channel-table snapshot.
#[cfg(not(loom))]
pub(crate) use arc_swap::ArcSwap;

/// Under loom, a stand-in for the channel-table snapshot with the API the
/// table uses. Readers load the current snapshot with a `SeqCst` loom
/// atomic (arc-swap's loads are `SeqCst` loads too), so loom sees a chunk
/// appended by one thread (a channel's first call) happen before another
/// thread's walk reads its entries, and no more: readers do not
/// synchronise with each other. Writers serialise on a loom mutex (as
/// arc-swap's `rcu` does through its CAS loop) and keep every snapshot
/// alive until the stand-in drops, so a loaded pointer stays valid.
#[cfg(loom)]
pub(crate) struct ArcSwap<T> {
    current: AtomicPtr<T>,
    all: Mutex<Vec<Arc<T>>>,
}

#[cfg(loom)]
impl<T> ArcSwap<T> {
    pub(crate) fn from_pointee(value: T) -> Self {
        let first = Arc::new(value);
        Self {
            current: AtomicPtr::new(Arc::as_ptr(&first).cast_mut()),
            all: Mutex::new(vec![first]),
        }
    }

    pub(crate) fn load(&self) -> Arc<T> {
        self.load_full()
    }

    pub(crate) fn load_full(&self) -> Arc<T> {
        let p = self.current.load(Ordering::SeqCst);
        // SAFETY: `p` is one of the snapshots `all` keeps alive until drop.
        unsafe {
            Arc::increment_strong_count(p);
            Arc::from_raw(p)
        }
    }

    pub(crate) fn rcu(&self, f: impl FnOnce(&Arc<T>) -> T) {
        let mut all = lock(&self.all);
        let next = Arc::new(f(&self.load_full()));
        self.current
            .store(Arc::as_ptr(&next).cast_mut(), Ordering::SeqCst);
        all.push(next);
    }
}

/// A cell with loom's closure-based API in both builds, so loom can check
/// causality of every access to the callback storage.
#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// A cell with loom's closure-based API in both builds, so loom can check
/// causality of every access to the callback storage.
#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    #[inline(always)]
    pub(crate) fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a mutable raw pointer to the contents; the caller must
    /// hold the exclusive right to touch the cell (see `state.rs`).
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Locks a mutex, ignoring poisoning: every critical section in this crate
/// leaves its data consistent before anything can panic (user code never
/// runs under one of our locks).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A read of a word only `Drop` can reach (`&mut self`): a plain load,
/// ordered after every other user by the last `Arc` drop's acquire fence.
/// Under loom an RMW: loom does not see std's `Arc` fence, and would let a
/// plain load read a value another thread has since replaced (review
/// finding: a retired segment then freed twice in a model of `Slab::drop`).
pub(crate) fn exclusive_usize(a: &AtomicUsize) -> usize {
    if cfg!(loom) {
        a.fetch_add(0, Ordering::Acquire)
    } else {
        // Ordering: Relaxed, see above.
        a.load(Ordering::Relaxed)
    }
}

/// As [`exclusive_usize`] for a pointer (under loom it is swapped out for
/// null: the caller is dropping its owner, nobody reads it again).
pub(crate) fn exclusive_ptr<T>(a: &AtomicPtr<T>) -> *mut T {
    if cfg!(loom) {
        a.swap(core::ptr::null_mut(), Ordering::Acquire)
    } else {
        // Ordering: Relaxed, see `exclusive_usize`.
        a.load(Ordering::Relaxed)
    }
}

/// A small per-thread number in `0..n`, assigned round-robin on a thread's
/// first call: spreads host-scope calls over the host's shards. The counter is
/// a process-wide `static`, so it is std's atomic even under loom (loom
/// atomics cannot live in statics); it only picks a shard and takes no part
/// in the cancellation protocol.
pub(crate) fn thread_shard(n: usize) -> usize {
    use std::cell::Cell;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local!(static MINE: Cell<usize> = const { Cell::new(usize::MAX) });
    MINE.with(|mine| {
        if mine.get() == usize::MAX {
            mine.set(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        }
        mine.get() % n
    })
}

/// Backs off while another thread finishes a step of a few instructions.
pub(crate) fn spin_wait(spins: u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if spins < 64 {
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
