//! R4: a call in flight when its channel faults or its host aborts is cancelled
//! with that reason, however registration races the cancel; if the cancel came
//! first, the callback runs inside register_for_cancel on the registering thread.

mod common;

use std::{
    sync::{Arc, Barrier},
    thread,
};

use callcancel::{CancelReason, ServiceHost};
use common::{jitter, Probe, Rng};

#[test]
fn abort_before_register_runs_callback_inline_on_registering_thread() {
    // T5
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    host.abort();
    assert!(call.is_cancelled());
    let probe = Probe::new();
    assert_eq!(probe.cancels(), 0);
    let result = probe.register(&call);
    assert!(result.is_ok(), "register after cancel must return Ok");
    assert_eq!(
        probe.cancels(),
        1,
        "callback must have run before register returned"
    );
    assert!(probe.cancel_finished());
    assert_eq!(probe.cancel_thread(), Some(thread::current().id()));
    assert_eq!(probe.reason(), Some(CancelReason::HostAbort));
    assert_eq!(probe.frees(), 0, "free follows at completion");
    call.complete();
    assert_eq!(probe.frees(), 1);
}

#[test]
fn fault_before_register_runs_callback_inline_with_channel_faulted() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    ch.fault();
    let probe = Probe::new();
    probe.register_drop(&call).unwrap();
    assert_eq!(probe.cancels(), 1);
    assert_eq!(probe.cancel_thread(), Some(thread::current().id()));
    assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
    assert_eq!(probe.frees(), 0);
    drop(call);
    assert_eq!(probe.frees(), 1);
}

#[test]
fn unregistered_in_flight_call_is_marked_cancelled() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let on_channel = ch.begin_call().unwrap();
    let host_scope = host.begin_call().unwrap();
    assert!(!on_channel.is_cancelled());
    assert_eq!(host_scope.cancel_reason(), None);
    ch.fault();
    assert!(on_channel.is_cancelled());
    assert_eq!(
        on_channel.cancel_reason(),
        Some(CancelReason::ChannelFaulted)
    );
    assert!(
        !host_scope.is_cancelled(),
        "a channel fault must not touch a host-scope call"
    );
    host.abort();
    assert_eq!(host_scope.cancel_reason(), Some(CancelReason::HostAbort));
}

#[test]
fn fault_cancels_only_that_channels_calls() {
    // T4 / T29
    let host = ServiceHost::new();
    let a = host.open_channel().unwrap();
    let b = host.open_channel().unwrap();
    let calls_a: Vec<_> = (0..2).map(|_| a.begin_call().unwrap()).collect();
    let calls_b: Vec<_> = (0..2).map(|_| b.begin_call().unwrap()).collect();
    let host_call = host.begin_call().unwrap();
    let pa: Vec<_> = calls_a
        .iter()
        .map(|c| {
            let p = Probe::new();
            p.register(c).unwrap();
            p
        })
        .collect();
    let pb: Vec<_> = calls_b
        .iter()
        .map(|c| {
            let p = Probe::new();
            p.register(c).unwrap();
            p
        })
        .collect();
    let ph = Probe::new();
    ph.register(&host_call).unwrap();

    a.fault();
    for p in &pa {
        assert_eq!(p.cancels(), 1);
        assert_eq!(p.reason(), Some(CancelReason::ChannelFaulted));
    }
    for p in pb.iter().chain([&ph]) {
        assert_eq!(
            p.cancels(),
            0,
            "calls outside the faulted channel are untouched"
        );
    }
    assert!(a.is_faulted());
    assert!(!b.is_faulted());
    assert_eq!(host.state(), callcancel::HostState::Open);
    assert!(
        b.begin_call().is_ok(),
        "other channels keep accepting calls"
    );
    assert!(
        host.begin_call().is_ok(),
        "host-scope calls are unaffected by a channel fault"
    );
    drop((calls_a, calls_b, host_call));
    for p in pa.iter().chain(&pb).chain([&ph]) {
        assert_eq!(p.frees(), 1);
    }
}

/// Tight race of register vs fault on a fresh channel; the call is in flight
/// throughout, so the callback must run exactly once either way.
#[test]
fn register_racing_fault_never_loses_the_cancel() {
    let host = ServiceHost::new();
    let barrier = Barrier::new(2);
    let mut rng = Rng::new(7);
    for i in 0..5_000 {
        let ch = host.open_channel().unwrap();
        let call = ch.begin_call().unwrap();
        let probe = Probe::new();
        let (j1, j2) = (rng.below(200), rng.below(200));
        thread::scope(|s| {
            s.spawn(|| {
                let mut r = Rng::new(j1);
                barrier.wait();
                jitter(&mut r, 200);
                ch.fault();
            });
            let mut r = Rng::new(j2);
            barrier.wait();
            jitter(&mut r, 200);
            let before = call.cancel_reason();
            probe.register(&call).unwrap();
            if before.is_some() {
                assert_eq!(
                    probe.cancels(),
                    1,
                    "iteration {i}: cancel came first, callback must run inside register"
                );
                assert_eq!(probe.cancel_thread(), Some(thread::current().id()));
            }
        });
        assert_eq!(probe.cancels(), 1, "iteration {i}: cancellation lost");
        assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
        call.complete();
        assert_eq!(probe.frees(), 1, "iteration {i}");
        assert_eq!(probe.violations(), 0, "iteration {i}");
    }
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn register_racing_abort_never_loses_the_cancel() {
    let barrier = Barrier::new(2);
    let mut rng = Rng::new(11);
    for i in 0..5_000 {
        let host = ServiceHost::new();
        let call = if i % 2 == 0 {
            host.begin_call().unwrap()
        } else {
            host.open_channel().unwrap().begin_call().unwrap()
        };
        let probe = Probe::new();
        let (j1, j2) = (rng.below(200), rng.below(200));
        thread::scope(|s| {
            s.spawn(|| {
                let mut r = Rng::new(j1);
                barrier.wait();
                jitter(&mut r, 200);
                host.abort();
            });
            let mut r = Rng::new(j2);
            barrier.wait();
            jitter(&mut r, 200);
            let before = call.is_cancelled();
            probe.register_drop(&call).unwrap();
            if before {
                assert_eq!(
                    probe.cancels(),
                    1,
                    "iteration {i}: callback must run inside register"
                );
            }
        });
        assert_eq!(probe.cancels(), 1, "iteration {i}: cancellation lost");
        assert_eq!(probe.reason(), Some(CancelReason::HostAbort));
        drop(call);
        assert_eq!(probe.frees(), 1, "iteration {i}");
        assert_eq!(probe.violations(), 0);
        assert_eq!(host.in_flight(), 0);
    }
}

#[test]
fn register_from_another_thread_while_call_pending_is_cancelled() {
    // T27: the context is free-threaded.
    let host = ServiceHost::new();
    let call = host.open_channel().unwrap().begin_call().unwrap();
    let probe = Probe::new();
    thread::scope(|s| {
        let ctx = call.context();
        let p = Arc::clone(&probe);
        s.spawn(move || p.register(ctx).unwrap()).join().unwrap();
    });
    host.abort();
    assert_eq!(probe.cancels(), 1);
    call.complete();
    assert_eq!(probe.frees(), 1);
}
