//! The per-call state word: one `AtomicUsize` that decides R1–R3.
//!
//! Every call slot owns one [`CallState`]. All questions "who runs the cancel
//! callback", "who frees the state", "may this slot be reused" are answered
//! by the *return value* of a single read-modify-write on this word, so no
//! two threads can both believe they won.
//!
//! # Bits
//!
//! ```text
//!  63 ............................ 10   9        8       7         6        5        4        3         2           1           0
//! +----------------------------------+--------+-------+---------+--------+--------+--------+---------+-----------+-------------+----------+
//! |            generation            |OVERFLOW|WAITER |COMPLETED|CB_DONE |CLAIMED |R_FAULT |CANCELLED|REGISTERED |REGISTERING  | OCCUPIED |
//! +----------------------------------+--------+-------+---------+--------+--------+--------+---------+-----------+-------------+----------+
//! ```
//!
//! | bit | meaning | set by | invariant |
//! |---|---|---|---|
//! | `OCCUPIED` | a live call owns the slot | `begin_call` ([`CallState::try_occupy`]) | cleared only by [`CallState::release`], which also bumps the generation |
//! | `REGISTERING` | a registration has started | the first registrar ([`CallState::begin_register`]) | later registrars see it and fail with `AlreadyRegistered` |
//! | `REGISTERED` | the callback cell is filled | that registrar ([`CallState::publish_registration`]) | implies `REGISTERING` |
//! | `CANCELLED` | cancellation decided | the first canceller ([`CallState::request_cancel`]) | set at most once per generation; never with `COMPLETED` already set |
//! | `R_FAULT` | reason is `ChannelFaulted` (else `HostAbort`) | the same RMW as `CANCELLED` | meaningful only with `CANCELLED`; never changes afterwards (R5) |
//! | `CLAIMED` | a canceller owns the callback and runs it | the RMW that makes `CANCELLED` and `REGISTERED` both true from the canceller side | implies `CANCELLED` and `REGISTERED` |
//! | `CB_DONE` | the claimed callback has returned | the claimer ([`CallState::finish_cancel`]) | implies `CLAIMED` |
//! | `COMPLETED` | the owner completed the call | [`CallState::complete`] | after it, no canceller claims (R6) |
//! | `WAITER` | a `cancelled()` future parked in the slot's `AtomicWaker` | the first future | cancellers wake the `AtomicWaker` when they see it |
//! | `OVERFLOW` | more futures parked in the channel's overflow list | later futures | cancellers wake the overflow list when they see it |
//!
//! # State machine (one generation of one slot)
//!
//! ```text
//!                    try_occupy
//!   FREE(g) ─────────────────────────▶ OCCUPIED
//!      ▲                               │   │  \
//!      │ release (gen g+1)             │   │   \ request_cancel (not registered): CANCELLED, no claim
//!      │                               │   │    ▼
//!      │                begin_register │   │   CANCELLED ──publish_registration──▶ callback runs *inline*
//!      │                               ▼   │                                        in register (R4)
//!      │                      REGISTERING  │
//!      │           publish_registration │  │
//!      │                               ▼   │
//!      │                         REGISTERED│
//!      │         request_cancel          │ │ complete
//!      │  (CANCELLED|CLAIMED: canceller  │ │
//!      │   runs the callback, unpinned)  ▼ ▼
//!      │                        CLAIMED      COMPLETED ──▶ owner frees, then release
//!      │                  complete │   │ finish_cancel
//!      │                           ▼   ▼
//!      │      CLAIMED|COMPLETED         CLAIMED|CB_DONE
//!      │   (owner returns at once:        │ complete: owner frees, then release
//!      │    whoever finishes last frees)  │
//!      └── finish_cancel: canceller frees, then release
//! ```
//!
//! # Reachable combinations (ignoring `WAITER`/`OVERFLOW`, which may be added
//! to any row while `COMPLETED` is clear)
//!
//! | OCC | REG'ING | REG'D | CANC | CLAIM | CB_DONE | COMPL | meaning |
//! |---|---|---|---|---|---|---|---|
//! | 0 | 0 | 0 | 0 | 0 | 0 | 0 | free slot (only the generation is non-zero) |
//! | 1 | 0 | 0 | 0 | 0 | 0 | 0 | call running, nothing registered |
//! | 1 | 1 | 0 | 0 | 0 | 0 | 0 | registration in progress |
//! | 1 | 1 | 1 | 0 | 0 | 0 | 0 | armed: a cancel will claim the callback |
//! | 1 | x | 0 | 1 | 0 | 0 | 0 | cancelled before registration finished: the registrar runs the callback inline |
//! | 1 | 1 | 1 | 1 | 0 | 0 | 0 | cancelled, callback ran (or runs) inline in the registrar |
//! | 1 | 1 | 1 | 1 | 1 | 0 | 0 | a canceller runs the callback |
//! | 1 | 1 | 1 | 1 | 1 | 1 | 0 | the callback returned, call still running |
//! | 1 | 1 | 1 | 1 | 1 | 0 | 1 | completed while the callback runs: the canceller will free |
//! | 1 | x | x | x | x | x | 1 | completed: the freer is running; `release` follows |
//!
//! # Memory ordering
//!
//! * The registrar writes the callback cell, then `publish_registration` does
//!   an `AcqRel` RMW. A canceller whose `request_cancel` RMW reads `REGISTERED`
//!   (`AcqRel`) therefore sees the cell contents. (Release → Acquire pair 1.)
//! * The claimer takes the `on_cancel` closure out of the cell, then
//!   `finish_cancel` (`AcqRel`). The owner's `complete` RMW (`AcqRel`) that
//!   reads `CB_DONE` sees the cell as the claimer left it; a claimer whose
//!   `finish_cancel` reads `COMPLETED` owns the cell outright. (Pair 2.)
//! * `release` stores the next generation with `SeqCst`; the next
//!   `try_occupy` (`SeqCst` CAS) reads it and so sees the emptied cell.
//!   (Pair 3.) `SeqCst` also orders it before the idle-waiter check that
//!   follows (a Dekker pair with `wait_idle`, see `host.rs`).
//! * `try_occupy` is `SeqCst` and is followed by a `SeqCst` re-check of the
//!   host and channel flags; an abort or fault sets its flag with a `SeqCst`
//!   RMW before its sweep loads slot states with `SeqCst`. In the single total
//!   order of `SeqCst` operations either the re-check sees the flag (the call
//!   is refused) or the sweep sees the slot occupied (the call is cancelled):
//!   never neither (R4).
//! * `is_cancelled()` is one `Acquire` load, pairing with the `AcqRel`
//!   RMW that set `CANCELLED` (P4).

