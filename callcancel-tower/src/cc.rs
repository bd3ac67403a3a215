//! The callcancel types this crate works with.
//!
//! **Temporary v2 adapter.** The core's v2 deadlines
//! (`begin_call_with_deadline`, `OperationContext::deadline`,
//! `CancelReason::DeadlineExceeded` decided by the core's timer) and
//! `ServiceHost::close_async` are not on `main` yet ("core rework, part 1"
//! has the four reasons, `cancel`, `Canceller` and `HostStats`). This module
//! emulates the whole v2 surface this crate uses on the core's v1 calls, so
//! the rest of the crate is written against the v2 names. When the core has
//! deadlines, this whole file becomes
//!
//! ```text
//! pub use callcancel::{Call, CancelReason, CancelWatch, Canceller, Channel, Error,
//!                      HostState, HostStats, OperationContext, RegisterError,
//!                      RegisterErrorKind, ServiceHost, WatchCancelled};
//! ```
//!
//! (checked: with that re-export and the two deadline methods stubbed, the
//! crate compiles unchanged against part 1 and every test not about
//! deadlines passes).
//!
//! How the emulation works: each call runs alone on a private v1 channel of
//! the host; cancelling one call (`cancel`, a deadline) records the v2 reason
//! and faults that private channel; a (v2) channel is a registry of its calls
//! and faults them all. Limits of the emulation (gone with v2): a cancel that
//! races a host abort may report the per-call reason to late readers while the
//! callback saw `HostAbort`; `HostStats::cancelled(HostAbort)` is not counted;
//! deadlines are driven by a tokio timer task (a std thread outside tokio).

#![allow(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use callcancel::{Error, HostState, RegisterError, RegisterErrorKind};

/// Why a call was cancelled (v2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelReason {
    /// The host was aborted.
    HostAbort,
    /// The call's channel (connection) faulted.
    ChannelFaulted,
    /// The call alone was cancelled (client reset, application, upstream).
    CallCancelled,
    /// The call's deadline passed.
    DeadlineExceeded,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::HostAbort => "host aborted",
            CancelReason::ChannelFaulted => "channel faulted",
            CancelReason::CallCancelled => "call cancelled",
            CancelReason::DeadlineExceeded => "deadline exceeded",
        })
    }
}

impl CancelReason {
    fn code(self) -> u8 {
        match self {
            CancelReason::HostAbort => 1,
            CancelReason::ChannelFaulted => 2,
            CancelReason::CallCancelled => 3,
            CancelReason::DeadlineExceeded => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => CancelReason::HostAbort,
            2 => CancelReason::ChannelFaulted,
            3 => CancelReason::CallCancelled,
            4 => CancelReason::DeadlineExceeded,
            _ => return None,
        })
    }
    fn from_v1(r: callcancel::CancelReason) -> Self {
        match r {
            callcancel::CancelReason::HostAbort => CancelReason::HostAbort,
            _ => CancelReason::ChannelFaulted,
        }
    }
}

#[derive(Default)]
struct StatsInner {
    refused: AtomicU64,
    cancelled: [AtomicU64; 5],
}

/// A snapshot of a host's counters (v2).
#[derive(Clone, Copy, Debug)]
pub struct HostStats {
    pub in_flight: usize,
    pub refused: u64,
    cancelled: [u64; 5],
}

impl HostStats {
    /// Calls cancelled with `reason`.
    pub fn cancelled(&self, reason: CancelReason) -> u64 {
        self.cancelled[reason.code() as usize]
    }
}

/// A service host (v2 surface).
#[derive(Clone)]
pub struct ServiceHost {
    v1: callcancel::ServiceHost,
    stats: Arc<StatsInner>,
}

impl Default for ServiceHost {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ServiceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.v1.fmt(f)
    }
}

