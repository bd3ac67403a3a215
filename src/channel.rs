//! Layer 7 (public face): [`Channel`]. Delegation and docs only: the
//! protocol lives in `engine/channel.rs`.

use core::fmt;
use std::time::Instant;

use crate::call::Call;
use crate::engine::channel::ChannelShared;
use crate::sync::Arc;
use crate::Error;

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
    pub(crate) shared: Arc<ChannelShared>,
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

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<ChannelShared> {
        &self.shared
    }

    /// Starts a call on this channel.
    ///
    /// Fails with [`Error::HostAborted`] / [`Error::HostClosed`] once the host
    /// was aborted / is closing, and with [`Error::ChannelFaulted`] once this
    /// channel faulted. A call that this returns is guaranteed to be
    /// cancelled by any later abort or fault (R4).
    ///
    /// Cost: one `SeqCst` CAS on a free slot of this channel (usually the
    /// one this thread released last) and two loads of the flags.
    #[inline]
    pub fn begin_call(&self) -> Result<Call, Error> {
        Call::begin(&self.shared)
    }

    /// Starts a call on this channel with a deadline (R7): when `deadline`
    /// passes while the call is in flight, it is cancelled with
    /// [`CancelReason::DeadlineExceeded`](crate::CancelReason::DeadlineExceeded)
    /// — never earlier, and (on an idle machine) within about a millisecond
    /// after, by the crate's timer thread (started with the process's first
    /// deadline; blocking services need no async runtime). A deadline that
    /// has already passed gives a call that is in flight and already
    /// cancelled (a registration then runs its callback inline). Completing
    /// the call first removes its timer entry (O(1)); a deadline years
    /// away is fine. Refused as [`begin_call`](Channel::begin_call).
    ///
    /// ```
    /// use callcancel::{CancelReason, ServiceHost};
    /// use std::time::{Duration, Instant};
    ///
    /// let host = ServiceHost::new();
    /// let channel = host.open_channel().unwrap();
    /// let at = Instant::now() + Duration::from_millis(20);
    /// let call = channel.begin_call_with_deadline(at).unwrap();
    /// assert_eq!(call.deadline(), Some(at));
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// call.register_for_cancel(tx, |reason, tx| tx.send(reason).unwrap()).unwrap();
    /// assert_eq!(rx.recv().unwrap(), CancelReason::DeadlineExceeded);
    /// assert!(Instant::now() >= at); // never early
    /// ```
    pub fn begin_call_with_deadline(&self, deadline: Instant) -> Result<Call, Error> {
        Call::begin_with_deadline(&self.shared, deadline)
    }

    /// Faults the channel: refuses new calls on it and cancels every pending
    /// call of this channel with [`CancelReason::ChannelFaulted`](crate::CancelReason::ChannelFaulted). Calls of
    /// other channels and host-scope calls are untouched.
    ///
    /// Idempotent and safe to call from several threads at once or from
    /// inside a cancel callback (A3). When it returns, the cancel callback of
    /// every registered call of this channel has been invoked (by this thread
    /// or by one that got there first, whose invocation it waits for: A1).
    ///
    /// # Panics
    ///
    /// If a cancel callback (or a free-state it had to run) panics, the sweep
    /// still notifies every other call; then the first panic is re-raised
    /// from `fault` (A4).
    ///
    /// Cost: one `SeqCst` swap of the channel's flag and a walk over this
    /// channel's slots; no lock, and nothing any other thread or channel
    /// pays for (no process-wide barrier).
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
        Arc::downgrade(channel.shared())
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
        drop(host); // A5: the last handle of an unclosed host aborts it
        assert_eq!(call.cancel_reason(), Some(crate::CancelReason::HostAbort));
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

    /// Issue 12 #2: the registered state owns the channel's last handle (a
    /// "connection context"); its free-state drops it while the call is in
    /// its finishing phase. The channel must be freed at once, not by some
    /// later pass over the host's table.
    #[test]
    fn a_channel_whose_last_handle_drops_in_a_free_state_is_freed() {
        let host = ServiceHost::new();
        let mut weaks = Vec::new();
        for _ in 0..100 {
            let ch = host.open_channel().unwrap();
            weaks.push(weak_of(&ch));
            let call = ch.begin_call().unwrap();
            call.register_for_cancel(ch, |_, _| {}).unwrap(); // state owns it
            call.complete(); // drops the state, and so the last handle
        }
        assert!(
            weaks.iter().all(|w| w.upgrade().is_none()),
            "every orphaned channel was freed by its last call's freer"
        );
        assert_eq!(host.in_flight(), 0);
    }

    /// Issue 12 #7: the overflow list is per slot (waking one call's
    /// waiters does not walk the others'), and a dropped primary future
    /// gives the slot's waker back, so the next future of the call does not
    /// take the overflow path.
    #[test]
    fn waiter_lists_stay_per_call_and_the_primary_waker_is_given_back() {
        use core::future::Future;
        use core::task::{Context, Waker};
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let calls: Vec<_> = (0..50).map(|_| ch.begin_call().unwrap()).collect();
        // Two watch futures per call: all in the overflow list.
        let mut futs: Vec<_> = calls
            .iter()
            .flat_map(|c| [c.watch().cancelled(), c.watch().cancelled()])
            .map(Box::pin)
            .collect();
        for f in &mut futs {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(ch.shared().overflow.len(), 100);
        assert!(calls[7].cancel());
        assert_eq!(ch.shared().overflow.len(), 98, "only call 7's waiters");
        drop(futs);
        assert_eq!(ch.shared().overflow.len(), 0);
        // A primary `cancelled()` future dropped unwoken, then another: the
        // second is primary again (not parked in the overflow list).
        for _ in 0..3 {
            let mut f = Box::pin(calls[0].cancelled());
            assert!(f.as_mut().poll(&mut cx).is_pending());
            drop(f);
            assert_eq!(ch.shared().overflow.len(), 0);
        }
    }
}
