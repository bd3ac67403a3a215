//! Layer 2: the per-call state word — one `AtomicU64` that decides R1–R3,
//! R5, R6, A1's wait and the release hand-off.
//!
//! Every call slot owns one [`CallState`]. All questions "who runs the cancel
//! callback", "with which reason", "who frees the state", "may this slot be
//! reused", "who looks after the channel once it is released" are answered
//! by the *return value* of a single read-modify-write on this word, so no
//! two threads can both believe they won. The uncontended lifecycle costs
//! four RMWs on this (call-private) word: `try_occupy` (CAS),
//! `publish_registration`, `complete` and `release` (swap).
//!
//! # Bits
//!
//! ```text
//!  63 ....... 13    12      11    10       9       8        7       6       5      4..3    2        1         0
//! +-------------+-------+------+--------+------+--------+-------+-------+-------+------+------+----------+--------+
//! | generation  |RETIRED| DUTY |OVERFLOW|WAITER|COMPLETED|CB_DONE|STARTED|CLAIMED|REASON|CANCEL|REGISTERED|OCCUPIED|
//! +-------------+-------+------+--------+------+--------+-------+-------+-------+------+------+----------+--------+
//! ```
//!
//! | bit | meaning | set by | invariant |
//! |---|---|---|---|
//! | `OCCUPIED` | a live call owns the slot | `begin` ([`CallState::try_occupy`], `SeqCst` CAS) | cleared only by [`CallState::release`], which also bumps the generation |
//! | `REGISTERED` | a registrar won the slot's one registration | [`CallState::publish_registration`] | later registrars fail with `AlreadyRegistered`; the bytes are published through the slot's vtable pointer (`slot.rs`) |
//! | `CANCELLED` + `REASON` (2 bits) | cancellation decided, and why (`HostAbort` 0, `ChannelFaulted` 1, `CallCancelled` 2, `DeadlineExceeded` 3) | the first canceller's CAS ([`CallState::request_cancel`]) | set at most once per generation, never after `COMPLETED`; the reason never changes (R5) |
//! | `CLAIMED` | a canceller owns the callback | the same CAS, when `REGISTERED` is set | implies `CANCELLED` and `REGISTERED` |
//! | `STARTED` | the callback is invoked (A1): the right to run it is taken, and its runner invokes it next, with no user code and nothing to wait for but the registrar's publication (pair 1) | the claim CAS itself when the canceller runs the callback at once (a sweep, `cancel()`: `run_now`); [`CallState::try_start`] on a job claimed without it (a deadline runner, or a sweeper taking the job over); the inline registrar ([`CallState::mark_started`]) | implies `CANCELLED` and `REGISTERED`; losing sweepers wait for it (`ChannelShared::await_started`); nobody takes a started callback over |
//! | `CB_DONE` | the claimed callback returned *and* the freer is decided | [`CallState::finish_cancel`] (one RMW after the callback), or [`CallState::take_free`] (a sweep's batched finish, pair 2b) | implies `CLAIMED` |
//! | `COMPLETED` | the owner completed the call | [`CallState::try_complete`] | afterwards only the freer writes the word, plus a `DUTY` request |
//! | `WAITER` | the primary `cancelled()` future parked in the slot's `AtomicWaker` | [`CallState::announce_waiter`] | cleared by a dropped primary ([`CallState::withdraw_waiter`]) or the release |
//! | `OVERFLOW` | futures parked in the channel's overflow list | [`CallState::announce_waiter`] | cleared by the release |
//! | `RETIRED` | a free slot of a segment being given back (`store/slab.rs`) | [`CallState::try_retire`] (CAS, only while free) | `try_occupy` fails on it; only the retiring census clears it again |
//! | `DUTY` | a scanner (last handle's drop, idle waiter) found the slot finishing and handed the freer a strong channel reference: run the release duties after the release | [`CallState::request_duty`] (CAS, only while finishing) | read by the release swap |
//!
//! # State machine (one generation of one slot)
//!
//! ```text
//!                    try_occupy (CAS)
//!   FREE(g) ─────────────────────────▶ OCCUPIED ───────────── request_cancel (nothing registered):
//!      ▲                                  │                  CANCELLED|reason; a later
//!      │ release: swap to FREE(g+1)       │ publish_registration   publish_registration returns
//!      │ by the freer (a DUTY found        ▼                  RunInline: the registrar sets
//!      │ makes it run the duties)     REGISTERED             STARTED and runs the callback (R4)
//!      │          request_cancel:        │   │
//!      │          CANCELLED|CLAIMED      │   │ complete (owner): COMPLETED → owner frees
//!      │          |STARTED (run_now),    ▼   ▼
//!      │          or try_start later
//!      │          → callback        CLAIMED|STARTED   COMPLETED ──▶ owner frees, then release
//!      │                  complete │     │ finish_cancel
//!      │                           ▼     ▼
//!      │          ..|COMPLETED          ..|CB_DONE
//!      │       (owner returns at once:    │ complete: owner frees, then release
//!      │        whoever finishes last     │
//!      │        frees)                    │
//!      └── finish_cancel: canceller frees, then release
//! ```
//!
//! A sweep (fault, abort) does not `finish_cancel`: after the callback it
//! tags the slot's vtable pointer `RETURNED` (a `Release` store, no RMW), and settles
//! the calls of its batch behind one fence (pair 2b below):
//!
//! ```text
//!   CLAIMED|STARTED ── callback returns ── tag RETURNED (store) ── fence ── re-read:
//!        │                                                   not COMPLETED: done, the owner frees
//!        │ complete (owner): COMPLETED;                      COMPLETED: take_free (CAS → CB_DONE)
//!        ▼ then reads the tag (SeqCst)                         winner frees, then release
//!   ..|COMPLETED ── tag not seen: return (the sweep's re-read sees COMPLETED)
//!                ── tag seen: take_free (CAS → CB_DONE); winner frees, then release
//! ```
//!
//! "Finishing" ([`Snapshot::is_finishing`]) = `COMPLETED` and the freer
//! decided (not `CLAIMED`, or `CB_DONE`): the freer runs the free-state and
//! wakes watches, then releases. A scanner that must know when the slot is
//! released (an idle waiter, the last handle's drop) CASes `DUTY` onto a
//! finishing word instead of polling; the freer's release swap returns it.
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
//! * A sweep's batched finish (pair 2b, P6: one RMW per swept call instead
//!   of three): the sweeper's callback returns, it stores the `RETURNED`
//!   tag (`Release`), and after its batch's `fence(SeqCst)` re-reads the
//!   word; the owner's `complete` RMW (`SeqCst`) is followed by a `SeqCst`
//!   load of the tag. A Dekker pair: the fence is sequenced after the store
//!   and before the re-read, so either the owner's RMW precedes the fence
//!   in the `SeqCst` order (the re-read sees `COMPLETED`) or the fence
//!   precedes the owner's load (which then sees the tag). Whoever sees the
//!   other asks [`CallState::take_free`] (a `SeqCst` CAS from "completed,
//!   claimed, not `CB_DONE`" of the same generation); one wins and frees.
//!   The tag's `Release` store and the CAS's acquire hand the cell over.
//!   Nothing waits: an owner that sees no tag returns at once (R3's "no
//!   blocking on a running callback"). Because it reads the slot after an
//!   RMW that may have handed the free over, an owner whose word shows a
//!   claimed callback running pins the channel and the slot's segment (a
//!   strong reference, a counted walk) *before* that RMW
//!   ([`CallState::try_complete`] commits from the word it read).
//!   Promptness: the sweeper re-reads each call right after its tag
//!   (without the fence) and frees at once a completion it sees there (one
//!   made before or inside the callback); only an owner completing in the
//!   instant between that re-read and the tag becoming visible to it has
//!   its free-state run at the batch's settle: later in the same sweep
//!   (after at most 31 more of its own callbacks, plus any deadline job it
//!   takes over and the free-states and wakers it runs meanwhile), and
//!   always before the sweep returns. So a cancel callback that waits for
//!   another call's free-state may, in that race, wait for its own sweep:
//!   it must not wait for it without a timeout (as it must not wait for a
//!   callback the same sweep runs later).
//! * `release` swaps in the next generation (`SeqCst`, so at least
//!   release); the next `try_occupy` (`SeqCst` CAS) reads it and so sees the
//!   emptied cell. (Pair 3.)
//! * R4: `try_occupy` is `SeqCst` and is followed by a `SeqCst` re-check of
//!   the host and channel flags; an abort or fault sets its flag with a
//!   `SeqCst` RMW before its sweep loads slot states with `SeqCst`. In the
//!   single total order of `SeqCst` operations either the re-check sees the
//!   flag (the call is refused) or the sweep sees the slot occupied (the
//!   call is cancelled): never neither. No asymmetric fence, no
//!   process-wide barrier. The sweep reaches the slot through two more
//!   publications that precede the claim in the same order: the channel's
//!   entry in the host's table (its first call publishes it,
//!   `ChannelShared::enter_table`) and the slab's `segments` bound (raised
//!   before a claim in a new segment, `Slab::cover`).
//! * The RMW that makes a thread the freer (`complete`, `finish_cancel` or
//!   `take_free`) is `SeqCst` and is followed by `SeqCst` loads of the host's idle-waiter
//!   count and the channel's handle count; a waiter (or the last handle's
//!   drop) writes those (`SeqCst`) before its census. So a freer either sees
//!   the waiter (and notifies after its release), or the census sees the
//!   slot not yet decided (its freer will see the waiter), or sees it
//!   finishing and hands the duty over with `DUTY` (`SeqCst` CAS, read by
//!   the `SeqCst` release swap).
//! * A1: `STARTED` is set by the claim CAS (`AcqRel`) of a canceller that
//!   runs the callback at once, by `mark_started` (a `Release` RMW) or by
//!   `try_start` (an `AcqRel` CAS); the waiting sweepers load with `Acquire`.
//! * `is_cancelled()` is one `Acquire` load, pairing with the `AcqRel`
//!   RMW that set `CANCELLED` (P4).

