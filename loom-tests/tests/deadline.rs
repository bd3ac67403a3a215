//! loom models for deadlines (R7 with R1, R5, R6): the timer's expiry races
//! the call's completion and the slot's reuse, and races a per-call cancel.
//! loom builds start no timer thread; a model thread expires the entries by
//! hand (`callcancel::loom_expire_deadlines`).
#![cfg(loom)]

mod common;

use std::time::{Duration, Instant};

use callcancel::{CancelReason, ServiceHost};
use common::Probe;

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn expire_all() -> usize {
    callcancel::loom_expire_deadlines(Instant::now() + Duration::from_secs(7200))
}

#[test]
fn deadline_vs_complete_and_reuse() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let first = channel.begin_call_with_deadline(far()).unwrap();
        let p1 = Probe::new();
        p1.register(&first).unwrap();
        let timer = loom::thread::spawn(expire_all);
        first.complete();
        let second = channel.begin_call().unwrap();
        let p2 = Probe::new();
        p2.register(&second).unwrap();
        timer.join().unwrap();
        p1.assert_settled();
        assert!(p1.cancels() <= 1);
        if p1.cancels() == 1 {
            assert_eq!(p1.reason(), Some(CancelReason::DeadlineExceeded));
        }
        assert_eq!(p2.cancels(), 0, "R6: the later call is never touched");
        second.complete();
        p2.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn deadline_vs_cancel() {
    loom::model(|| {
        let host = ServiceHost::new();
        let call = host.begin_call_with_deadline(far()).unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let timer = loom::thread::spawn(expire_all);
        let mine = call.cancel();
        timer.join().unwrap();
        assert_eq!(p.cancels(), 1, "R1");
        let want = if mine {
            CancelReason::CallCancelled
        } else {
            CancelReason::DeadlineExceeded
        };
        assert_eq!(p.reason(), Some(want), "R5");
        assert_eq!(call.cancel_reason(), Some(want));
        call.complete();
        p.assert_settled();
        let stats = host.stats();
        assert_eq!(stats.cancelled(want), 1);
    });
}

/// A1 against a deadline job: the timer claims the callback *without*
/// `STARTED` (it hands the job to a runner), so a fault that finds the call
/// claimed must wait for the job to start, or take it over, before it
/// returns. (Sweeps and `cancel()` take `STARTED` in their claim, so this
/// is where `ChannelShared::await_started` still waits; mutant
/// `no_started_wait` fails it.)
#[test]
fn fault_waits_for_a_claimed_deadline_job() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call_with_deadline(far()).unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let timer = loom::thread::spawn(expire_all);
        let faulter = {
            let (channel, p) = (channel.clone(), std::sync::Arc::clone(&p));
            loom::thread::spawn(move || {
                channel.fault();
                assert_eq!(p.started(), 1, "A1: callback invoked when fault returns");
            })
        };
        timer.join().unwrap();
        faulter.join().unwrap();
        assert_eq!(p.cancels(), 1, "R1");
        call.complete();
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}
