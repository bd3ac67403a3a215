//! A2 and close(): in-flight accounting after abort, wait_idle, graceful close,
//! close timeout, close of an aborted host.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use callcancel::{CancelReason, Error, HostState, ServiceHost};
use common::{wait_until, within_watchdog, Probe, WATCHDOG};

#[test]
fn in_flight_counts_until_completion_after_abort() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let a = ch.begin_call().unwrap();
    let b = host.begin_call().unwrap();
    let pa = Probe::new();
    pa.register(&a).unwrap();
    host.abort();
    assert_eq!(host.in_flight(), 2, "abort does not forget in-flight calls");
    assert_eq!(ch.in_flight(), 1);
    assert!(!host.wait_idle(Duration::from_millis(10)));
    a.complete();
    assert_eq!(host.in_flight(), 1);
    assert_eq!(ch.in_flight(), 0);
    assert!(!host.wait_idle(Duration::ZERO));
    b.complete();
    assert_eq!(host.in_flight(), 0);
    assert!(host.wait_idle(Duration::ZERO));
    assert_eq!(pa.frees(), 1);
}

#[test]
fn wait_idle_returns_true_when_another_thread_completes() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        d.store(true, SeqCst);
        call.complete();
    });
    assert!(host.wait_idle(WATCHDOG), "wait_idle must report idleness");
    assert!(
        done.load(SeqCst),
        "wait_idle returned before the call completed"
    );
    assert_eq!(host.in_flight(), 0);
    t.join().unwrap();
}

#[test]
fn wait_idle_times_out_while_a_call_is_pending() {
    let host = ServiceHost::new();
    let _call = host.begin_call().unwrap();
    let start = Instant::now();
    assert!(!host.wait_idle(Duration::from_millis(50)));
    assert!(
        start.elapsed() >= Duration::from_millis(45),
        "wait_idle returned early"
    );
}

#[test]
fn close_on_an_idle_open_host_closes_and_refuses_work() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    assert_eq!(host.close(Duration::from_secs(1)), Ok(()));
    assert_eq!(host.state(), HostState::Closed);
    assert_eq!(host.open_channel().err(), Some(Error::HostClosed));
    assert_eq!(host.begin_call().err(), Some(Error::HostClosed));
    assert_eq!(ch.begin_call().err(), Some(Error::HostClosed));
    assert_eq!(host.close(Duration::ZERO), Ok(()), "close on Closed is Ok");
    assert_eq!(host.state(), HostState::Closed);
}

#[test]
fn graceful_close_waits_for_calls_without_cancelling_them() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();

    let closer = {
        let host = host.clone();
        thread::spawn(move || host.close(WATCHDOG))
    };
    wait_until("state Closing", || host.state() == HostState::Closing);
    assert_eq!(host.open_channel().err(), Some(Error::HostClosed));
    assert_eq!(host.begin_call().err(), Some(Error::HostClosed));
    assert_eq!(ch.begin_call().err(), Some(Error::HostClosed));
    assert!(
        !closer.is_finished(),
        "close must wait for the in-flight call"
    );
    assert_eq!(probe.cancels(), 0, "graceful close does not cancel");
    assert!(!call.is_cancelled());

    call.complete();
    assert_eq!(closer.join().unwrap(), Ok(()));
    assert_eq!(host.state(), HostState::Closed);
    assert_eq!((probe.cancels(), probe.frees()), (0, 1));
}

#[test]
fn close_timeout_aborts_the_rest_and_returns_timeout() {
    // T18
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    let h = host.clone();
    let (res, took) = within_watchdog("close must not wait past its deadline", move || {
        let start = Instant::now();
        let res = h.close(Duration::from_millis(100));
        (res, start.elapsed())
    });
    assert_eq!(res, Err(Error::Timeout));
    assert!(
        took >= Duration::from_millis(90),
        "close gave up after {took:?}"
    );
    assert!(
        took < WATCHDOG,
        "close must not wait for the call after the deadline"
    );
    assert_eq!(host.state(), HostState::Aborted);
    assert_eq!(
        probe.cancels(),
        1,
        "the deadline aborts the remaining calls"
    );
    assert_eq!(probe.reason(), Some(CancelReason::HostAbort));
    assert_eq!(
        host.in_flight(),
        1,
        "the call still counts until it completes"
    );
    assert_eq!(host.begin_call().err(), Some(Error::HostAborted));
    assert!(!ch.is_faulted());

    call.complete();
    assert_eq!(probe.frees(), 1);
    assert!(host.wait_idle(Duration::ZERO));
    assert_eq!(host.close(Duration::from_secs(1)), Ok(()));
    assert_eq!(host.state(), HostState::Closed);
}

