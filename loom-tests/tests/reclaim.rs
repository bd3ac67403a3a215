//! loom models: something a sweep can reach is reclaimed while the sweep
//! runs.
//!
//! * `channel_reclaimed_while_abort_sweeps` (table reclamation): the owner
//!   completes the last call of a channel and drops the last handle, so the
//!   channel is dropped and its table entry retired, while an abort walks
//!   the host table (`announce → load entry → upgrade → leave`). The sweep
//!   either upgrades first (and holds the channel alive) or finds the entry
//!   gone; a retire that finds the walker announced parks the table's weak
//!   reference until it leaves (`src/store/table.rs`; under loom a shadow
//!   check asserts no walker reads a released one: mutant
//!   `retire_ignores_walkers`). Rules: R1/R2/R6 for the call, A2 (nothing
//!   left in flight).
//! * `table_walk_vs_last_drop` and `two_table_walks_vs_last_drop` (the
//!   reclamation handshake alone): one or two threads walk the table
//!   (`in_flight()`) while the channel's last handle drops; no walker may
//!   read a released reference (the shadow check; mutant
//!   `retire_ignores_walkers`) and, once all have left, nothing may stay
//!   parked (mutant `retire_no_second_look`). `two_drops_vs_table_walk`:
//!   two retirers at once vs one walker, the same two checks.
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

        // Before any further walk (which would drain it): nothing parked.
        assert_eq!(callcancel::loom_parked_table_refs(&host), 0);
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

/// One walk (`in_flight`) vs the last handle's drop of a channel that ran a
/// call (so it is in the table).
#[test]
fn table_walk_vs_last_drop() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        channel.begin_call().unwrap().complete();
        let h = host.clone();
        let walker = loom::thread::spawn(move || h.in_flight());
        drop(channel);
        assert_eq!(walker.join().unwrap(), 0);
        assert_eq!(callcancel::loom_parked_table_refs(&host), 0);
        assert_eq!(host.in_flight(), 0);
    });
}

/// Two walks vs the last handle's drop: whichever walker leaves last (or
/// the retirer's second look) drains.
#[test]
fn two_table_walks_vs_last_drop() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        channel.begin_call().unwrap().complete();
        let walkers: Vec<_> = (0..2)
            .map(|_| {
                let h = host.clone();
                loom::thread::spawn(move || h.in_flight())
            })
            .collect();
        drop(channel);
        for w in walkers {
            assert_eq!(w.join().unwrap(), 0);
        }
        assert_eq!(callcancel::loom_parked_table_refs(&host), 0);
        assert_eq!(host.in_flight(), 0);
    });
}

/// Two last drops (two retirers, which may park at once) vs one walk: the
/// lock orders the two parks, and whichever of the walker leaving and the
/// retirers' second looks comes last drains both.
#[test]
fn two_drops_vs_table_walk() {
    loom::model(|| {
        let host = ServiceHost::new();
        let (a, b) = (host.open_channel().unwrap(), host.open_channel().unwrap());
        a.begin_call().unwrap().complete();
        b.begin_call().unwrap().complete();
        let h = host.clone();
        let walker = loom::thread::spawn(move || h.in_flight());
        let dropper = loom::thread::spawn(move || drop(a));
        drop(b);
        dropper.join().unwrap();
        assert_eq!(walker.join().unwrap(), 0);
        assert_eq!(callcancel::loom_parked_table_refs(&host), 0);
        assert_eq!(host.in_flight(), 0);
    });
}
