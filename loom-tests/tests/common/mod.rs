//! Shared probes for the loom models: counters that a model asserts rules
//! with. The counters are std atomics on purpose: they are test bookkeeping,
//! not part of the protocol, so they add no states for loom to explore (loom
//! runs every model thread on one OS thread, one at a time, so a std atomic
//! read is always current).
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use callcancel::{CancelReason, OperationContext, RegisterError};

/// Encodes an optional reason in a counter.
pub fn code(reason: Option<CancelReason>) -> usize {
    match reason {
        None => 0,
        Some(CancelReason::HostAbort) => 1,
        Some(CancelReason::ChannelFaulted) => 2,
        Some(CancelReason::CallCancelled) => 3,
        Some(_) => 4,
    }
}

/// Decodes [`code`].
pub fn decode(code: usize) -> Option<CancelReason> {
    match code {
        0 => None,
        1 => Some(CancelReason::HostAbort),
        2 => Some(CancelReason::ChannelFaulted),
        3 => Some(CancelReason::CallCancelled),
        4 => Some(CancelReason::DeadlineExceeded),
        _ => unreachable!(),
    }
}

/// What happened to one registration. Every callback checks R1 and R3 as it
/// runs; models check the totals.
#[derive(Default)]
pub struct Probe {
    /// Cancel callbacks that started.
    pub started: AtomicUsize,
    /// Cancel callbacks that returned.
    pub cancels: AtomicUsize,
    /// Free-state runs.
    pub frees: AtomicUsize,
    /// The reason the callback got (`code`).
    pub reason: AtomicUsize,
    /// `cancels` as seen when the free-state ran.
    pub cancels_at_free: AtomicUsize,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn started(&self) -> usize {
        self.started.load(SeqCst)
    }

    pub fn cancels(&self) -> usize {
        self.cancels.load(SeqCst)
    }

    pub fn frees(&self) -> usize {
        self.frees.load(SeqCst)
    }

    pub fn reason(&self) -> Option<CancelReason> {
        decode(self.reason.load(SeqCst))
    }

    /// Registers a callback and free-state that count into `self`;
    /// `during` runs inside the callback (a model's hook: block, abort...).
    pub fn register_with(
        self: &Arc<Self>,
        call: &OperationContext,
        during: impl FnOnce() + Send + 'static,
    ) -> Result<(), RegisterError<Arc<Probe>>> {
        let on_cancel = move |reason: CancelReason, p: &Arc<Probe>| {
            // R1: at most once. R3: never after the free-state.
            assert_eq!(p.started.fetch_add(1, SeqCst), 0, "R1: callback ran twice");
            assert_eq!(p.frees(), 0, "R3: callback saw freed state");
            p.reason.store(code(Some(reason)), SeqCst);
            during();
            assert_eq!(p.frees(), 0, "R3: state freed while the callback ran");
            p.cancels.fetch_add(1, SeqCst);
        };
        let on_free = |p: Arc<Probe>| {
            // R3: the callback, if it started, has returned.
            assert_eq!(
                p.started(),
                p.cancels(),
                "R3: freed while the callback runs"
            );
            assert_eq!(p.frees.fetch_add(1, SeqCst), 0, "R2: freed twice");
            p.cancels_at_free.store(p.cancels(), SeqCst);
        };
        call.register_for_cancel_with_free(Arc::clone(self), on_cancel, on_free)
    }

    pub fn register(
        self: &Arc<Self>,
        call: &OperationContext,
    ) -> Result<(), RegisterError<Arc<Probe>>> {
        self.register_with(call, || {})
    }

    /// After the call completed and everything joined: R2 (one free), R6
    /// (nothing ran after the free), and the reason matches the call's.
    pub fn assert_settled(&self) {
        assert_eq!(self.frees(), 1, "R2: freed exactly once");
        assert_eq!(self.started(), self.cancels(), "callback still running");
        assert_eq!(
            self.cancels(),
            self.cancels_at_free.load(SeqCst),
            "R3/R6: callback ran after the free-state"
        );
    }
}

/// A thread that faults `channel` (a clone of the handle moves into it).
pub fn spawn_fault(channel: &callcancel::Channel) -> loom::thread::JoinHandle<()> {
    let channel = channel.clone();
    loom::thread::spawn(move || channel.fault())
}

/// A thread that aborts `host` (a clone of the handle moves into it).
pub fn spawn_abort(host: &callcancel::ServiceHost) -> loom::thread::JoinHandle<()> {
    let host = host.clone();
    loom::thread::spawn(move || host.abort())
}
