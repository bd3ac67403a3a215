//! The service host: its state word, its channel table, abort, close and the
//! idle wait.
//!
//! # Host state word
//!
//! One `AtomicU8`: `OPEN → CLOSING → CLOSED`, `OPEN | CLOSING → ABORTED →
//! CLOSED`. Every change is a `SeqCst` CAS; `abort` sets `ABORTED` before it
//! sweeps (the first half of the R4 Dekker pair, `state.rs`). The hot path
//! only *reads* it (`begin_call`'s check and re-check), so the line stays
//! shared in every core's cache.
//!
//! # Idle waiting (A2)
//!
//! There is no host-wide in-flight counter: it would be a cache line written
//! by every call of the host. `in_flight()` sums the occupied slots of every
//! channel instead (cold path). A waiter announces itself in `idle_waiters`
//! (`SeqCst`), then takes a census under the `idle` mutex and sleeps on the
//! condvar (or parks its waker).
//!
//! The thread that frees a call (the owner in `complete`, or a canceller
//! whose callback outlived the completion) reads `idle_waiters` (`SeqCst`)
//! right after the `SeqCst` RMW that made it the freer, runs the free-state,
//! releases the slot with a plain store, and notifies under the mutex if it
//! saw a waiter. In the single order of `SeqCst` operations either the freer's
//! load sees the waiter (and notifies after the release), or the waiter's
//! census sees the slot already in its finishing phase. A finishing slot
//! will be released without a notification, so the waiter re-takes the
//! census after a short pause instead of sleeping until notified (the freer
//! is running the free-state: typically microseconds). Calls that were not
//! finishing at the census will be notified for. The hot path pays one load
//! of a line that is written only while somebody waits.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::call::Call;
use crate::channel::{Channel, ChannelShared, FirstPanic};
use crate::registry::{Census, ChannelTable};
use crate::slot::{catch, Panic};
use crate::sync::{
    lock, pause_briefly, thread_shard, Arc, AtomicU8, AtomicUsize, Condvar, Mutex, Ordering,
};
use crate::{CancelReason, Error, HostState};

const OPEN: u8 = 0;
const CLOSING: u8 = 1;
const ABORTED: u8 = 2;
const CLOSED: u8 = 3;

/// First and longest pause before a waiter re-takes the census while a call
/// is finishing (its free-state running).
const FINISHING_PAUSE_MIN: Duration = Duration::from_micros(50);
const FINISHING_PAUSE_MAX: Duration = Duration::from_millis(5);

/// Keeps a hot, read-mostly field off its neighbours' cache lines (128 bytes:
/// the adjacent-line prefetcher pairs 64-byte lines on x86).
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Default)]
struct IdleWakers {
    next_id: u64,
    wakers: Vec<(u64, Waker)>,
}

/// What every channel of a host needs: the state word and the idle wake-up.
pub(crate) struct HostCore {
    state: Padded<AtomicU8>,
    idle_waiters: Padded<AtomicUsize>,
    idle: Mutex<IdleWakers>,
    idle_cv: Condvar,
}

impl HostCore {
    fn new() -> Self {
        Self {
            state: Padded(AtomicU8::new(OPEN)),
            idle_waiters: Padded(AtomicUsize::new(0)),
            idle: Mutex::new(IdleWakers::default()),
            idle_cv: Condvar::new(),
        }
    }

    /// `Err` unless the host accepts new channels and calls.
    #[inline]
    pub(crate) fn check_accepting(&self, order: Ordering) -> Result<(), Error> {
        match self.state.0.load(order) {
            OPEN => Ok(()),
            ABORTED => Err(Error::HostAborted),
            _ => Err(Error::HostClosed),
        }
    }

    /// Before a census: if the host refuses new calls, run the heavy side of
    /// the R4 fence pair (`sync::asym`) so that a leased call that slipped in
    /// beside the abort or close (its re-check read `Open`) is counted even
    /// by a thread that saw the refusal before the aborter's or closer's own
    /// barrier finished. While the host is open a call missed here simply
    /// began after the census.
    pub(crate) fn fence_if_refusing(&self) {
        if self.check_accepting(Ordering::SeqCst).is_err() {
            crate::sync::asym::heavy();
        }
    }

