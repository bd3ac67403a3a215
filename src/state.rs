//! The per-call state word: one `AtomicUsize` that decides R1–R3.
//!
//! Every call slot owns one [`CallState`]. All questions "who runs the cancel
//! callback", "who frees the state", "may this slot be reused" are answered
//! by the *return value* of a single read-modify-write on this word, so no
//! two threads can both believe they won. The uncontended lifecycle costs
//! two RMWs on this (call-private) word, `publish_registration` and
//! `complete`, when the thread occupies its leased slot (`occupy_leased`, a
//! plain store); three with the `try_occupy` CAS otherwise. The release that
//! follows is a plain store.
//!
//! # Bits
//!
//! ```text
//!  63 .................. 10   9        8       7         6        5        4        3          2          1        0
//! +------------------------+--------+-------+---------+--------+--------+--------+---------+------------+--------+----------+
//! |       generation       |OVERFLOW|WAITER |COMPLETED|CB_DONE |CLAIMED |R_FAULT |CANCELLED| REGISTERED | LEASED | OCCUPIED |
//! +------------------------+--------+-------+---------+--------+--------+--------+---------+------------+--------+----------+
//! ```
//!
//! | bit | meaning | set by | invariant |
//! |---|---|---|---|
//! | `OCCUPIED` | a live call owns the slot | `begin_call` ([`CallState::try_occupy`], [`CallState::try_occupy_and_lease`], [`CallState::occupy_leased`]) | cleared only by [`CallState::release`], which also bumps the generation |
//! | `LEASED` | the slot is reserved for the live thread holding its lease tag (`registry.rs`) | that thread's `try_occupy_and_lease` | never cleared; `release` keeps it. A free leased word is written by nobody but the lease holder, whose `occupy_leased` is therefore a plain store |
//! | `REGISTERED` | a registrar won the slot's one registration | the first registrar ([`CallState::publish_registration`]) | later registrars see it and fail with `AlreadyRegistered`; the registration's bytes are published separately (the slot's vtable pointer, `slot.rs`) |
//! | `CANCELLED` | cancellation decided | the first canceller ([`CallState::request_cancel`]) | set at most once per generation; never once `COMPLETED` is set |
//! | `R_FAULT` | reason is `ChannelFaulted` (else `HostAbort`) | the same RMW as `CANCELLED` | meaningful only with `CANCELLED`; never changes afterwards (R5) |
//! | `CLAIMED` | a canceller owns the callback and runs it | the canceller's RMW that sets `CANCELLED` while `REGISTERED` is set | implies `CANCELLED` and `REGISTERED` |
//! | `CB_DONE` | the claimed callback has returned | the claimer ([`CallState::finish_cancel`]) | implies `CLAIMED` |
//! | `COMPLETED` | the owner completed the call | [`CallState::complete`] | after it, no thread but the freer writes the word (R6) |
//! | `WAITER` | a future parked in the slot's `AtomicWaker` | the first waiter | cancellers and completers wake the `AtomicWaker` when they see it |
//! | `OVERFLOW` | more futures parked in the channel's overflow list | later waiters | cancellers and completers wake the list when they see it |
//!
//! # State machine (one generation of one slot)
//!
//! ```text
//!                    try_occupy
//!   FREE(g) ─────────────────────────▶ OCCUPIED ───────────── request_cancel (nothing registered):
//!      ▲                                  │                  CANCELLED, no claim; a later
//!      │ release: plain store of          │ publish_registration   publish_registration returns
//!      │ FREE(g+1) by the freer           ▼                  RunInline: the registrar runs the
//!      │                              REGISTERED             callback inside register (R4)
//!      │          request_cancel:        │   │
//!      │          CANCELLED|CLAIMED      │   │ complete (owner): COMPLETED → owner frees
//!      │          (canceller runs the    ▼   ▼
//!      │          callback, unpinned)  CLAIMED    COMPLETED ──▶ owner frees, then release
//!      │                  complete │     │ finish_cancel
//!      │                           ▼     ▼
//!      │          CLAIMED|COMPLETED     CLAIMED|CB_DONE
//!      │       (owner returns at once:    │ complete: owner frees, then release
//!      │        whoever finishes last     │
//!      │        frees)                    │
//!      └── finish_cancel: canceller frees, then release
//! ```
//!
//! # Reachable combinations (ignoring `WAITER`/`OVERFLOW`, which may be added
//! to any row while `COMPLETED` is clear, and `LEASED`, which may be set in
//! any row and stays)
//!
//! | OCC | REG | CANC | CLAIM | CB_DONE | COMPL | meaning |
//! |---|---|---|---|---|---|---|
//! | 0 | 0 | 0 | 0 | 0 | 0 | free slot (only the generation is non-zero) |
//! | 1 | 0 | 0 | 0 | 0 | 0 | call running, nothing registered |
//! | 1 | 1 | 0 | 0 | 0 | 0 | armed: a cancel will claim the callback |
//! | 1 | 0 | 1 | 0 | 0 | 0 | cancelled before registration: a registrar will run the callback inline |
//! | 1 | 1 | 1 | 0 | 0 | 0 | cancelled, callback ran (or runs) inline in the registrar |
//! | 1 | 1 | 1 | 1 | 0 | 0 | a canceller runs the callback |
//! | 1 | 1 | 1 | 1 | 1 | 0 | the callback returned, call still running |
//! | 1 | 1 | 1 | 1 | 0 | 1 | completed while the callback runs: the canceller will free |
//! | 1 | x | x | x | x | 1 | completed, freer running (the "finishing" phase); `release` follows |
//!
//! # Memory ordering
//!
//! * `publish_registration` is an `AcqRel` RMW; the registrar then writes the
//!   registration and publishes it with a `Release` store of the slot's
//!   vtable pointer. A canceller whose `request_cancel` claimed (`AcqRel`)
//!   waits for that pointer with `Acquire` loads before touching the bytes
//!   (a window of a few instructions, no user code: see `slot.rs`).
//!   (Pair 1.)
//! * The claimer takes the `on_cancel` closure out of the cell, then
//!   `finish_cancel` (`SeqCst` RMW). The owner's `complete` RMW (`SeqCst`) that
//!   reads `CB_DONE` sees the cell as the claimer left it; a claimer whose
//!   `finish_cancel` reads `COMPLETED` owns the cell outright. (Pair 2.)
//! * `release` stores the next generation with `Release`; the next
//!   `try_occupy` (`SeqCst` CAS) reads it and so sees the emptied cell.
//!   (Pair 3.) A plain store is enough because after `COMPLETED` (owner
//!   frees) or `CB_DONE` with `COMPLETED` (canceller frees) no other thread
//!   writes the word: cancellers, registrars and waiters all back off on
//!   `COMPLETED`, and claimers need `OCCUPIED` clear.
//! * `try_occupy` is `SeqCst` and is followed by a `SeqCst` re-check of the
//!   host and channel flags; an abort or fault sets its flag with a `SeqCst`
//!   RMW before its sweep loads slot states with `SeqCst`. In the single total
//!   order of `SeqCst` operations either the re-check sees the flag (the call
//!   is refused) or the sweep sees the slot occupied (the call is cancelled):
//!   never neither (R4). `occupy_leased` is a plain store instead; there the
//!   pair is the asymmetric fence of `sync::asym`: a compiler fence between
//!   the store and the re-check, a process-wide membarrier between the
//!   sweeper's flag RMW and its loads. Its `Acquire` load pairs with
//!   `release` (pair 3) like the CAS does.
//! * The RMW that makes a thread the freer (`complete` or `finish_cancel`) is
//!   `SeqCst` and is followed by a `SeqCst` load of the host's idle-waiter
//!   count; `wait_idle` increments that count (`SeqCst`) before it scans. So a
//!   freer either sees the waiter (and notifies it after `release`), or the
//!   waiter sees the slot already in its finishing phase and polls it
//!   briefly instead of sleeping (`host.rs`).
//! * `is_cancelled()` is one `Acquire` load, pairing with the `AcqRel`
//!   RMW that set `CANCELLED` (P4).