use crate::sync::{AtomicU64, Ordering};
use crate::CancelReason;

// The generation must not wrap while a `CancelWatch` or `Canceller` of an
// old call can still look at the slot: a 64-bit word on every target.
#[cfg(not(any(target_has_atomic = "64", loom)))]
compile_error!("callcancel needs 64-bit atomics (its per-call state word is an AtomicU64)");

const OCCUPIED: u64 = 1 << 0;
const REGISTERED: u64 = 1 << 1;
const CANCELLED: u64 = 1 << 2;
/// Two bits: which [`CancelReason`] was decided (meaningful with `CANCELLED`).
const REASON_SHIFT: u32 = 3;
const REASON_MASK: u64 = 0b11 << REASON_SHIFT;
const CLAIMED: u64 = 1 << 5;
const STARTED: u64 = 1 << 6;
const CB_DONE: u64 = 1 << 7;
const COMPLETED: u64 = 1 << 8;
/// A primary `cancelled()` future parked in the slot's `AtomicWaker`.
pub(crate) const WAITER: u64 = 1 << 9;
/// Further futures parked in the channel's overflow list.
pub(crate) const OVERFLOW: u64 = 1 << 10;
/// Somebody asked the freer to look after the channel once it released the
/// slot (idle waiters, an orphaned channel), and handed it a strong
/// reference for that.
const DUTY: u64 = 1 << 11;
/// A free slot of a segment being given back (`store/slab.rs`): nobody may
/// occupy it again.
const RETIRED: u64 = 1 << 12;
const GEN_SHIFT: u32 = 13;
const FLAGS_MASK: u64 = (1 << GEN_SHIFT) - 1;
/// Bits of generation: a slot reused every 10 ns wraps after ~8 months.
#[cfg(test)]
pub(crate) const GEN_BITS: u32 = u64::BITS - GEN_SHIFT;