    /// Whether anybody waits for idle: read by a freer right after its
    /// deciding `SeqCst` RMW (the freer's half of the idle Dekker pair; see
    /// the module docs).
    #[inline]
    pub(crate) fn idle_watched(&self) -> bool {
        crate::sync::dekker_fence();
        self.idle_waiters.0.load(Ordering::SeqCst) != 0
    }

    /// Wakes every idle waiter so it takes a new census. A waker that
    /// panics does not stop the others; the first panic is returned.
    #[must_use]
    pub(crate) fn notify_idle(&self) -> Option<Panic> {
        let wakers = {
            let mut idle = lock(&self.idle);
            self.idle_cv.notify_all();
            core::mem::take(&mut idle.wakers)
        };
        let mut first = FirstPanic::default();
        for (_, w) in wakers {
            first.record(catch(|| w.wake()));
        }
        first.into_inner()
    }
}

/// Host-scope calls are spread over a few internal channels so that threads
/// calling `ServiceHost::begin_call` do not share one slab.
fn shard_count() -> usize {
    if cfg!(loom) {
        1
    } else {
        std::thread::available_parallelism().map_or(4, |n| (n.get() * 2).clamp(2, 16))
    }
}

pub(crate) struct HostShared {
    core: Arc<HostCore>,
    table: ChannelTable,
    shards: Vec<Arc<ChannelShared>>,
}

impl HostShared {
    /// Every channel and shard. Also collects orphaned, idle channels whose
    /// disposal no freer could do (see `ChannelShared`).
    fn for_each_channel(&self, mut f: impl FnMut(&Arc<ChannelShared>)) {
        self.table.for_each(|ch| {
            f(ch);
            ch.try_dispose();
        });
        self.shards.iter().for_each(f);
    }

    fn census(&self) -> Census {
        self.core.fence_if_refusing();
        let mut c = Census::default();
        self.for_each_channel(|ch| c += ch.slab.census());
        c
    }

    fn in_flight(&self) -> usize {
        self.census().occupied
    }