use crate::sync::{AtomicUsize, Ordering};
use crate::CancelReason;

const OCCUPIED: usize = 1 << 0;
const LEASED: usize = 1 << 1;
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
    /// The slot is reserved for the thread holding its lease tag.
    #[inline]
    pub(crate) fn is_leased(self) -> bool {
        self.0 & LEASED != 0
    }
    pub(crate) fn generation(self) -> usize {
        self.0 >> GEN_SHIFT
    }
    #[inline]
    pub(crate) fn is_cancelled(self) -> bool {
        self.0 & CANCELLED != 0
    }
    pub(crate) fn is_completed(self) -> bool {
        self.0 & COMPLETED != 0
    }
    /// Completed, with the freer at work: `release` follows without waking
    /// anybody who was not waiting already (`host.rs`).
    pub(crate) fn is_finishing(self) -> bool {
        self.is_occupied() && self.is_completed() && (!self.has(CLAIMED) || self.has(CB_DONE))
    }
    pub(crate) fn is_registered(self) -> bool {
        self.0 & REGISTERED != 0
    }
    /// The word as the owner's `complete` left it.
    #[inline]
    pub(crate) fn with_completed(self) -> Self {
        Self(self.0 | COMPLETED)
    }
    pub(crate) fn has(self, bit: usize) -> bool {
        self.0 & bit != 0
    }
    /// The decided reason, if cancelled.
    #[inline]
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
            (LEASED, "LEASED"),
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

