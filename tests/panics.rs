//! Panics in user code (issue 6, item 4), beyond the basic A4 cases of
//! `a4_panics.rs`: each test states the behaviour it holds the library to.
//!
//! * A fault sweep full of panicking callbacks notifies every call, re-raises
//!   the first panic (in the order the callbacks ran) and the host keeps
//!   working: other channels, host-scope calls, new channels, a later abort
//!   and a clean close.
//! * An `on_free` that panics on the *canceller's* thread (the owner completed
//!   while the callback ran) is caught, the slot is released, and the sweep
//!   re-raises it after notifying the rest.
//! * A thread that panics while it holds registered calls completes them by
//!   unwinding through `Drop`: every state is freed once, the calls leave
//!   in-flight, and a second panic from `on_free` or from the state's `Drop`
//!   during that unwinding is swallowed (the process does not abort).
//! * A task that panics while its `cancelled()` futures are parked (slot and
//!   overflow waiters) leaves nothing dangling: later waiters are woken and
//!   the sweep does not touch the dropped ones.
//! * A hostile waker whose `wake()` panics inside a sweep.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use callcancel::{CancelReason, Error, HostState, RegisterErrorKind, ServiceHost};

const WATCHDOG: Duration = Duration::from_secs(20);

fn text(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string payload>".into()
    }
}

/// Silences the default panic hook for the expected panics of this file
/// (their messages all start with "boom"); everything else still prints.
fn quiet_expected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !text(info.payload()).starts_with("boom") {
                prev(info);
            }
        }));
    });
}

/// Per-registration counters plus a log of the order callbacks ran in.
#[derive(Default)]
struct Book {
    cancels: Vec<AtomicUsize>,
    frees: Vec<AtomicUsize>,
    reasons: Mutex<Vec<Option<CancelReason>>>,
    ran: Mutex<Vec<usize>>,
}

impl Book {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            cancels: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            frees: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            reasons: Mutex::new(vec![None; n]),
            ran: Mutex::new(Vec::new()),
        })
    }
    fn cancel(&self, i: usize, r: CancelReason) {
        self.cancels[i].fetch_add(1, SeqCst);
        self.reasons.lock().unwrap()[i] = Some(r);
        self.ran.lock().unwrap().push(i);
    }
    fn free(&self, i: usize) {
        self.frees[i].fetch_add(1, SeqCst);
    }
    fn cancels(&self, i: usize) -> usize {
        self.cancels[i].load(SeqCst)
    }
    fn frees(&self, i: usize) -> usize {
        self.frees[i].load(SeqCst)
    }
}

/// Registers call `i` of `book`: its callback panics with "boom-cb-{i}" when
/// `panic_cb`, its on_free with "boom-free-{i}" when `panic_free`.
fn register(
    ctx: &callcancel::OperationContext,
    book: &Arc<Book>,
    i: usize,
    panic_cb: bool,
    panic_free: bool,
) {
    let b = Arc::clone(book);
    ctx.register_for_cancel_with_free(
        b,
        move |r, b: &Arc<Book>| {
            b.cancel(i, r);
            if panic_cb {
                panic!("boom-cb-{i}");
            }
        },
        move |b: Arc<Book>| {
            b.free(i);
            if panic_free {
                panic!("boom-free-{i}");
            }
        },
    )
    .map_err(|_| "registration refused")
    .unwrap();
}