use crate::sync::{AtomicUsize, Ordering};
use crate::CancelReason;

const OCCUPIED: usize = 1 << 0;
const REGISTERING: usize = 1 << 1;
const REGISTERED: usize = 1 << 2;
const CANCELLED: usize = 1 << 3;
const R_FAULT: usize = 1 << 4;
const CLAIMED: usize = 1 << 5;
const CB_DONE: usize = 1 << 6;
const COMPLETED: usize = 1 << 7;
/// A primary `cancelled()` future parked in the slot's `AtomicWaker`.
pub(crate) const WAITER: usize = 1 << 8;
/// Further `cancelled()` futures parked in the channel's overflow list.
pub(crate) const OVERFLOW: usize = 1 << 9;
const GEN_SHIFT: u32 = 10;
const FLAGS_MASK: usize = (1 << GEN_SHIFT) - 1;

/// A value read from a [`CallState`]; never a bare `usize` across a function
/// boundary.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot(usize);

impl Snapshot {
    pub(crate) fn is_occupied(self) -> bool {
        self.0 & OCCUPIED != 0
    }
    pub(crate) fn generation(self) -> usize {
        self.0 >> GEN_SHIFT
    }
    pub(crate) fn is_cancelled(self) -> bool {
        self.0 & CANCELLED != 0
    }
    pub(crate) fn is_completed(self) -> bool {
        self.0 & COMPLETED != 0
    }
    pub(crate) fn is_registered(self) -> bool {
        self.0 & REGISTERED != 0
    }
    pub(crate) fn has(self, bit: usize) -> bool {
        self.0 & bit != 0
    }
    /// The decided reason, if cancelled.
    pub(crate) fn reason(self) -> Option<CancelReason> {
        if self.0 & CANCELLED == 0 {
            None
        } else if self.0 & R_FAULT != 0 {
            Some(CancelReason::ChannelFaulted)
        } else {
            Some(CancelReason::HostAbort)
        }
    }
}