    /// Waits until nothing is in flight or `deadline` passes.
    fn wait_idle_until(&self, deadline: Option<Instant>) -> bool {
        let core = &self.core;
        // Ordering: SeqCst, the waiter's half of the idle Dekker pair.
        core.idle_waiters.0.fetch_add(1, Ordering::SeqCst);
        crate::sync::dekker_fence();
        let mut guard = lock(&core.idle);
        let mut pause = FINISHING_PAUSE_MIN;
        let idle = loop {
            let census = self.census();
            if census.occupied == 0 {
                break true;
            }
            let remaining = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => r,
                    _ => break false,
                },
            };
            if census.finishing > 0 {
                // Released without a notification for us: look again soon.
                guard = pause_briefly(&core.idle_cv, &core.idle, guard, pause.min(remaining));
                pause = (pause * 2).min(FINISHING_PAUSE_MAX);
                continue;
            }
            pause = FINISHING_PAUSE_MIN;
            guard = match core.idle_cv.wait_timeout(guard, remaining) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        drop(guard);
        // Ordering: SeqCst like the increment; it only stops notifications.
        core.idle_waiters.0.fetch_sub(1, Ordering::SeqCst);
        idle
    }

    fn abort(&self) {
        let state = &self.core.state.0;
        // Ordering: SeqCst; the ABORTED store (ours, or the one we read) is
        // the first half of the R4 Dekker pair and precedes the sweep below.
        let mut cur = state.load(Ordering::SeqCst);
        loop {
            match cur {
                // Closed means idle with nothing accepted since: nothing to
                // cancel, and Closed is final.
                CLOSED => return,
                ABORTED => break,
                _ => match state.compare_exchange(cur, ABORTED, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => break,
                    Err(actual) => cur = actual,
                },
            }
        }
        // Every abort sweeps, even a repeated or concurrent one, so that each
        // caller can rely on A1 when it returns. Sweeps skip calls that are
        // already cancelled, so a call's callback still runs at most once.
        // The heavy side of the R4 fence pair (`sync::asym`): a call that
        // occupied its leased slot with a plain store is now either visible
        // to the sweep or sees ABORTED in its re-check.
        crate::sync::asym::heavy();
        let mut panics = FirstPanic::default();
        self.for_each_channel(|c| c.sweep(CancelReason::HostAbort, &mut panics));
        panics.resume();
    }

    /// `Open → Closing`; returns the state found (`OPEN` if this moved it).
    fn begin_close(&self) -> u8 {
        let state = &self.core.state.0;
        // Ordering: SeqCst like every host-state transition: CLOSING is the
        // flag half of the R4 pair with `begin_call`'s re-check (and of the
        // heavy fence below).
        let mut cur = state.load(Ordering::SeqCst);
        while cur == OPEN {
            match state.compare_exchange(OPEN, CLOSING, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        // Heavy side of the R4 fence pair (`sync::asym`), by every closer
        // (not only the one that moved the state): a call that slipped in
        // beside CLOSING is seen by the idle census that follows.
        crate::sync::asym::heavy();
        cur
    }

    fn close(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now().checked_add(timeout);
        let state = &self.core.state.0;
        if self.begin_close() == CLOSED {
            return Ok(());
        }
        if self.wait_idle_until(deadline) {
            // Ordering: SeqCst, as in `begin_close`; CLOSED is final and only
            // follows an idle census.
            let mut cur = state.load(Ordering::SeqCst);
            while cur != CLOSED {
                match state.compare_exchange(cur, CLOSED, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break,
                    Err(actual) => cur = actual,
                }
            }
            Ok(())
        } else {
            self.abort();
            Err(Error::Timeout)
        }
    }
}

/// A service host: accepts channels, which carry calls (WWSAPI
/// `WS_SERVICE_HOST`).
///
/// Clones share one host. Dropping every handle does **not** abort or close
/// the host: calls already running keep running on their channels (abort or
/// close it first, as WWSAPI requires `WsCloseServiceHost` before
/// `WsFreeServiceHost`).
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
#[derive(Clone)]
pub struct ServiceHost {
    shared: Arc<HostShared>,
}

impl Drop for HostShared {
    fn drop(&mut self) {
        // Give up the host's handle on each shard: an idle shard is disposed
        // now, a busy one by the freer of its last call.
        self.shards.iter().for_each(|shard| shard.drop_handle());
        // Collect channels left orphaned and idle.
        self.table.for_each(|ch| ch.try_dispose());
    }
}

impl Default for ServiceHost {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceHost {
    /// Creates an open host.
    pub fn new() -> Self {
        crate::sync::asym::init();
        let core = Arc::new(HostCore::new());
        let shards = (0..shard_count())
            // Each shard starts with one handle: the host's (see `Drop`).
            .map(|_| ChannelShared::new(Arc::clone(&core), None))
            .collect();
        Self {
            shared: Arc::new(HostShared {
                core,
                table: ChannelTable::new(),
                shards,
            }),
        }
    }

    /// Opens a channel (WWSAPI: a channel accepted by the host).
    ///
    /// Fails with [`Error::HostAborted`] or [`Error::HostClosed`] once the host
    /// was aborted or is closing.
    pub fn open_channel(&self) -> Result<Channel, Error> {
        let core = &self.shared.core;
        // Ordering: Acquire, an early refusal only; the SeqCst re-check
        // below is the one that counts.
        core.check_accepting(Ordering::Acquire)?;
        let entry = self.shared.table.reserve();
        let shared = ChannelShared::new(Arc::clone(core), Some(entry));
        shared.publish_in_table();
        crate::sync::dekker_fence();
        let channel = Channel::new(shared);
        // A channel that slipped in beside an abort holds no call yet; its
        // `begin_call` re-checks the host state, so nothing can be lost.
        // (On `Err`, dropping `channel` disposes of it.)
        core.check_accepting(Ordering::SeqCst)?;
        Ok(channel)
    }

    /// Starts a host-scope call: one that belongs to no channel (WWSAPI: a host
    /// callback running with an operation context). Only a host abort cancels
    /// it.
    pub fn begin_call(&self) -> Result<Call, Error> {
        let shards = &self.shared.shards;
        shards[thread_shard(shards.len())].begin_call()
    }

    /// Aborts the host (WWSAPI `WsAbortServiceHost`).
    ///
    /// * New channels and calls are refused with [`Error::HostAborted`];
    ///   channels are *not* marked faulted (A1).
    /// * Every in-flight call is cancelled with [`CancelReason::HostAbort`];
    ///   when `abort` returns, the cancel callback of every registered
    ///   in-flight call has been invoked (A1).
    /// * The host still counts in-flight calls until each completes (A2).
    /// * Idempotent; may be called from several threads, repeatedly, and
    ///   from inside a cancel callback without deadlock (A3). On a `Closed`
    ///   host it does nothing.
    /// * Cost: besides the sweep, one process-wide memory barrier (Linux
    ///   `membarrier`, a few microseconds; the price of `begin_call`'s
    ///   barrier-free fast path, see the README's Design section).
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
    /// [`CancelReason::HostAbort`], as `abort`), the host is `Aborted`, and
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
        // Ordering: Acquire pairs with the SeqCst state changes.
        match self.shared.core.state.0.load(Ordering::Acquire) {
            OPEN => HostState::Open,
            CLOSING => HostState::Closing,
            ABORTED => HostState::Aborted,
            _ => HostState::Closed,
        }
    }

    /// Calls in flight on the host, channel and host-scope alike. A call
    /// counts until it completed *and* any cancel callback and free-state of
    /// it returned. A snapshot; costs a walk over every channel.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Blocks until no call is in flight (`true`) or `timeout` passes
    /// (`false`).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.shared
            .wait_idle_until(Instant::now().checked_add(timeout))
    }

    /// Resolves once no call is in flight: the async twin of
    /// [`wait_idle`](ServiceHost::wait_idle). Runtime-agnostic.
    pub fn idle(&self) -> Idle {
        Idle {
            host: Arc::clone(&self.shared),
            id: None,
        }
    }
}

