//! loom models: `begin_call` races a host abort / a channel fault.
//!
//! Rules: R4 and A1/A2 counting. A call that `begin_call` returned is
//! cancelled by the abort (or fault) that raced it, with that reason, and is
//! counted in flight until it completes; a refused call is never counted.
//! This is the `SeqCst` Dekker pair of `state.rs`: the claimer's
//! `try_occupy` + re-check against the canceller's flag + sweep.
//!
//! A channel enters its host's table with its first call (issue 13, W3):
//! `begin_call_vs_host_abort` races that first call with the abort, and
//! `two_first_calls_vs_host_abort` two first calls on two threads, of which
//! one publishes the channel while the other must not pass its re-check
//! before that publication (the mutant `registered_early`, which announces
//! the channel as published before it is, fails it).
#![cfg(loom)]

mod common;

use callcancel::{CancelReason, Error, ServiceHost};
use common::{spawn_abort, spawn_fault, Probe};

#[test]
fn begin_call_vs_host_abort() {
    loom::model(|| begin_call_vs_host_abort_model(false));
}

/// One `begin_call` racing a host abort. With `reuse`, this thread's
/// earlier call released the slot the racing call takes again (the
/// thread-hint path).
fn begin_call_vs_host_abort_model(reuse: bool) {
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    if reuse {
        channel.begin_call().unwrap().complete();
    }
    let aborter = spawn_abort(&host);
    let begun = channel.begin_call();
    aborter.join().unwrap();
    match begun {
        Ok(call) => {
            // R4: in flight across the abort, so cancelled; registering
            // now runs the callback inline.
            assert_eq!(call.cancel_reason(), Some(CancelReason::HostAbort));
            let p = Probe::new();
            p.register(&call).unwrap();
            assert_eq!(p.cancels(), 1, "R4: inline run after a missed abort");
            assert_eq!(host.in_flight(), 1, "A2: counted until completion");
            call.complete();
            p.assert_settled();
        }
        Err(e) => assert_eq!(e, Error::HostAborted),
    }
    assert_eq!(host.in_flight(), 0, "A2: refused calls are not counted");
}

#[test]
fn begin_call_vs_channel_fault() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let faulter = spawn_fault(&channel);
        let begun = channel.begin_call();
        faulter.join().unwrap();
        match begun {
            Ok(call) => {
                assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
                assert_eq!(channel.in_flight(), 1);
                call.complete();
            }
            Err(e) => assert_eq!(e, Error::ChannelFaulted),
        }
        assert_eq!(channel.in_flight(), 0);
        assert_eq!(host.in_flight(), 0);
    });
}

/// A reused slot: this thread's second call takes the slot its first call
/// released.
#[test]
fn reused_slot_begin_call_vs_host_abort() {
    loom::model(|| begin_call_vs_host_abort_model(true));
}

/// A close racing a `begin_call` on a reused slot: either the call is
/// refused, or the close's idle census sees it and waits for its completion.
#[test]
fn begin_call_vs_close() {
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::Arc;
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        channel.begin_call().unwrap().complete();
        let finished = Arc::new(AtomicBool::new(false));
        let closer = {
            let host = host.clone();
            let finished = Arc::clone(&finished);
            loom::thread::spawn(move || {
                host.close(std::time::Duration::from_secs(3600)).unwrap();
                // A2: close returns only once the call that got in is done.
                finished.load(Ordering::SeqCst)
            })
        };
        let began = match channel.begin_call() {
            Ok(call) => {
                finished.store(true, Ordering::SeqCst);
                call.complete();
                true
            }
            Err(e) => {
                assert_eq!(e, Error::HostClosed);
                false
            }
        };
        let saw_finished = closer.join().unwrap();
        if began {
            assert!(saw_finished, "close returned while a call was in flight");
        }
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn two_first_calls_vs_host_abort() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let first = {
            let channel = channel.clone();
            loom::thread::spawn(move || channel.begin_call())
        };
        let aborter = spawn_abort(&host);
        let second = channel.begin_call();
        let first = first.join().unwrap();
        aborter.join().unwrap();
        for begun in [first, second] {
            match begun {
                Ok(call) => {
                    assert_eq!(
                        call.cancel_reason(),
                        Some(CancelReason::HostAbort),
                        "R4: a first call in flight across the abort"
                    );
                    drop(call);
                }
                Err(e) => assert_eq!(e, Error::HostAborted),
            }
        }
        assert_eq!(host.in_flight(), 0);
        assert_eq!(
            host.stats().channels,
            1,
            "one channel, however many entries"
        );
    });
}
