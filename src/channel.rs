//! Channels: a slab of calls, a fault flag, and the sweep that cancels them.

use core::fmt;
use core::ptr::{self, NonNull};

use crate::call::Call;
use crate::host::HostCore;
use crate::registry::{Slab, TableEntry};
use crate::slot::{catch, CallSlot, Panic};
use crate::state::{AfterCallback, CancelOutcome, Snapshot, OVERFLOW, WAITER};
use crate::sync::{lock, Arc, AtomicPtr, AtomicU8, AtomicUsize, Mutex, Ordering};
use crate::{CancelReason, Error};

/// The first panic caught during a sweep; later ones are dropped (A4).
#[derive(Default)]
pub(crate) struct FirstPanic(Option<Panic>);

impl FirstPanic {
    #[inline]
    pub(crate) fn record(&mut self, p: Option<Panic>) {
        if self.0.is_none() {
            self.0 = p;
        }
    }

    pub(crate) fn into_inner(self) -> Option<Panic> {
        self.0
    }

    /// Re-raises the recorded panic, if any, once the sweep is over.
    pub(crate) fn resume(self) {
        if let Some(p) = self.0 {
            std::panic::resume_unwind(p);
        }
    }
}

/// A `cancelled()` future that is not the slot's primary waiter.
pub(crate) struct OverflowWaiter {
    pub(crate) slot: *const CallSlot,
    pub(crate) id: u64,
    pub(crate) waker: core::task::Waker,
}

// SAFETY: `slot` is only compared as an address, never dereferenced.
unsafe impl Send for OverflowWaiter {}

#[derive(Default)]
pub(crate) struct Overflow {
    pub(crate) next_id: u64,
    pub(crate) waiters: Vec<OverflowWaiter>,
}

/// The shared state behind [`Channel`] handles and the calls on them. Host-scope
/// calls use a few internal channels ("shards") that are never faulted.
///
/// # Lifetime without a per-call reference count
///
/// A call does not clone an `Arc` of its channel (two RMWs on a line shared
/// by every call of the channel). Instead the channel holds a strong
/// reference to itself, `keepalive`, on behalf of all its calls, and a count
/// of `Channel` handles (plus one held by the host for a shard). Once there
/// are no handles ("orphaned") *and* no occupied slot, `try_dispose` drops
/// the keepalive, exactly once (a swap). It runs:
///
/// * when the last handle drops (its census finds no call in flight);
/// * in the thread that frees a call, if it saw the channel orphaned right
///   after its deciding `SeqCst` RMW (it holds a temporary `Arc` across the
///   release so it can look after it);
/// * in every pass over the host's channel table (`in_flight`, `wait_idle`,
///   `abort`, `open_channel`'s scan), which collects the one case the two
///   above can miss: the last handle dropped while a call was in its
///   finishing phase, after that call's freer had looked (the same `SeqCst`
///   argument as for idle waiters, `host.rs`).
///
/// A call's raw pointer to its channel is valid because `try_dispose` only
/// drops the keepalive when the census sees every slot free, and a call's
/// freer touches the channel after its release store only through its
/// temporary `Arc`.
pub(crate) struct ChannelShared {
    pub(crate) slab: Slab,
    /// `Channel` handles (plus the host's, for a shard). Zero is final.
    handles: AtomicUsize,
    /// `Arc::into_raw` of this channel, held for its calls; null once
    /// disposed.
    keepalive: AtomicPtr<ChannelShared>,
    /// `1` once faulted. Set by a `SeqCst` swap before the fault sweep; read
    /// `SeqCst` by `begin_call`'s re-check (the R4 Dekker pair, `state.rs`).
    faulted: AtomicU8,
    pub(crate) host: Arc<HostCore>,
    /// Secondary `cancelled()` waiters of this channel's calls (slow path).
    pub(crate) overflow: Mutex<Overflow>,
    /// Where the host's table points at this channel; `None` for shards.
    table: Option<TableEntry>,
}

