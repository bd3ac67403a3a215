//! loom models: something a sweep can reach is reclaimed while the sweep
//! runs.
//!
//! * `channel_reclaimed_while_abort_sweeps` (epoch protection): the owner
//!   completes the last call of a channel and drops the last handle, so the
//!   channel is dropped and its table entry retired through crossbeam-epoch,
//!   while an abort walks the host table (`pin → load entry → upgrade`). The
//!   sweep either upgrades first (and holds the channel alive) or finds the
//!   entry gone. Rules: R1/R2/R6 for the call, A2 (nothing left in flight).
//!   With `--cfg crossbeam_loom` (ci/loom.sh) the epoch itself is modelled.
//! * `slot_reused_while_fault_sweeps` (generation): a fault sweep holds a
//!   slot while its call completes and a new call takes the same slot; the
//!   stale generation must be skipped, and the new call is either refused or
//!   cancelled (R4, R6, R1, R2).
#![cfg(loom)]

mod common;

use callcancel::{CancelReason, Error, ServiceHost};
use common::{spawn_abort, spawn_fault, Probe};

#[test]
fn channel_reclaimed_while_abort_sweeps() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();

        let aborter = spawn_abort(&host);
        let owner = loom::thread::spawn(move || {
            call.complete();
            drop(channel); // the last reference: the channel is reclaimed
        });
        owner.join().unwrap();
        aborter.join().unwrap();

        assert!(p.cancels() <= 1);
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn slot_reused_while_fault_sweeps() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let first = channel.begin_call().unwrap();
        let p1 = Probe::new();
        p1.register(&first).unwrap();

        let faulter = spawn_fault(&channel);
        first.complete();
        let second = channel.begin_call();
        let p2 = Probe::new();
        if let Ok(call) = &second {
            p2.register(call).unwrap();
        }
        faulter.join().unwrap();

        p1.assert_settled();
        match second {
            Ok(call) => {
                // R4: in flight across the fault, in the reused slot.
                assert_eq!(p2.cancels(), 1, "R4: the new call is cancelled");
                assert_eq!(p2.reason(), Some(CancelReason::ChannelFaulted));
                call.complete();
                p2.assert_settled();
            }
            Err(e) => assert_eq!(e, Error::ChannelFaulted),
        }
        assert_eq!(host.in_flight(), 0);
    });
}