impl ServiceHost {
    pub fn new() -> Self {
        Self {
            v1: callcancel::ServiceHost::new(),
            stats: Arc::default(),
        }
    }
    fn refused<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if r.is_err() {
            self.stats.refused.fetch_add(1, SeqCst);
        }
        r
    }
    pub fn open_channel(&self) -> Result<Channel, Error> {
        // The v1 channel is held only to refuse and count like v2 does.
        let v1 = self.refused(self.v1.open_channel())?;
        Ok(Channel {
            shared: Arc::new(ChanShared {
                host: self.clone(),
                _v1: v1,
                faulted: AtomicBool::new(false),
                calls: Mutex::new((0, HashMap::new())),
            }),
        })
    }
    pub fn begin_call(&self) -> Result<Call, Error> {
        self.new_call(None, None)
    }
    pub fn begin_call_with_deadline(&self, deadline: Instant) -> Result<Call, Error> {
        self.new_call(None, Some(deadline))
    }
    fn new_call(
        &self,
        chan: Option<&Arc<ChanShared>>,
        deadline: Option<Instant>,
    ) -> Result<Call, Error> {
        let sub = self.refused(self.v1.open_channel())?;
        let v1 = self.refused(sub.begin_call())?;
        let shared = Arc::new(CallShared {
            watch: v1.watch(),
            sub,
            reason: AtomicU8::new(0),
            completed: AtomicBool::new(false),
            stats: Arc::clone(&self.stats),
            timer: Mutex::new(None),
        });
        let mut call = Call {
            ctx: OperationContext {
                v1: Some(v1),
                shared: Arc::clone(&shared),
                deadline,
                chan: None,
            },
        };
        if let Some(ch) = chan {
            let id = {
                let mut g = ch.calls.lock().unwrap();
                g.0 += 1;
                let id = g.0;
                g.1.insert(id, Arc::clone(&shared));
                id
            };
            call.ctx.chan = Some((Arc::clone(ch), id));
            if ch.faulted.load(SeqCst) {
                shared.cancel(CancelReason::ChannelFaulted);
            }
        }
        if let Some(d) = deadline {
            if d <= Instant::now() {
                shared.cancel(CancelReason::DeadlineExceeded);
            } else {
                let s = Arc::clone(&shared);
                let fire = async move {
                    tokio::time::sleep_until(d.into()).await;
                    s.cancel(CancelReason::DeadlineExceeded);
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => *shared.timer.lock().unwrap() = Some(h.spawn(fire).abort_handle()),
                    Err(_) => {
                        let s = Arc::clone(&shared);
                        std::thread::spawn(move || {
                            std::thread::sleep(d.saturating_duration_since(Instant::now()));
                            s.cancel(CancelReason::DeadlineExceeded);
                        });
                    }
                }
            }
        }
        Ok(call)
    }
    pub fn abort(&self) {
        self.v1.abort()
    }
    pub fn close(&self, timeout: Duration) -> Result<(), Error> {
        self.v1.close(timeout)
    }
    pub fn close_async(&self, timeout: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        let h = self.clone();
        async move {
            h.begin_close();
            if tokio::time::timeout(timeout, h.idle()).await.is_ok() {
                return h.close(Duration::ZERO);
            }
            h.abort();
            h.idle().await;
            let _ = h.close(Duration::ZERO);
            Err(Error::Timeout)
        }
    }
    pub fn begin_close(&self) -> HostState {
        self.v1.begin_close()
    }
    pub fn state(&self) -> HostState {
        self.v1.state()
    }
    pub fn in_flight(&self) -> usize {
        self.v1.in_flight()
    }
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.v1.wait_idle(timeout)
    }
    pub fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        self.v1.idle()
    }
    pub fn stats(&self) -> HostStats {
        let mut cancelled = [0; 5];
        for (i, c) in self.stats.cancelled.iter().enumerate() {
            cancelled[i] = c.load(SeqCst);
        }
        HostStats {
            in_flight: self.in_flight(),
            refused: self.stats.refused.load(SeqCst),
            cancelled,
        }
    }
}

struct ChanShared {
    host: ServiceHost,
    _v1: callcancel::Channel,
    faulted: AtomicBool,
    calls: Mutex<(u64, HashMap<u64, Arc<CallShared>>)>,
}