/// A value read from a [`CallState`]; never a bare integer across a function
/// boundary.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot(u64);

impl Snapshot {
    #[inline]
    pub(crate) fn is_occupied(self) -> bool {
        self.0 & OCCUPIED != 0
    }
    /// Free with no flag at all (no waiter, duty or retirement pending):
    /// such a slot may serve another slab as it is (`store/slab.rs`'s spare
    /// first block).
    #[inline]
    pub(crate) fn is_clean_free(self) -> bool {
        self.0 & FLAGS_MASK == 0
    }
    #[inline]
    pub(crate) fn generation(self) -> u64 {
        self.0 >> GEN_SHIFT
    }
    #[inline]
    pub(crate) fn is_cancelled(self) -> bool {
        self.0 & CANCELLED != 0
    }
    #[inline]
    pub(crate) fn is_completed(self) -> bool {
        self.0 & COMPLETED != 0
    }
    /// Completed, and the freer decided (the owner in `complete`, or the
    /// canceller in `finish_cancel`): `release` follows.
    #[inline]
    pub(crate) fn is_finishing(self) -> bool {
        self.is_occupied() && self.is_completed() && (!self.has(CLAIMED) || self.has(CB_DONE))
    }
    #[inline]
    pub(crate) fn is_registered(self) -> bool {
        self.0 & REGISTERED != 0
    }
    /// Cancelled and registered, but nobody holds the right to run the
    /// callback yet (`STARTED`): A1 waits for it (`ChannelShared::await_started`).
    #[inline]
    pub(crate) fn callback_pending(self) -> bool {
        self.0 & (OCCUPIED | REGISTERED | CANCELLED | STARTED) == OCCUPIED | REGISTERED | CANCELLED
    }
    /// A canceller claimed the callback and has not finished it
    /// (`finish_cancel` / `take_free` not yet): an owner completing now
    /// hands it the free.
    #[inline]
    pub(crate) fn callback_running(self) -> bool {
        self.0 & (CLAIMED | CB_DONE) == CLAIMED
    }
    /// The same word with no waiter bits (nothing to wake).
    #[inline]
    pub(crate) fn without_waiters(self) -> Self {
        Self(self.0 & !(WAITER | OVERFLOW))
    }
    /// The word as the owner's `complete` left it.
    #[inline]
    pub(crate) fn with_completed(self) -> Self {
        Self(self.0 | COMPLETED)
    }
    /// A canceller claimed the callback (it may not have started yet).
    #[inline]
    pub(crate) fn is_claimed(self) -> bool {
        self.0 & CLAIMED != 0
    }
    #[inline]
    pub(crate) fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
    /// Whether `self` is generation `gen` of the slot, still occupied.
    #[inline]
    pub(crate) fn is_live(self, gen: u64) -> bool {
        self.is_occupied() && self.generation() == gen
    }
    /// The decided reason, if cancelled.
    #[inline]
    pub(crate) fn reason(self) -> Option<CancelReason> {
        if self.0 & CANCELLED == 0 {
            return None;
        }
        Some(match (self.0 & REASON_MASK) >> REASON_SHIFT {
            0 => CancelReason::HostAbort,
            1 => CancelReason::ChannelFaulted,
            2 => CancelReason::CallCancelled,
            _ => CancelReason::DeadlineExceeded,
        })
    }
}

