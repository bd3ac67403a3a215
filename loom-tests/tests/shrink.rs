//! loom models: a census gives a burst's segments back (issue 13) while
//! other threads still hold slot references or claim slots.
//!
//! * `stale_canceller_vs_shrink`: a `Canceller` and a `CancelWatch` of a call
//!   in a high segment outlive the call; a census retires and frees that
//!   segment while they are used. They must either see the (retired) slot
//!   under their walk, or see the segment gone: never freed memory (loom
//!   reports a use of a dropped object), never a cancel of another call.
//! * `begin_call_vs_shrink`: calls begin while the census retires the top
//!   segment; each claim either wins its slot before the retirement (then
//!   the segment stays) or goes elsewhere, and an abort afterwards finds
//!   every call (R4).
//!
//! Under loom a slab's first segment holds 2 slots, then 4, then 8.
#![cfg(loom)]

use callcancel::{CancelReason, ServiceHost};

/// The set-up (7 calls, a census over 3 segments) has many atomic steps,
/// each a branch point for loom: raise its branch limit.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 50_000;
    b.check(f);
}

#[test]
fn stale_canceller_vs_shrink() {
    model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        // 7 calls: segment 0 (2), 1 (4), 2 (1): the last is in segment 2.
        let mut calls: Vec<_> = (0..7).map(|_| channel.begin_call().unwrap()).collect();
        let last = calls.pop().unwrap();
        let canceller = last.canceller();
        let watch = last.watch();
        drop(last);
        let keep = calls.remove(0);
        drop(calls);
        let user = loom::thread::spawn(move || {
            assert!(!canceller.cancel(), "R6: the call completed");
            assert!(canceller.is_finished());
            assert!(watch.is_finished());
            assert_eq!(watch.cancel_reason(), None);
        });
        // The census gives segment 2 (and 1) back.
        assert_eq!(host.in_flight(), 1);
        user.join().unwrap();
        assert_eq!(keep.cancel_reason(), None);
        drop(keep);
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn begin_call_vs_shrink() {
    model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let calls: Vec<_> = (0..7).map(|_| channel.begin_call().unwrap()).collect();
        drop(calls);
        let censor = {
            let host = host.clone();
            loom::thread::spawn(move || host.in_flight())
        };
        let a = channel.begin_call().unwrap();
        let b = channel.begin_call().unwrap();
        let c = channel.begin_call().unwrap();
        let seen = censor.join().unwrap();
        assert!(seen <= 3);
        host.abort();
        for call in [&a, &b, &c] {
            assert_eq!(call.cancel_reason(), Some(CancelReason::HostAbort), "R4");
        }
        assert_eq!(host.in_flight(), 3);
        drop((a, b, c));
        assert_eq!(host.in_flight(), 0);
    });
}
