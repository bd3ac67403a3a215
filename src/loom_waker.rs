//! A loom-visible copy of `atomic_waker::AtomicWaker` (built only under
//! `--cfg loom`).
//!
//! `atomic-waker` uses `core`'s atomics and `UnsafeCell`, which loom cannot
//! see: under loom the real crate would behave as a linearizable black box
//! and loom could not explore the interleavings *inside* `register` and
//! `wake`, where the crate's "register, then re-check" protocol lives
//! (`waiter.rs`). This module is the same state machine as
//! atomic-waker 1.1.2 (`src/lib.rs`), line for line, written against the
//! crate's sync seam (loom atomics and loom's `UnsafeCell`), as tokio keeps
//! its own copy for the same reason. `sync.rs` re-exports it as
//! `AtomicWaker` under `cfg(loom)`; normal builds use the real crate.
//!
//! What this proves and what it does not: loom checks callcancel's waiter
//! protocol against *this* copy of the algorithm, with its real orderings
//! (`Acquire` register CAS, `AcqRel` hand-back, `AcqRel` wake `fetch_or`,
//! `Release` unlock), and checks every access to the waker cell for
//! causality. It does not check the published crate's binary; a change in a
//! later atomic-waker release has to be copied here by hand.
//!
//! # Protocol (from atomic-waker)
//!
//! One word with two bits: `REGISTERING` (a `register` call holds the cell)
//! and `WAKING` (a `wake`/`take` call holds it, or wants it).
//!
//! * `register`: CAS `WAITING → REGISTERING` (`Acquire`: sees the cell as the
//!   last waker left it); store the waker; CAS `REGISTERING → WAITING`
//!   (`AcqRel`). If a waker set `WAKING` meanwhile, that CAS fails: take the
//!   waker back out, reset to `WAITING` and wake it here (the concurrent wake
//!   is not lost). If `WAKING` was set on entry, wake the new waker at once.
//! * `take`: `fetch_or(WAKING)` (`AcqRel`). From `WAITING` it owns the cell:
//!   take the waker and clear `WAKING` (`Release`). Otherwise a `register` is
//!   in progress (it will see `WAKING` and wake) or another `take` runs.
//!
//! Memory ordering (atomic-waker's contract): `register` acquires everything
//! released by `wake` calls that happened before it, so a re-check after
//! `register` sees the condition a lost `wake` published.

use core::fmt;
use core::task::Waker;

// Part of the seam (layer 0): loom's types directly, not through `sync`.
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering};

/// Idle: nobody holds the cell.
const WAITING: usize = 0;
/// A `register` call holds the cell.
const REGISTERING: usize = 0b01;
/// A `wake`/`take` call holds the cell (or asked a registrar to wake).
const WAKING: usize = 0b10;

/// The loom-visible `AtomicWaker`: the same API the crate uses (`new`,
/// `register`, `wake`, `take`).
pub(crate) struct AtomicWaker {
    state: AtomicUsize,
    waker: UnsafeCell<Option<Waker>>,
}

// SAFETY: the cell is touched only by the holder of `REGISTERING` (set from
// `WAITING` by a successful CAS) or of `WAKING` (set from `WAITING` by
// `fetch_or`), never both; `Waker` is `Send + Sync`.
unsafe impl Send for AtomicWaker {}
// SAFETY: as above.
unsafe impl Sync for AtomicWaker {}

impl AtomicWaker {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicUsize::new(WAITING),
            waker: UnsafeCell::new(None),
        }
    }

    /// Registers `waker` to be woken by the next `wake`.
    pub(crate) fn register(&self, waker: &Waker) {
        // Ordering: Acquire, pairing with the Release that ended the last
        // `take`, so the cell is seen as that waker left it.
        match self
            .state
            .compare_exchange(WAITING, REGISTERING, Ordering::Acquire, Ordering::Acquire)
            .unwrap_or_else(|x| x)
        {
            WAITING => {
                self.waker.with_mut(|cell| {
                    // SAFETY: we hold `REGISTERING`: no `take` touches the
                    // cell until we hand it back.
                    let cell = unsafe { &mut *cell };
                    match cell {
                        Some(old) if old.will_wake(waker) => {}
                        _ => *cell = Some(waker.clone()),
                    }
                });
                // Ordering: AcqRel: release publishes the waker to the next
                // `take`; acquire (on failure) sees a waker's writes.
                let res = self.state.compare_exchange(
                    REGISTERING,
                    WAITING,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if let Err(actual) = res {
                    // A `wake` came while we held the cell: it saw
                    // `REGISTERING` and left the waking to us.
                    debug_assert_eq!(actual, REGISTERING | WAKING);
                    let waker = self.waker.with_mut(|cell| {
                        // SAFETY: still ours: the concurrent `take` returned
                        // without touching the cell.
                        unsafe { (*cell).take() }
                    });
                    self.state.swap(WAITING, Ordering::AcqRel);
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
            }
            WAKING => {
                // A wake is in progress: wake this waker now.
                waker.wake_by_ref();
            }
            state => {
                // Another registration in progress: concurrent `register`
                // calls are a caller bug (atomic-waker ignores it too).
                debug_assert!(state == REGISTERING || state == REGISTERING | WAKING);
            }
        }
    }

    /// Wakes the registered waker, if any.
    pub(crate) fn wake(&self) {
        if let Some(waker) = self.take() {
            waker.wake();
        }
    }

    /// Takes the registered waker out, if any.
    pub(crate) fn take(&self) -> Option<Waker> {
        // Ordering: AcqRel: acquire sees the registrar's waker; release makes
        // the condition we publish before waking visible to a registrar that
        // sees `WAKING`.
        match self.state.fetch_or(WAKING, Ordering::AcqRel) {
            WAITING => {
                let waker = self.waker.with_mut(|cell| {
                    // SAFETY: we moved the state from `WAITING` to `WAKING`:
                    // the cell is ours until we clear `WAKING`.
                    unsafe { (*cell).take() }
                });
                // Ordering: Release, pairing with `register`'s Acquire CAS.
                self.state.fetch_and(!WAKING, Ordering::Release);
                waker
            }
            state => {
                debug_assert!(
                    state == REGISTERING || state == REGISTERING | WAKING || state == WAKING
                );
                None
            }
        }
    }
}

impl fmt::Debug for AtomicWaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AtomicWaker")
    }
}
