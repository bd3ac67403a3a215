//! Channels: a slab of calls, a fault flag, and the sweep that cancels them.

use core::fmt;

use crate::call::Call;
use crate::host::HostCore;
use crate::registry::{Slab, TableEntry};
use crate::slot::{CallSlot, Panic};
use crate::state::{AfterCallback, CancelOutcome, Snapshot, OVERFLOW, WAITER};
use crate::sync::{lock, Arc, AtomicU8, Mutex, Ordering};
use crate::{CancelReason, Error};

/// The first panic caught during a sweep; later ones are dropped (A4).
#[derive(Default)]
pub(crate) struct FirstPanic(Option<Panic>);

impl FirstPanic {
    pub(crate) fn record(&mut self, p: Option<Panic>) {
        if self.0.is_none() {
            self.0 = p;
        }
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
pub(crate) struct ChannelShared {
    pub(crate) slab: Slab,
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
    pub(crate) fn new(host: Arc<HostCore>, table: Option<TableEntry>) -> Self {
        Self {
            slab: Slab::new(),
            faulted: AtomicU8::new(0),
            host,
            overflow: Mutex::new(Overflow::default()),
            table,
        }
    }

    pub(crate) fn publish_in_table(self: &Arc<Self>) {
        if let Some(entry) = &self.table {
            entry.publish(self);
        }
    }

    pub(crate) fn is_faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire) != 0
    }

    fn check(&self, order: Ordering) -> Result<(), Error> {
        self.host.check_accepting(order)?;
        if self.faulted.load(order) != 0 {
            return Err(Error::ChannelFaulted);
        }
        Ok(())
    }

    /// Starts a call on this channel (or shard).
    pub(crate) fn begin_call(self: &Arc<Self>) -> Result<Call, Error> {
        // Cheap early refusal; the SeqCst re-check below is what R4 relies on.
        self.check(Ordering::Acquire)?;
        let claimed = self.slab.claim();
        let call = Call::new(Arc::clone(self), claimed);
        // Ordering: SeqCst re-check after the SeqCst `try_occupy`: either we
        // see the abort/fault flag, or its sweep sees our slot (state.rs).
        // Mutant (ci/mutants.sh): skip the re-check.
        if cfg!(callcancel_mutant = "no_recheck") {
            return Ok(call);
        }
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
            CancelOutcome::Marked { wake } => self.wake_waiters(slot, wake),
            CancelOutcome::Claimed { wake } => {
                self.wake_waiters(slot, wake);
                // SAFETY: `request_cancel` returned `Claimed`: this thread
                // alone may run the callback until `finish_cancel`.
                panics.record(unsafe { slot.run_callback(reason) });
                match slot.state.finish_cancel() {
                    AfterCallback::OwnerFrees => {}
                    AfterCallback::CancellerFrees => {
                        // Right after the freer-deciding SeqCst RMW (host.rs).
                        let notify = self.host.idle_watched();
                        // SAFETY: `finish_cancel` returned `CancellerFrees`:
                        // the owner completed and left the freeing to us.
                        panics.record(unsafe { slot.free_registration(true) });
                        self.release(slot, None, notify);
                    }
                }
            }
        }
    }

    /// Wakes the waiters of a slot whose cancellation (or completion) we just
    /// decided; `seen` is the state our winning RMW replaced (`waiter.rs`).
    pub(crate) fn wake_waiters(&self, slot: &CallSlot, seen: Snapshot) {
        if seen.has(WAITER) {
            slot.waker.wake();
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
            wakers.into_iter().for_each(|w| w.waker.wake());
        }
    }

    /// Hands a finished slot back. `index` (when the caller knows it)
    /// becomes the slab's hint for the next `begin_call`; `notify` is what the
    /// freer read from the idle-waiter count right after its deciding RMW.
    pub(crate) fn release(&self, slot: &CallSlot, index: Option<usize>, notify: bool) {
        if let Some(index) = index {
            self.slab.note_released(index);
        }
        slot.state.release();
        if notify {
            self.host.notify_idle();
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.slab.census().occupied
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
#[derive(Clone)]
pub struct Channel {
    shared: Arc<ChannelShared>,
}

impl Channel {
    pub(crate) fn new(shared: Arc<ChannelShared>) -> Self {
        Self { shared }
    }

    /// Starts a call on this channel.
    ///
    /// Fails with [`Error::HostAborted`] / [`Error::HostClosed`] once the host
    /// was aborted / is closing, and with [`Error::ChannelFaulted`] once this
    /// channel faulted. A call that this returns is guaranteed to be
    /// cancelled by any later abort or fault (R4).
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