#[cfg(all(test, not(loom)))]
impl ServiceHost {
    pub(crate) fn shared_shards(&self) -> &[Arc<ChannelShared>] {
        &self.shared.shards
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

/// The future of [`ServiceHost::idle`].
#[must_use = "futures do nothing unless polled"]
pub struct Idle {
    host: Arc<HostShared>,
    /// Set once this future announced itself in `idle_waiters`.
    id: Option<u64>,
}

impl Future for Idle {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let core = &this.host.core;
        let mut idle = lock(&core.idle);
        let id = *this.id.get_or_insert_with(|| {
            // Ordering: SeqCst, the waiter's half of the idle Dekker pair.
            core.idle_waiters.0.fetch_add(1, Ordering::SeqCst);
            crate::sync::dekker_fence();
            idle.next_id += 1;
            idle.next_id
        });
        let census = this.host.census();
        if census.occupied == 0 {
            idle.wakers.retain(|(i, _)| *i != id);
            return Poll::Ready(());
        }
        if census.finishing > 0 {
            // A finishing slot is released without a notification for us
            // (module docs): ask to be polled again.
            drop(idle);
            crate::sync::model_yield();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match idle.wakers.iter_mut().find(|(i, _)| *i == id) {
            Some((_, w)) => w.clone_from(cx.waker()),
            None => idle.wakers.push((id, cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let core = &self.host.core;
            lock(&core.idle).wakers.retain(|(i, _)| *i != id);
            core.idle_waiters.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl fmt::Debug for Idle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idle").finish_non_exhaustive()
    }
}
