//! The host engine: the table of channels and shards, abort (A1), close and
//! the idle wait (A2), the drop of the last handle (A5).

use std::time::{Duration, Instant};

use crate::engine::channel::{ChannelShared, Store};
use crate::store::host_core::{running_for, ABORTED, CLOSED, CLOSING, OPEN};
use crate::sync::{thread_shard, Arc, AtomicUsize, Ordering};
use crate::value::panic::{catch, FirstPanic};
use crate::{CancelReason, Error, HostStats};

/// Host-scope calls are spread over a few internal channels so that threads
/// calling `ServiceHost::begin_call` do not share one slab.
fn shard_count() -> usize {
    if cfg!(loom) {
        1
    } else {
        std::thread::available_parallelism().map_or(4, |n| (n.get() * 2).clamp(2, 16))
    }
}

/// What every `ServiceHost` handle shares.
pub(crate) struct HostShared {
    /// `ServiceHost` handles (futures of the host hold the `Arc`, not a
    /// handle). The last handle's drop aborts an unclosed host (A5).
    handles: AtomicUsize,
    /// The core and the channel table (`store/host_store.rs`), shared with
    /// every channel.
    pub(crate) core: Arc<Store>,
    shards: Vec<Arc<ChannelShared>>,
}

impl HostShared {
    pub(crate) fn new() -> Self {
        let core = Arc::new(Store::new());
        let shards = (0..shard_count())
            // Each shard starts with one handle: the host's (see `Drop`).
            .map(|_| ChannelShared::new(Arc::clone(&core), true))
            .collect();
        Self {
            handles: AtomicUsize::new(1),
            core,
            shards,
        }
    }

    /// A new `ServiceHost` handle.
    pub(crate) fn add_handle(&self) {
        // Ordering: Relaxed, like `Arc::clone`: the caller holds a handle.
        self.handles.fetch_add(1, Ordering::Relaxed);
    }

    /// A `ServiceHost` handle went away; the last one aborts the host unless
    /// it is closed (A5). A callback's panic is re-raised unless the thread
    /// is already unwinding.
    pub(crate) fn drop_handle(&self) {
        // Ordering: AcqRel, like `Arc::drop`: the last dropper sees every
        // other handle's work.
        if self.handles.fetch_sub(1, Ordering::AcqRel) == 1
            && self.core.raw_state(Ordering::SeqCst) != CLOSED
        {
            let mut panics = FirstPanic::default();
            panics.record(catch(|| self.abort()));
            panics.resume_unless_panicking();
        }
    }

    /// Opens a channel. It enters the host's table only with its first call
    /// (`ChannelShared::enter_table`): an abort has nothing to sweep in a
    /// channel without calls, and a `begin` re-checks the host state (R4).
    pub(crate) fn open_channel(&self) -> Result<Arc<ChannelShared>, Error> {
        let core = &self.core;
        // Ordering: Acquire, an early refusal only; the SeqCst re-check
        // below is the one that counts.
        if let Err(e) = core.check_accepting(Ordering::Acquire) {
            core.count_refused(e);
            return Err(e);
        }
        let shared = ChannelShared::new(Arc::clone(core), false);
        // A channel opened while an abort or close began is refused now
        // rather than at its first call.
        if let Err(e) = core.check_accepting(Ordering::SeqCst) {
            core.count_refused(e);
            // The caller never sees the handle: dropping it disposes.
            shared.drop_handle();
            return Err(e);
        }
        Ok(shared)
    }

    /// The shard of this thread, for host-scope calls.
    pub(crate) fn shard(&self) -> &ChannelShared {
        &self.shards[thread_shard(self.shards.len())]
    }

    /// Every channel and shard, each held by a strong reference while `f`
    /// runs. (Orphaned channels are disposed of by their last handle or
    /// their last call's freer, never by this walk.)
    fn for_each_channel(&self, mut f: impl FnMut(&Arc<ChannelShared>)) {
        self.core.table.for_each(&mut f);
        self.shards.iter().for_each(f);
    }

