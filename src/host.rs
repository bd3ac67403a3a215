//! Layer 7 (public face): [`ServiceHost`]. Delegation and docs only: the
//! protocol lives in `engine/host.rs`.

use core::fmt;
use std::time::{Duration, Instant};

use crate::call::Call;
use crate::channel::Channel;
use crate::engine::host::HostShared;
use crate::sync::Arc;
use crate::wait::idle::Idle;
use crate::{Error, HostState, HostStats};

/// A service host: accepts channels, which carry calls (WWSAPI
/// `WS_SERVICE_HOST`).
///
/// Clones share one host. Dropping the last handle of a host that is not
/// `Closed` **aborts** it (A5, as `WsFreeServiceHost` and tokio's `Runtime`
/// drop do): every in-flight call is cancelled with
/// [`CancelReason::HostAbort`](crate::CancelReason::HostAbort), so nothing
/// is left running that nobody can stop. Calls keep counting on their
/// channels until each completes, and their free-states run then. A
/// cancel callback that panics during that abort re-raises from the drop
/// (unless the thread is already unwinding, when it is dropped).
///
/// ```
/// use callcancel::{CancelReason, HostState, ServiceHost};
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// let host = ServiceHost::new();
/// let channel = host.open_channel().unwrap();
/// let call = channel.begin_call().unwrap();
/// let cancels = Arc::new(AtomicUsize::new(0));
/// let c = Arc::clone(&cancels);
/// call.register_for_cancel((), move |reason, _| {
///     assert_eq!(reason, CancelReason::HostAbort);
///     c.fetch_add(1, Ordering::SeqCst);
/// })
/// .unwrap();
///
/// host.abort(); // A1: the callback has run when abort returns
/// assert_eq!(cancels.load(Ordering::SeqCst), 1);
/// assert_eq!(host.in_flight(), 1); // A2: still counted until it completes
/// call.complete();
/// assert!(host.wait_idle(Duration::from_secs(1)));
/// assert_eq!(host.close(Duration::from_secs(1)), Ok(()));
/// assert_eq!(host.state(), HostState::Closed);
/// ```
pub struct ServiceHost {
    shared: Arc<HostShared>,
}

#[cfg(loom)]
impl ServiceHost {
    pub(crate) fn parked_table_refs(&self) -> usize {
        self.shared.core.table.parked_count()
    }
}

