//! The channel engine: claim, sweep, cancel, run, free, release and dispose
//! for the calls of one channel (or host shard).
//!
//! # Lifetime without a per-call reference count
//!
//! A call does not clone an `Arc` of its channel (two RMWs on a line shared
//! by every call of the channel). Instead the channel holds a strong
//! reference to itself, `keepalive`, on behalf of all its calls, and a count
//! of `Channel` handles (plus one held by the host for a shard). Once there
//! are no handles ("orphaned") *and* no occupied slot, [`ChannelShared::try_dispose`]
//! drops the keepalive, exactly once (a swap). Who does it, on every
//! interleaving (issue 12 #2):
//!
//! * the last handle's drop, if its scan finds every slot free;
//! * a call's freer that saw the channel orphaned right after its deciding
//!   `SeqCst` RMW (it takes a temporary `Arc` before its release);
//! * a freer whose release swap finds the `DUTY` bit: a scan (by the last
//!   handle's drop, or by a freer of another slot) found this slot in its
//!   finishing phase, past its freer's check, and handed the freer a strong
//!   reference with the bit (`CallState::request_duty`). The scanner's
//!   handle decrement precedes its scan in the `SeqCst` order, so a slot it
//!   saw *not yet* finishing has a freer that will see the orphan itself.
//!
//! A call's raw pointer to its channel is valid because the keepalive is
//! only dropped when a scan sees every slot free, and a freer touches the
//! channel after its release only through an `Arc` it took before (or was
//! handed with `DUTY`).

use core::mem::MaybeUninit;
use core::ptr::{self, NonNull};

use crate::slot::{CallSlot, Prepared};
use crate::state::{
    AfterCallback, CancelOutcome, Completion, DutyRequest, Published, Released, Snapshot, OVERFLOW,
    WAITER,
};
use crate::store::host_core::UserCode;
use crate::store::host_store::HostStore;
use crate::store::overflow::Overflow;
use crate::store::slab::Slab;
use crate::store::table::{TableChunk, TableEntry};
use crate::sync::{exclusive_ptr, Arc, AtomicPtr, AtomicU8, AtomicUsize, Ordering};

/// A host's core and channel table, as its channels see it.
pub(crate) type Store = HostStore<ChannelShared>;

/// `ChannelShared::stripe` of a shard (not counted as a channel).
const NOT_COUNTED: u8 = u8::MAX;

/// `ChannelShared::flags`: the channel was faulted.
const FAULTED: u8 = 1;
/// `ChannelShared::flags`: the channel is published in its host's table
/// (set by its first call; shards never are, and start with it).
const REGISTERED: u8 = 2;
use crate::value::panic::{catch, FirstPanic, Panic};
use crate::{CancelReason, Error, RegisterError, RegisterErrorKind};

/// The shared state behind `Channel` handles and the calls on them.
/// Host-scope calls use a few internal channels ("shards") that are never
/// faulted. See the module docs for its lifetime.
pub(crate) struct ChannelShared {
    pub(crate) slab: Slab,
    /// `Channel` handles (plus the host's, for a shard). Zero is final.
    handles: AtomicUsize,
    /// `Arc::into_raw` of this channel, held for its calls; null once
    /// disposed.
    keepalive: AtomicPtr<ChannelShared>,
    /// `FAULTED` and `REGISTERED`. `FAULTED` is set by a `SeqCst` RMW
    /// before the fault sweep and read `SeqCst` by `begin`'s re-check (the
    /// R4 Dekker pair, `state.rs`); `REGISTERED` is read by the same early
    /// load of `begin` that checks `FAULTED` (no extra load on the hot path).
    flags: AtomicU8,
    pub(crate) host: Arc<Store>,
    /// Secondary waiters of this channel's calls (slow path).
    pub(crate) overflow: Overflow,
    /// This channel's entry in its host's table (`TableEntry::pack`), null
    /// until its first call takes one (`enter_table`); never for a shard.
    entry: AtomicPtr<TableChunk<ChannelShared>>,
    /// The host counter stripe this channel is counted on
    /// (`HostCore::count_channel_opened`); `NOT_COUNTED` for a shard.
    stripe: u8,
}

impl ChannelShared {
    /// A new channel with one handle (the caller's); a host-scope shard if
    /// `shard` (never in the table, not counted as a channel).
    pub(crate) fn new(host: Arc<Store>, shard: bool) -> Arc<Self> {
        let stripe = if shard {
            NOT_COUNTED
        } else {
            host.count_channel_opened()
        };
        let channel = Arc::new(Self {
            slab: Slab::new(),
            handles: AtomicUsize::new(1),
            keepalive: AtomicPtr::new(ptr::null_mut()),
            flags: AtomicU8::new(if shard { REGISTERED } else { 0 }),
            host,
            overflow: Overflow::default(),
            entry: AtomicPtr::new(ptr::null_mut()),
            stripe,
        });
        let raw = Arc::into_raw(Arc::clone(&channel)).cast_mut();
        // Ordering: Release; the handle returned here carries it to other
        // threads, whose `self_ptr` loads then see the pointer.
        channel.keepalive.store(raw, Ordering::Release);
        channel
    }

    /// A new handle.
    pub(crate) fn add_handle(&self) {
        // Ordering: Relaxed, like `Arc::clone`: the caller holds a handle.
        self.handles.fetch_add(1, Ordering::Relaxed);
    }