impl core::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = [
            (OCCUPIED, "OCCUPIED"),
            (REGISTERED, "REGISTERED"),
            (CANCELLED, "CANCELLED"),
            (CLAIMED, "CLAIMED"),
            (STARTED, "STARTED"),
            (CB_DONE, "CB_DONE"),
            (COMPLETED, "COMPLETED"),
            (WAITER, "WAITER"),
            (OVERFLOW, "OVERFLOW"),
            (DUTY, "DUTY"),
            (RETIRED, "RETIRED"),
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
        if let Some(r) = self.reason() {
            write!(f, " {r:?}")?;
        }
        f.write_str("]")
    }
}

fn reason_bits(reason: CancelReason) -> u64 {
    let code = match reason {
        CancelReason::HostAbort => 0,
        CancelReason::ChannelFaulted => 1,
        CancelReason::CallCancelled => 2,
        CancelReason::DeadlineExceeded => 3,
    };
    code << REASON_SHIFT
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
    /// inline, with this reason (R4), after [`CallState::mark_started`]. No
    /// canceller will touch the cell.
    RunInline(CancelReason),
}

/// Outcome of [`CallState::request_cancel`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelOutcome {
    /// This canceller decided the cancellation *and* claimed the registered
    /// callback: it must [`CallState::mark_started`], run it, then call
    /// [`CallState::finish_cancel`], then wake the waiters `wake` names.
    Claimed { wake: Snapshot },
    /// This canceller decided the cancellation; nothing is registered yet
    /// (a later registration runs the callback inline). Wake waiters.
    Marked { wake: Snapshot },
    /// Nothing decided here: already cancelled (first reason wins, R5; `now`
    /// says whether a callback is still to be invoked), completed (R6), free,
    /// or reused by another generation.
    Skipped { now: Snapshot },
}

/// Outcome of [`CallState::finish_cancel`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterCallback {
    /// The owner has not completed: it will free at completion.
    OwnerFrees,
    /// The owner completed while the callback ran: the canceller frees the
    /// state and releases the slot. `word` is the word as it now stands.
    CancellerFrees { word: Snapshot },
}

/// Outcome of [`CallState::try_complete`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The owner frees the registered state (if `prev` is registered), wakes
    /// the waiters `prev` names, then calls [`CallState::release`].
    OwnerFrees { prev: Snapshot },
    /// A canceller's callback was still running at the RMW (`prev`, the
    /// word it replaced): the canceller frees and releases — after a
    /// batched finish, whoever wins [`CallState::take_free`] does.
    CancellerFrees { prev: Snapshot },
}

/// Outcome of [`CallState::release`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// Nobody asked for anything.
    Quiet,
    /// A `DUTY` request was found: the releaser now owns the strong channel
    /// reference its setter handed over, and must run the release duties.
    Duty,
}

/// Outcome of [`CallState::request_duty`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DutyRequest {
    /// Our `DUTY` bit is on the word: the freer takes over the reference we
    /// handed over.
    HandedOver,
    /// The bit was there already: the freer will look anyway (and owns an
    /// earlier setter's reference); ours stays with us.
    AlreadyAsked,
    /// The slot is no longer finishing (released, or not yet decided): look
    /// at it again.
    NotFinishing,
}

/// The atomic state word of one call slot. See the module docs.
#[derive(Debug)]
pub(crate) struct CallState {
    word: AtomicU64,
}

