//! cancelled() and idle(): woken from other threads; several waiters on one call
//! are all woken; a re-polled future wakes its latest waker.

mod common;

use std::{
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    task::{Poll, Waker},
    thread,
    time::Duration,
};

use callcancel::{CancelReason, ServiceHost};
use common::{block_on, poll_once, wait_until, within_watchdog, CountingWaker, Probe, WATCHDOG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_resolves_when_another_thread_aborts() {
    let host = ServiceHost::new();
    let call = host.open_channel().unwrap().begin_call().unwrap();
    let h = host.clone();
    let aborter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        h.abort();
    });
    let reason = tokio::time::timeout(WATCHDOG, call.cancelled())
        .await
        .expect("cancelled() was never woken");
    assert_eq!(reason, CancelReason::HostAbort);
    assert_eq!(call.cancel_reason(), Some(reason));
    aborter.join().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn two_futures_in_one_task_both_resolve_on_fault() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let c2 = ch.clone();
    let faulter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        c2.fault();
    });
    let both = async { tokio::join!(call.cancelled(), call.cancelled()) };
    let (a, b) = tokio::time::timeout(WATCHDOG, both)
        .await
        .expect("not woken");
    assert_eq!(
        (a, b),
        (CancelReason::ChannelFaulted, CancelReason::ChannelFaulted)
    );
    faulter.join().unwrap();
}

#[test]
fn several_waiters_on_separate_threads_are_all_woken() {
    const WAITERS: usize = 4;
    for round in 0..20 {
        within_watchdog("all waiters woken", move || {
            let host = ServiceHost::new();
            let ch = host.open_channel().unwrap();
            let call = ch.begin_call().unwrap();
            let parked = AtomicUsize::new(0);
            let results = thread::scope(|s| {
                let handles: Vec<_> = (0..WAITERS)
                    .map(|_| {
                        let (ctx, parked) = (call.context(), &parked);
                        s.spawn(move || {
                            let mut counted = false;
                            block_on(ctx.cancelled(), || {
                                if !counted {
                                    counted = true;
                                    parked.fetch_add(1, SeqCst);
                                }
                            })
                        })
                    })
                    .collect();
                wait_until("all waiters polled", || parked.load(SeqCst) == WAITERS);
                if round % 2 == 0 {
                    ch.fault();
                } else {
                    host.abort();
                }
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            let expected = if round % 2 == 0 {
                CancelReason::ChannelFaulted
            } else {
                CancelReason::HostAbort
            };
            assert_eq!(results, vec![expected; WAITERS]);
        });
    }
}

#[test]
fn already_cancelled_call_is_ready_on_first_poll() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    host.abort();
    let fut = pin!(call.cancelled());
    assert_eq!(
        poll_once(fut, Waker::noop()),
        Poll::Ready(CancelReason::HostAbort)
    );
}

#[test]
fn uncancelled_call_is_pending_and_does_not_wake() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let cw = Arc::new(CountingWaker::default());
    let waker = Waker::from(Arc::clone(&cw));
    let mut fut = pin!(call.cancelled());
    assert!(poll_once(fut.as_mut(), &waker).is_pending());
    assert!(poll_once(fut.as_mut(), &waker).is_pending());
    assert_eq!(cw.wakes.load(SeqCst), 0);
}

#[test]
fn repolled_future_wakes_the_latest_waker() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let first = Arc::new(CountingWaker::default());
    let second = Arc::new(CountingWaker::default());
    let mut fut = pin!(call.cancelled());
    assert!(poll_once(fut.as_mut(), &Waker::from(Arc::clone(&first))).is_pending());
    assert!(poll_once(fut.as_mut(), &Waker::from(Arc::clone(&second))).is_pending());
    thread::scope(|s| {
        s.spawn(|| ch.fault());
    });
    assert!(
        second.wakes.load(SeqCst) >= 1,
        "the most recent waker must be woken"
    );
    assert_eq!(
        poll_once(fut.as_mut(), Waker::noop()),
        Poll::Ready(CancelReason::ChannelFaulted)
    );
}