/// Outcome of [`CallState::publish_registration`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// Somebody registered already: this registrar must not touch the cell.
    AlreadyRegistered,
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

    /// Under loom only: an acquire RMW on the word before a slot is dropped.
    /// The real synchronisation is the acquire fence in `Arc::drop_slow`
    /// (the last `Arc<ChannelShared>` may be dropped by a sweeper), which
    /// loom cannot see because `Arc` stays std's; the slot's last freer
    /// released the word after its last cell access, so this RMW (which
    /// reads the newest value) restores that edge for loom.
    #[cfg(loom)]
    pub(crate) fn sync_before_drop(&self) {
        self.word.fetch_or(0, Ordering::Acquire);
    }

    #[inline]
    pub(crate) fn load(&self, order: Ordering) -> Snapshot {
        Snapshot(self.word.load(order))
    }

    /// `begin_call`: take a free slot that is not leased. Returns the
    /// occupied snapshot.
    ///
    /// Ordering: `SeqCst`, so that the caller's following `SeqCst` re-check
    /// of the host/channel flags forms the R4 Dekker pair with the sweeps
    /// (module docs); its acquire side pairs with `release` (pair 3).
    #[inline]
    #[must_use]
    pub(crate) fn try_occupy(&self) -> Option<Snapshot> {
        self.try_occupy_setting(0)
    }

    /// `begin_call` on the slot its thread may lease: take it if it is free
    /// and not leased yet, and lease it in the same CAS. Orderings as
    /// [`CallState::try_occupy`].
    #[must_use]
    pub(crate) fn try_occupy_and_lease(&self) -> Option<Snapshot> {
        self.try_occupy_setting(LEASED)
    }

    #[inline]
    fn try_occupy_setting(&self, extra: usize) -> Option<Snapshot> {
        let cur = self.word.load(Ordering::Relaxed);
        if cur & (OCCUPIED | LEASED) != 0 {
            return None;
        }
        let new = cur | OCCUPIED | extra;
        self.word
            .compare_exchange(cur, new, Ordering::SeqCst, Ordering::Relaxed)
            .ok()
            .map(|_| Snapshot(new))
    }

    /// `begin_call` by the holder of this slot's lease: occupy it with a
    /// plain store if it is free.
    ///
    /// The caller must hold the slot's lease (`registry.rs`): then no other
    /// thread writes the word while it is free and leased (claimers skip
    /// `LEASED`, sweepers and waiters need `OCCUPIED`, stale CASes carry an
    /// old generation), so a load and a store cannot lose an update.
    ///
    /// Ordering: `Acquire` load, pairing with `release` (pair 3); `Relaxed`
    /// store, followed by `sync::asym::light` before the flag re-check (the
    /// R4 pair, module docs).
    #[inline]
    #[must_use]
    pub(crate) fn occupy_leased(&self) -> Option<Snapshot> {
        let cur = self.word.load(Ordering::Acquire);
        if cur & (OCCUPIED | LEASED) != LEASED {
            return None;
        }
        let new = cur | OCCUPIED;
        self.word.store(new, Ordering::Relaxed);
        Some(Snapshot(new))
    }

    /// A registration: become *the* registrar, in one RMW.
    ///
    /// Ordering: `AcqRel`. Acquire: a cancel decided first is seen here, and
    /// then no canceller claimed (the registrar runs the callback inline).
    /// Release: a canceller that claims after us is ordered after this; it
    /// still waits for the registration bytes through the slot's vtable
    /// pointer (pair 1).
    pub(crate) fn publish_registration(&self) -> Published {
        let prev = Snapshot(self.word.fetch_or(REGISTERED, Ordering::AcqRel));
        debug_assert!(prev.is_occupied() && !prev.is_completed());
        if prev.is_registered() {
            return Published::AlreadyRegistered;
        }
        debug_assert!(!prev.has(CLAIMED));
        match prev.reason() {
            // Mutant (ci/mutants.sh): forget a cancel that came first.
            Some(_) if cfg!(callcancel_mutant = "no_inline_run") => Published::Armed,
            Some(reason) => Published::RunInline(reason),
            None => Published::Armed,
        }
    }

    /// A canceller (abort or fault sweep) asks to cancel generation `gen`.
    ///
    /// Ordering: `AcqRel` on success. Acquire: a claimer is ordered after the
    /// registrar's RMW (it still waits for the registration bytes through the
    /// slot's vtable pointer, pair 1). Release: publishes `CANCELLED` (and
    /// everything the canceller did before) to `is_cancelled()`, to
    /// `cancelled()` and to a registrar that will run the callback inline.
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
    /// Ordering: `SeqCst` (at least `AcqRel`): release hands the cell to an
    /// owner that completes later (pair 2); acquire makes the owner's writes
    /// visible when the owner completed first and the canceller now frees;
    /// `SeqCst` for the idle-waiter check that a freer makes next.
    pub(crate) fn finish_cancel(&self) -> AfterCallback {
        let prev = Snapshot(self.word.fetch_or(CB_DONE, Ordering::SeqCst));
        debug_assert!(prev.has(CLAIMED) && !prev.has(CB_DONE));
        if prev.is_completed() {
            AfterCallback::CancellerFrees
        } else {
            AfterCallback::OwnerFrees
        }
    }

    /// The owner completes the call.
    ///
    /// Ordering: one `SeqCst` RMW sets `COMPLETED`, pairing with
    /// `finish_cancel` (pair 2), and with the idle waiters and the last
    /// channel handle (module docs). The freer's `release` is a plain store,
    /// and nothing touches the channel after it without a reference of its
    /// own: so even a call with nothing registered is not released by this
    /// RMW itself.
    pub(crate) fn complete(&self) -> Completion {
        let prev = Snapshot(self.word.fetch_or(COMPLETED, Ordering::SeqCst));
        // Mutant (ci/mutants.sh): free while the callback still runs.
        if prev.has(CLAIMED)
            && !prev.has(CB_DONE)
            && !cfg!(callcancel_mutant = "complete_ignores_claim")
        {
            Completion::CancellerFrees
        } else {
            Completion::OwnerFrees { prev }
        }
    }

    /// The freer hands the slot back: clear every flag but `LEASED` and bump
    /// the generation with one `Release` store (pair 3). No RMW is needed: in the
    /// finishing phase no other thread writes the word (module docs).
    pub(crate) fn release(&self) {
        self.release_from(Snapshot(self.word.load(Ordering::Relaxed)));
    }

    /// [`CallState::release`] by a freer that knows the word's last value
    /// (nobody else writes it in the finishing phase), saving the load.
    #[inline]
    pub(crate) fn release_from(&self, cur: Snapshot) {
        debug_assert!(
            cur.is_occupied() && cur.is_completed(),
            "release of {cur:?}"
        );
        debug_assert_eq!(
            self.word.load(Ordering::Relaxed),
            cur.0,
            "the word changed in the finishing phase"
        );
        self.word.store(next_free(cur), Ordering::Release);
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
    (((cur.0 & !FLAGS_MASK).wrapping_add(1 << GEN_SHIFT)) & !FLAGS_MASK) | (cur.0 & LEASED)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_without_registration_bumps_generation() {
        let s = CallState::new();
        let occ = s.try_occupy().unwrap();
        assert!(s.try_occupy().is_none());
        assert!(matches!(s.complete(), Completion::OwnerFrees { prev } if !prev.is_registered()));
        s.release();
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
        assert_eq!(
            s.publish_registration(),
            Published::RunInline(CancelReason::ChannelFaulted)
        );
        assert_eq!(s.publish_registration(), Published::AlreadyRegistered);
        assert!(matches!(s.complete(), Completion::OwnerFrees { prev } if prev.is_registered()));
        assert!(s.load(Ordering::Relaxed).is_finishing());
        s.release();
    }

    #[test]
    fn whoever_finishes_last_frees() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Claimed { .. }
        ));
        assert_eq!(s.complete(), Completion::CancellerFrees);
        assert!(!s.load(Ordering::Relaxed).is_finishing());
        assert_eq!(s.finish_cancel(), AfterCallback::CancellerFrees);
        assert!(s.load(Ordering::Relaxed).is_finishing());
        s.release();
        // The other order: callback returns first, owner frees.
        let g = s.try_occupy().unwrap().generation();
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
        assert!(matches!(s.complete(), Completion::OwnerFrees { .. }));
        assert_eq!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        s.release();
        let g2 = s.try_occupy().unwrap().generation();
        assert_ne!(g, g2);
        assert_eq!(
            s.request_cancel(g, CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(s.complete(), Completion::OwnerFrees { prev } if prev.is_registered()));
        assert_eq!(
            s.request_cancel(g2, CancelReason::HostAbort),
            CancelOutcome::Skipped
        );
        assert_eq!(s.announce_waiter(g2, WAITER), None);
        s.release();
    }
}