impl CallState {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::at_generation(0)
    }

    /// A free word whose first generation is `gen` (a segment allocated
    /// again after one was given back starts above every generation the old
    /// one used, so a stale `Canceller` can never match: `store/slab.rs`).
    pub(crate) fn at_generation(gen: u64) -> Self {
        Self {
            word: AtomicU64::new((gen << GEN_SHIFT) & !FLAGS_MASK),
        }
    }

    /// Marks a free slot `RETIRED` (its segment is being given back).
    /// Fails if it is occupied. Ordering: `SeqCst` CAS, against
    /// `try_occupy`'s CAS (one of the two fails).
    pub(crate) fn try_retire(&self) -> bool {
        let cur = self.word.load(Ordering::SeqCst);
        cur & (OCCUPIED | RETIRED) == 0
            && self
                .word
                .compare_exchange(cur, cur | RETIRED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// Undoes [`CallState::try_retire`] (another slot of the segment was
    /// busy). Nobody else writes a retired word.
    pub(crate) fn unretire(&self) {
        self.word.fetch_and(!RETIRED, Ordering::SeqCst);
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

    /// `begin_call`: take a free slot. Returns the occupied snapshot.
    ///
    /// Ordering: `SeqCst`, so that the caller's following `SeqCst` re-check
    /// of the host/channel flags forms the R4 Dekker pair with the sweeps
    /// (module docs); its acquire side pairs with `release` (pair 3).
    #[inline]
    #[must_use]
    pub(crate) fn try_occupy(&self) -> Option<Snapshot> {
        let cur = self.word.load(Ordering::Relaxed);
        if cur & (OCCUPIED | RETIRED) != 0 {
            return None;
        }
        let new = cur | OCCUPIED;
        self.word
            .compare_exchange(cur, new, Ordering::SeqCst, Ordering::Relaxed)
            .ok()
            .map(|_| Snapshot(new))
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

    /// A canceller asks to cancel generation `gen` with `reason`. `run_now`:
    /// the canceller will run a claimed callback itself, at once (a sweep,
    /// `cancel()`): then the same CAS sets `STARTED` too (one RMW instead of
    /// a claim and a `try_start`): the right to run it is taken, nobody may
    /// take it over, and A1's waiters may return. A deadline expiry, which
    /// hands the callback to a runner thread, claims without it.
    ///
    /// Ordering: `AcqRel` on success. Acquire: a claimer is ordered after the
    /// registrar's RMW (it still waits for the registration bytes through the
    /// slot's vtable pointer, pair 1). Release: publishes `CANCELLED` (and
    /// everything the canceller did before) to `is_cancelled()`, to
    /// `cancelled()` and to a registrar that will run the callback inline.
    /// The failure and skip loads are `Acquire` too: a skipping sweeper that
    /// must wait for the callback (A1) reads on with `Acquire` afterwards.
    pub(crate) fn request_cancel(
        &self,
        gen: u64,
        reason: CancelReason,
        run_now: bool,
    ) -> CancelOutcome {
        let mut cur = Snapshot(self.word.load(Ordering::Acquire));
        loop {
            if !cur.is_live(gen) || cur.is_completed() || cur.is_cancelled() {
                return CancelOutcome::Skipped { now: cur };
            }
            let claim = cur.is_registered();
            let mut new = cur.0 | CANCELLED | reason_bits(reason);
            if claim {
                new |= CLAIMED;
                if run_now {
                    new |= STARTED;
                }
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

    /// The inline registrar is about to invoke the callback (nobody claimed
    /// it, and nobody else may run it): from now on a sweeper that lost the
    /// race may return (A1: "invoked").
    ///
    /// Ordering: `Release`, pairing with the `Acquire` loads of the sweepers
    /// that wait for it.
    pub(crate) fn mark_started(&self) {
        let prev = Snapshot(self.word.fetch_or(STARTED, Ordering::Release));
        debug_assert!(prev.is_cancelled() && prev.is_registered() && !prev.has(STARTED));
        debug_assert!(!prev.has(CLAIMED));
    }

    /// The right to run a *claimed* callback of generation `gen`: set
    /// `STARTED` unless somebody did. The claimer tries first; a sweeper
    /// that finds a claimed callback not started after a while (a deadline
    /// job queued behind a busy runner, a preempted claimer) takes it over,
    /// so that no sweep waits on a thread that may be blocked (A1, A3).
    /// Whoever wins runs the callback and the rest of the claim's protocol
    /// (`finish_cancel`); the loser does nothing more.
    ///
    /// Ordering: `AcqRel`: release pairs with the waiting sweepers' Acquire
    /// loads; acquire orders the winner after the claim.
    #[must_use]
    pub(crate) fn try_start(&self, gen: u64) -> bool {
        // Ordering: Acquire, like the CAS's failure ordering: a `false`
        // (taken over, or already started) is ordered after the winner's
        // `STARTED`, as `await_started`'s loads are.
        let mut cur = self.load(Ordering::Acquire);
        loop {
            if !cur.is_live(gen) || !cur.has(CLAIMED) || cur.has(STARTED) {
                return false;
            }
            match self.word.compare_exchange_weak(
                cur.0,
                cur.0 | STARTED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = Snapshot(actual),
            }
        }
    }

    /// The claimer's callback returned (or panicked).
    ///
    /// Ordering: `SeqCst` (at least `AcqRel`): release hands the cell to an
    /// owner that completes later (pair 2); acquire makes the owner's writes
    /// visible when the owner completed first and the canceller now frees;
    /// `SeqCst` for the idle-waiter and handle checks a freer makes next.
    pub(crate) fn finish_cancel(&self) -> AfterCallback {
        let prev = Snapshot(self.word.fetch_or(CB_DONE, Ordering::SeqCst));
        debug_assert!(prev.has(CLAIMED) && !prev.has(CB_DONE));
        if prev.is_completed() {
            AfterCallback::CancellerFrees {
                word: Snapshot(prev.0 | CB_DONE),
            }
        } else {
            AfterCallback::OwnerFrees
        }
    }

    /// [`CallState::try_complete`] until it commits (the unit tests' owner).
    #[cfg(test)]
    pub(crate) fn complete(&self) -> Completion {
        let mut cur = self.load(Ordering::Relaxed);
        loop {
            match self.try_complete(cur) {
                Ok(done) => return done,
                Err(now) => cur = now,
            }
        }
    }

    /// The owner completes the call, from `cur`, the word as it last read
    /// it, as one `SeqCst` CAS: `Err(now)` if the word changed meanwhile (a
    /// claim, a waiter), and the owner decides again from `now`. The owner
    /// reads the word before committing so that, when a claimed callback
    /// runs (`Snapshot::callback_running`), it can keep the slot and the
    /// channel alive *before* the RMW that may hand the free to the
    /// canceller (`ChannelShared::complete`, pair 2b). (An x86 `fetch_or`
    /// whose result is used is the same load and CAS loop.)
    ///
    /// Ordering: one `SeqCst` RMW (the CAS) sets `COMPLETED`, pairing with
    /// `finish_cancel` (pair 2), with the sweeper's settle (pair 2b), and
    /// with the idle waiters and the last channel handle (module docs); the
    /// failure load is Relaxed (only the next attempt's CAS counts).
    #[inline]
    pub(crate) fn try_complete(&self, cur: Snapshot) -> Result<Completion, Snapshot> {
        debug_assert!(cur.is_occupied() && !cur.is_completed());
        if let Err(now) = self.word.compare_exchange_weak(
            cur.0,
            cur.0 | COMPLETED,
            Ordering::SeqCst,
            Ordering::Relaxed,
        ) {
            return Err(Snapshot(now));
        }
        let prev = cur;
        // Mutant (ci/mutants.sh): free while the callback still runs.
        Ok(
            if prev.callback_running() && !cfg!(callcancel_mutant = "complete_ignores_claim") {
                Completion::CancellerFrees { prev }
            } else {
                Completion::OwnerFrees { prev }
            },
        )
    }

    /// The batched finish's arbitration (pair 2b): a sweeping canceller
    /// that tagged its callback `RETURNED` (`CallSlot::mark_returned`) and
    /// then saw `COMPLETED`, and an owner whose `complete` found the claim
    /// unfinished and then saw the tag, both ask for the freer's right;
    /// exactly one gets it (the word of generation `gen` goes to
    /// `CB_DONE`, and finishing). `Some(word)`: ours, `word` as it now
    /// stands. `None`: the other side took it (or the slot moved on).
    ///
    /// Ordering: `SeqCst` CAS, the freer-deciding RMW (idle waiters and the
    /// last handle are checked right after it, module docs); acquire orders
    /// the winner after the other side's last use of the cell (its release
    /// store of the tag, or its `complete` RMW).
    #[must_use]
    pub(crate) fn take_free(&self, gen: u64) -> Option<Snapshot> {
        let mut cur = self.load(Ordering::SeqCst);
        loop {
            if !cur.is_live(gen) || !cur.is_completed() || !cur.has(CLAIMED) || cur.has(CB_DONE) {
                return None;
            }
            let new = cur.0 | CB_DONE;
            match self
                .word
                .compare_exchange_weak(cur.0, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Some(Snapshot(new)),
                Err(actual) => cur = Snapshot(actual),
            }
        }
    }

    /// Whether `self` is generation `gen`, completed by its owner while a
    /// claimed callback was still running and nobody decided the freer yet:
    /// a sweeper's immediate re-read right after its `RETURNED` tag (free
    /// now, or batch). (The settle after the fence re-reads through
    /// `take_free`'s first load.)
    ///
    /// Ordering: `SeqCst`, like `take_free`'s; without the fence a miss is
    /// only a later settle, never a lost free.
    pub(crate) fn completed_unfinished(&self, gen: u64) -> bool {
        let cur = self.load(Ordering::SeqCst);
        cur.is_live(gen) && cur.is_completed() && cur.has(CLAIMED) && !cur.has(CB_DONE)
    }

    /// The freer hands the slot back: clear every flag and bump the
    /// generation in one `SeqCst` swap (pair 3, and the `DUTY` hand-off).
    /// `cur` is the word as the freer last knew it; in the finishing phase
    /// nobody writes it but a `DUTY` setter.
    #[inline]
    pub(crate) fn release(&self, cur: Snapshot) -> Released {
        debug_assert!(cur.is_finishing(), "release of {cur:?}");
        let old = Snapshot(self.word.swap(next_free(cur), Ordering::SeqCst));
        debug_assert_eq!(
            old.0 & !DUTY,
            cur.0 & !DUTY,
            "the word changed while finishing"
        );
        if old.has(DUTY) {
            Released::Duty
        } else {
            Released::Quiet
        }
    }

    /// Asks the freer of a finishing generation `gen` to run the release
    /// duties once it released the slot (the caller hands it a strong
    /// channel reference on `HandedOver`).
    ///
    /// Ordering: `SeqCst`: the caller's interest (an idle-waiter count, a
    /// dropped handle) precedes this in the `SeqCst` order, and the freer's
    /// `release` swap, which reads our bit, precedes its duty checks.
    pub(crate) fn request_duty(&self, gen: u64) -> DutyRequest {
        // Mutant (ci/mutants.sh): pretend somebody asked already.
        if cfg!(callcancel_mutant = "no_duty") {
            return DutyRequest::AlreadyAsked;
        }
        let mut cur = self.load(Ordering::SeqCst);
        loop {
            if !cur.is_live(gen) || !cur.is_finishing() {
                return DutyRequest::NotFinishing;
            }
            if cur.has(DUTY) {
                return DutyRequest::AlreadyAsked;
            }
            match self.word.compare_exchange_weak(
                cur.0,
                cur.0 | DUTY,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return DutyRequest::HandedOver,
                Err(actual) => cur = Snapshot(actual),
            }
        }
    }

    /// A `cancelled()` future announces itself (`WAITER` or `OVERFLOW`) on
    /// generation `gen`. Returns the state it replaced, or `None` if that
    /// generation has completed (or the slot moved on): then nobody will
    /// wake it.
    ///
    /// Ordering: `AcqRel`: if the returned snapshot is not cancelled, a
    /// canceller's or completer's later RMW is ordered after ours in the
    /// word's modification order, sees the bit, and wakes.
    #[must_use]
    pub(crate) fn announce_waiter(&self, gen: u64, bit: u64) -> Option<Snapshot> {
        let mut cur = Snapshot(self.word.load(Ordering::Acquire));
        loop {
            if !cur.is_live(gen) || cur.is_completed() {
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

    /// The primary `cancelled()` future of generation `gen` goes away
    /// unwoken: clear `WAITER` so the next future of the call can take the
    /// slot's waker again (instead of the channel's overflow list).
    ///
    /// Ordering: `Release` on success, pairing with the next primary's
    /// `AcqRel` announcement: the old primary's `waker.take()` happens
    /// before the new primary's `register`, so it can never take the new
    /// waker. (A canceller that still saw the bit merely wakes an empty
    /// `AtomicWaker`.)
    pub(crate) fn withdraw_waiter(&self, gen: u64) {
        let mut cur = Snapshot(self.word.load(Ordering::Relaxed));
        loop {
            if !cur.is_live(gen) || cur.is_completed() || cur.is_cancelled() || !cur.has(WAITER) {
                return;
            }
            match self.word.compare_exchange_weak(
                cur.0,
                cur.0 & !WAITER,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = Snapshot(actual),
            }
        }
    }
}

fn next_free(cur: Snapshot) -> u64 {
    ((cur.0 & !FLAGS_MASK).wrapping_add(1 << GEN_SHIFT)) & !FLAGS_MASK
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn finish(s: &CallState, prev: Snapshot) {
        assert_eq!(s.release(prev.with_completed()), Released::Quiet);
    }

    #[test]
    fn the_generation_is_wide_on_every_target() {
        // Issue 12 #10: 22 bits on 32-bit targets wrapped in ~0.1 s.
        const { assert!(GEN_BITS >= 51) };
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!()
        };
        finish(&s, prev);
        assert_eq!(s.load(Ordering::Relaxed).generation(), g + 1);
    }

    #[test]
    fn lifecycle_without_registration_bumps_generation() {
        let s = CallState::new();
        let occ = s.try_occupy().unwrap();
        assert!(s.try_occupy().is_none());
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!("no claim")
        };
        assert!(!prev.is_registered());
        finish(&s, prev);
        let next = s.load(Ordering::Relaxed);
        assert!(!next.is_occupied());
        assert_eq!(next.generation(), occ.generation() + 1);
    }

    #[test]
    fn every_reason_round_trips_through_the_word() {
        for reason in [
            CancelReason::HostAbort,
            CancelReason::ChannelFaulted,
            CancelReason::CallCancelled,
            CancelReason::DeadlineExceeded,
        ] {
            let s = CallState::new();
            let g = s.try_occupy().unwrap().generation();
            assert!(matches!(
                s.request_cancel(g, reason, false),
                CancelOutcome::Marked { .. }
            ));
            assert_eq!(s.load(Ordering::Relaxed).reason(), Some(reason));
            for other in [CancelReason::HostAbort, CancelReason::DeadlineExceeded] {
                assert!(matches!(
                    s.request_cancel(g, other, false),
                    CancelOutcome::Skipped { .. }
                ));
            }
            assert_eq!(s.load(Ordering::Relaxed).reason(), Some(reason));
        }
    }

    #[test]
    fn cancel_then_register_runs_inline_with_first_reason() {
        let s = CallState::new();
        let occ = s.try_occupy().unwrap();
        assert!(matches!(
            s.request_cancel(occ.generation(), CancelReason::ChannelFaulted, false),
            CancelOutcome::Marked { .. }
        ));
        assert_eq!(
            s.publish_registration(),
            Published::RunInline(CancelReason::ChannelFaulted)
        );
        assert!(s.load(Ordering::Relaxed).callback_pending());
        s.mark_started();
        assert!(!s.load(Ordering::Relaxed).callback_pending());
        assert_eq!(s.publish_registration(), Published::AlreadyRegistered);
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!()
        };
        assert!(prev.is_registered());
        assert!(s.load(Ordering::Relaxed).is_finishing());
        finish(&s, prev);
    }

    #[test]
    fn whoever_finishes_last_frees() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort, false),
            CancelOutcome::Claimed { .. }
        ));
        assert!(s.try_start(g));
        assert!(!s.try_start(g), "one runner");
        assert!(matches!(s.complete(), Completion::CancellerFrees { .. }));
        assert!(!s.load(Ordering::Relaxed).is_finishing());
        let AfterCallback::CancellerFrees { word } = s.finish_cancel() else {
            panic!()
        };
        assert!(s.load(Ordering::Relaxed).is_finishing());
        assert_eq!(s.release(word), Released::Quiet);
        // The other order: callback returns first, owner frees.
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort, false),
            CancelOutcome::Claimed { .. }
        ));
        assert!(s.try_start(g));
        assert_eq!(s.finish_cancel(), AfterCallback::OwnerFrees);
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!()
        };
        finish(&s, prev);
    }

    #[test]
    fn a_duty_request_reaches_the_freer() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.request_duty(g), DutyRequest::NotFinishing);
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!()
        };
        assert_eq!(s.request_duty(g), DutyRequest::HandedOver);
        assert_eq!(s.request_duty(g), DutyRequest::AlreadyAsked);
        assert_eq!(s.release(prev.with_completed()), Released::Duty);
        assert_eq!(s.request_duty(g), DutyRequest::NotFinishing);
        let next = s.load(Ordering::Relaxed);
        assert!(!next.has(DUTY) && !next.is_occupied());
    }

    #[test]
    fn stale_generation_and_completed_calls_are_skipped() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!()
        };
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort, false),
            CancelOutcome::Skipped { .. }
        ));
        finish(&s, prev);
        let g2 = s.try_occupy().unwrap().generation();
        assert_ne!(g, g2);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort, false),
            CancelOutcome::Skipped { .. }
        ));
        assert_eq!(s.publish_registration(), Published::Armed);
        let Completion::OwnerFrees { prev } = s.complete() else {
            panic!()
        };
        assert!(matches!(
            s.request_cancel(g2, CancelReason::HostAbort, false),
            CancelOutcome::Skipped { .. }
        ));
        assert_eq!(s.announce_waiter(g2, WAITER), None);
        finish(&s, prev);
    }

    #[test]
    fn a_withdrawn_primary_waiter_frees_the_bit() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert!(!s.announce_waiter(g, WAITER).unwrap().has(WAITER));
        assert!(s.announce_waiter(g, WAITER).unwrap().has(WAITER));
        s.withdraw_waiter(g);
        assert!(!s.announce_waiter(g, WAITER).unwrap().has(WAITER));
    }

    /// Pair 2b: a claim that runs at once takes `STARTED` in the same CAS
    /// (nobody can take it over); after the owner completed while it ran,
    /// `take_free` gives the freer's right once, for that generation only.
    #[test]
    fn a_batched_finish_gives_the_free_once() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::HostAbort, true),
            CancelOutcome::Claimed { .. }
        ));
        assert!(!s.load(Ordering::Relaxed).callback_pending());
        assert!(!s.try_start(g), "started by the claim");
        // Not completed yet: nothing to take, the owner will free.
        assert!(!s.completed_unfinished(g));
        assert_eq!(s.take_free(g), None);
        let Completion::CancellerFrees { prev } = s.complete() else {
            panic!("the claimed callback has not finished")
        };
        assert_eq!(prev.generation(), g);
        assert!(s.completed_unfinished(g));
        assert_eq!(s.take_free(g + 1), None, "another generation");
        let word = s.take_free(g).expect("first asker frees");
        assert!(word.is_finishing());
        assert_eq!(s.take_free(g), None, "only once");
        assert!(!s.completed_unfinished(g));
        assert_eq!(s.release(word), Released::Quiet);
        assert!(!s.completed_unfinished(g));
    }

    /// A deadline expiry claims without `STARTED`: its runner (or a thief)
    /// must win `try_start`, once.
    #[test]
    fn a_claim_for_a_runner_leaves_the_start_open() {
        let s = CallState::new();
        let g = s.try_occupy().unwrap().generation();
        assert_eq!(s.publish_registration(), Published::Armed);
        assert!(matches!(
            s.request_cancel(g, CancelReason::DeadlineExceeded, false),
            CancelOutcome::Claimed { .. }
        ));
        assert!(s.load(Ordering::Relaxed).callback_pending());
        assert!(s.try_start(g));
        assert!(!s.try_start(g));
    }
}
