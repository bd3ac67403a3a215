//! loom models: the batched finish of a sweep (pair 2b in `state.rs`).
//!
//! A sweep runs each claimed callback, tags the slot's vtable pointer
//! `RETURNED` with a plain store, and settles the hand-off to the owner for
//! its whole batch behind one `fence(SeqCst)`: it re-reads each call, and
//! frees those whose owner completed while the callback ran. The owner's
//! `complete` RMW is followed by a `SeqCst` load of the tag. Dekker: one of
//! the two must see the other (else the state leaks: `assert_settled` and
//! `in_flight` fail), and if both do, `take_free` lets only one free (else
//! R2 fails: freed twice).
//!
//! * `fault_settles_vs_complete`: one call, the fault vs its completion.
//! * `fault_settles_two_calls_vs_completions`: two calls in one batch, both
//!   completed by their owner while the fault sweeps.
//! * `fault_settles_vs_complete_vs_last_handle`: the channel's last handle
//!   drops meanwhile: whoever frees last disposes of the channel.
//!
//! Mutants (`ci/mutants.sh`): `no_settle_fence` (the sweeper re-reads
//! without its barrier) and `owner_ignores_returned` (the owner never reads
//! the tag) leak the state.
#![cfg(loom)]

mod common;

use callcancel::{CancelReason, ServiceHost};
use common::{spawn_fault, Probe};

#[test]
fn fault_settles_vs_complete() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();

        let faulter = spawn_fault(&channel);
        call.complete();
        faulter.join().unwrap();

        // Completed first (R6: nothing ran), or cancelled by the fault.
        if p.cancels() == 1 {
            assert_eq!(p.reason(), Some(CancelReason::ChannelFaulted));
        }
        p.assert_settled();
        assert_eq!(host.in_flight(), 0, "A2: freed and released");
        assert_eq!(channel.in_flight(), 0);
    });
}

#[test]
fn fault_settles_two_calls_vs_completions() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let calls = [channel.begin_call().unwrap(), channel.begin_call().unwrap()];
        let probes = [Probe::new(), Probe::new()];
        for (p, call) in probes.iter().zip(&calls) {
            p.register(call).unwrap();
        }

        let faulter = spawn_fault(&channel);
        for call in calls {
            call.complete();
        }
        faulter.join().unwrap();

        for p in &probes {
            p.assert_settled();
        }
        assert_eq!(host.in_flight(), 0, "A2: freed and released");
    });
}

#[test]
fn fault_settles_vs_complete_vs_last_handle() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();

        let faulter = spawn_fault(&channel);
        let owner = loom::thread::spawn(move || call.complete());
        drop(channel);
        faulter.join().unwrap();
        owner.join().unwrap();

        p.assert_settled();
        let s = host.stats();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.channels, 0, "orphaned channel disposed");
    });
}
