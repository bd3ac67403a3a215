//! loom models from the adversarial review of the v2 core: several `DUTY`
//! setters at once, a canceller that frees vs the last handle, the timer's
//! take vs completion vs the last handle, a stale canceller's late wake vs a
//! reused slot's waiter, and a refused begin racing an abort (HostStats).
#![cfg(loom)]
mod common;

use std::time::{Duration, Instant};

use callcancel::{CancelReason, ServiceHost};
use common::Probe;

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Two calls finishing on an orphaned channel while the last handle drops
/// and an idle waiter takes its census (two DUTY setters at once).
#[test]
fn two_freers_last_handle_and_idle_waiter() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let c1 = channel.begin_call().unwrap();
        let c2 = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&c1).unwrap();
        let t1 = loom::thread::spawn(move || c1.complete());
        let t2 = loom::thread::spawn(move || c2.complete());
        drop(channel);
        loom::future::block_on(host.idle());
        t1.join().unwrap();
        t2.join().unwrap();
        p.assert_settled();
        let s = host.stats();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.channels, 0, "orphaned channel disposed");
    });
}

/// A canceller frees (owner completed while the callback ran) while the last
/// handle drops: the canceller's thread releases and disposes.
#[test]
fn canceller_frees_vs_last_handle() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let canceller = call.canceller();
        let t = loom::thread::spawn(move || canceller.cancel());
        let owner = loom::thread::spawn(move || call.complete());
        drop(channel);
        let _ = t.join().unwrap();
        owner.join().unwrap();
        p.assert_settled();
        let s = host.stats();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.channels, 0, "orphaned channel disposed");
    });
}

/// The timer takes the entry (strong ref) while the owner completes and the
/// last handle drops.
#[test]
fn deadline_take_vs_complete_vs_last_handle() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call_with_deadline(far()).unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let timer = loom::thread::spawn(|| {
            callcancel::loom_expire_deadlines(Instant::now() + Duration::from_secs(7200))
        });
        let owner = loom::thread::spawn(move || call.complete());
        drop(channel);
        timer.join().unwrap();
        owner.join().unwrap();
        p.assert_settled();
        if p.cancels() == 1 {
            assert_eq!(p.reason(), Some(CancelReason::DeadlineExceeded));
        }
        let s = host.stats();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.channels, 0, "orphaned channel disposed");
    });
}

/// A primary cancelled() future of call 2 must be woken even when a stale
/// Marked canceller of call 1 (same slot) wakes late.
#[test]
fn stale_marked_wake_vs_reused_slot_waiter() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let first = channel.begin_call().unwrap();
        let canceller = first.canceller();
        let t = loom::thread::spawn(move || canceller.cancel());
        // a watch on the first call parks in overflow so OVERFLOW is set
        first.complete();
        let second = channel.begin_call().unwrap();
        let ch2 = channel.clone();
        let f = loom::thread::spawn(move || ch2.fault());
        let r = loom::future::block_on(second.cancelled());
        assert_eq!(r, CancelReason::ChannelFaulted);
        let _ = t.join().unwrap();
        f.join().unwrap();
        second.complete();
    });
}

/// A begin refused by its SeqCst re-check must not be counted as a
/// cancelled call (HostStats: "calls cancelled with that reason").
#[test]
fn refused_begin_is_not_counted_cancelled() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let h = host.clone();
        let t = loom::thread::spawn(move || h.abort());
        let r = channel.begin_call();
        let began = r.is_ok();
        drop(r);
        t.join().unwrap();
        let s = host.stats();
        assert!(
            s.cancelled(CancelReason::HostAbort) <= u64::from(began),
            "refused begin counted as cancelled: began={began} stats={s:?}"
        );
    });
}