#[test]
fn close_of_an_aborted_host_waits_for_calls_then_closes() {
    // T3 / T12: abort, then close, then free.
    let host = ServiceHost::new();
    let call = host.open_channel().unwrap().begin_call().unwrap();
    let probe = Probe::new();
    let (tx, rx) = mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    call.register_for_cancel_with_free(
        Arc::clone(&probe),
        move |r, p: &Arc<Probe>| {
            p.on_cancel(r);
            tx.lock().unwrap().send(()).unwrap(); // "set the event"
        },
        |p| p.on_free(),
    )
    .unwrap();
    let completed = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&completed);
    let op = thread::spawn(move || {
        rx.recv_timeout(WATCHDOG)
            .expect("cancel never signalled the operation");
        thread::sleep(Duration::from_millis(50)); // keep using the call a little
        c.store(true, SeqCst);
        call.complete();
    });
    host.abort();
    assert_eq!(host.state(), HostState::Aborted);
    assert_eq!(host.close(WATCHDOG), Ok(()));
    assert!(
        completed.load(SeqCst),
        "close returned before the call completed"
    );
    assert_eq!(host.state(), HostState::Closed);
    assert_eq!(host.in_flight(), 0);
    assert_eq!(
        (probe.cancels(), probe.frees(), probe.violations()),
        (1, 1, 0)
    );
    op.join().unwrap();
}

#[test]
fn in_flight_includes_a_running_cancel_callback() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    call.register_for_cancel(entered_tx, move |_, entered| {
        entered.send(()).unwrap();
        release_rx.lock().unwrap().recv_timeout(WATCHDOG).unwrap();
    })
    .unwrap();
    let aborter = {
        let host = host.clone();
        thread::spawn(move || host.abort())
    };
    entered_rx.recv_timeout(WATCHDOG).unwrap();
    within_watchdog("complete during callback", move || call.complete());
    assert_eq!(host.in_flight(), 1);
    assert_eq!(ch.in_flight(), 1);
    let closer = {
        let host = host.clone();
        thread::spawn(move || host.close(WATCHDOG))
    };
    thread::sleep(Duration::from_millis(20));
    assert!(
        !closer.is_finished(),
        "close must wait for the running callback"
    );
    release_tx.send(()).unwrap();
    aborter.join().unwrap();
    assert_eq!(closer.join().unwrap(), Ok(()));
    assert_eq!(host.in_flight(), 0);
    assert_eq!(ch.in_flight(), 0);
    assert_eq!(host.state(), HostState::Closed);
}

#[test]
fn channel_in_flight_is_per_channel() {
    let host = ServiceHost::new();
    let a = host.open_channel().unwrap();
    let b = host.open_channel().unwrap();
    let a_calls: Vec<_> = (0..3).map(|_| a.begin_call().unwrap()).collect();
    let b_call = b.begin_call().unwrap();
    let h_call = host.begin_call().unwrap();
    assert_eq!(a.in_flight(), 3);
    assert_eq!(a.clone().in_flight(), 3, "clones share the channel");
    assert_eq!(b.in_flight(), 1);
    assert_eq!(host.in_flight(), 5);
    drop(a_calls);
    assert_eq!(a.in_flight(), 0);
    assert_eq!(host.in_flight(), 2);
    drop((b_call, h_call));
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn in_flight_includes_a_running_free() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    call.register_for_cancel_with_free(
        (entered_tx, release_rx),
        |_, _| {},
        |(entered, release)| {
            entered.send(()).unwrap();
            release.recv_timeout(WATCHDOG).unwrap();
        },
    )
    .unwrap();
    let completer = thread::spawn(move || call.complete());
    entered_rx
        .recv_timeout(WATCHDOG)
        .expect("free did not run at completion");
    assert_eq!(host.in_flight(), 1, "a call counts until its free finished");
    assert_eq!(ch.in_flight(), 1);
    assert!(!host.wait_idle(Duration::from_millis(10)));
    release_tx.send(()).unwrap();
    completer.join().unwrap();
    assert_eq!(host.in_flight(), 0);
    assert_eq!(ch.in_flight(), 0);
    assert!(host.wait_idle(Duration::ZERO));
}