#[test]
fn fault_sweep_with_panicking_callbacks_notifies_all_and_the_host_keeps_working() {
    quiet_expected_panics();
    let host = ServiceHost::new();
    let bad = host.open_channel().unwrap();
    let good = host.open_channel().unwrap();
    let n = 24;
    let book = Book::new(n + 2);
    let mut calls = Vec::new();
    for i in 0..n {
        let call = bad.begin_call().unwrap();
        register(&call, &book, i, i % 3 == 1, false);
        calls.push(call);
    }
    // Untouched by the fault: a call on another channel and a host-scope call.
    let other = good.begin_call().unwrap();
    register(&other, &book, n, true, false);
    let hosted = host.begin_call().unwrap();
    register(&hosted, &book, n + 1, false, false);

    let err = catch_unwind(AssertUnwindSafe(|| bad.fault())).expect_err("fault re-raises");
    let ran = book.ran.lock().unwrap().clone();
    assert_eq!(ran.len(), n, "every call of the faulted channel notified");
    let first_panicker = *ran.iter().find(|&&i| i % 3 == 1).unwrap();
    assert_eq!(
        text(&*err),
        format!("boom-cb-{first_panicker}"),
        "the FIRST panic"
    );
    for i in 0..n {
        assert_eq!(book.cancels(i), 1, "call {i}");
        assert_eq!(
            book.reasons.lock().unwrap()[i],
            Some(CancelReason::ChannelFaulted)
        );
        assert_eq!(book.frees(i), 0, "nothing freed before completion");
    }
    // A second fault finds nothing to do and raises nothing (R1).
    bad.fault();
    assert_eq!(book.ran.lock().unwrap().len(), n);

    // The host keeps working.
    assert_eq!(host.state(), HostState::Open);
    assert_eq!(bad.begin_call().unwrap_err(), Error::ChannelFaulted);
    assert!(!other.is_cancelled() && !hosted.is_cancelled());
    let fresh = host.open_channel().unwrap();
    let c = fresh.begin_call().unwrap();
    c.complete();
    for (i, call) in calls.into_iter().enumerate() {
        call.complete();
        assert_eq!(book.frees(i), 1, "call {i} freed exactly once");
    }
    assert_eq!(bad.in_flight(), 0);
    // A later abort still reaches the others; its own panic is re-raised.
    let err = catch_unwind(AssertUnwindSafe(|| host.abort())).expect_err("abort re-raises");
    assert_eq!(text(&*err), format!("boom-cb-{n}"));
    assert_eq!(book.cancels(n), 1);
    assert_eq!(book.cancels(n + 1), 1);
    other.complete();
    hosted.complete();
    assert_eq!((book.frees(n), book.frees(n + 1)), (1, 1));
    assert_eq!(host.close(WATCHDOG), Ok(()));
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn on_free_panic_on_the_cancellers_thread_is_caught_released_and_re_raised() {
    quiet_expected_panics();
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let book = Book::new(4);
    // Call 0: its callback blocks until its owner has completed it, so the
    // canceller becomes the freer; its on_free panics there.
    let call0 = ch.begin_call().unwrap();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let b = Arc::clone(&book);
    call0
        .register_for_cancel_with_free(
            b,
            move |r, b: &Arc<Book>| {
                b.cancel(0, r);
                started_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv_timeout(WATCHDOG).unwrap();
            },
            |b: Arc<Book>| {
                b.free(0);
                panic!("boom-free-0");
            },
        )
        .unwrap();
    let mut rest = Vec::new();
    for i in 1..4 {
        let call = ch.begin_call().unwrap();
        register(&call, &book, i, false, false);
        rest.push(call);
    }
    let h = host.clone();
    let aborter = thread::spawn(move || catch_unwind(AssertUnwindSafe(|| h.abort())));
    started_rx.recv_timeout(WATCHDOG).unwrap();
    // Completing never waits for the running callback (R3) ...
    call0.complete();
    assert_eq!(book.frees(0), 0, "R3: not freed while the callback runs");
    assert_eq!(
        host.in_flight(),
        4,
        "counted until its callback and free end"
    );
    go_tx.send(()).unwrap();
    let res = aborter.join().unwrap();
    let err = res.expect_err("abort re-raises the on_free panic");
    assert_eq!(text(&*err), "boom-free-0");
    assert_eq!(book.frees(0), 1, "freed once, on the canceller's thread");
    for i in 1..4 {
        assert_eq!(book.cancels(i), 1, "call {i} notified despite the panic");
    }
    assert_eq!(host.in_flight(), 3, "call 0 released despite the panic");
    for (i, call) in rest.into_iter().enumerate() {
        call.complete();
        assert_eq!(book.frees(i + 1), 1);
    }
    assert!(host.wait_idle(WATCHDOG));
    assert_eq!(host.close(WATCHDOG), Ok(()));
}

/// A state whose drop counts and optionally panics.
struct Bomb {
    drops: Arc<AtomicUsize>,
    panic: bool,
}

impl Drop for Bomb {
    fn drop(&mut self) {
        self.drops.fetch_add(1, SeqCst);
        if self.panic {
            panic!("boom-drop");
        }
    }
}

#[test]
fn panic_while_holding_calls_completes_them_through_drop() {
    quiet_expected_panics();
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let book = Book::new(3);
    let drops = Arc::new(AtomicUsize::new(0));
    let (h, c, b, d) = (
        host.clone(),
        ch.clone(),
        Arc::clone(&book),
        Arc::clone(&drops),
    );
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let worker = thread::spawn(move || {
        let plain = c.begin_call().unwrap();
        register(&plain, &b, 0, false, false);
        // on_free panics while the thread is already unwinding: swallowed.
        let free_panics = c.begin_call().unwrap();
        register(&free_panics, &b, 1, false, true);
        // The state's own Drop panics while unwinding: swallowed too.
        let drop_panics = h.begin_call().unwrap();
        drop_panics
            .register_for_cancel(
                Bomb {
                    drops: d,
                    panic: true,
                },
                |_, _| {},
            )
            .map_err(|_| ())
            .unwrap();
        // A cancelled one as well.
        let cancelled = c.begin_call().unwrap();
        register(&cancelled, &b, 2, false, false);
        assert_eq!(h.in_flight(), 4);
        let _keep = (plain, free_panics, drop_panics, cancelled);
        ready_tx.send(()).unwrap();
        go_rx.recv_timeout(WATCHDOG).unwrap();
        panic!("boom-worker");
    });
    ready_rx.recv_timeout(WATCHDOG).unwrap();
    go_tx.send(()).unwrap();
    // The fault races the unwinding: it may land before, during or after it,
    // and every order must keep the counts exact. If the worker's unwinding
    // completes `free_panics` while the fault runs its cancel callback, the
    // fault's thread frees it, and its panicking on_free is re-raised from
    // `fault` after the sweep (A4): the one panic `fault` may return.
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| ch.fault())) {
        assert_eq!(
            text(&*p),
            "boom-free-1",
            "only the canceller-side free panics"
        );
    }
    let err = worker.join().expect_err("the worker panicked");
    assert_eq!(
        text(&*err),
        "boom-worker",
        "the first panic is the one seen"
    );
    assert_eq!(book.frees(0), 1);
    assert_eq!(book.frees(1), 1);
    assert_eq!(drops.load(SeqCst), 1);
    assert_eq!(book.frees(2), 1);
    assert!(book.cancels(2) <= 1);
    assert_eq!(host.in_flight(), 0, "every call released by unwinding");
    assert_eq!(ch.in_flight(), 0);
    assert_eq!(host.close(WATCHDOG), Ok(()));
}

