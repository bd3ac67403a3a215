//! A3: abort() and fault() from inside a cancel callback, from several threads at
//! once and repeatedly, without deadlock (every scenario runs under a watchdog).

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Barrier, Mutex,
    },
    thread,
    time::Duration,
};

use callcancel::{CancelReason, HostState, ServiceHost};
use common::{within_watchdog, Probe};

#[test]
fn abort_and_state_from_inside_the_abort_callback() {
    // T24
    within_watchdog("nested abort", || {
        let host = ServiceHost::new();
        let call = host.open_channel().unwrap().begin_call().unwrap();
        let probe = Probe::new();
        let states = Arc::new(Mutex::new(Vec::new()));
        let (h, st) = (host.clone(), Arc::clone(&states));
        call.register_for_cancel_with_free(
            Arc::clone(&probe),
            move |r, p: &Arc<Probe>| {
                p.on_cancel(r);
                h.abort();
                st.lock().unwrap().push(h.state());
                let _ = h.in_flight();
            },
            |p| p.on_free(),
        )
        .unwrap();
        host.abort();
        assert_eq!(
            probe.cancels(),
            1,
            "nested abort must not rerun the callback"
        );
        assert_eq!(*states.lock().unwrap(), vec![HostState::Aborted]);
        call.complete();
        assert_eq!(probe.frees(), 1);
        assert_eq!(host.close(Duration::from_secs(5)), Ok(()));
    });
}

#[test]
fn fault_of_the_same_channel_from_inside_the_fault_callback() {
    within_watchdog("nested fault", || {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let calls: Vec<_> = (0..10).map(|_| ch.begin_call().unwrap()).collect();
        let probes: Vec<_> = calls
            .iter()
            .map(|c| {
                let p = Probe::new();
                let ch2 = ch.clone();
                c.register_for_cancel_with_free(
                    Arc::clone(&p),
                    move |r, p: &Arc<Probe>| {
                        p.on_cancel(r);
                        ch2.fault();
                        assert!(ch2.is_faulted());
                    },
                    |p| p.on_free(),
                )
                .unwrap();
                p
            })
            .collect();
        ch.fault();
        for p in &probes {
            assert_eq!(p.cancels(), 1);
            assert_eq!(p.reason(), Some(CancelReason::ChannelFaulted));
        }
        drop(calls);
        for p in &probes {
            assert_eq!(p.frees(), 1);
        }
    });
}

#[test]
fn abort_from_inside_a_fault_callback_and_fault_from_inside_an_abort_callback() {
    within_watchdog("cross nesting", || {
        let host = ServiceHost::new();
        let a = host.open_channel().unwrap();
        let b = host.open_channel().unwrap();
        let ca = a.begin_call().unwrap();
        let cb = b.begin_call().unwrap();
        let pa = Probe::new();
        let pb = Probe::new();
        let h = host.clone();
        ca.register_for_cancel_with_free(
            Arc::clone(&pa),
            move |r, p: &Arc<Probe>| {
                p.on_cancel(r);
                h.abort(); // fault callback aborts the host
            },
            |p| p.on_free(),
        )
        .unwrap();
        let bb = b.clone();
        cb.register_for_cancel_with_free(
            Arc::clone(&pb),
            move |r, p: &Arc<Probe>| {
                p.on_cancel(r);
                bb.fault(); // abort callback faults its own channel
            },
            |p| p.on_free(),
        )
        .unwrap();
        a.fault();
        assert_eq!(pa.reason(), Some(CancelReason::ChannelFaulted));
        assert_eq!(
            pb.reason(),
            Some(CancelReason::HostAbort),
            "nested abort reached channel b"
        );
        assert_eq!((pa.cancels(), pb.cancels()), (1, 1));
        assert_eq!(host.state(), HostState::Aborted);
        assert!(b.is_faulted());
        drop((ca, cb));
        assert_eq!((pa.frees(), pb.frees()), (1, 1));
    });
}

#[test]
fn operation_aborts_its_own_host() {
    // T25: a "Shutdown" operation registers and then aborts its own host.
    within_watchdog("shutdown operation", || {
        let host = ServiceHost::new();
        let call = host.open_channel().unwrap().begin_call().unwrap();
        let probe = Probe::new();
        probe.register(&call).unwrap();
        host.abort(); // from the operation's own thread, while the call is in flight
        assert_eq!(probe.cancels(), 1);
        assert_eq!(probe.cancel_thread(), Some(thread::current().id()));
        call.complete();
        assert_eq!(probe.frees(), 1);
        assert_eq!(host.close(Duration::from_secs(5)), Ok(()));
    });
}

