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
//! * **Seen through a stand-in:** `atomic_waker::AtomicWaker` is replaced
//!   under loom by `loom_waker.rs`, a line-for-line copy of its state machine
//!   on loom atomics (tokio keeps such a copy for the same reason).
//! * **Seen only with `--cfg crossbeam_loom`:** `crossbeam_epoch` (it defers
//!   releasing the host channel table's weak references). `ci/loom.sh` runs
//!   a second pass with that cfg and crossbeam-epoch's `loom` feature, so
//!   loom explores the real epoch code; a plain `--cfg loom` build treats it
//!   as a black box.
//! * **Not seen (a linearizable black box):** `arc_swap` (the host
//!   channel-table snapshot, written only when the table grows). Its own
//!   miri/TSan coverage stands for its internals.
//! * `Arc`/`Weak` stay std's: loom's `Arc` has no `Weak`. Where the last
//!   `Arc` drop is the only synchronisation loom would need to see, a
//!   loom-only acquire RMW stands in (`CallState::sync_before_drop`).
//! * loom treats `SeqCst` *accesses* as `AcqRel`; the protocol's Dekker
//!   pairs rely on the single `SeqCst` order, so under loom a
//!   `fence(SeqCst)` sits between the two accesses of each side
//!   ([`dekker_fence`], a no-op in normal builds).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
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

/// The asymmetric Dekker fence pair of the R4 handshake (`begin_call` vs
/// abort, fault and close), after folly's `asymmetricLightBarrier` /
/// `asymmetricHeavyBarrier` and the `membarrier` crate.
///
/// `begin_call` on a slot leased to its thread (`registry.rs`) occupies it
/// with a plain store and then re-reads the host and channel flags;
/// abort/fault/close set their flag and then read the slots. Each side needs
/// a full barrier between its write and its read. The light side (every
/// call) is only a compiler fence; the heavy side (rare) makes the kernel run
/// a barrier on every CPU that runs a thread of this process
/// (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, Linux 4.14+), which has
/// the same effect as a fence in each of them at that point: either the
/// sweeper then sees the occupied slot, or the call's re-check sees the
/// flag.
///
/// Where membarrier is missing or refused (not Linux, a seccomp filter,
/// `CALLCANCEL_MEMBARRIER=off`), [`leases_enabled`] is false, `begin_call`
/// takes every slot with a `SeqCst` CAS (a full barrier of its own) and
/// the heavy side is a plain `SeqCst` fence. Under loom and miri both sides
/// are `fence(SeqCst)` (which both model) and leases stay on, so the models
/// and miri run the leased path.
pub(crate) mod asym {
    #[cfg(not(any(loom, miri)))]
    use std::sync::atomic::{AtomicU8, Ordering};

    #[cfg(not(any(loom, miri)))]
    const UNKNOWN: u8 = 0;
    #[cfg(not(any(loom, miri)))]
    const ON: u8 = 1;
    #[cfg(not(any(loom, miri)))]
    const OFF: u8 = 2;

    /// Decided once per process by [`init`]; never changes afterwards.
    #[cfg(not(any(loom, miri)))]
    static STATUS: AtomicU8 = AtomicU8::new(UNKNOWN);

    /// Decides (once) whether the heavy side can use membarrier. Called by
    /// `ServiceHost::new`, so before any call of any host exists.
    pub(crate) fn init() {
        #[cfg(not(any(loom, miri)))]
        if STATUS.load(Ordering::Acquire) == UNKNOWN {
            let on = !disabled_by_env() && register();
            // Ordering: Release, read with Acquire by `leases_enabled` and
            // `heavy`. The first answer wins and never changes: racing
            // initialisers may disagree (seccomp filters are per thread, the
            // environment may change), and turning ON into OFF after leased
            // calls began would leave them without a heavy side.
            let _ = STATUS.compare_exchange(
                UNKNOWN,
                if on { ON } else { OFF },
                Ordering::Release,
                Ordering::Relaxed,
            );
        }
    }

