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
//! * `begin_call_in_a_new_segment_vs_fault`: a call grows a new segment
//!   while the channel is faulted. The fault's sweep scans only the segments
//!   below the slab's `segments` bound (and without a walk while it is 1),
//!   so the claimer must raise the bound before its claim: either the sweep
//!   sees the call, or the call's re-check sees the fault (R4). The mutant
//!   `no_cover` (the bound never raised) fails it.
//! * `regrow_vs_shrink_vs_fault`: after a burst, a census retires the top
//!   segments (lowering the bound) while calls claim slots there again (a
//!   regrow raises it) and the channel is faulted: every call that began is
//!   cancelled (R4).
//!
//! Under loom a slab's first segment holds 2 slots, then 4, then 8.
#![cfg(loom)]

mod common;

use common::spawn_fault;

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

#[test]
fn begin_call_in_a_new_segment_vs_fault() {
    model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        // Segment 0 (2 slots) is full: the next call grows segment 1.
        let held: Vec<_> = (0..2).map(|_| channel.begin_call().unwrap()).collect();
        let faulter = spawn_fault(&channel);
        let third = channel.begin_call();
        faulter.join().unwrap();
        for call in &held {
            assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
        }
        match third {
            Ok(call) => assert_eq!(
                call.cancel_reason(),
                Some(CancelReason::ChannelFaulted),
                "R4: a call in flight across the fault is cancelled"
            ),
            Err(e) => assert_eq!(e, callcancel::Error::ChannelFaulted),
        }
        drop(held);
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn regrow_vs_shrink_vs_fault() {
    model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        // A burst over segments 0, 1 and 2, gone again.
        drop(
            (0..7)
                .map(|_| channel.begin_call().unwrap())
                .collect::<Vec<_>>(),
        );
        // Segment 0 taken again: the next claim goes to segment 1.
        let held: Vec<_> = (0..2).map(|_| channel.begin_call().unwrap()).collect();
        let censor = {
            let host = host.clone();
            loom::thread::spawn(move || host.in_flight())
        };
        let faulter = spawn_fault(&channel);
        let third = channel.begin_call();
        let seen = censor.join().unwrap();
        faulter.join().unwrap();
        assert!((2..=3).contains(&seen), "census saw {seen}");
        if let Ok(call) = &third {
            assert_eq!(
                call.cancel_reason(),
                Some(CancelReason::ChannelFaulted),
                "R4: a call in flight across the fault is cancelled"
            );
        }
        drop(third);
        drop(held);
        assert_eq!(host.in_flight(), 0);
    });
}
