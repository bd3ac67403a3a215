//! A1: abort() moves the host to Aborted, refuses new channels and calls with
//! HostAborted, does not mark channels faulted, and has invoked the callback of
//! every registered in-flight call when it returns.

mod common;

use callcancel::{CancelReason, Error, HostState, ServiceHost};
use common::Probe;

#[test]
fn fresh_host_is_open() {
    let host = ServiceHost::new();
    assert_eq!(host.state(), HostState::Open);
    assert_eq!(host.in_flight(), 0);
    let ch = host.open_channel().unwrap();
    assert!(!ch.is_faulted());
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn abort_refuses_new_work_with_host_aborted() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    host.abort();
    assert_eq!(host.state(), HostState::Aborted);
    assert_eq!(host.open_channel().err(), Some(Error::HostAborted));
    assert_eq!(host.begin_call().err(), Some(Error::HostAborted));
    assert_eq!(ch.begin_call().err(), Some(Error::HostAborted));
    assert!(!ch.is_faulted(), "abort must not mark channels faulted");
    host.abort(); // idempotent
    assert_eq!(host.state(), HostState::Aborted);
    assert!(!ch.is_faulted());
}

#[test]
fn fault_is_sticky_and_new_calls_still_fail_after_abort() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    ch.fault();
    assert!(ch.is_faulted());
    assert_eq!(ch.begin_call().err(), Some(Error::ChannelFaulted));
    host.abort();
    assert!(ch.begin_call().is_err());
    assert!(ch.is_faulted(), "fault is sticky");
}

#[test]
fn abort_through_a_clone_affects_every_handle() {
    let host = ServiceHost::new();
    let other = host.clone();
    let call = host.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    other.abort();
    assert_eq!(host.state(), HostState::Aborted);
    assert_eq!(probe.cancels(), 1);
    assert_eq!(host.begin_call().err(), Some(Error::HostAborted));
}

#[test]
fn every_registered_in_flight_call_is_notified_when_abort_returns() {
    let host = ServiceHost::new();
    let channels: Vec<_> = (0..8).map(|_| host.open_channel().unwrap()).collect();
    let mut calls = Vec::new();
    let mut probes = Vec::new();
    for i in 0..1_000 {
        let call = if i % 9 == 8 {
            host.begin_call().unwrap()
        } else {
            channels[i % 9].begin_call().unwrap()
        };
        let p = Probe::new();
        if i % 2 == 0 {
            p.register(&call).unwrap();
        } else {
            p.register_drop(&call).unwrap();
        }
        calls.push(call);
        probes.push(p);
    }
    let unregistered = channels[0].begin_call().unwrap();
    assert_eq!(host.in_flight(), 1_001);
    host.abort();
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(
            p.cancels(),
            1,
            "call {i} not notified by the time abort returned"
        );
        assert!(p.cancel_finished(), "call {i}");
        assert_eq!(p.reason(), Some(CancelReason::HostAbort), "call {i}");
        assert_eq!(p.frees(), 0, "call {i}: free waits for completion");
    }
    assert!(unregistered.is_cancelled());
    for ch in &channels {
        assert!(!ch.is_faulted());
    }
    drop(calls);
    drop(unregistered);
    for p in &probes {
        assert_eq!(p.frees(), 1);
    }
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn abort_of_an_empty_host_returns() {
    let host = ServiceHost::new();
    host.abort();
    assert_eq!(host.state(), HostState::Aborted);
    assert_eq!(host.in_flight(), 0);
    assert!(host.wait_idle(std::time::Duration::ZERO));
}

/// A5 (v2): dropping the last handle of a host that is not closed aborts
/// it (as `WsFreeServiceHost` does); a clone keeps it alive; a closed host's
/// drop cancels nothing.
#[test]
fn dropping_the_last_host_handle_aborts_an_unclosed_host() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let ch_call = ch.begin_call().unwrap();
    let host_call = host.begin_call().unwrap();
    let p1 = Probe::new();
    let p2 = Probe::new();
    p1.register(&ch_call).unwrap();
    p2.register(&host_call).unwrap();
    let clone = host.clone();
    drop(host);
    assert_eq!(p1.cancels(), 0, "a clone still holds the host");
    drop(clone);
    assert_eq!(p1.cancels(), 1, "the last handle aborted the host");
    assert_eq!(p2.cancels(), 1);
    assert_eq!(ch_call.cancel_reason(), Some(CancelReason::HostAbort));
    assert_eq!(host_call.cancel_reason(), Some(CancelReason::HostAbort));
    assert!(!ch.is_faulted(), "an abort does not fault channels");
    assert_eq!(ch.begin_call().err(), Some(Error::HostAborted));
    assert_eq!(ch.in_flight(), 1, "the channel still counts its call");
    ch_call.complete();
    host_call.complete();
    assert_eq!((p1.cancels(), p1.frees()), (1, 1));
    assert_eq!((p2.cancels(), p2.frees()), (1, 1));

    // A closed host: its drop has nothing to abort.
    let host = ServiceHost::new();
    host.close(std::time::Duration::ZERO).unwrap();
    drop(host);
}
