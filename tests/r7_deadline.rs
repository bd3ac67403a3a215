//! R7: deadlines. A call's `DeadlineExceeded` is decided no earlier than its
//! deadline, by the crate's own timer thread (no runtime, no user thread),
//! and a call that completes first leaves nothing behind. The 2 ms bound on
//! an idle machine is a benchmark target (`benches/deadline.rs`); the tests
//! here use generous bounds (shared, noisy machines).

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callcancel::{CancelReason, ServiceHost};
use common::{Probe, WATCHDOG};

#[test]
fn a_deadline_cancels_never_early() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let (tx, rx) = mpsc::channel();
    let mut calls = Vec::new();
    let t0 = Instant::now();
    for i in 0..200u64 {
        let at = t0 + Duration::from_millis(5 + i % 40);
        let call = ch.begin_call_with_deadline(at).unwrap();
        assert_eq!(call.deadline(), Some(at));
        let tx = tx.clone();
        call.register_for_cancel(tx, move |reason, tx| {
            tx.send((reason, at, Instant::now())).unwrap();
        })
        .unwrap();
        calls.push(call);
    }
    for _ in 0..200 {
        let (reason, at, fired) = rx.recv_timeout(WATCHDOG).expect("every deadline fires");
        assert_eq!(reason, CancelReason::DeadlineExceeded);
        assert!(fired >= at, "R7: fired {:?} early", at - fired);
    }
    for c in &calls {
        assert_eq!(c.cancel_reason(), Some(CancelReason::DeadlineExceeded));
    }
    drop(calls);
    let stats = host.stats();
    assert_eq!(stats.cancelled(CancelReason::DeadlineExceeded), 200);
    assert_eq!(stats.in_flight, 0);
}

#[test]
fn a_deadline_in_the_past_gives_a_call_in_flight_and_cancelled() {
    let host = ServiceHost::new();
    let past = Instant::now() - Duration::from_millis(1);
    let call = host.begin_call_with_deadline(past).unwrap();
    assert_eq!(call.cancel_reason(), Some(CancelReason::DeadlineExceeded));
    assert_eq!(host.in_flight(), 1);
    let p = Probe::new();
    p.register(&call).unwrap();
    assert_eq!(p.cancels(), 1, "R4: the callback runs inside register");
    call.complete();
    assert_eq!(p.frees(), 1);
    assert_eq!(host.stats().cancelled(CancelReason::DeadlineExceeded), 1);
}

#[test]
fn completing_first_means_the_deadline_runs_nothing() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let at = Instant::now() + Duration::from_millis(30);
    let probes: Vec<_> = (0..100)
        .map(|_| {
            let call = ch.begin_call_with_deadline(at).unwrap();
            let p = Probe::new();
            p.register(&call).unwrap();
            call.complete();
            p
        })
        .collect();
    // Later calls reuse the same slots: the stale deadlines must not hit them.
    let later: Vec<_> = (0..100).map(|_| ch.begin_call().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(80));
    assert!(probes.iter().all(|p| p.cancels() == 0 && p.frees() == 1));
    assert!(later.iter().all(|c| !c.is_cancelled()), "R6");
    assert_eq!(host.stats().cancelled(CancelReason::DeadlineExceeded), 0);
}

#[test]
fn first_reason_wins_between_a_deadline_and_a_cancel() {
    let host = ServiceHost::new();
    let call = host
        .begin_call_with_deadline(Instant::now() + Duration::from_millis(5))
        .unwrap();
    assert!(call.cancel());
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(call.cancel_reason(), Some(CancelReason::CallCancelled));
    assert_eq!(host.stats().cancelled(CancelReason::DeadlineExceeded), 0);
}

#[test]
fn far_future_deadlines_are_accepted_and_cost_nothing_once_completed() {
    let host = ServiceHost::new();
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    for _ in 0..1000 {
        let call = host.begin_call_with_deadline(far).unwrap();
        assert_eq!(call.deadline(), Some(far));
        assert!(!call.is_cancelled());
    }
    assert_eq!(host.in_flight(), 0);
}

/// A blocking service with no async runtime at all: the `Block` operation
/// of WWSAPI's example, woken by its deadline.
#[test]
fn a_blocked_thread_is_woken_by_its_deadline() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch
        .begin_call_with_deadline(Instant::now() + Duration::from_millis(20))
        .unwrap();
    let event = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    call.register_for_cancel(Arc::clone(&event), |_, ev| {
        *ev.0.lock().unwrap() = true;
        ev.1.notify_all();
    })
    .unwrap();
    let (set, _) = event
        .1
        .wait_timeout_while(event.0.lock().unwrap(), WATCHDOG, |set| !*set)
        .unwrap();
    assert!(*set, "woken by the deadline, not the watchdog");
    drop(set);
    assert_eq!(call.cancel_reason(), Some(CancelReason::DeadlineExceeded));
}

/// 10^4 deadlines expiring at once are all cancelled, each once.
#[test]
fn many_deadlines_expire_together() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let at = Instant::now() + Duration::from_millis(20);
    let calls: Vec<_> = (0..10_000)
        .map(|_| ch.begin_call_with_deadline(at).unwrap())
        .collect();
    common::wait_until("all expired", || {
        host.stats().cancelled(CancelReason::DeadlineExceeded) == 10_000
    });
    assert!(calls
        .iter()
        .all(|c| c.cancel_reason() == Some(CancelReason::DeadlineExceeded)));
}

#[test]
fn close_async_waits_then_aborts_at_its_timeout() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let host = ServiceHost::new();
        let quick = host.begin_call().unwrap();
        let stuck = host.begin_call().unwrap();
        let p = Probe::new();
        p.register(&stuck).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            quick.complete();
        });
        let t0 = Instant::now();
        let r = host.close_async(Duration::from_millis(50)).await;
        assert_eq!(r, Err(callcancel::Error::Timeout));
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "not before its timeout"
        );
        assert_eq!(p.reason(), Some(CancelReason::HostAbort));
        assert_eq!(host.in_flight(), 1);
        drop(stuck);
        assert_eq!(host.close_async(WATCHDOG).await, Ok(()));
        assert_eq!(host.state(), callcancel::HostState::Closed);
    });
}

#[test]
fn close_async_is_send_and_returns_once_idle() {
    fn assert_send<T: Send>(t: T) -> T {
        t
    }
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let fut = assert_send(host.close_async(WATCHDOG));
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(10));
        call.complete();
    });
    let r = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(fut);
    assert_eq!(r, Ok(()));
    t.join().unwrap();
    assert_eq!(host.state(), callcancel::HostState::Closed);
}
