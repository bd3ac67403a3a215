//! R5: the first reason wins; cancel_reason(), the callback's reason and
//! cancelled().await agree.

mod common;

use std::{
    pin::pin,
    sync::{Arc, Barrier},
    task::{Poll, Waker},
    thread,
};

use callcancel::{CancelReason, ServiceHost};
use common::{jitter, poll_once, Probe, Rng};

fn ready_reason(ctx: &callcancel::OperationContext) -> Option<CancelReason> {
    let fut = pin!(ctx.cancelled());
    match poll_once(fut, Waker::noop()) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

#[test]
fn fault_then_abort_reports_channel_faulted_everywhere() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    assert_eq!(ready_reason(&call), None, "not cancelled yet");
    ch.fault();
    host.abort();
    assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
    assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
    assert_eq!(ready_reason(&call), Some(CancelReason::ChannelFaulted));
}

#[test]
fn abort_then_fault_reports_host_abort_everywhere() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register_drop(&call).unwrap();
    host.abort();
    ch.fault();
    assert_eq!(probe.reason(), Some(CancelReason::HostAbort));
    assert_eq!(call.cancel_reason(), Some(CancelReason::HostAbort));
    assert_eq!(ready_reason(&call), Some(CancelReason::HostAbort));
}

#[test]
fn reason_decided_before_registration_is_the_one_the_callback_gets() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    ch.fault();
    host.abort();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
    assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
}

#[test]
fn racing_fault_and_abort_agree_on_one_reason() {
    let mut rng = Rng::new(99);
    let barrier = Barrier::new(3);
    for i in 0..3_000 {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let call = ch.begin_call().unwrap();
        let probe = Probe::new();
        let register_first = i % 2 == 0;
        if register_first {
            probe.register(&call).unwrap();
        }
        let seeds = (rng.next_u64(), rng.next_u64());
        thread::scope(|s| {
            s.spawn(|| {
                let mut r = Rng::new(seeds.0);
                barrier.wait();
                jitter(&mut r, 300);
                ch.fault();
            });
            s.spawn(|| {
                let mut r = Rng::new(seeds.1);
                barrier.wait();
                jitter(&mut r, 300);
                host.abort();
            });
            barrier.wait();
        });
        if !register_first {
            probe.register(&call).unwrap();
        }
        let reason = call.cancel_reason().expect("both cancelled the call");
        assert_eq!(probe.cancels(), 1, "iteration {i}");
        assert_eq!(
            probe.reason(),
            Some(reason),
            "iteration {i}: callback vs cancel_reason()"
        );
        assert_eq!(
            ready_reason(&call),
            Some(reason),
            "iteration {i}: cancelled() vs cancel_reason()"
        );
        call.complete();
        assert_eq!(probe.frees(), 1);
    }
}

#[test]
fn reason_never_changes_once_observed() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = Arc::new(ch.begin_call().unwrap());
    let observer = {
        let call = Arc::clone(&call);
        thread::spawn(move || {
            let mut first = None;
            for _ in 0..200_000 {
                let now = call.cancel_reason();
                match (first, now) {
                    (None, Some(r)) => first = Some(r),
                    (Some(f), n) => assert_eq!(Some(f), n, "reason changed or was cleared"),
                    (None, None) => {}
                }
            }
            first
        })
    };
    ch.fault();
    host.abort();
    let seen = observer.join().unwrap();
    assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
    if let Some(seen) = seen {
        assert_eq!(seen, CancelReason::ChannelFaulted);
    }
}

#[test]
fn cancel_reason_display_is_distinct_and_nonempty() {
    let a = CancelReason::HostAbort.to_string();
    let b = CancelReason::ChannelFaulted.to_string();
    assert!(!a.is_empty() && !b.is_empty());
    assert_ne!(a, b);
    assert_ne!(CancelReason::HostAbort, CancelReason::ChannelFaulted);
    let copy = CancelReason::HostAbort;
    let again = copy;
    assert_eq!(copy, again);
    assert!(!format!("{copy:?}").is_empty());
}