#[test]
fn on_free_panic_at_complete_propagates_after_release_and_state_drop_panics_too() {
    quiet_expected_panics();
    let host = ServiceHost::new();
    let book = Book::new(1);
    let call = host.begin_call().unwrap();
    register(&call, &book, 0, false, true);
    let err = catch_unwind(AssertUnwindSafe(|| call.complete())).expect_err("propagates");
    assert_eq!(text(&*err), "boom-free-0");
    assert_eq!((book.frees(0), host.in_flight()), (1, 0));

    // A panicking drop of a plain state (register_for_cancel) after an abort.
    let drops = Arc::new(AtomicUsize::new(0));
    let call = host.begin_call().unwrap();
    call.register_for_cancel(
        Bomb {
            drops: Arc::clone(&drops),
            panic: true,
        },
        |_, _| {},
    )
    .map_err(|_| ())
    .unwrap();
    host.abort();
    assert!(call.is_cancelled());
    let err = catch_unwind(AssertUnwindSafe(move || drop(call))).expect_err("propagates");
    assert_eq!(text(&*err), "boom-drop");
    assert_eq!((drops.load(SeqCst), host.in_flight()), (1, 0));
    assert_eq!(host.close(WATCHDOG), Ok(()));
}

struct FlagWaker(AtomicBool);

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.0.store(true, SeqCst);
    }
}

