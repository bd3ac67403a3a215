//! loom model: two threads abort the host at once.
//!
//! Rules: R1 (the callback runs once), A1 (when *each* `abort` returns, the
//! callback has been invoked, by this thread or the other), A2 (the call is
//! still counted until it completes), R2.
#![cfg(loom)]

mod common;

use callcancel::{CancelReason, HostState, ServiceHost};
use common::Probe;

#[test]
fn two_aborts_at_once() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();

        let aborters: Vec<_> = (0..2)
            .map(|_| {
                let host = host.clone();
                let p = std::sync::Arc::clone(&p);
                loom::thread::spawn(move || {
                    host.abort();
                    assert_eq!(p.started(), 1, "A1: callback invoked when abort returns");
                })
            })
            .collect();
        for a in aborters {
            a.join().unwrap();
        }

        assert_eq!(p.cancels(), 1, "R1");
        assert_eq!(p.reason(), Some(CancelReason::HostAbort));
        assert_eq!(host.state(), HostState::Aborted);
        assert_eq!(host.in_flight(), 1, "A2");
        call.complete();
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}

/// Issue 12 #3: a sweeper that lost the race must not return before the
/// callback the winner claimed has been invoked, even while the winner is
/// still busy (waking a parked watch, or simply preempted between claim and
/// run). Two faults race; each asserts A1 when it returns. (A sweep now
/// takes `STARTED` in its claim CAS, so the loser returns on seeing it; the
/// wait for a claim without it is modelled by
/// `deadline::fault_waits_for_a_claimed_deadline_job`, where mutant
/// `no_started_wait` is caught.)
#[test]
fn two_faults_with_a_parked_watch() {
    use std::future::Future;
    use std::task::{Context, Waker};
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let mut watch = Box::pin(call.watch().cancelled());
        assert!(watch
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending());
        let faulters: Vec<_> = (0..2)
            .map(|_| {
                let channel = channel.clone();
                let p = std::sync::Arc::clone(&p);
                loom::thread::spawn(move || {
                    channel.fault();
                    assert_eq!(p.started(), 1, "A1: callback invoked when fault returns");
                })
            })
            .collect();
        for f in faulters {
            f.join().unwrap();
        }
        assert_eq!(p.cancels(), 1, "R1");
        drop(watch);
        call.complete();
        p.assert_settled();
    });
}