impl core::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = [
            (OCCUPIED, "OCCUPIED"),
            (REGISTERING, "REGISTERING"),
            (REGISTERED, "REGISTERED"),
            (CANCELLED, "CANCELLED"),
            (R_FAULT, "R_FAULT"),
            (CLAIMED, "CLAIMED"),
            (CB_DONE, "CB_DONE"),
            (COMPLETED, "COMPLETED"),
            (WAITER, "WAITER"),
            (OVERFLOW, "OVERFLOW"),
        ];
        write!(f, "gen {} [", self.generation())?;
        let mut first = true;
        for (bit, name) in names {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str("]")
    }
}

fn reason_bits(reason: CancelReason) -> usize {
    match reason {
        CancelReason::HostAbort => 0,
        CancelReason::ChannelFaulted => R_FAULT,
    }
}

/// Outcome of [`CallState::begin_register`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BeginRegister {
    /// This registrar alone may now write the callback cell.
    Proceed,
    /// Somebody registered (or is registering) already.
    AlreadyRegistered,
}

/// Outcome of [`CallState::publish_registration`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// Armed: a later cancel claims and runs the callback.
    Armed,
    /// Cancellation was decided first: the registrar runs the callback now,
    /// inline, with this reason (R4). No canceller will touch the cell.
    RunInline(CancelReason),
}

/// Outcome of [`CallState::request_cancel`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelOutcome {
    /// This canceller decided the cancellation *and* claimed the registered
    /// callback: it must run it, then call [`CallState::finish_cancel`].
    Claimed { wake: Snapshot },
    /// This canceller decided the cancellation; nothing is registered yet
    /// (a later registration runs the callback inline). Wake waiters.
    Marked { wake: Snapshot },
    /// Nothing to do: already cancelled (first reason wins, R5), completed
    /// (R6), free, or reused by another generation.
    Skipped,
}

/// Outcome of [`CallState::finish_cancel`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterCallback {
    /// The owner has not completed: it will free at completion.
    OwnerFrees,
    /// The owner completed while the callback ran: the canceller frees the
    /// state and releases the slot.
    CancellerFrees,
}

/// Outcome of [`CallState::complete`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Nothing was registered and the slot is already released (fast path).
    Released,
    /// The owner frees the registered state (if `prev` is registered), wakes
    /// the waiters `prev` names, then calls [`CallState::release`].
    OwnerFrees { prev: Snapshot },
    /// A canceller's callback is still running: it frees and releases.
    CancellerFrees,
}

/// The atomic state word of one call slot. See the module docs.
#[derive(Debug)]
pub(crate) struct CallState {
    word: AtomicUsize,
}

impl CallState {
    pub(crate) fn new() -> Self {
        Self {
            word: AtomicUsize::new(0),
        }
    }

    pub(crate) fn load(&self, order: Ordering) -> Snapshot {
        Snapshot(self.word.load(order))
    }

    /// `begin_call`: take a free slot. Returns the occupied snapshot.
    ///
    /// Ordering: `SeqCst`, so that the caller's following `SeqCst` re-check
    /// of the host/channel flags forms the R4 Dekker pair with the sweeps
    /// (module docs); its acquire side pairs with `release` (pair 3).
    #[must_use]
    pub(crate) fn try_occupy(&self) -> Option<Snapshot> {
        let cur = self.word.load(Ordering::Relaxed);
        if cur & OCCUPIED != 0 {
            return None;
        }
        let new = cur | OCCUPIED;
        self.word
            .compare_exchange(cur, new, Ordering::SeqCst, Ordering::Relaxed)
            .ok()
            .map(|_| Snapshot(new))
    }

