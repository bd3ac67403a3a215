//! R1: the cancel callback runs at most once per call, whatever number of aborts,
//! faults and registrations race.

mod common;

use std::{sync::Barrier, thread};

use callcancel::{CancelReason, ServiceHost};
use common::Probe;

#[test]
fn repeated_aborts_run_the_callback_once() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();

    host.abort();
    host.abort();
    host.clone().abort();

    assert_eq!(probe.cancels(), 1, "cancel callback must run exactly once");
    assert_eq!(probe.reason(), Some(CancelReason::HostAbort));
    call.complete();
    assert_eq!(probe.cancels(), 1);
    assert_eq!(probe.frees(), 1);
    assert_eq!(probe.violations(), 0);
}

#[test]
fn fault_abort_fault_runs_the_callback_once() {
    // T11: abort/fault/abort on one blocked call.
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();

    ch.fault();
    host.abort();
    ch.fault();
    ch.clone().fault();
    host.abort();

    assert_eq!(probe.cancels(), 1);
    assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
    drop(call);
    assert_eq!(probe.frees(), 1);
    assert_eq!(probe.cancels(), 1);
}

#[test]
fn callback_of_a_call_registered_after_cancel_runs_once_despite_later_cancels() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    ch.fault();
    let probe = Probe::new();
    probe.register(&call).unwrap(); // runs inline
    assert_eq!(probe.cancels(), 1);
    ch.fault();
    host.abort();
    assert_eq!(
        probe.cancels(),
        1,
        "later cancels must not rerun the callback"
    );
    call.complete();
    assert_eq!(probe.frees(), 1);
}

#[test]
fn concurrent_aborts_and_faults_run_each_callback_once() {
    const CHANNELS: usize = 4;
    const CALLS_PER_CHANNEL: usize = 50;
    const THREADS: usize = 4;
    for round in 0..50 {
        let host = ServiceHost::new();
        let channels: Vec<_> = (0..CHANNELS)
            .map(|_| host.open_channel().unwrap())
            .collect();
        let mut calls = Vec::new();
        let mut probes = Vec::new();
        for ch in &channels {
            for _ in 0..CALLS_PER_CHANNEL {
                let call = ch.begin_call().unwrap();
                let p = Probe::new();
                p.register(&call).unwrap();
                calls.push(call);
                probes.push(p);
            }
        }
        let host_call = host.begin_call().unwrap();
        let host_probe = Probe::new();
        host_probe.register(&host_call).unwrap();

        let barrier = Barrier::new(THREADS);
        thread::scope(|s| {
            for t in 0..THREADS {
                let (host, channels, barrier) = (&host, &channels, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for k in 0..3 {
                        if (t + k + round) % 2 == 0 {
                            host.abort();
                        } else {
                            channels[(t + k) % CHANNELS].fault();
                        }
                    }
                });
            }
        });
        // Some thread aborted the host, so every call is cancelled by now.
        for (i, p) in probes.iter().enumerate() {
            assert_eq!(p.cancels(), 1, "round {round}: call {i} cancel count");
        }
        assert_eq!(host_probe.cancels(), 1);
        assert_eq!(host_probe.reason(), Some(CancelReason::HostAbort));
        drop(calls);
        drop(host_call);
        for (i, p) in probes.iter().enumerate() {
            assert_eq!(
                p.cancels(),
                1,
                "round {round}: call {i} cancel count after completion"
            );
            assert_eq!(p.frees(), 1, "round {round}: call {i} free count");
            assert_eq!(p.violations(), 0, "round {round}: call {i} ordering");
        }
        assert_eq!(host.in_flight(), 0);
    }
}
