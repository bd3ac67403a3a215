//! R6: once a call completed without being cancelled, no later abort or fault runs
//! its cancel callback (and nothing runs after its free).

mod common;

use callcancel::{CancelReason, ServiceHost};
use common::Probe;

#[test]
fn abort_after_completion_runs_nothing() {
    // T10 / T14
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    call.complete();
    assert_eq!(probe.frees(), 1, "free runs right at completion");
    host.abort();
    ch.fault();
    assert_eq!(probe.cancels(), 0, "completed call must not be cancelled");
    assert_eq!(probe.frees(), 1);
    assert_eq!(probe.violations(), 0);
}

#[test]
fn fault_after_completion_runs_nothing_for_host_and_channel_calls() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let probes: Vec<_> = (0..4)
        .map(|i| {
            let call = if i % 2 == 0 {
                ch.begin_call().unwrap()
            } else {
                host.begin_call().unwrap()
            };
            let p = Probe::new();
            p.register_drop(&call).unwrap();
            drop(call);
            p
        })
        .collect();
    ch.fault();
    host.abort();
    for p in &probes {
        assert_eq!((p.cancels(), p.frees()), (0, 1));
    }
}

#[test]
fn cancelled_then_completed_call_gets_nothing_more() {
    // T30
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    ch.fault();
    assert_eq!(probe.cancels(), 1);
    assert_eq!(probe.frees(), 0);
    call.complete();
    assert_eq!(probe.frees(), 1);
    host.abort();
    ch.fault();
    assert_eq!((probe.cancels(), probe.frees()), (1, 1));
    assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
}

#[test]
fn completed_calls_leave_in_flight_and_only_live_calls_are_cancelled() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let done = ch.begin_call().unwrap();
    let live = ch.begin_call().unwrap();
    assert_eq!(host.in_flight(), 2);
    assert_eq!(ch.in_flight(), 2);
    let p_done = Probe::new();
    let p_live = Probe::new();
    p_done.register(&done).unwrap();
    p_live.register(&live).unwrap();
    done.complete();
    assert_eq!(host.in_flight(), 1);
    assert_eq!(ch.in_flight(), 1);
    host.abort();
    assert_eq!(p_done.cancels(), 0);
    assert_eq!(p_live.cancels(), 1);
    live.complete();
    assert_eq!(host.in_flight(), 0);
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn unregistered_completed_call_is_not_marked_cancelled_by_later_abort_of_others() {
    let host = ServiceHost::new();
    let first = host.begin_call().unwrap();
    assert!(!first.is_cancelled());
    first.complete();
    let second = host.begin_call().unwrap();
    host.abort();
    assert!(second.is_cancelled());
    assert_eq!(host.in_flight(), 1);
    second.complete();
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn many_completed_calls_then_abort_runs_no_callback() {
    let host = ServiceHost::new();
    let channels: Vec<_> = (0..4).map(|_| host.open_channel().unwrap()).collect();
    let mut probes = Vec::new();
    for i in 0..2_000 {
        let call = channels[i % 4].begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        call.complete();
        probes.push(p);
    }
    for ch in &channels {
        ch.fault();
    }
    host.abort();
    for (i, p) in probes.iter().enumerate() {
        assert_eq!((p.cancels(), p.frees()), (0, 1), "call {i}");
    }
}