/// A channel (connection) of a host.
#[derive(Clone)]
pub struct Channel {
    shared: Arc<ChanShared>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("faulted", &self.is_faulted())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Channel {
    pub fn begin_call(&self) -> Result<Call, Error> {
        self.begin(None)
    }
    pub fn begin_call_with_deadline(&self, deadline: Instant) -> Result<Call, Error> {
        self.begin(Some(deadline))
    }
    fn begin(&self, deadline: Option<Instant>) -> Result<Call, Error> {
        if self.is_faulted() {
            self.shared.host.stats.refused.fetch_add(1, SeqCst);
            return Err(Error::ChannelFaulted);
        }
        self.shared.host.new_call(Some(&self.shared), deadline)
    }
    pub fn fault(&self) {
        self.shared.faulted.store(true, SeqCst);
        let calls: Vec<_> = self
            .shared
            .calls
            .lock()
            .unwrap()
            .1
            .values()
            .cloned()
            .collect();
        for c in calls {
            c.cancel(CancelReason::ChannelFaulted);
        }
    }
    pub fn is_faulted(&self) -> bool {
        self.shared.faulted.load(SeqCst)
    }
    pub fn in_flight(&self) -> usize {
        self.shared.calls.lock().unwrap().1.len()
    }
}

struct CallShared {
    watch: callcancel::CancelWatch,
    sub: callcancel::Channel,
    reason: AtomicU8,
    completed: AtomicBool,
    stats: Arc<StatsInner>,
    timer: Mutex<Option<tokio::task::AbortHandle>>,
}

impl CallShared {
    fn cancel(&self, reason: CancelReason) -> bool {
        if self.completed.load(SeqCst) || self.watch.cancel_reason().is_some() {
            return false;
        }
        if self
            .reason
            .compare_exchange(0, reason.code(), SeqCst, SeqCst)
            .is_err()
        {
            return false;
        }
        self.stats.cancelled[reason.code() as usize].fetch_add(1, SeqCst);
        self.sub.fault();
        true
    }
    fn translate(&self, r: callcancel::CancelReason) -> CancelReason {
        CancelReason::from_code(self.reason.load(SeqCst))
            .unwrap_or_else(|| CancelReason::from_v1(r))
    }
}

/// A call's operation context (v2 surface).
pub struct OperationContext {
    v1: Option<callcancel::Call>,
    shared: Arc<CallShared>,
    deadline: Option<Instant>,
    chan: Option<(Arc<ChanShared>, u64)>,
}

impl fmt::Debug for OperationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperationContext")
            .field("cancel_reason", &self.cancel_reason())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl OperationContext {
    fn v1(&self) -> &callcancel::Call {
        self.v1.as_ref().expect("call in flight")
    }
    pub fn register_for_cancel<S, C>(&self, state: S, on_cancel: C) -> Result<(), RegisterError<S>>
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
    {
        self.register_for_cancel_with_free(state, on_cancel, drop::<S>)
    }
    pub fn register_for_cancel_with_free<S, C, F>(
        &self,
        state: S,
        on_cancel: C,
        on_free: F,
    ) -> Result<(), RegisterError<S>>
    where
        S: Send + 'static,
        C: FnOnce(CancelReason, &S) + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        let sh = Arc::clone(&self.shared);
        self.v1().register_for_cancel_with_free(
            state,
            move |r, s| on_cancel(sh.translate(r), s),
            on_free,
        )
    }
    pub fn is_cancelled(&self) -> bool {
        self.v1().is_cancelled()
    }
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.v1().cancel_reason().map(|r| self.shared.translate(r))
    }
    pub async fn cancelled(&self) -> CancelReason {
        self.shared.translate(self.v1().cancelled().await)
    }
    pub async fn run_until_cancelled<F: Future>(&self, fut: F) -> Result<F::Output, CancelReason> {
        tokio::select! {
            biased;
            r = self.cancelled() => Err(r),
            v = fut => Ok(v),
        }
    }
    pub fn watch(&self) -> CancelWatch {
        CancelWatch {
            v1: self.v1().watch(),
            shared: Arc::clone(&self.shared),
        }
    }
    pub fn cancel(&self) -> bool {
        self.shared.cancel(CancelReason::CallCancelled)
    }
    pub fn canceller(&self) -> Canceller {
        Canceller {
            shared: Arc::clone(&self.shared),
        }
    }
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// A call in flight (v2 surface).
#[derive(Debug)]
pub struct Call {
    ctx: OperationContext,
}

impl Call {
    pub fn complete(self) {
        drop(self)
    }
    pub fn context(&self) -> &OperationContext {
        &self.ctx
    }
}

impl std::ops::Deref for Call {
    type Target = OperationContext;
    fn deref(&self) -> &OperationContext {
        &self.ctx
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let ctx = &mut self.ctx;
        ctx.shared.completed.store(true, SeqCst);
        if let Some(t) = ctx.shared.timer.lock().unwrap().take() {
            t.abort();
        }
        if let Some((ch, id)) = ctx.chan.take() {
            ch.calls.lock().unwrap().1.remove(&id);
        }
        drop(ctx.v1.take());
    }
}

/// Cancels the call it was taken from (v2).
#[derive(Clone)]
pub struct Canceller {
    shared: Arc<CallShared>,
}

impl fmt::Debug for Canceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Canceller")
    }
}

impl Canceller {
    pub fn cancel(&self) -> bool {
        self.shared.cancel(CancelReason::CallCancelled)
    }
}

/// A `'static` watch on a call's cancellation.
#[derive(Clone)]
pub struct CancelWatch {
    v1: callcancel::CancelWatch,
    shared: Arc<CallShared>,
}

impl fmt::Debug for CancelWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelWatch")
            .field("cancel_reason", &self.cancel_reason())
            .finish()
    }
}

/// The `'static` future of [`CancelWatch::cancelled`].
pub type WatchCancelled = Pin<Box<dyn Future<Output = Option<CancelReason>> + Send>>;

impl CancelWatch {
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.v1.cancel_reason().map(|r| self.shared.translate(r))
    }
    pub fn is_finished(&self) -> bool {
        self.v1.is_finished()
    }
    pub fn cancelled(&self) -> WatchCancelled {
        let w = self.clone();
        Box::pin(async move { w.v1.cancelled().await.map(|r| w.shared.translate(r)) })
    }
}