impl ChannelShared {
    /// A new channel with one handle (the caller's).
    pub(crate) fn new(host: Arc<HostCore>, table: Option<TableEntry>) -> Arc<Self> {
        let channel = Arc::new(Self {
            slab: Slab::new(),
            handles: AtomicUsize::new(1),
            keepalive: AtomicPtr::new(ptr::null_mut()),
            faulted: AtomicU8::new(0),
            host,
            overflow: Mutex::new(Overflow::default()),
            table,
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

    /// A handle went away; the last one disposes the channel if idle.
    pub(crate) fn drop_handle(&self) {
        // Ordering: SeqCst, pairing with the freer's `is_orphaned` load after
        // its SeqCst RMW (see the type docs).
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

    /// Drops the calls' keepalive reference if the channel is orphaned and no
    /// call is in flight. The caller must hold a strong reference of its own.
    pub(crate) fn try_dispose(&self) {
        self.try_dispose_from(None);
    }

    /// As [`ChannelShared::try_dispose`], looking for a busy slot from
    /// `start` (a freer's own slot) onwards.
    fn try_dispose_from(&self, start: Option<&CallSlot>) {
        if !self.is_orphaned() || self.slab.any_occupied_from(start) {
            return;
        }
        // Ordering: AcqRel; the swap makes exactly one disposer own the
        // reference, and orders every freer's release before the drop.
        let raw = self.keepalive.swap(ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            // SAFETY: `raw` came from `Arc::into_raw` in `new`; the swap made
            // us its only owner. The caller's own reference keeps `self`
            // alive past this drop.
            drop(unsafe { Arc::from_raw(raw) });
        }
    }

    /// The channel's own address, with the provenance of its `Arc` (taken
    /// from the keepalive), for calls to keep: a pointer derived from `&self`
    /// could not later release an `Arc` (see [`ChannelShared::hold`]).
    #[inline]
    pub(crate) fn self_ptr(&self) -> NonNull<ChannelShared> {
        // Ordering: Relaxed; written once in `new`, before any handle exists.
        // A caller holds a handle, so the keepalive is not disposed yet.
        NonNull::new(self.keepalive.load(Ordering::Relaxed))
            .expect("a channel with a handle keeps its keepalive")
    }

    /// A temporary strong reference for a call's freer, who must look at the
    /// channel after releasing its slot.
    ///
    /// # Safety
    /// The caller's call still occupies its slot, so the keepalive is held.
    pub(crate) unsafe fn hold(this: *const Self) -> Arc<Self> {
        // SAFETY: per the contract the keepalive reference is alive, so the
        // strong count is at least one and `this` came from `Arc::into_raw`
        // (the keepalive's own pointer).
        unsafe {
            Arc::increment_strong_count(this);
        }
        // SAFETY: the increment above is the reference we now own.
        unsafe { Arc::from_raw(this) }
    }

    pub(crate) fn publish_in_table(self: &Arc<Self>) {
        if let Some(entry) = &self.table {
            entry.publish(self);
        }
    }

    pub(crate) fn is_faulted(&self) -> bool {
        // Ordering: Acquire pairs with the SeqCst swap in `fault`.
        self.faulted.load(Ordering::Acquire) != 0
    }

    #[inline]
    fn check(&self, order: Ordering) -> Result<(), Error> {
        self.host.check_accepting(order)?;
        if self.faulted.load(order) != 0 {
            return Err(Error::ChannelFaulted);
        }
        Ok(())
    }

    /// Starts a call on this channel (or shard).
    #[inline]
    pub(crate) fn begin_call(&self) -> Result<Call, Error> {
        // Cheap early refusal; the SeqCst re-check below is what R4 relies on.
        self.check(Ordering::Acquire)?;
        let call = Call::new(self, self.slab.claim());
        // Ordering: the R4 pair with abort/fault/close (state.rs): our claim
        // (a SeqCst CAS, or a plain store to our leased slot), then this
        // fence (light side of `sync::asym`), then the SeqCst re-check;
        // their flag RMW, then the heavy fence, then their loads of slots.
        // Either we see their flag or they see our slot.
        // Mutant (ci/mutants.sh): skip the re-check.
        if cfg!(callcancel_mutant = "no_recheck") {
            return Ok(call);
        }
        crate::sync::asym::light();
        if let Err(e) = self.check(Ordering::SeqCst) {
            drop(call);
            return Err(e);
        }
        Ok(call)
    }

    /// Marks the channel faulted and cancels its calls with `ChannelFaulted`.
    pub(crate) fn fault(&self) {
        // Ordering: SeqCst, first half of the R4 Dekker pair.
        self.faulted.swap(1, Ordering::SeqCst);
        crate::sync::asym::heavy();
        let mut panics = FirstPanic::default();
        self.sweep(CancelReason::ChannelFaulted, &mut panics);
        panics.resume();
    }

    /// Cancels every in-flight call of this channel with `reason`.
    pub(crate) fn sweep(&self, reason: CancelReason, panics: &mut FirstPanic) {
        self.slab.for_each_slot(|slot| {
            // Ordering: SeqCst, second half of the R4 Dekker pair.
            let snap = slot.state.load(Ordering::SeqCst);
            if snap.is_occupied() && !snap.is_cancelled() && !snap.is_completed() {
                self.cancel_slot(slot, snap.generation(), reason, panics);
            }
        });
    }

    /// One call's cancellation: decide, wake, run the callback if we
    /// claimed it, and free if the owner completed meanwhile.
    fn cancel_slot(
        &self,
        slot: &CallSlot,
        gen: usize,
        reason: CancelReason,
        panics: &mut FirstPanic,
    ) {
        match slot.state.request_cancel(gen, reason) {
            CancelOutcome::Skipped => {}
            CancelOutcome::Marked { wake } => panics.record(self.wake_waiters(slot, wake)),
            CancelOutcome::Claimed { wake } => {
                panics.record(self.wake_waiters(slot, wake));
                // SAFETY: `request_cancel` returned `Claimed`: this thread
                // alone may run the callback until `finish_cancel`.
                panics.record(unsafe { slot.run_callback(reason) });
                match slot.state.finish_cancel() {
                    AfterCallback::OwnerFrees => {}
                    AfterCallback::CancellerFrees => {
                        // Right after the freer-deciding SeqCst RMW (host.rs).
                        let after = self.after_release_duties();
                        // SAFETY: `finish_cancel` returned `CancellerFrees`:
                        // the owner completed and left the freeing to us.
                        panics.record(unsafe { slot.free_registration(true) });
                        // The sweeper holds an `Arc` of this channel, so it
                        // may look after it past the release.
                        panics.record(self.release(slot, None, after));
                    }
                }
            }
        }
    }

    /// Wakes the waiters of a slot whose cancellation (or completion) we just
    /// decided; `seen` is the state our winning RMW replaced (`waiter.rs`).
    ///
    /// A waker whose `wake` panics is caught, so the caller can finish its
    /// protocol step; the first such panic is returned for re-raising.
    #[must_use]
    #[inline]
    pub(crate) fn wake_waiters(&self, slot: &CallSlot, seen: Snapshot) -> Option<Panic> {
        if seen.has(WAITER) || seen.has(OVERFLOW) {
            self.wake_waiters_slow(slot, seen)
        } else {
            None
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_waiters_slow(&self, slot: &CallSlot, seen: Snapshot) -> Option<Panic> {
        let mut first = FirstPanic::default();
        if seen.has(WAITER) {
            first.record(catch(|| slot.waker.wake()));
        }
        if seen.has(OVERFLOW) {
            let wakers: Vec<_> = {
                let mut overflow = lock(&self.overflow);
                let target: *const CallSlot = slot;
                let (mine, rest) = core::mem::take(&mut overflow.waiters)
                    .into_iter()
                    .partition(|w| w.slot == target);
                overflow.waiters = rest;
                mine
            };
            // Wake outside the lock: a waker may run arbitrary code.
            for w in wakers {
                first.record(catch(|| w.waker.wake()));
            }
        }
        first.into_inner()
    }

    /// What a freer must do after its release; read right after its
    /// deciding `SeqCst` RMW (the Dekker pairs with idle waiters and with the
    /// last handle's drop: `host.rs` and the type docs).
    #[inline]
    pub(crate) fn after_release_duties(&self) -> AfterRelease {
        AfterRelease {
            notify_idle: self.host.idle_watched(),
            dispose: self.is_orphaned(),
        }
    }

    /// Hands a finished slot back. `owner` is the word `complete` returned
    /// when the freer is the call's owner: then the slot (unless it is this
    /// thread's leased one) becomes this thread's hint for its next
    /// `begin_call` here, and the release needs no load. The caller must hold a
    /// strong reference if `after` asks for any duty (see
    /// [`ChannelShared::hold`]).
    /// Returns the first panic of an idle waiter's waker, if any.
    #[must_use]
    #[inline]
    pub(crate) fn release(
        &self,
        slot: &CallSlot,
        owner: Option<Snapshot>,
        after: AfterRelease,
    ) -> Option<Panic> {
        match owner {
            Some(prev) => {
                if !prev.is_leased() {
                    self.slab.note_released(slot);
                }
                slot.state.release_from(prev.with_completed());
            }
            None => slot.state.release(),
        }
        if after.any() {
            self.release_duties(slot, after)
        } else {
            None
        }
    }

    /// The rare part of [`ChannelShared::release`]: wake idle waiters,
    /// dispose an orphaned channel.
    #[cold]
    #[inline(never)]
    fn release_duties(&self, slot: &CallSlot, after: AfterRelease) -> Option<Panic> {
        let panic = if after.notify_idle {
            self.host.notify_idle()
        } else {
            None
        };
        if after.dispose {
            self.try_dispose_from(Some(slot));
        }
        panic
    }

    pub(crate) fn in_flight(&self) -> usize {
        // As `HostCore::fence_if_refusing`, for a fault too.
        if self.is_faulted() {
            crate::sync::asym::heavy();
        } else {
            self.host.fence_if_refusing();
        }
        self.slab.census().occupied
    }
}

/// Duties of a freer after its release (see
/// [`ChannelShared::after_release_duties`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AfterRelease {
    pub(crate) notify_idle: bool,
    pub(crate) dispose: bool,
}

impl AfterRelease {
    #[inline]
    pub(crate) fn any(self) -> bool {
        self.notify_idle || self.dispose
    }
}

impl Drop for ChannelShared {
    fn drop(&mut self) {
        if let Some(entry) = &self.table {
            entry.retire();
        }
    }
}

/// A channel of a [`ServiceHost`](crate::ServiceHost): carries calls, and can
/// fault (WWSAPI: the underlying channel raised a fault, or the client went
/// away).
///
/// Clones share one channel. The channel lives while any handle or any call
/// on it does.
///
/// ```
/// use callcancel::{CancelReason, Error, ServiceHost};
/// use std::sync::{Arc, Mutex};
///
/// let host = ServiceHost::new();
/// let channel = host.open_channel()?;
/// let call = channel.begin_call()?;
/// let seen = Arc::new(Mutex::new(None));
/// let s = Arc::clone(&seen);
/// call.register_for_cancel((), move |reason, _| *s.lock().unwrap() = Some(reason))
///     .map_err(|_| "already registered")?;
/// channel.fault();
/// assert_eq!(*seen.lock().unwrap(), Some(CancelReason::ChannelFaulted));
/// assert_eq!(channel.begin_call().unwrap_err(), Error::ChannelFaulted);
/// call.complete();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Channel {
    shared: Arc<ChannelShared>,
}

impl Clone for Channel {
    fn clone(&self) -> Self {
        self.shared.add_handle();
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.shared.drop_handle();
    }
}

impl Channel {
    /// Wraps a new channel's first handle.
    pub(crate) fn new(shared: Arc<ChannelShared>) -> Self {
        Self { shared }
    }

    /// Starts a call on this channel.
    ///
    /// Fails with [`Error::HostAborted`] / [`Error::HostClosed`] once the host
    /// was aborted / is closing, and with [`Error::ChannelFaulted`] once this
    /// channel faulted. A call that this returns is guaranteed to be
    /// cancelled by any later abort or fault (R4).
    ///
    /// Not async-signal-safe: do not call it from a signal handler (its
    /// leased fast path is a load and a store that a handler on the same
    /// thread must not interleave with).
    #[inline]
    pub fn begin_call(&self) -> Result<Call, Error> {
        self.shared.begin_call()
    }

    /// Faults the channel: refuses new calls on it and cancels every pending
    /// call of this channel with [`CancelReason::ChannelFaulted`]. Calls of
    /// other channels and host-scope calls are untouched.
    ///
    /// Idempotent and safe to call from several threads at once or from
    /// inside a cancel callback (A3). When it returns, the cancel callback of
    /// every registered call of this channel has been invoked (by this thread
    /// or by one that got there first).
    ///
    /// # Panics
    ///
    /// If a cancel callback (or a free-state it had to run) panics, the sweep
    /// still notifies every other call; then the first panic is re-raised
    /// from `fault` (A4).
    ///
    /// Cost: besides the sweep of this channel, one process-wide memory
    /// barrier (Linux `membarrier`, a few microseconds), as for
    /// [`ServiceHost::abort`](crate::ServiceHost::abort).
    pub fn fault(&self) {
        self.shared.fault();
    }

    /// Whether [`fault`](Channel::fault) was called. A host abort does not
    /// fault channels.
    pub fn is_faulted(&self) -> bool {
        self.shared.is_faulted()
    }

    /// Calls on this channel that are in flight (begun, and not yet
    /// completed and finished with any running cancel callback and
    /// free-state). A snapshot.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("faulted", &self.is_faulted())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::sync::{Arc, Weak};
    use crate::ServiceHost;

    fn weak_of(channel: &super::Channel) -> Weak<super::ChannelShared> {
        Arc::downgrade(&channel.shared)
    }

    #[test]
    fn a_channel_is_freed_when_its_last_handle_and_call_are_gone() {
        let host = ServiceHost::new();
        // Call completes first, then the handles go.
        let ch = host.open_channel().unwrap();
        let ch2 = ch.clone();
        let weak = weak_of(&ch);
        ch.begin_call().unwrap().complete();
        drop(ch);
        assert!(weak.upgrade().is_some(), "a handle is left");
        drop(ch2);
        assert!(weak.upgrade().is_none(), "disposed with its last handle");

        // Handles go first, then the call completes: its freer disposes.
        let ch = host.open_channel().unwrap();
        let weak = weak_of(&ch);
        let call = ch.begin_call().unwrap();
        call.register_for_cancel(7u64, |_, _| {}).unwrap();
        drop(ch);
        assert!(weak.upgrade().is_some(), "the call keeps it alive");
        assert_eq!(host.in_flight(), 1);
        call.complete();
        assert!(
            weak.upgrade().is_none(),
            "disposed by the last call's freer"
        );
        assert_eq!(host.in_flight(), 0);
    }

    #[test]
    fn a_canceller_that_frees_disposes_an_orphaned_channel() {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let weak = weak_of(&ch);
        let call = ch.begin_call().unwrap();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        call.register_for_cancel((), move |_, _| {
            entered_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        })
        .unwrap();
        let aborter = {
            let host = host.clone();
            std::thread::spawn(move || host.abort())
        };
        entered_rx.recv().unwrap();
        call.complete(); // the callback runs: the canceller will free
        drop(ch);
        assert!(weak.upgrade().is_some());
        go_tx.send(()).unwrap();
        aborter.join().unwrap();
        assert!(
            weak.upgrade().is_none(),
            "the canceller's release disposed it"
        );
    }

    #[test]
    fn host_scope_calls_outlive_a_dropped_host_and_free_their_shard() {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let freed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let f = Arc::clone(&freed);
        call.register_for_cancel_with_free(
            (),
            |_, _| {},
            move |_| {
                f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
        )
        .unwrap();
        let shards: Vec<_> = host.shared_shards().iter().map(Arc::downgrade).collect();
        drop(host);
        assert!(
            shards.iter().any(|w| w.upgrade().is_some()),
            "the call's shard lives"
        );
        call.complete();
        assert_eq!(freed.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            shards.iter().all(|w| w.upgrade().is_none()),
            "every shard freed"
        );
    }
}