impl Clone for ServiceHost {
    fn clone(&self) -> Self {
        self.shared.add_handle();
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for ServiceHost {
    fn drop(&mut self) {
        // A5: the last *handle* aborts an unclosed host, even while an
        // `idle()` or `close_async()` future still holds the shared state.
        self.shared.drop_handle();
    }
}

impl Default for ServiceHost {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceHost {
    /// Creates an open host. No thread is started (the deadline timer's
    /// thread starts with the first deadline of the process).
    pub fn new() -> Self {
        Self {
            shared: Arc::new(HostShared::new()),
        }
    }

    /// Opens a channel (WWSAPI: a channel accepted by the host).
    ///
    /// Fails with [`Error::HostAborted`] or [`Error::HostClosed`] once the host
    /// was aborted or is closing.
    pub fn open_channel(&self) -> Result<Channel, Error> {
        self.shared.open_channel().map(Channel::new)
    }

    /// Starts a host-scope call: one that belongs to no channel (WWSAPI: a host
    /// callback running with an operation context). Only a host abort cancels
    /// it.
    pub fn begin_call(&self) -> Result<Call, Error> {
        Call::begin(self.shared.shard())
    }

    /// Starts a host-scope call with a deadline: as
    /// [`Channel::begin_call_with_deadline`] (only a host abort or the
    /// deadline cancels it, or its own [`cancel`](crate::OperationContext::cancel)).
    pub fn begin_call_with_deadline(&self, deadline: Instant) -> Result<Call, Error> {
        Call::begin_with_deadline(self.shared.shard(), deadline)
    }

    /// Aborts the host (WWSAPI `WsAbortServiceHost`).
    ///
    /// * New channels and calls are refused with [`Error::HostAborted`];
    ///   channels are *not* marked faulted (A1).
    /// * Every in-flight call is cancelled with [`CancelReason::HostAbort`](crate::CancelReason::HostAbort);
    ///   when `abort` returns, the cancel callback of every registered
    ///   in-flight call has been invoked (A1).
    /// * The host still counts in-flight calls until each completes (A2).
    /// * Idempotent; may be called from several threads, repeatedly, and
    ///   from inside a cancel callback without deadlock (A3). On a `Closed`
    ///   host it does nothing.
    /// * Cost: a `SeqCst` state change and a walk over the live channels'
    ///   slots (chunks of the channel table with nothing live are skipped);
    ///   no process-wide barrier.
    ///
    /// # Panics
    ///
    /// If a cancel callback (or a free-state it had to run) panics, the sweep
    /// still notifies every other call; after the sweep the first panic is
    /// re-raised from `abort` (A4).
    pub fn abort(&self) {
        self.shared.abort();
    }

    /// Closes the host gracefully (WWSAPI `WsCloseServiceHost` with a close
    /// timeout).
    ///
    /// Refuses new channels and calls at once ([`Error::HostClosed`]), then
    /// waits up to `timeout` for in-flight calls. If they all complete, the
    /// host becomes [`HostState::Closed`] and `close` returns `Ok`. At the
    /// deadline the remaining calls are aborted (cancelled with
    /// [`CancelReason::HostAbort`](crate::CancelReason::HostAbort), as `abort`), the host is `Aborted`, and
    /// `close` returns `Err(Error::Timeout)` without waiting further; a later
    /// `close` waits for those calls and then closes (A2). On a `Closed` host
    /// it returns `Ok` at once.
    ///
    /// # Panics
    ///
    /// As [`abort`](ServiceHost::abort), when the deadline passes and a
    /// cancel callback panics.
    pub fn close(&self, timeout: Duration) -> Result<(), Error> {
        self.shared.close(timeout)
    }

    /// The async twin of [`close`](ServiceHost::close), for async servers:
    /// refuses new work at once, awaits idle up to `timeout` (on the crate's
    /// own timer: any runtime, or none), then aborts the rest and resolves
    /// to `Err(Error::Timeout)`; `Ok(())` once the host is `Closed`. The
    /// future is `Send` and blocks no thread (the abort's sweep runs the
    /// remaining calls' cancel callbacks on the polling thread).
    ///
    /// Dropped before it resolves, it leaves the host as far as it got:
    /// `Closing` (new work refused, calls running on), or `Aborted` once the
    /// timeout passed while it was polled; nothing leaks. A later `close`
    /// or `close_async` finishes the job.
    ///
    /// ```
    /// use callcancel::{Error, HostState, ServiceHost};
    /// use std::time::Duration;
    ///
    /// # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// # rt.block_on(async {
    /// let host = ServiceHost::new();
    /// let stuck = host.begin_call().unwrap(); // ignores cancellation
    /// let r = host.close_async(Duration::from_millis(10)).await;
    /// assert_eq!(r, Err(Error::Timeout));
    /// assert_eq!(host.state(), HostState::Aborted);
    /// drop(stuck);
    /// assert_eq!(host.close_async(Duration::from_secs(1)).await, Ok(()));
    /// # });
    /// ```
    pub fn close_async(
        &self,
        timeout: Duration,
    ) -> impl core::future::Future<Output = Result<(), Error>> + Send + 'static {
        crate::wait::close::close_async(Arc::clone(&self.shared), timeout)
    }

    /// Starts a graceful close without blocking: an `Open` host becomes
    /// [`HostState::Closing`] and refuses new channels and calls from now on
    /// ([`Error::HostClosed`]); in-flight calls run on. Returns the state
    /// after the call. For async services: `begin_close()`, then await
    /// [`idle`](ServiceHost::idle) (racing your own timer, and `abort()` if it
    /// fires), then `close(Duration::ZERO)` to reach `Closed`.
    ///
    /// ```
    /// use callcancel::{Error, HostState, ServiceHost};
    /// use std::time::Duration;
    ///
    /// let host = ServiceHost::new();
    /// let call = host.begin_call().unwrap();
    /// assert_eq!(host.begin_close(), HostState::Closing);
    /// assert_eq!(host.begin_call().unwrap_err(), Error::HostClosed);
    /// call.complete();
    /// assert_eq!(host.close(Duration::ZERO), Ok(()));
    /// assert_eq!(host.state(), HostState::Closed);
    /// ```
    pub fn begin_close(&self) -> HostState {
        self.shared.begin_close();
        self.state()
    }

    /// The host's state: a snapshot.
    pub fn state(&self) -> HostState {
        self.shared.core.state()
    }

    /// A snapshot of the host's counters: calls in flight, refusals, and
    /// cancellations by reason (see [`HostStats`]).
    pub fn stats(&self) -> HostStats {
        self.shared.stats()
    }

    /// Calls in flight on the host, channel and host-scope alike. A call
    /// counts until it completed *and* any cancel callback and free-state of
    /// it returned. A snapshot; costs a walk over every channel.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Blocks until no call is in flight (`true`) or `timeout` passes
    /// (`false`).
    ///
    /// Called from inside a cancel callback or free-state of one of this
    /// host's calls, it returns `false` at once: that call is in flight until
    /// its callback returns, so the wait could only time out (A3).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        if self.shared.called_from_own_callback() {
            return false;
        }
        self.shared
            .wait_idle_until(Instant::now().checked_add(timeout))
    }

    /// Resolves once no call is in flight: the async twin of
    /// [`wait_idle`](ServiceHost::wait_idle). Runtime-agnostic.
    pub fn idle(&self) -> Idle {
        Idle::new(Arc::clone(&self.shared))
    }
}

#[cfg(all(test, not(loom)))]
impl ServiceHost {
    pub(crate) fn shared_shards(&self) -> Vec<Arc<crate::engine::channel::ChannelShared>> {
        self.shared.shards_for_test()
    }
}

impl fmt::Debug for ServiceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHost")
            .field("state", &self.state())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