    /// A handle went away; the last one disposes of the channel (now, or
    /// through a freer it hands the duty to). The caller holds an `Arc`.
    pub(crate) fn drop_handle(&self) {
        // Ordering: SeqCst, pairing with the freer's `is_orphaned` load after
        // its SeqCst RMW, and preceding our scan (module docs).
        if self.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            crate::sync::dekker_fence();
            self.try_dispose();
        }
    }

    /// Whether every handle is gone. Read by a freer right after its
    /// deciding `SeqCst` RMW.
    #[inline]
    pub(crate) fn is_orphaned(&self) -> bool {
        crate::sync::dekker_fence();
        self.handles.load(Ordering::SeqCst) == 0
    }

    /// The keepalive pointer (the channel's `Arc` provenance), if not
    /// disposed yet.
    #[inline]
    fn keepalive_ptr(&self) -> Option<NonNull<ChannelShared>> {
        // Ordering: Acquire, pairing with the Release store in `new` (and
        // ordered after the disposer's swap when it reads null).
        NonNull::new(self.keepalive.load(Ordering::Acquire))
    }

    /// Drops the calls' keepalive reference if the channel is orphaned and no
    /// call is in flight, or hands that duty to the freer of a call in its
    /// finishing phase (module docs). The caller must hold a strong
    /// reference of its own.
    pub(crate) fn try_dispose(&self) {
        self.try_dispose_from(None);
    }

    /// As [`ChannelShared::try_dispose`], scanning from `start` (a freer's
    /// own slot) onwards.
    fn try_dispose_from(&self, start: Option<usize>) {
        if !self.is_orphaned() {
            return;
        }
        if self.slab.never_used() {
            // No segment was ever grown: no call can be in flight (a call's
            // segment publication precedes its handle's decrement, which
            // precedes ours in the handle count's release sequence).
            self.drop_keepalive();
            return;
        }
        let walk = self.slab.scan();
        'scan: loop {
            let mut seen = None;
            let found = self.slab.find_slot_from(&walk, start, |slot| {
                // Ordering: SeqCst, after our handle decrement (module docs).
                let s = slot.state.load(Ordering::SeqCst);
                seen = Some(s);
                s.is_occupied()
            });
            let (Some(slot), Some(s)) = (found, seen) else {
                break;
            };
            if !s.is_finishing() {
                // Its freer is still to decide, and will see the orphan.
                return;
            }
            let Some(me) = self.keepalive_ptr() else {
                return; // disposed by somebody else already
            };
            // SAFETY: the caller holds a strong reference, so the count is
            // at least one; `me` has the `Arc`'s provenance. This reference
            // is handed to the freer with the `DUTY` bit, or taken back.
            unsafe { Arc::increment_strong_count(me.as_ptr()) };
            match slot.state.request_duty(s.generation()) {
                DutyRequest::HandedOver => return,
                outcome => {
                    // SAFETY: the reference we took above was not handed over.
                    drop(unsafe { Arc::from_raw(me.as_ptr()) });
                    if outcome == DutyRequest::AlreadyAsked {
                        return; // that freer will dispose
                    }
                    continue 'scan; // released meanwhile: look again
                }
            }
        }
        drop(walk);
        self.drop_keepalive();
    }

    /// Drops the calls' keepalive reference, once (the disposal).
    fn drop_keepalive(&self) {
        // Ordering: AcqRel; the swap makes exactly one disposer own the
        // reference, and orders every freer's release before the drop.
        let raw = self.keepalive.swap(ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            if self.stripe != NOT_COUNTED {
                self.host.count_channel_disposed(self.stripe);
            }
            // SAFETY: `raw` came from `Arc::into_raw` in `new`; the swap made
            // us its only owner. The caller's own reference keeps `self`
            // alive past this drop.
            drop(unsafe { Arc::from_raw(raw) });
        }
    }

    /// Publishes the channel in its host's table, for its first call (a
    /// channel that never runs a call never touches the table: W3). Racing
    /// first calls on other threads do the same, none waiting for another
    /// (lock-free: a reservation may retry its CASes): each may
    /// reserve an entry, one CAS makes one of them the channel's (the others
    /// give theirs back), and each then tries to publish the channel there
    /// (`TableEntry::publish_once`: the first wins, the rest see it done).
    /// So every first call's re-check comes after the publication in the
    /// `SeqCst` order, and an abort's table walk that follows the re-check
    /// finds the channel (R4).
    #[cold]
    #[inline(never)]
    fn enter_table(&self) {
        // Ordering: Acquire pairs with the AcqRel CAS below (another first
        // call's entry).
        let entry = match TableEntry::unpack(self.entry.load(Ordering::Acquire)) {
            Some(theirs) => theirs,
            None => {
                let mine = self.host.table.reserve();
                // Ordering: AcqRel: publishes our reservation to the other
                // first calls, or reads theirs.
                match self.entry.compare_exchange(
                    ptr::null_mut(),
                    mine.pack(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => mine,
                    Err(theirs) => {
                        // SAFETY: reserved just now from our host's table
                        // (alive: `self.host`), never published, given back
                        // once.
                        unsafe { mine.retire(&self.host.table) };
                        TableEntry::unpack(theirs).expect("a packed entry is non-null")
                    }
                }
            }
        };
        // The channel's `Arc`, from the keepalive (held: the caller holds a
        // handle), borrowed for the weak reference: no count changes.
        // SAFETY: the keepalive pointer came from `Arc::into_raw`; the
        // `ManuallyDrop` never releases the reference it stands for.
        let me = core::mem::ManuallyDrop::new(unsafe { Arc::from_raw(self.self_ptr().as_ptr()) });
        // Mutant (ci/mutants.sh): announce the channel before publishing it.
        if cfg!(callcancel_mutant = "registered_early") {
            self.flags.fetch_or(REGISTERED, Ordering::Release);
        }
        // SAFETY: the entry was reserved by a first call of this channel
        // from our host's table (alive: `self.host`), and only our `Drop`
        // retires it.
        let _ = unsafe { entry.publish_once(&me) };
        // Ordering: Release, after the SeqCst publication: a first call
        // that reads the bit in `begin` (Acquire) is ordered after it.
        self.flags.fetch_or(REGISTERED, Ordering::Release);
    }

    /// The channel's own address, with the provenance of its `Arc` (taken
    /// from the keepalive), for calls to keep.
    #[inline]
    pub(crate) fn self_ptr(&self) -> NonNull<ChannelShared> {
        // Ordering: Relaxed; written once in `new`, before any handle exists.
        // A caller holds a handle or an occupied call, so the keepalive is
        // not disposed yet.
        NonNull::new(self.keepalive.load(Ordering::Relaxed))
            .expect("a channel with a handle or a call keeps its keepalive")
    }

    /// A temporary strong reference for a call's freer, who must look at the
    /// channel after releasing its slot.
    ///
    /// # Safety
    /// `this` is the keepalive pointer and the keepalive is held (a call
    /// still occupies its slot, or the caller holds a strong reference).
    pub(crate) unsafe fn hold(this: *const Self) -> Arc<Self> {
        // SAFETY: per the contract the strong count is at least one and
        // `this` came from `Arc::into_raw`.
        unsafe {
            Arc::increment_strong_count(this);
            Arc::from_raw(this)
        }
    }

    pub(crate) fn is_faulted(&self) -> bool {
        // Ordering: Acquire pairs with the SeqCst RMW in `fault`.
        self.flags.load(Ordering::Acquire) & FAULTED != 0
    }

    /// The host's and the channel's refusal, else the channel's flags.
    #[inline]
    fn check(&self, order: Ordering) -> Result<u8, Error> {
        self.host.check_accepting(order)?;
        let flags = self.flags.load(order);
        if flags & FAULTED != 0 {
            return Err(Error::ChannelFaulted);
        }
        Ok(flags)
    }

    /// Begins a call: publishes the channel in its host's table if this is
    /// its first call, claims a slot (a `SeqCst` CAS), then re-checks the
    /// host and channel flags (R4: decided here).
    #[inline]
    pub(crate) fn begin(&self) -> Result<NonNull<CallSlot>, Error> {
        // Cheap early refusal; the SeqCst re-check below is what R4 relies on.
        let flags = match self.check(Ordering::Acquire) {
            Ok(flags) => flags,
            Err(e) => {
                self.host.count_refused(e);
                return Err(e);
            }
        };
        // Ordering: the Acquire load above read `REGISTERED` set (Release)
        // after the publication, so that publication precedes our SeqCst
        // claim and re-check in the SeqCst order.
        if flags & REGISTERED == 0 {
            self.enter_table();
        }
        let slot = self.slab.claim();
        // Ordering: the R4 Dekker pair with abort/fault/close (state.rs):
        // our SeqCst claim, then the SeqCst re-check; their SeqCst flag RMW,
        // then their SeqCst loads of the slots. Either we see their flag or
        // they see our slot.
        // Mutant (ci/mutants.sh): skip the re-check.
        if cfg!(callcancel_mutant = "no_recheck") {
            return Ok(slot);
        }
        crate::sync::dekker_fence();
        if let Err(e) = self.check(Ordering::SeqCst) {
            self.refuse(slot, e);
            return Err(e);
        }
        Ok(slot)
    }

    #[cold]
    #[inline(never)]
    fn refuse(&self, slot: NonNull<CallSlot>, why: Error) {
        self.host.count_refused(why);
        // SAFETY: we occupy `slot` (just claimed) and it is ours to finish.
        let slot = unsafe { slot.as_ref() };
        // Nothing registered, nobody parked: no user code runs. A sweep may
        // have marked (and counted) this call before our re-check refused
        // it: the user never saw the call, so it is not counted cancelled.
        // SAFETY: we occupy the slot (just claimed), and `self` came from a
        // handle's `Arc` that our caller holds (so `keep` is never the last).
        let (panic, reason, keep) = unsafe { Self::complete(self.self_ptr(), NonNull::from(slot)) };
        drop(panic);
        if let Some(reason) = reason {
            self.host.uncount_cancel(reason);
        }
        // Our caller holds a handle's `Arc`: this is never the last one.
        drop(keep);
    }

    /// Marks the channel faulted and cancels its calls with `ChannelFaulted`
    /// (A1 for every caller: see [`ChannelShared::sweep`]).
    pub(crate) fn fault(&self) {
        // Ordering: SeqCst, first half of the R4 Dekker pair.
        self.flags.fetch_or(FAULTED, Ordering::SeqCst);
        crate::sync::dekker_fence();
        let mut panics = FirstPanic::default();
        self.sweep(CancelReason::ChannelFaulted, &mut panics);
        panics.resume();
    }

    /// Cancels every in-flight call of this channel with `reason`. When it
    /// returns, every registered call that was in flight when it started
    /// has had its callback invoked — by this thread, or by the thread that
    /// decided first, whose `STARTED` it waits for (A1, issue 12 #3).
    /// The caller holds a strong reference.
    ///
    /// Per call this sweep claims (one CAS, which also takes the right to
    /// run: `STARTED`), runs the callback, and tags the vtable pointer
    /// `RETURNED` (a `Release` store, no RMW); the hand-off to an owner that
    /// completed meanwhile is settled for up to [`BATCH`] calls at once,
    /// behind one `fence(SeqCst)` ([`ChannelShared::settle`], pair 2b in
    /// `state.rs`). Cancellations are counted once per sweep, and the
    /// thread is marked as running user code once (P6).
    pub(crate) fn sweep(&self, reason: CancelReason, panics: &mut FirstPanic) {
        let walk = self.slab.scan();
        let mut occupied = 0;
        let mut sweep = Sweep {
            reason,
            decided: 0,
            returned: Returned::default(),
            user: None,
            panics,
        };
        // The closure stays small (inlined into the walk: a fault of an
        // idle channel pays a load per slot); an occupied slot goes out
        // of line.
        self.slab.for_each_slot(&walk, |slot| {
            // Ordering: SeqCst, second half of the R4 Dekker pair.
            let snap = slot.state.load(Ordering::SeqCst);
            if snap.is_occupied() {
                occupied += 1;
                self.sweep_occupied(slot, snap, &mut sweep);
            }
        });
        // In place: the batch is 512 bytes, not to be moved.
        self.settle(&mut sweep.returned, sweep.panics);
        drop(sweep.user.take());
        self.host.count_cancels(reason, sweep.decided);
        // Cost follows the live load: give back a burst's segments.
        self.slab.shrink(&walk, occupied);
    }

    /// One occupied slot of a sweep (`snap`: its word as the sweep read it).
    #[inline(never)]
    fn sweep_occupied(&self, slot: &CallSlot, snap: Snapshot, sweep: &mut Sweep<'_>) {
        let gen = snap.generation();
        let now = if snap.is_cancelled() || snap.is_completed() {
            snap
        } else {
            match slot.state.request_cancel(gen, sweep.reason, true) {
                CancelOutcome::Skipped { now } => now,
                CancelOutcome::Marked { wake } => {
                    sweep.decided += 1;
                    sweep
                        .panics
                        .record(self.wake_waiters(slot, wake, Some(sweep.reason)));
                    return;
                }
                CancelOutcome::Claimed { wake } => {
                    sweep.decided += 1;
                    sweep
                        .user
                        .get_or_insert_with(|| UserCode::enter(&self.host));
                    self.invoke(slot, sweep.reason, wake, sweep.panics);
                    slot.mark_returned();
                    // An owner whose completion we can see already (it
                    // completed before or inside the callback) is settled
                    // now, not behind later callbacks; only a completion
                    // racing these few instructions waits for the batch's
                    // fence.
                    // Mutant (ci/mutants.sh): batch it all the same.
                    if !cfg!(callcancel_mutant = "no_immediate_free")
                        && slot.state.completed_unfinished(gen)
                    {
                        self.free_returned(slot, gen, sweep.panics);
                    } else if sweep.returned.push(slot, gen) {
                        self.settle(&mut sweep.returned, sweep.panics);
                    }
                    return;
                }
            }
        };
        if now.callback_pending() {
            self.await_started(slot, gen, sweep.panics);
        }
    }

    /// The sweeper's side of the batched finish (pair 2b in `state.rs`):
    /// after one `fence(SeqCst)`, every call whose callback this sweep ran
    /// and tagged `RETURNED` is re-read; an owner that completed while the
    /// callback ran (and may not have seen the tag) leaves the free to us,
    /// and [`CallState::take_free`] decides it against an owner that did.
    /// The slots stay reachable: the sweep's walk keeps their segments.
    fn settle(&self, returned: &mut Returned, panics: &mut FirstPanic) {
        if returned.len == 0 {
            return;
        }
        // Ordering: the canceller's StoreLoad barrier of pair 2b: its
        // `RETURNED` stores (Release) before, its state loads after; pairs
        // with the owner's `complete` RMW and `SeqCst` load of the tag.
        // Mutant (ci/mutants.sh): no barrier (a leak loom finds).
        if !cfg!(callcancel_mutant = "no_settle_fence") {
            crate::sync::fence(Ordering::SeqCst);
        }
        for (slot, gen) in returned.calls() {
            // SAFETY: the sweep's walk (still alive) keeps the segment, and
            // with it the slot, allocated; `CallState` is all atomics.
            let slot = unsafe { slot.as_ref() };
            // The re-read is `take_free`'s first load: `None` if the owner
            // has not completed (it frees at completion) or took it.
            self.free_returned(slot, gen, panics);
        }
        returned.clear();
    }

    /// A swept call whose owner completed while its callback ran: free it,
    /// if `take_free` says we are the freer (the owner may have seen our
    /// tag and asked too).
    fn free_returned(&self, slot: &CallSlot, gen: u64, panics: &mut FirstPanic) {
        if let Some(word) = slot.state.take_free(gen) {
            self.canceller_frees(slot, word, panics);
        }
    }

    /// A canceller (or an owner that won `take_free`) is the freer of a call
    /// whose callback ran: `word` is the word its deciding `SeqCst` RMW left.
    /// Free, release and run the duties. The caller holds a strong
    /// reference (a sweep's, a `Canceller`'s, a timer job's, an owner's
    /// pin), so the reference the release may hand back is never the last.
    fn canceller_frees(&self, slot: &CallSlot, word: Snapshot, panics: &mut FirstPanic) {
        // Right after the freer-deciding SeqCst RMW.
        let after = self.after_release_duties();
        panics.record(self.free(slot, true));
        let (panic, keep) = self.release(slot, word, after);
        panics.record(panic);
        drop(keep);
    }

    /// Cancels generation `gen` of `slot` alone with `reason`: decide, run
    /// the callback if we claimed it, wake the waiters, and free if the
    /// owner completed meanwhile. `Err(now)` if somebody decided first (or
    /// the call is gone). The channel must stay alive until this returns:
    /// the caller holds a strong reference or borrows the call.
    pub(crate) fn cancel_slot(
        &self,
        slot: &CallSlot,
        gen: u64,
        reason: CancelReason,
        panics: &mut FirstPanic,
    ) -> Result<(), Snapshot> {
        match slot.state.request_cancel(gen, reason, true) {
            CancelOutcome::Skipped { now } => Err(now),
            CancelOutcome::Marked { wake } => {
                self.host.count_cancel(reason);
                panics.record(self.wake_waiters(slot, wake, Some(reason)));
                Ok(())
            }
            CancelOutcome::Claimed { wake } => {
                self.host.count_cancel(reason);
                let _user = UserCode::enter(&self.host);
                self.invoke(slot, reason, wake, panics);
                self.finish_now(slot, panics);
                Ok(())
            }
        }
    }

    /// As [`ChannelShared::cancel_slot`], but a callback to run is handed
    /// back as a [`Claimed`] job instead of run here (the timer thread must
    /// not run user code that may block: `engine/deadline.rs`). The claim
    /// leaves `STARTED` clear: a sweep may take the job over.
    pub(crate) fn decide_cancel(
        &self,
        slot: &CallSlot,
        gen: u64,
        reason: CancelReason,
        panics: &mut FirstPanic,
    ) -> Option<Claimed> {
        match slot.state.request_cancel(gen, reason, false) {
            CancelOutcome::Skipped { .. } => None,
            CancelOutcome::Marked { wake } => {
                self.host.count_cancel(reason);
                panics.record(self.wake_waiters(slot, wake, Some(reason)));
                None
            }
            CancelOutcome::Claimed { wake } => {
                self.host.count_cancel(reason);
                // Wake now: the callback may wait for a runner.
                panics.record(self.wake_waiters(slot, wake, Some(reason)));
                Some(Claimed {
                    reason,
                    generation: gen,
                })
            }
        }
    }

    /// Runs a claimed callback of generation `gen` that was claimed without
    /// `STARTED` (a deadline job), if this thread wins `try_start` (the
    /// job's runner normally does; a sweeper may have taken it over:
    /// `await_started`): invoke it, wake the waiters `wake` names, and free
    /// if the owner completed meanwhile. The slot stays occupied until
    /// `finish_cancel`, and the channel alive (the caller's duty).
    pub(crate) fn run_claimed(
        &self,
        slot: &CallSlot,
        gen: u64,
        reason: CancelReason,
        wake: Snapshot,
        panics: &mut FirstPanic,
    ) {
        if !slot.state.try_start(gen) {
            return; // taken over: its thief runs the rest
        }
        let _user = UserCode::enter(&self.host);
        self.invoke(slot, reason, wake, panics);
        self.finish_now(slot, panics);
    }

    /// Invokes a callback whose right to run (`STARTED`) this thread holds,
    /// then wakes the waiters `wake` names — before the finish, so the slot
    /// cannot be released (and reused) while we still wake its waiters.
    /// The caller has entered `UserCode`.
    #[inline]
    fn invoke(
        &self,
        slot: &CallSlot,
        reason: CancelReason,
        wake: Snapshot,
        panics: &mut FirstPanic,
    ) {
        // SAFETY: we hold `STARTED` on a claimed callback (our claim set
        // it, or we won `try_start`): this thread alone runs it, and its
        // finish has not happened.
        panics.record(unsafe { slot.run_callback(reason) });
        panics.record(self.wake_waiters(slot, wake, Some(reason)));
    }

    /// The unbatched finish: one `finish_cancel` RMW decides whether the
    /// owner completed while the callback ran; then we free and release.
    fn finish_now(&self, slot: &CallSlot, panics: &mut FirstPanic) {
        if let AfterCallback::CancellerFrees { word } = slot.state.finish_cancel() {
            self.canceller_frees(slot, word, panics);
        }
    }

    /// A sweeper waits until the callback of generation `gen`, decided by
    /// another thread, has been invoked (A1 for every caller): until a
    /// runner holds `STARTED`. An inline registrar is a few instructions
    /// from it (no user code); a sweep or `cancel()` sets it in its claim. A
    /// callback *claimed* without it (a deadline job queued behind a runner
    /// that a callback blocks) and not started after a short spin is taken
    /// over and run here, so a sweep never waits on a thread that may be
    /// blocked, possibly on the sweeper itself (A3).
    fn await_started(&self, slot: &CallSlot, gen: u64, panics: &mut FirstPanic) {
        // Mutant (ci/mutants.sh): return before the callback was invoked.
        if cfg!(callcancel_mutant = "no_started_wait") {
            return;
        }
        let steal_after: u32 = if cfg!(loom) { 1 } else { 128 };
        let mut spins = 0u32;
        loop {
            // Ordering: Acquire, pairing with the `STARTED` writers.
            let s = slot.state.load(Ordering::Acquire);
            if !s.is_live(gen) || !s.callback_pending() {
                return;
            }
            if s.is_claimed() && spins >= steal_after {
                if let Some(reason) = s.reason() {
                    // The claimer's waiters: ours to wake if we win.
                    self.run_claimed(slot, gen, reason, s, panics);
                }
                continue;
            }
            spins = spins.wrapping_add(1);
            crate::sync::spin_wait(spins);
        }
    }

    /// `OperationContext::cancel` and `Canceller::cancel`: cancels one call
    /// with `CallCancelled`. True if this request decided it.
    pub(crate) fn cancel_call(&self, slot: &CallSlot, gen: u64) -> bool {
        let mut panics = FirstPanic::default();
        let decided = self
            .cancel_slot(slot, gen, CancelReason::CallCancelled, &mut panics)
            .is_ok();
        panics.resume();
        decided
    }

    /// The registration protocol (`WsRegisterOperationForCancel`): win the
    /// one registration, store it, and run it inline if cancellation was
    /// decided first (R2, R4).
    pub(crate) fn register<S, C, F>(
        &self,
        slot: &CallSlot,
        state: S,
        on_cancel: C,
        on_free: F,
    ) -> Result<(), RegisterError<S>>
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        let prepared = Prepared::new(state, on_cancel, on_free);
        let published = slot.state.publish_registration();
        if let Published::AlreadyRegistered = published {
            return Err(RegisterError::new(
                RegisterErrorKind::AlreadyRegistered,
                prepared.into_state(),
            ));
        }
        // SAFETY: `publish_registration` made us the registrar of this
        // generation and we have not stored yet.
        unsafe { slot.store_registration(prepared) };
        if let Published::RunInline(reason) = published {
            // Invoked from here on (A1); nobody else may run it (unclaimed).
            slot.state.mark_started();
            let _user = UserCode::enter(&self.host);
            // SAFETY: `RunInline`: no canceller claimed this callback, and
            // the owner cannot complete while the caller borrows the call.
            if let Some(panic) = unsafe { slot.run_callback(reason) } {
                std::panic::resume_unwind(panic);
            }
        }
        Ok(())
    }

    /// The owner completes the call in `slot` (its `Call` drops). Returns the
    /// first panic of user code run here (free-state, wakers), the reason
    /// the call was cancelled with, and a strong reference that the caller
    /// must drop only when no reference to the channel is live (it may be
    /// the last: an orphaned channel disposed here).
    ///
    /// Raw pointers, not `&self`: from the release swap on, another thread
    /// may free the channel (its last handle's drop), and no reference to it
    /// may be live then — a `&self` argument would be, to the end of the
    /// call.
    ///
    /// # Safety
    /// `this` is the channel's keepalive pointer and the caller's call
    /// occupies `slot`, which it is completing (once).
    pub(crate) unsafe fn complete(
        this: NonNull<Self>,
        slot: NonNull<CallSlot>,
    ) -> (Option<Panic>, Option<CancelReason>, Keep) {
        // SAFETY: per the contract the call occupies the slot: slot and
        // channel are alive until our release below, or until our RMW hands
        // the free to a canceller (from then on only `pinned` keeps them).
        let (prev, after, mut panics) = unsafe {
            let (ch, slot) = (this.as_ref(), slot.as_ref());
            // The usual case in one CAS; a claimed callback running, or a
            // word that changed under us, goes out of line.
            // Ordering: Relaxed: only the expected value of the CAS below,
            // which (SeqCst) validates it.
            let cur = slot.state.load(Ordering::Relaxed);
            let fast = if cur.callback_running() {
                None
            } else {
                match slot.state.try_complete(cur) {
                    Ok(Completion::OwnerFrees { prev }) => Some(prev),
                    _ => None,
                }
            };
            let prev = match fast {
                Some(prev) => prev,
                None => match Self::complete_contended(this, NonNull::from(slot)) {
                    Ok(prev) => prev,
                    Err(handed_over) => return handed_over,
                },
            };
            // Right after the freer-deciding SeqCst RMW.
            let after = ch.after_release_duties();
            let mut panics = FirstPanic::default();
            // Watches still parked learn that the call finished.
            panics.record(ch.wake_waiters(slot, prev, None));
            if prev.is_registered() {
                panics.record(ch.free(slot, prev.is_cancelled()));
            }
            ch.slab.note_released(slot);
            (prev, after, panics)
        };
        // SAFETY: still ours until the swap inside; see `release_raw`.
        let (panic, keep) = unsafe { Self::release_raw(this, slot, prev.with_completed(), after) };
        panics.record(panic);
        (panics.into_inner(), prev.reason(), keep)
    }

    /// `complete`'s slow path: a claimed callback runs (or ran), or the
    /// word changed between the owner's load and its CAS. `Ok(prev)`: the
    /// owner frees (as in `complete`); `Err(result)`: the RMW handed the
    /// free to a canceller, and `result` is what `complete` returns.
    ///
    /// Raw pointers, as in `complete`: once the free is handed over, the
    /// slot is ours only through the pin, and no `&CallSlot` may outlive it.
    ///
    /// # Safety
    /// As for [`ChannelShared::complete`].
    #[cold]
    #[inline(never)]
    unsafe fn complete_contended(
        this: NonNull<Self>,
        slot: NonNull<CallSlot>,
    ) -> Result<Snapshot, (Option<Panic>, Option<CancelReason>, Keep)> {
        // SAFETY: before our completing CAS the call occupies the slot.
        // Ordering: Relaxed, as in `complete`: the CAS validates it.
        let mut cur = unsafe { slot.as_ref() }.state.load(Ordering::Relaxed);
        loop {
            // A claimed callback runs: our RMW may hand the free to its
            // canceller, after which we still read the slot (pair 2b). Pin
            // the channel and the slot's segment *before* the RMW.
            let pin = cur.callback_running().then(|| {
                // SAFETY: before our RMW the slot is occupied, so the
                // keepalive is held and `this` is its pointer.
                unsafe { OwnerPin::new(this) }
            });
            // SAFETY: not completed yet: the call occupies the slot.
            let tried = unsafe { slot.as_ref() }.state.try_complete(cur);
            match tried {
                Ok(Completion::OwnerFrees { prev }) => return Ok(prev),
                Ok(Completion::CancellerFrees { prev }) => {
                    // `try_complete` committed from `cur`, whose callback
                    // was running: so we pinned.
                    let pin = pin.expect("a handed-over completion is pinned");
                    // SAFETY: handed over, the slot may be released and
                    // reused, but the pin keeps its segment allocated; the
                    // reference ends with this call, before the pin.
                    let slot = unsafe { slot.as_ref() };
                    let panic = pin.channel().complete_handed_over(slot, prev);
                    // Ends the walk (which may free the slot's segment: no
                    // reference to the slot is live here), keeps the Arc.
                    let held = pin.into_arc();
                    return Err((panic, prev.reason(), Some(held)));
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The owner's side of pair 2b, after its `complete` RMW (`prev`, the
    /// word it replaced) found a canceller's callback running: if that was
    /// a sweep's, it may have returned already (the `RETURNED` tag), and
    /// then whoever wins `take_free` frees — us, if the sweep's re-read
    /// missed our `COMPLETED`. The caller's `OwnerPin`, taken before the
    /// RMW, outlives this call: the slot may be released (and reused) under
    /// us, never freed.
    #[cold]
    fn complete_handed_over(&self, slot: &CallSlot, prev: Snapshot) -> Option<Panic> {
        #[cfg(all(test, not(loom)))]
        tests::after_handoff();
        crate::sync::dekker_fence();
        if !slot.callback_returned() {
            return None; // still running: its canceller frees
        }
        let word = slot.state.take_free(prev.generation())?;
        let mut panics = FirstPanic::default();
        self.canceller_frees(slot, word, &mut panics);
        panics.into_inner()
    }

    /// Runs a registration's free-state (the caller is the freer).
    fn free(&self, slot: &CallSlot, cancel_ran: bool) -> Option<Panic> {
        let _user = UserCode::enter(&self.host);
        // SAFETY: the caller's `complete` returned `OwnerFrees` for a
        // registered call, its `finish_cancel` returned `CancellerFrees`, or
        // it won `take_free`.
        unsafe { slot.free_registration(cancel_ran) }
    }

    /// Wakes the waiters of a slot whose cancellation (or completion) we just
    /// decided; `seen` is the state our winning RMW replaced (`wait/`).
    /// A waker whose `wake` panics is caught; the first panic is returned.
    #[must_use]
    #[inline]
    pub(crate) fn wake_waiters(
        &self,
        slot: &CallSlot,
        seen: Snapshot,
        decided: Option<CancelReason>,
    ) -> Option<Panic> {
        if seen.has(WAITER) || seen.has(OVERFLOW) {
            self.wake_waiters_slow(slot, seen, decided)
        } else {
            None
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_waiters_slow(
        &self,
        slot: &CallSlot,
        seen: Snapshot,
        decided: Option<CancelReason>,
    ) -> Option<Panic> {
        let mut first = FirstPanic::default();
        if seen.has(WAITER) {
            first.record(catch(|| slot.waker.wake()));
        }
        if seen.has(OVERFLOW) {
            // Taken under the lock, woken outside it. A watch of this
            // generation is left the reason first (R5: it may poll again
            // only after the call completed).
            let (generation, reason) = (seen.generation(), decided.or(seen.reason()));
            for entry in self.overflow.take(slot_key(slot)) {
                first.record(catch(|| entry.wake(generation, reason)));
            }
        }
        first.into_inner()
    }

    /// What a freer must do after its release; read right after its
    /// deciding `SeqCst` RMW (the Dekker pairs with idle waiters and with the
    /// last handle's drop).
    #[inline]
    fn after_release_duties(&self) -> bool {
        self.host.idle_watched() || self.is_orphaned()
    }

    /// Hands a finished slot back (`word`: the word as the freer knows it)
    /// and runs the release duties the freer saw (`duties`) or was handed
    /// (`DUTY`). For freers whose caller holds a strong reference (a
    /// canceller's `finish_now`, a sweep's `free_returned`, an owner that
    /// pinned the channel in `complete_handed_over`); the owner otherwise uses
    /// [`ChannelShared::release_raw`] through `complete`.
    #[must_use]
    #[inline]
    fn release(&self, slot: &CallSlot, word: Snapshot, duties: bool) -> (Option<Panic>, Keep) {
        // SAFETY: the slot is occupied by the call we free; the caller's
        // strong reference keeps the channel alive past this call.
        unsafe { Self::release_raw(self.self_ptr(), NonNull::from(slot), word, duties) }
    }

    /// [`ChannelShared::release`] on raw pointers. After the release swap
    /// it touches the channel only through an `Arc` it took before (or was
    /// handed with `DUTY`), which it returns for the caller to drop once no
    /// reference to the channel is live; and it never forms a reference to
    /// the slot again (its segment may be given back).
    ///
    /// # Safety
    /// `this` is the keepalive pointer; the slot is occupied, finishing, by
    /// the call this thread frees.
    #[must_use]
    #[inline]
    unsafe fn release_raw(
        this: NonNull<Self>,
        slot: NonNull<CallSlot>,
        word: Snapshot,
        duties: bool,
    ) -> (Option<Panic>, Keep) {
        let held = duties.then(|| {
            // SAFETY: before the swap the slot is occupied, so the
            // keepalive is held and `this` is its pointer.
            unsafe { Self::hold(this.as_ptr()) }
        });
        // SAFETY: as above; the reference lives only for the swap, and
        // `CallState` is all atomics.
        let released = unsafe { slot.as_ref() }.state.release(word);
        let adopted = match released {
            Released::Quiet => None,
            // SAFETY: the `DUTY` setter handed us a strong reference counted
            // on the keepalive pointer (`try_dispose`, `census_for_wait`).
            Released::Duty => Some(unsafe { Arc::from_raw(this.as_ptr()) }),
        };
        let keep = match (held, adopted) {
            (Some(held), adopted) => {
                // `held` is alive: dropping the handed reference frees nothing.
                drop(adopted);
                Some(held)
            }
            (None, adopted) => adopted,
        };
        let panic = keep
            .as_ref()
            .and_then(|ch| Self::run_duties(ch, slot.as_ptr().cast_const()));
        (panic, keep)
    }

    /// The release duties: wake idle waiters, dispose of an orphaned
    /// channel (scanning from the slot just released, at `released`: an
    /// address only, the slot may be reused by now). Runs on a strong
    /// reference.
    #[cold]
    fn run_duties(this: &Arc<Self>, released: *const CallSlot) -> Option<Panic> {
        let panic = if this.host.idle_watched() {
            this.host.notify_idle()
        } else {
            None
        };
        if this.is_orphaned() {
            this.try_dispose_from(this.slab.index_hint(released));
        }
        panic
    }

    /// Calls in flight (occupied slots): a snapshot.
    pub(crate) fn in_flight(&self) -> usize {
        self.slab.census().occupied
    }

    /// The census of an announced idle waiter: counts the occupied slots,
    /// and asks the freer of every slot in its finishing phase to notify
    /// (`DUTY`), since that freer may have looked before the waiter came.
    /// The caller holds a strong reference.
    pub(crate) fn census_for_wait(&self) -> usize {
        let walk = self.slab.scan();
        let mut busy = 0;
        self.slab.for_each_slot(&walk, |slot| loop {
            // Ordering: SeqCst, the waiter side of the idle Dekker pair.
            let s = slot.state.load(Ordering::SeqCst);
            if !s.is_occupied() {
                return;
            }
            if !s.is_finishing() {
                busy += 1; // its freer decides later and sees the waiter
                return;
            }
            let Some(me) = self.keepalive_ptr() else {
                busy += 1;
                return;
            };
            // SAFETY: the caller holds a strong reference; handed over with
            // `DUTY` or taken back below.
            unsafe { Arc::increment_strong_count(me.as_ptr()) };
            match slot.state.request_duty(s.generation()) {
                DutyRequest::HandedOver => {
                    busy += 1;
                    return;
                }
                outcome => {
                    // SAFETY: not handed over: ours to drop.
                    drop(unsafe { Arc::from_raw(me.as_ptr()) });
                    if outcome == DutyRequest::AlreadyAsked {
                        busy += 1;
                        return;
                    }
                    // Released meanwhile: look at the slot again.
                }
            }
        });
        self.slab.shrink(&walk, busy);
        busy
    }
}

/// A callback claimed by [`ChannelShared::decide_cancel`] (its waiters
/// already woken), to be run with [`ChannelShared::run_claimed`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claimed {
    pub(crate) reason: CancelReason,
    pub(crate) generation: u64,
}

/// A strong reference a freer hands up to be dropped once no reference to
/// the channel is live any more (it may be the last).
pub(crate) type Keep = Option<Arc<ChannelShared>>;

/// Calls a sweep settles at once ([`ChannelShared::settle`]): one
/// `fence(SeqCst)` per this many callbacks run.
pub(crate) const BATCH: usize = 32;

/// An owner's hold on its channel and its slot's segment across a
/// `complete` RMW that may hand the free to a sweep (pair 2b): a strong
/// reference (the channel, so its slab and segment 0) and a detached,
/// counted slab walk (a higher segment, which a census may retire once the
/// sweep released the slot). Ending it ends the walk first, while the
/// reference still keeps the slab alive; also on unwinding.
struct OwnerPin(Option<Arc<ChannelShared>>);

impl OwnerPin {
    /// # Safety
    /// `this` is the channel's keepalive pointer and is held (a call still
    /// occupies one of its slots).
    unsafe fn new(this: NonNull<ChannelShared>) -> Self {
        // SAFETY: per the contract.
        let ch = unsafe { ChannelShared::hold(this.as_ptr()) };
        // Mutant (ci/mutants.sh, under miri): no walk; the slot's segment
        // may be freed under the owner.
        if !cfg!(callcancel_mutant = "owner_no_walk") {
            ch.slab.walk().detach();
        }
        Self(Some(ch))
    }

    fn channel(&self) -> &ChannelShared {
        self.0.as_deref().expect("held until ended")
    }

    /// Ends the walk and hands the strong reference over.
    fn into_arc(mut self) -> Arc<ChannelShared> {
        let ch = self.0.take().expect("held until ended");
        if !cfg!(callcancel_mutant = "owner_no_walk") {
            ch.slab.end_detached_walk();
        }
        ch
    }
}

impl Drop for OwnerPin {
    fn drop(&mut self) {
        if let Some(ch) = self.0.take() {
            if !cfg!(callcancel_mutant = "owner_no_walk") {
                ch.slab.end_detached_walk();
            }
            drop(ch);
        }
    }
}

/// What a sweep carries from slot to slot.
struct Sweep<'p> {
    reason: CancelReason,
    /// Cancellations decided, counted once at the end (P6).
    decided: u64,
    returned: Returned,
    /// Entered at the first callback, left at the end.
    user: Option<UserCode>,
    panics: &'p mut FirstPanic,
}

/// The calls whose callbacks a sweep ran and tagged `RETURNED`, not yet
/// settled (pair 2b). Uninitialised storage: a sweep that runs no callback
/// (an idle channel's fault) pays nothing for it.
struct Returned {
    calls: [MaybeUninit<(NonNull<CallSlot>, u64)>; BATCH],
    len: usize,
}

impl Default for Returned {
    #[inline]
    fn default() -> Self {
        Self {
            calls: [const { MaybeUninit::uninit() }; BATCH],
            len: 0,
        }
    }
}

impl Returned {
    /// Adds a call; true if the batch is full (settle it now).
    #[inline]
    fn push(&mut self, slot: &CallSlot, gen: u64) -> bool {
        self.calls[self.len].write((NonNull::from(slot), gen));
        self.len += 1;
        self.len == BATCH
    }

    /// The calls pushed since the last `clear`.
    fn calls(&self) -> impl Iterator<Item = (NonNull<CallSlot>, u64)> + '_ {
        self.calls[..self.len].iter().map(|c| {
            // SAFETY: `push` wrote every entry below `len`.
            unsafe { c.assume_init() }
        })
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// The key of a slot in the overflow lists.
#[inline]
pub(crate) fn slot_key(slot: &CallSlot) -> usize {
    ptr::from_ref(slot) as usize
}

impl Drop for ChannelShared {
    fn drop(&mut self) {
        // A plain load (`&mut self` orders us after every other user); an
        // RMW under loom, which does not see std's `Arc` fence.
        let word = exclusive_ptr(&self.entry);
        if let Some(entry) = TableEntry::<ChannelShared>::unpack(word) {
            // SAFETY: a non-null word was packed by `enter_table` from an
            // entry of our host's table, which `self.host` still keeps alive;
            // retired once, here.
            unsafe { entry.retire(&self.host.table) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::cell::RefCell;
    use std::sync::{mpsc, Arc, Mutex};
    use std::thread;

    use crate::ServiceHost;

    thread_local! {
        /// Runs on the owner's thread right after its `complete` RMW handed
        /// the free to a canceller, before it reads the slot again.
        static AFTER_HANDOFF: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    pub(super) fn after_handoff() {
        if let Some(hook) = AFTER_HANDOFF.with(|h| h.borrow_mut().take()) {
            hook();
        }
    }

    /// The owner of a call whose callback a fault runs completes it while
    /// the callback runs (handing the free to the sweep), then, from the
    /// hook right after that RMW, lets the callback return and waits until
    /// the sweep settled, freed and released the call, dropped the last
    /// handle (disposing of the orphaned channel) and its thread exited
    /// (freeing its spare first block) — then reads the slot again.
    /// `fillers` calls begun (and completed) first put the call in a higher
    /// segment, which the sweep's census retires.
    fn owner_completes_a_handed_over_call(fillers: usize) {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let before: Vec<_> = (0..fillers).map(|_| ch.begin_call().unwrap()).collect();
        let call = ch.begin_call().unwrap();
        let segment = usize::from(fillers >= 8);
        assert_eq!(ch.shared.slab.published_segments(), segment + 1);
        drop(before);
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let freed = Arc::new(Mutex::new(0));
        let f = Arc::clone(&freed);
        call.register_for_cancel_with_free(
            (),
            move |_, _| {
                entered_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            },
            move |()| *f.lock().unwrap() += 1,
        )
        .unwrap();
        let sweeper = thread::spawn(move || {
            ch.fault();
            drop(ch);
        });
        entered_rx.recv().unwrap();
        let owner = thread::spawn(move || {
            AFTER_HANDOFF.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || {
                    go_tx.send(()).unwrap();
                    sweeper.join().unwrap();
                }));
            });
            call.complete();
            // The hook ran: the owner did hand the free over.
            assert!(AFTER_HANDOFF.with(|h| h.borrow().is_none()));
        });
        owner.join().unwrap();
        assert_eq!(*freed.lock().unwrap(), 1, "freed once");
        let stats = host.stats();
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.channels, 0, "the orphaned channel is disposed");
    }

    /// Review of e7f3db5 (high): after its `complete` RMW handed the free
    /// to a sweep, the owner read the slot's tag unpinned, after all of the
    /// above. It now keeps the channel alive from before that RMW; miri
    /// (`ci/miri.sh`, `--lib`) reported the use after free without it.
    #[test]
    fn the_owner_keeps_a_handed_over_slot_alive() {
        owner_completes_a_handed_over_call(0);
    }

    /// Second review: the same with the call in segment 1, which the
    /// sweep's census retires once it released the call: the owner's walk
    /// keeps the segment allocated until the owner is done with the slot
    /// (miri reports the use after free with mutant `owner_no_walk`).
    #[test]
    fn the_owner_keeps_a_handed_over_slot_of_segment_1_alive() {
        owner_completes_a_handed_over_call(8);
    }
}