    /// First step of a registration: become *the* registrar.
    ///
    /// Ordering: `Relaxed` is enough; the RMW's atomicity alone makes one
    /// registrar win, and a loser touches nothing. The cell write that follows
    /// is published by [`CallState::publish_registration`].
    pub(crate) fn begin_register(&self) -> BeginRegister {
        let prev = self.word.fetch_or(REGISTERING, Ordering::Relaxed);
        debug_assert!(prev & OCCUPIED != 0 && prev & COMPLETED == 0);
        if prev & REGISTERING != 0 {
            BeginRegister::AlreadyRegistered
        } else {
            BeginRegister::Proceed
        }
    }

    /// Second step: the cell is written; publish it.
    ///
    /// Ordering: `AcqRel`. Release publishes the cell (pair 1); a cancel that
    /// came first is seen by this very RMW, and then no canceller claimed.
    pub(crate) fn publish_registration(&self) -> Published {
        let prev = Snapshot(self.word.fetch_or(REGISTERED, Ordering::AcqRel));
        debug_assert!(prev.has(REGISTERING) && !prev.has(REGISTERED) && !prev.has(CLAIMED));
        match prev.reason() {
            Some(reason) => Published::RunInline(reason),
            None => Published::Armed,
        }
    }

    /// A canceller (abort or fault sweep) asks to cancel generation `gen`.
    ///
    /// Ordering: `AcqRel` on success: acquire pairs with
    /// `publish_registration` (pair 1) so a claimer sees the callback;
    /// release publishes `CANCELLED` to `is_cancelled()` and to the registrar.
    pub(crate) fn request_cancel(&self, gen: usize, reason: CancelReason) -> CancelOutcome {
        let mut cur = Snapshot(self.word.load(Ordering::Acquire));
        loop {
            if !cur.is_occupied()
                || cur.generation() != gen
                || cur.is_completed()
                || cur.is_cancelled()
            {
                return CancelOutcome::Skipped;
            }
            let claim = cur.has(REGISTERED);
            let mut new = cur.0 | CANCELLED | reason_bits(reason);
            if claim {
                new |= CLAIMED;
            }
            match self
                .word
                .compare_exchange_weak(cur.0, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if claim => return CancelOutcome::Claimed { wake: cur },
                Ok(_) => return CancelOutcome::Marked { wake: cur },
                Err(actual) => cur = Snapshot(actual),
            }
        }
    }

    /// The claimer's callback returned (or panicked).
    ///
    /// Ordering: `AcqRel`: release hands the cell to an owner that completes
    /// later (pair 2); acquire makes the owner's writes visible when the
    /// owner completed first and the canceller now frees.
    pub(crate) fn finish_cancel(&self) -> AfterCallback {
        let prev = Snapshot(self.word.fetch_or(CB_DONE, Ordering::AcqRel));
        debug_assert!(prev.has(CLAIMED) && !prev.has(CB_DONE));
        if prev.is_completed() {
            AfterCallback::CancellerFrees
        } else {
            AfterCallback::OwnerFrees
        }
    }

