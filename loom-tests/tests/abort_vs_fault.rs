//! loom model: a host abort and a channel fault hit the same call while it
//! registers (three threads).
//!
//! Rules: R5 (the first reason wins: the callback, `cancel_reason()` and the
//! `cancelled()` future all report the same one), R1 (one callback), R4
//! (cancelled whatever the order), R2 (one free).
//!
//! Bound: `LOOM_MAX_PREEMPTIONS=2` in CI (three threads).
#![cfg(loom)]

mod common;

use callcancel::ServiceHost;
use common::{spawn_abort, spawn_fault, Probe};

#[test]
fn abort_vs_fault_same_call() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();

        let aborter = spawn_abort(&host);
        let faulter = spawn_fault(&channel);
        p.register(&call).unwrap();
        aborter.join().unwrap();
        faulter.join().unwrap();

        assert_eq!(p.cancels(), 1, "R1/R4");
        let reason = call.cancel_reason();
        assert!(reason.is_some());
        assert_eq!(p.reason(), reason, "R5: callback and cancel_reason agree");
        assert_eq!(
            Some(loom::future::block_on(call.cancelled())),
            reason,
            "R5: cancelled() agrees"
        );
        call.complete();
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}