#[test]
fn each_of_several_futures_with_their_own_waker_is_woken() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let wakers: Vec<_> = (0..3).map(|_| Arc::new(CountingWaker::default())).collect();
    let mut f1 = pin!(call.cancelled());
    let mut f2 = pin!(call.cancelled());
    let mut f3 = pin!(call.cancelled());
    assert!(poll_once(f1.as_mut(), &Waker::from(Arc::clone(&wakers[0]))).is_pending());
    assert!(poll_once(f2.as_mut(), &Waker::from(Arc::clone(&wakers[1]))).is_pending());
    assert!(poll_once(f3.as_mut(), &Waker::from(Arc::clone(&wakers[2]))).is_pending());
    let h = host.clone();
    thread::spawn(move || h.abort()).join().unwrap();
    for (i, w) in wakers.iter().enumerate() {
        assert!(w.wakes.load(SeqCst) >= 1, "waiter {i} was left hanging");
    }
    for f in [f1, f2, f3] {
        assert_eq!(
            poll_once(f, Waker::noop()),
            Poll::Ready(CancelReason::HostAbort)
        );
    }
}

#[test]
fn dropping_one_waiter_does_not_strand_the_other() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let keep = Arc::new(CountingWaker::default());
    {
        let gone = Arc::new(CountingWaker::default());
        let f = pin!(call.cancelled());
        assert!(poll_once(f, &Waker::from(gone)).is_pending());
    }
    let mut f = pin!(call.cancelled());
    assert!(poll_once(f.as_mut(), &Waker::from(Arc::clone(&keep))).is_pending());
    host.abort();
    assert!(keep.wakes.load(SeqCst) >= 1);
    assert_eq!(
        poll_once(f, Waker::noop()),
        Poll::Ready(CancelReason::HostAbort)
    );
}

#[test]
fn cancelled_agrees_with_the_callback_reason() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    ch.fault();
    host.abort();
    let r = block_on(call.cancelled(), || {});
    assert_eq!(Some(r), probe.reason());
    assert_eq!(Some(r), call.cancel_reason());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_resolves_after_the_last_call_completes() {
    let host = ServiceHost::new();
    let calls: Vec<_> = (0..3).map(|_| host.begin_call().unwrap()).collect();
    let done = Arc::new(AtomicUsize::new(0));
    let d = Arc::clone(&done);
    let completer = thread::spawn(move || {
        for c in calls {
            thread::sleep(Duration::from_millis(10));
            d.fetch_add(1, SeqCst);
            c.complete();
        }
    });
    // idle() is Send + 'static: it can be spawned.
    let idle = tokio::spawn(host.idle());
    tokio::time::timeout(WATCHDOG, idle)
        .await
        .expect("idle() was never woken")
        .unwrap();
    assert_eq!(
        done.load(SeqCst),
        3,
        "idle() resolved before every call completed"
    );
    assert_eq!(host.in_flight(), 0);
    completer.join().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn idle_after_abort_waits_for_completion() {
    let host = ServiceHost::new();
    let call = host.open_channel().unwrap().begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    host.abort();
    let mut idle = Box::pin(host.idle());
    assert!(
        poll_once(idle.as_mut(), Waker::noop()).is_pending(),
        "a call is still in flight"
    );
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20)); // let idle() park first
        call.complete();
    });
    tokio::time::timeout(WATCHDOG, idle)
        .await
        .expect("idle() never resolved");
    t.join().unwrap();
    assert_eq!(probe.frees(), 1);
}

#[test]
fn idle_of_an_idle_host_is_ready_at_once() {
    let host = ServiceHost::new();
    let idle = pin!(host.idle());
    assert_eq!(poll_once(idle, Waker::noop()), Poll::Ready(()));
}
