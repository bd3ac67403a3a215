//! The one synchronisation seam of the crate.
//!
//! Every other module imports its atomics, cells, locks and the epoch and
//! snapshot primitives from here and never names `std::sync::atomic`,
//! `loom`, `crossbeam_epoch`, `atomic_waker` or `arc_swap` directly. Building
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
//! * **Not seen (treated as linearizable black boxes):** `crossbeam_epoch`
//!   (only used to defer releasing the host channel table's weak references),
//!   `arc_swap` (the host channel-table snapshot) and `atomic_waker` (the
//!   fast-path waker of `cancelled()`). Their own test suites (miri, TSan)
//!   cover their internals; loom models of this crate check *our* protocol
//!   assuming those primitives are correct. Loom-visible stand-ins are
//!   tracked separately.
//! * `Arc`/`Weak` stay std's: loom's `Arc` has no `Weak`.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

pub(crate) use std::sync::{Arc, Weak};

/// Epoch-based reclamation (crossbeam-epoch), used by the host's channel
/// table: see `registry.rs`.
pub(crate) mod epoch {
    pub(crate) use crossbeam_epoch::pin;
}

/// The single-waiter fast path of `OperationContext::cancelled()`.
#[cfg(not(loom))]
pub(crate) use atomic_waker::AtomicWaker;

/// Under loom, a loom-visible copy of atomic-waker's state machine
/// (`loom_waker.rs`), so loom explores the waiter protocol inside it.
#[cfg(loom)]
pub(crate) use crate::loom_waker::AtomicWaker;

/// The host's channel-table snapshot.
pub(crate) use arc_swap::ArcSwap;

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

/// Sleeps on `cv` for at most `dur` (a short re-check pause, woken early by a
/// notification). Under loom, whose condvar ignores timeouts, it yields
/// instead so that a model can make progress.
pub(crate) fn pause_briefly<'a, T>(
    cv: &Condvar,
    m: &'a Mutex<T>,
    guard: MutexGuard<'a, T>,
    dur: std::time::Duration,
) -> MutexGuard<'a, T> {
    #[cfg(loom)]
    {
        let _ = (cv, dur);
        drop(guard);
        loom::thread::yield_now();
        lock(m)
    }
    #[cfg(not(loom))]
    let _ = m;
    #[cfg(not(loom))]
    match cv.wait_timeout(guard, dur) {
        Ok((g, _)) => g,
        Err(poisoned) => poisoned.into_inner().0,
    }
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