    #[cfg(not(any(loom, miri)))]
    fn disabled_by_env() -> bool {
        std::env::var_os("CALLCANCEL_MEMBARRIER").is_some_and(|v| v == "off" || v == "0")
    }

    /// Registers the process for private expedited membarriers.
    #[cfg(all(target_os = "linux", not(any(loom, miri))))]
    fn register() -> bool {
        const QUERY: libc::c_long = 0;
        const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        const REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;
        // SAFETY: membarrier takes (cmd, flags, cpu_id) integers, reads no
        // memory of ours, and fails with -1/errno when unsupported.
        let supported = unsafe { libc::syscall(libc::SYS_membarrier, QUERY, 0, 0) };
        if supported < 0
            || supported & PRIVATE_EXPEDITED == 0
            || supported & REGISTER_PRIVATE_EXPEDITED == 0
        {
            return false;
        }
        // SAFETY: as above.
        let registered =
            unsafe { libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0, 0) };
        // One trial barrier, so a filter that allows registration but not
        // the barrier itself turns leases off instead of failing later.
        // SAFETY: as above.
        registered == 0
            && unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0, 0) } == 0
    }

    #[cfg(all(not(target_os = "linux"), not(any(loom, miri))))]
    fn register() -> bool {
        false
    }

    /// Whether `begin_call` may occupy a leased slot with a plain store.
    #[inline]
    pub(crate) fn leases_enabled() -> bool {
        #[cfg(any(loom, miri))]
        return true;
        // Ordering: Relaxed is enough: `init` stored the answer before any
        // host existed, and a caller holds a host, so it happens-after that
        // store and cannot read UNKNOWN or an older value.
        #[cfg(not(any(loom, miri)))]
        return STATUS.load(Ordering::Relaxed) == ON;
    }

    /// The light side: between `begin_call`'s occupying store and its flag
    /// re-check.
    #[inline(always)]
    pub(crate) fn light() {
        #[cfg(any(loom, miri))]
        super::fence_seqcst();
        #[cfg(not(any(loom, miri)))]
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
    }

    /// The heavy side: between an abort's, fault's or close's flag write
    /// and its reads of the slots.
    pub(crate) fn heavy() {
        // Mutant (ci/mutants.sh): no heavy side at all.
        if cfg!(callcancel_mutant = "no_heavy_fence") {
            return;
        }
        #[cfg(any(loom, miri))]
        super::fence_seqcst();
        #[cfg(not(any(loom, miri)))]
        {
            // Ordering: Acquire; `init` ran before any host existed, and we
            // hold a host, so this reads the final answer.
            if STATUS.load(Ordering::Acquire) == ON {
                membarrier();
            } else {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
        }
    }

    #[cfg(all(target_os = "linux", not(any(loom, miri))))]
    fn membarrier() {
        const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        // SAFETY: as in `register`.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0, 0) };
        // Registered and tried in `init`; the kernel documents no later
        // failure (a stricter seccomp filter on this thread could still
        // refuse it). Then leased calls could go unseen by the sweep that
        // follows, and a caught panic would leave the flag set and the sweep
        // undone: stop the process rather than lose a cancellation.
        if r != 0 {
            eprintln!("callcancel: membarrier failed after registration; aborting the process");
            std::process::abort();
        }
    }

    #[cfg(all(not(target_os = "linux"), not(any(loom, miri))))]
    fn membarrier() {
        unreachable!("leases are never enabled without membarrier")
    }
}

#[cfg(any(loom, miri))]
#[inline(always)]
fn fence_seqcst() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
    #[cfg(not(loom))]
    std::sync::atomic::fence(Ordering::SeqCst);
}

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

/// Lets a loom model schedule another thread before a busy re-poll (loom
/// treats an unbounded re-poll as a spin loop); a no-op in normal builds.
#[inline(always)]
pub(crate) fn model_yield() {
    #[cfg(loom)]
    loom::thread::yield_now();
}