    /// The owner completes the call.
    ///
    /// Ordering: the fast path is a `SeqCst` CAS straight to the next free
    /// generation (it is also the release, see [`CallState::release`]). The
    /// slow path is an `AcqRel` RMW pairing with `finish_cancel` (pair 2).
    pub(crate) fn complete(&self) -> Completion {
        let cur = self.word.load(Ordering::Relaxed);
        debug_assert!(cur & OCCUPIED != 0 && cur & COMPLETED == 0);
        if cur & (REGISTERING | REGISTERED | CLAIMED | WAITER | OVERFLOW) == 0 {
            let next = next_free(Snapshot(cur));
            if self
                .word
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                return Completion::Released;
            }
        }
        let prev = Snapshot(self.word.fetch_or(COMPLETED, Ordering::AcqRel));
        if prev.has(CLAIMED) && !prev.has(CB_DONE) {
            Completion::CancellerFrees
        } else {
            Completion::OwnerFrees { prev }
        }
    }

    /// The last finisher hands the slot back: clear every flag and bump the
    /// generation, in one `SeqCst` swap (pair 3, and the Dekker pair with
    /// idle waiters).
    pub(crate) fn release(&self) {
        let cur = Snapshot(self.word.load(Ordering::Relaxed));
        debug_assert!(
            cur.is_occupied() && cur.is_completed(),
            "release of {cur:?}"
        );
        let prev = self.word.swap(next_free(cur), Ordering::SeqCst);
        debug_assert_eq!(prev, cur.0, "slot word changed under its freer");
    }

    /// A `cancelled()` future or a [`CancelWatch`](crate::CancelWatch)
    /// announces itself (`WAITER` or `OVERFLOW`) on generation `gen`.
    /// Returns the state it replaced, or `None` if that generation has
    /// completed (or the slot moved on): then nobody will wake it.
    ///
    /// Ordering: `AcqRel`: if the returned snapshot is not cancelled, a
    /// canceller's or completer's later RMW is ordered after ours in the
    /// word's modification order, sees the bit, and wakes.
    #[must_use]
    pub(crate) fn announce_waiter(&self, gen: usize, bit: usize) -> Option<Snapshot> {
        let mut cur = Snapshot(self.word.load(Ordering::Acquire));
        loop {
            if !cur.is_occupied() || cur.generation() != gen || cur.is_completed() {
                return None;
            }
            if cur.has(bit) || cur.is_cancelled() {
                return Some(cur);
            }
            match self.word.compare_exchange_weak(
                cur.0,
                cur.0 | bit,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(cur),
                Err(actual) => cur = Snapshot(actual),
            }
        }
    }
}

fn next_free(cur: Snapshot) -> usize {
    ((cur.0 & !FLAGS_MASK).wrapping_add(1 << GEN_SHIFT)) & !FLAGS_MASK
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_without_registration_bumps_generation() {
        let s = CallState::new();
        let occ = s.try_occupy().unwrap();
        assert!(s.try_occupy().is_none());
        assert_eq!(s.complete(), Completion::Released);
        let next = s.load(Ordering::Relaxed);
        assert!(!next.is_occupied());
        assert_eq!(next.generation(), occ.generation() + 1);
    }

    #[test]
    fn cancel_then_register_runs_inline_with_first_reason() {
        let s = CallState::new();
        let occ = s.try_occupy().unwrap();
        assert!(matches!(
            s.request_cancel(occ.generation(), CancelReason::ChannelFaulted),
            CancelOutcome::Marked { .. }
        ));
        assert_eq!(
            s.request_cancel(occ.generation(), CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        assert_eq!(s.begin_register(), BeginRegister::Proceed);
        assert_eq!(
            s.publish_registration(),
            Published::RunInline(CancelReason::ChannelFaulted)
        );
        assert_eq!(s.begin_register(), BeginRegister::AlreadyRegistered);
        assert!(matches!(s.complete(), Completion::OwnerFrees { prev } if prev.is_registered()));
        s.release();
    }

    #[test]
    fn whoever_finishes_last_frees() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.begin_register(), BeginRegister::Proceed);
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Claimed { .. }
        ));
        assert_eq!(s.complete(), Completion::CancellerFrees);
        assert_eq!(s.finish_cancel(), AfterCallback::CancellerFrees);
        s.release();
        // The other order: callback returns first, owner frees.
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.begin_register(), BeginRegister::Proceed);
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Claimed { .. }
        ));
        assert_eq!(s.finish_cancel(), AfterCallback::OwnerFrees);
        assert!(matches!(s.complete(), Completion::OwnerFrees { prev } if prev.is_registered()));
        s.release();
    }

    #[test]
    fn stale_generation_and_completed_calls_are_skipped() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.complete(), Completion::Released);
        assert_eq!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        let g2 = s.try_occupy().unwrap().generation();
        assert_ne!(g, g2);
        assert_eq!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        assert_eq!(s.begin_register(), BeginRegister::Proceed);
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(s.complete(), Completion::OwnerFrees { prev } if prev.is_registered()));
        assert_eq!(
            s.request_cancel(g2, CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        s.release();
    }
}
