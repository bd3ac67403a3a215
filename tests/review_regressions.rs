//! Regression tests for the adversarial review of the v2 core (each failed
//! on d8145ba): a parked watch losing the reason (R5), a blocking deadline
//! callback stalling every other deadline and `close_async` (R7), nested
//! hosts' callbacks waiting for themselves (A3), and an `idle()` future
//! defeating A5.

use callcancel::{CancelReason, ServiceHost};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// F1: a watch future parked *before* the cancellation resolves None when the
/// call completes before the woken task re-polls (R5: the watch disagrees
/// with the callback / cancel_reason).
#[test]
fn parked_watch_loses_reason_when_call_completes_before_repoll() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let watch = call.watch();
    let mut fut = pin!(watch.cancelled());
    let mut cx = Context::from_waker(Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending()); // parked first
    assert!(call.cancel()); // decided: CallCancelled; the watch is woken
    assert_eq!(call.cancel_reason(), Some(CancelReason::CallCancelled));
    call.complete(); // the handler notices and finishes quickly
                     // The woken watch task runs now:
    assert_eq!(
        fut.as_mut().poll(&mut cx),
        Poll::Ready(Some(CancelReason::CallCancelled)),
        "R5: the watch was parked when CallCancelled was decided"
    );
}

/// F2: a cancel callback that blocks on the timer thread stalls every other
/// deadline in the process (R7: within 2 ms on an idle machine).
#[test]
fn blocking_deadline_callback_stalls_other_hosts_deadlines() {
    let h1 = ServiceHost::new();
    let h2 = ServiceHost::new();
    let c1 = h1
        .begin_call_with_deadline(Instant::now() + Duration::from_millis(5))
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&release);
    c1.register_for_cancel((), move |_, _| {
        // A callback that blocks for a while (e.g. joins a worker).
        let t0 = Instant::now();
        while !r.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(50)); // timer thread now blocked
    let at = Instant::now() + Duration::from_millis(10);
    let c2 = h2.begin_call_with_deadline(at).unwrap();
    let (tx, rx) = mpsc::channel();
    c2.register_for_cancel(tx, |reason, tx| tx.send((reason, Instant::now())).unwrap())
        .unwrap();
    let (reason, when) = rx.recv().unwrap();
    release.store(true, Ordering::SeqCst);
    assert_eq!(reason, CancelReason::DeadlineExceeded);
    let late = when.saturating_duration_since(at);
    assert!(late < Duration::from_millis(100), "R7: fired {late:?} late");
}

/// F2b: the same stalls close_async's timeout (capability 3's bound).
#[test]
fn blocking_deadline_callback_stalls_close_async_timeout() {
    let h1 = ServiceHost::new();
    let c1 = h1
        .begin_call_with_deadline(Instant::now() + Duration::from_millis(5))
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&release);
    c1.register_for_cancel((), move |_, _| {
        let t0 = Instant::now();
        while !r.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let h2 = ServiceHost::new();
    let _stuck = h2.begin_call().unwrap(); // ignores cancellation
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r2 = rt.block_on(h2.close_async(Duration::from_millis(20)));
    let took = t0.elapsed();
    release.store(true, Ordering::SeqCst);
    assert_eq!(r2, Err(callcancel::Error::Timeout));
    assert!(
        took < Duration::from_millis(500),
        "close_async(20ms) took {took:?}"
    );
}

/// F3: A3 across two hosts: a callback of host B, running inside a callback
/// of host A, waits for A to be idle: waits for itself (full timeout)
/// instead of answering at once.
#[test]
fn nested_host_callback_wait_idle_waits_for_itself() {
    let a = ServiceHost::new();
    let b = ServiceHost::new();
    let ca = a.begin_call().unwrap();
    let cb = b.begin_call().unwrap();
    let (a2, b2) = (a.clone(), b.clone());
    let (tx, rx) = mpsc::channel();
    cb.register_for_cancel(tx, move |_, tx| {
        let t0 = Instant::now();
        let idle = a2.wait_idle(Duration::from_millis(300));
        tx.send((idle, t0.elapsed())).unwrap();
    })
    .unwrap();
    ca.register_for_cancel((), move |_, _| b2.abort()).unwrap();
    assert!(ca.cancel());
    let (idle, took) = rx.recv().unwrap();
    assert!(!idle);
    assert!(
        took < Duration::from_millis(100),
        "waited {took:?} for itself"
    );
    drop((ca, cb));
}

/// F4: A5: an `idle()` future keeps the host alive: dropping the last
/// ServiceHost does not abort, so the call is never cancelled.
#[test]
fn idle_future_defeats_a5() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let idle = host.idle();
    drop(host); // last ServiceHost handle
    assert_eq!(call.cancel_reason(), Some(CancelReason::HostAbort), "A5");
    drop(idle);
}

/// Second review, finding 1: a deadline callback claimed by the timer but
/// queued behind a runner that another deadline callback blocks must not
/// make an abort wait forever (A1 / A3). Here that other callback blocks on
/// a lock the aborting thread holds: before the fix, a deadlock. The abort
/// now takes the queued callback over and runs it itself.
#[test]
fn abort_takes_over_a_deadline_callback_queued_behind_a_blocked_runner() {
    use std::sync::Mutex;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let lock = Arc::new(Mutex::new(()));
        let held = lock.lock().unwrap();
        let at = Instant::now() + Duration::from_millis(20);
        let x = ch.begin_call_with_deadline(at).unwrap();
        let y = ch.begin_call_with_deadline(at).unwrap();
        let l = Arc::clone(&lock);
        x.register_for_cancel((), move |_, _| drop(l.lock().unwrap()))
            .unwrap();
        let ran_y = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&ran_y);
        y.register_for_cancel((), move |_, _| r.store(true, Ordering::SeqCst))
            .unwrap();
        // Both decided by the timer; X's callback blocks on our lock.
        while x.cancel_reason().is_none() || y.cancel_reason().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        host.abort(); // must not wait for X's runner
        let y_ran = ran_y.load(Ordering::SeqCst); // A1: invoked by now
        drop(held);
        tx.send(y_ran).unwrap();
        drop((x, y));
    });
    let y_ran = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("abort deadlocked behind a blocked deadline runner");
    assert!(y_ran);
}

/// Issue 13 (W3): a channel enters its host's table only with its first
/// call, yet `HostStats::channels` counts every channel not yet disposed of
/// (idle ones too, from any thread), and an abort still reaches every
/// channel with a call (the call's first `begin_call` put it in the table).
#[test]
fn idle_channels_are_counted_and_first_calls_are_swept() {
    let host = ServiceHost::new();
    let idle: Vec<_> = (0..100).map(|_| host.open_channel().unwrap()).collect();
    assert_eq!(host.stats().channels, 100);
    let busy: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let ch = host.open_channel().unwrap();
                    let call = ch.begin_call().unwrap();
                    (ch, call)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(host.stats().channels, 104);
    assert_eq!(host.in_flight(), 4);
    host.abort();
    for (_, call) in &busy {
        assert_eq!(call.cancel_reason(), Some(CancelReason::HostAbort));
    }
    // Dropped on another thread than the one that opened them.
    std::thread::spawn(move || drop(idle)).join().unwrap();
    assert_eq!(host.stats().channels, 4);
    drop(busy);
    let stats = host.stats();
    assert_eq!((stats.channels, stats.in_flight), (0, 0));
}