    pub(crate) fn in_flight(&self) -> usize {
        let mut n = 0;
        self.for_each_channel(|ch| n += ch.in_flight());
        n
    }

    pub(crate) fn stats(&self) -> HostStats {
        let (refused, refused_channel_faulted, cancelled) = self.core.counts();
        HostStats {
            in_flight: self.in_flight(),
            refused,
            refused_channel_faulted,
            channels: self.core.channels(),
            cancelled,
        }
    }

    /// Whether this thread runs a callback or free-state of this host's
    /// calls: then waiting for idle would wait for itself (A3).
    pub(crate) fn called_from_own_callback(&self) -> bool {
        running_for(&self.core)
    }

    /// The census of an announced idle waiter: occupied slots, with a
    /// `DUTY` request on every finishing one (`engine/channel.rs`).
    pub(crate) fn census_for_wait(&self) -> usize {
        let mut n = 0;
        self.for_each_channel(|ch| n += ch.census_for_wait());
        n
    }

    /// Waits until nothing is in flight or `deadline` passes. No polling:
    /// freers notify (`store/host_core.rs`).
    pub(crate) fn wait_idle_until(&self, deadline: Option<Instant>) -> bool {
        let core = &self.core;
        let _watch = core.watch_idle();
        loop {
            let epoch = core.idle_epoch();
            if self.census_for_wait() == 0 {
                return true;
            }
            let remaining = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => r,
                    _ => return false,
                },
            };
            core.sleep_idle(epoch, remaining);
        }
    }

    /// Aborts: refuse new work, then sweep every channel (A1).
    pub(crate) fn abort(&self) {
        // Closed means idle with nothing accepted since: nothing to cancel,
        // and Closed is final. Ordering: SeqCst; the ABORTED state (ours or
        // the one we read) is the first half of the R4 Dekker pair and
        // precedes the sweep below.
        if self.core.transition(&[OPEN, CLOSING], ABORTED) == CLOSED {
            return;
        }
        crate::sync::dekker_fence();
        // Every abort sweeps, even a repeated or concurrent one, so that each
        // caller can rely on A1 when it returns. Sweeps skip calls that are
        // already cancelled (and wait for a callback another sweeper
        // claimed to start), so a call's callback still runs at most once.
        let mut panics = FirstPanic::default();
        self.for_each_channel(|c| c.sweep(CancelReason::HostAbort, &mut panics));
        panics.resume();
    }

    /// `Open → Closing`; returns the state found (`OPEN` if this moved it).
    pub(crate) fn begin_close(&self) -> u8 {
        let found = self.core.transition(&[OPEN], CLOSING);
        crate::sync::dekker_fence();
        found
    }

    /// After an idle census: the host is `Closed` (final).
    pub(crate) fn mark_closed(&self) {
        let _ = self.core.transition(&[OPEN, CLOSING, ABORTED], CLOSED);
    }

    pub(crate) fn close(&self, timeout: Duration) -> Result<(), Error> {
        if self.begin_close() == CLOSED {
            return Ok(());
        }
        if self.called_from_own_callback() {
            return Err(Error::WouldDeadlock);
        }
        if self.wait_idle_until(Instant::now().checked_add(timeout)) {
            self.mark_closed();
            Ok(())
        } else {
            self.abort();
            Err(Error::Timeout)
        }
    }
}

impl Drop for HostShared {
    fn drop(&mut self) {
        // (A5 was done by the last `ServiceHost` handle: `drop_handle`.)
        // Give up the host's handle on each shard: an idle shard is disposed
        // now, a busy one by the freer of its last call.
        self.shards.iter().for_each(|shard| shard.drop_handle());
    }
}

#[cfg(all(test, not(loom)))]
impl HostShared {
    pub(crate) fn shards_for_test(&self) -> Vec<Arc<ChannelShared>> {
        self.shards.clone()
    }
}