#[test]
fn callback_registers_on_another_call_during_the_sweep() {
    within_watchdog("register inside callback", || {
        for _ in 0..50 {
            let host = ServiceHost::new();
            let ch = host.open_channel().unwrap();
            let first = ch.begin_call().unwrap();
            let second = Arc::new(ch.begin_call().unwrap());
            let p1 = Probe::new();
            let p2 = Probe::new();
            let (s2, pp2) = (Arc::clone(&second), Arc::clone(&p2));
            first
                .register_for_cancel_with_free(
                    Arc::clone(&p1),
                    move |r, p: &Arc<Probe>| {
                        p.on_cancel(r);
                        // `second` is cancelled by this same abort, before or after us.
                        pp2.register(&s2).unwrap();
                    },
                    |p| p.on_free(),
                )
                .unwrap();
            host.abort();
            assert_eq!(p1.cancels(), 1);
            assert_eq!(
                p2.cancels(),
                1,
                "second call's callback must run exactly once"
            );
            assert_eq!(p2.reason(), Some(CancelReason::HostAbort));
            first.complete();
            assert_eq!(p1.frees(), 1);
            assert!(host.in_flight() >= 1);
            drop(second);
            assert_eq!(p2.frees(), 1);
            assert_eq!(host.in_flight(), 0);
        }
    });
}

#[test]
fn aborts_and_faults_from_many_threads_and_from_callbacks_repeatedly() {
    within_watchdog("concurrent nested aborts/faults", || {
        const THREADS: usize = 4;
        for round in 0..100 {
            let host = ServiceHost::new();
            let channels: Vec<_> = (0..3).map(|_| host.open_channel().unwrap()).collect();
            let nested = Arc::new(AtomicUsize::new(0));
            let mut calls = Vec::new();
            let mut probes = Vec::new();
            for i in 0..30 {
                let ch = &channels[i % 3];
                let call = ch.begin_call().unwrap();
                let p = Probe::new();
                let (h, c, n) = (
                    host.clone(),
                    channels[(i + 1) % 3].clone(),
                    Arc::clone(&nested),
                );
                call.register_for_cancel_with_free(
                    Arc::clone(&p),
                    move |r, p: &Arc<Probe>| {
                        p.on_cancel(r);
                        n.fetch_add(1, SeqCst);
                        if i % 2 == 0 {
                            h.abort();
                        } else {
                            c.fault();
                        }
                    },
                    |p| p.on_free(),
                )
                .unwrap();
                calls.push(call);
                probes.push(p);
            }
            let barrier = Barrier::new(THREADS);
            thread::scope(|s| {
                for t in 0..THREADS {
                    let (host, channels, barrier) = (&host, &channels, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        for k in 0..4 {
                            if (t + k) % 2 == 0 {
                                host.abort();
                            } else {
                                channels[(t + k + round) % 3].fault();
                            }
                        }
                    });
                }
            });
            for (i, p) in probes.iter().enumerate() {
                assert_eq!(p.cancels(), 1, "round {round} call {i}");
            }
            assert_eq!(nested.load(SeqCst), 30);
            drop(calls);
            for (i, p) in probes.iter().enumerate() {
                assert_eq!(
                    (p.frees(), p.violations()),
                    (1, 0),
                    "round {round} call {i}"
                );
            }
            assert_eq!(host.in_flight(), 0);
        }
    });
}

/// Review of e7f3db5 (medium): a call whose callback completes it (its
/// owner finishes inside the callback) is freed as soon as that callback
/// returns, not when the sweep settles its batch later on: a later
/// callback of the same sweep that waits for the earlier call's
/// free-state (a permit it hands back) gets it. Failed (the later
/// callback timed out) while the sweep deferred every such free.
#[test]
fn a_call_completed_inside_its_callback_is_freed_before_the_next_callback() {
    use std::sync::mpsc;

    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let first = ch.begin_call().unwrap();
    let second = ch.begin_call().unwrap();
    let first_owner: Arc<Mutex<Option<callcancel::Call>>> = Arc::default();
    let (permit_tx, permit_rx) = mpsc::channel::<()>();
    let (got_tx, got_rx) = mpsc::channel::<bool>();
    let owner = Arc::clone(&first_owner);
    first
        .register_for_cancel_with_free(
            (),
            move |_, _| owner.lock().unwrap().take().unwrap().complete(),
            move |()| permit_tx.send(()).unwrap(),
        )
        .unwrap();
    let permit_rx = Mutex::new(permit_rx);
    second
        .register_for_cancel_with_free(
            (),
            move |_, _| {
                let got = permit_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(5));
                got_tx.send(got.is_ok()).unwrap();
            },
            |()| {},
        )
        .unwrap();
    *first_owner.lock().unwrap() = Some(first);
    ch.fault();
    assert!(
        got_rx.recv().unwrap(),
        "the first call's free-state waited for the sweep"
    );
    second.complete();
    assert_eq!(host.in_flight(), 0);
}