#[test]
fn task_panicking_with_parked_cancelled_futures_leaves_no_dangling_waiter() {
    quiet_expected_panics();
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let book = Book::new(1);
    register(&call, &book, 0, false, false);
    let watch = call.watch();
    for round in 0..3 {
        // A task parks two `cancelled()` futures (the slot's waiter and an
        // overflow waiter) and a watch future, then panics mid-poll.
        let res = catch_unwind(AssertUnwindSafe(|| {
            let w = Arc::new(FlagWaker(AtomicBool::new(false)));
            let waker = Waker::from(w);
            let mut cx = Context::from_waker(&waker);
            let mut a = pin!(call.cancelled());
            let mut b = pin!(call.cancelled());
            let mut c = pin!(watch.cancelled());
            assert!(a.as_mut().poll(&mut cx).is_pending());
            assert!(b.as_mut().poll(&mut cx).is_pending());
            assert!(c.as_mut().poll(&mut cx).is_pending());
            panic!("boom-task-{round}");
        }));
        assert!(res.is_err());
    }
    // Fresh waiters after the panics are all woken by the fault.
    let flags: Vec<_> = (0..3)
        .map(|_| Arc::new(FlagWaker(AtomicBool::new(false))))
        .collect();
    let wakers: Vec<Waker> = flags.iter().map(|f| Waker::from(Arc::clone(f))).collect();
    let mut f1 = Box::pin(call.cancelled());
    let mut f2 = Box::pin(call.cancelled());
    let mut f3 = pin!(watch.cancelled());
    assert!(f1
        .as_mut()
        .poll(&mut Context::from_waker(&wakers[0]))
        .is_pending());
    assert!(f2
        .as_mut()
        .poll(&mut Context::from_waker(&wakers[1]))
        .is_pending());
    assert!(f3
        .as_mut()
        .poll(&mut Context::from_waker(&wakers[2]))
        .is_pending());
    ch.fault();
    for (i, f) in flags.iter().enumerate() {
        assert!(f.0.load(SeqCst), "waiter {i} woken");
    }
    let cx = &mut Context::from_waker(Waker::noop());
    assert_eq!(
        f1.as_mut().poll(cx),
        Poll::Ready(CancelReason::ChannelFaulted)
    );
    assert_eq!(
        f2.as_mut().poll(cx),
        Poll::Ready(CancelReason::ChannelFaulted)
    );
    assert_eq!(
        f3.as_mut().poll(cx),
        Poll::Ready(Some(CancelReason::ChannelFaulted))
    );
    assert_eq!(book.cancels(0), 1);
    drop((f1, f2));
    // A second registration is still refused and handed back.
    let e = call.register_for_cancel(7u8, |_, _| {}).unwrap_err();
    assert_eq!(e.kind(), RegisterErrorKind::AlreadyRegistered);
    assert_eq!(e.into_state(), 7);
    call.complete();
    assert_eq!(book.frees(0), 1);
    assert_eq!(host.in_flight(), 0);
    assert_eq!(host.close(WATCHDOG), Ok(()));
}

/// A waker from a hostile executor: `wake` panics.
struct PanickyWaker;

impl Wake for PanickyWaker {
    fn wake(self: Arc<Self>) {
        panic!("boom-waker");
    }
}

/// A `cancelled()` waiter whose waker panics inside the sweep must not cost
/// the other calls their notification, nor its own call its callback and
/// free: the state must still be freed once and the call released.
#[test]
fn panicking_waker_inside_a_sweep_skips_nothing() {
    quiet_expected_panics();
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let book = Book::new(3);
    let calls: Vec<_> = (0..3).map(|_| ch.begin_call().unwrap()).collect();
    for (i, c) in calls.iter().enumerate() {
        register(c, &book, i, false, false);
    }
    let waker = Waker::from(Arc::new(PanickyWaker));
    let mut fut = Box::pin(calls[0].cancelled());
    assert!(fut
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    let res = catch_unwind(AssertUnwindSafe(|| ch.fault()));
    assert!(res.is_err(), "the waker's panic is reported");
    for i in 0..3 {
        assert_eq!(book.cancels(i), 1, "call {i} notified");
    }
    drop(fut);
    for c in calls {
        c.complete();
    }
    for i in 0..3 {
        assert_eq!(book.frees(i), 1, "call {i} freed once");
    }
    assert!(
        host.wait_idle(Duration::from_secs(2)),
        "in_flight stuck at {}",
        host.in_flight()
    );
}
