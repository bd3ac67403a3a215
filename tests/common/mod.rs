//! Shared helpers for the integration tests: a counting probe that records every
//! cancel callback and every free-state, a watchdog for deadlock-prone scenarios
//! and a tiny `block_on`.
#![allow(dead_code)]

use std::{
    future::Future,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst},
        mpsc, Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
    thread::{self, ThreadId},
    time::Duration,
};

use callcancel::{CancelReason, OperationContext, RegisterError};

/// Generous bound for anything that should finish "at once"; only reached when a
/// test is about to fail (deadlock or lost wake-up).
pub const WATCHDOG: Duration = Duration::from_secs(20);

const STARTED: u32 = 1;
const DONE: u32 = 2;
const FREED: u32 = 4;

/// Records what happened to one registration.
#[derive(Debug, Default)]
pub struct Probe {
    cancels: AtomicUsize,
    frees: AtomicUsize,
    phase: AtomicU32,
    violations: AtomicUsize,
    reason: Mutex<Option<CancelReason>>,
    cancel_thread: Mutex<Option<ThreadId>>,
    free_thread: Mutex<Option<ThreadId>>,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The body of a cancel callback: checks the state was not freed yet.
    pub fn on_cancel(&self, reason: CancelReason) {
        let before = self.phase.fetch_or(STARTED, SeqCst);
        if before & FREED != 0 {
            self.violations.fetch_add(1, SeqCst); // callback saw freed state
        }
        self.cancels.fetch_add(1, SeqCst);
        *self.reason.lock().unwrap() = Some(reason);
        *self.cancel_thread.lock().unwrap() = Some(thread::current().id());
        self.phase.fetch_or(DONE, SeqCst);
    }

    /// The body of a free-state: checks no cancel callback is still running.
    pub fn on_free(&self) {
        let before = self.phase.fetch_or(FREED, SeqCst);
        if before & STARTED != 0 && before & DONE == 0 {
            self.violations.fetch_add(1, SeqCst); // free while cancel running
        }
        self.frees.fetch_add(1, SeqCst);
        *self.free_thread.lock().unwrap() = Some(thread::current().id());
    }

    /// Registers with an explicit `on_free`; the state is a clone of the probe.
    pub fn register(
        self: &Arc<Self>,
        ctx: &OperationContext,
    ) -> Result<(), RegisterError<Arc<Self>>> {
        ctx.register_for_cancel_with_free(
            Arc::clone(self),
            |reason, p: &Arc<Probe>| p.on_cancel(reason),
            |p| p.on_free(),
        )
    }

    /// Registers without `on_free`: the free-state is the drop of a [`DropToken`].
    pub fn register_drop(
        self: &Arc<Self>,
        ctx: &OperationContext,
    ) -> Result<(), RegisterError<DropToken>> {
        ctx.register_for_cancel(DropToken(Arc::clone(self)), |reason, t: &DropToken| {
            t.0.on_cancel(reason)
        })
    }

    pub fn cancels(&self) -> usize {
        self.cancels.load(SeqCst)
    }
    pub fn frees(&self) -> usize {
        self.frees.load(SeqCst)
    }
    pub fn violations(&self) -> usize {
        self.violations.load(SeqCst)
    }
    pub fn reason(&self) -> Option<CancelReason> {
        *self.reason.lock().unwrap()
    }
    pub fn cancel_thread(&self) -> Option<ThreadId> {
        *self.cancel_thread.lock().unwrap()
    }
    pub fn free_thread(&self) -> Option<ThreadId> {
        *self.free_thread.lock().unwrap()
    }
    /// The cancel callback has returned (it started and finished).
    pub fn cancel_finished(&self) -> bool {
        self.phase.load(SeqCst) & DONE != 0
    }
}

/// A state whose drop is the free-state of `register_for_cancel`.
#[derive(Debug)]
pub struct DropToken(pub Arc<Probe>);

impl Drop for DropToken {
    fn drop(&mut self) {
        self.0.on_free();
    }
}

/// A state that counts how often it is dropped (to prove the library does not
/// drop a state it handed to `on_free` or back in a `RegisterError`).
#[derive(Debug)]
pub struct Counted(pub Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// Runs `f` on a fresh thread and fails the test if it does not finish within
/// [`WATCHDOG`] (a deadlock). Panics from `f` propagate.
pub fn within_watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let out = f();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {WATCHDOG:?} (deadlock or lost wake-up)")
        }
    }
}

/// Spins (yielding) until `cond` holds; panics after [`WATCHDOG`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WATCHDOG;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

struct ThreadWaker {
    thread: thread::Thread,
    woken: AtomicBool,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        self.thread.unpark();
    }
}

/// Minimal single-future executor on the current thread. `on_pending` runs after
/// every poll that returned `Pending` (used to signal "this waiter is parked").
pub fn block_on<F: Future>(fut: F, mut on_pending: impl FnMut()) -> F::Output {
    let tw = Arc::new(ThreadWaker {
        thread: thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(Arc::clone(&tw));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        on_pending();
        // Only a real wake-up lets us poll again (no busy re-polling that would
        // hide a lost wake-up).
        while !tw.woken.swap(false, SeqCst) {
            thread::park();
        }
    }
}

/// Counts how often it is woken.
#[derive(Debug, Default)]
pub struct CountingWaker {
    pub wakes: AtomicUsize,
}

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, SeqCst);
    }
}

/// Polls a future once with `waker`.
pub fn poll_once<F: Future + ?Sized>(fut: std::pin::Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(waker))
}

/// Small deterministic PRNG (xorshift64*), so tests need no extra crates.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Busy-waits for a small random number of spins (to vary interleavings).
pub fn jitter(rng: &mut Rng, max_spins: u64) {
    for _ in 0..rng.below(max_spins + 1) {
        std::hint::spin_loop();
    }
}
