//! loom model: a cancel callback aborts the host from inside, while another
//! thread faults the channel and a third aborts (A3: re-entrant and
//! concurrent abort/fault, no deadlock).
//!
//! Rules: A3 (every `abort`/`fault` returns; loom reports a deadlock
//! otherwise), A1 (when each returns, both calls' callbacks have been
//! invoked), R1 (each callback once), R5 (each call has one reason, the one
//! its callback got), R2.
//!
//! Bound: `LOOM_MAX_PREEMPTIONS=2` in CI (three threads).
#![cfg(loom)]

mod common;

use std::sync::Arc;

use callcancel::{HostState, ServiceHost};
use common::Probe;

#[test]
fn abort_in_callback_vs_fault() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let (call1, call2) = (channel.begin_call().unwrap(), channel.begin_call().unwrap());
        let (p1, p2) = (Probe::new(), Probe::new());
        {
            let host = host.clone();
            p1.register_with(&call1, move || host.abort()).unwrap();
        }
        p2.register(&call2).unwrap();

        let check = {
            let (p1, p2) = (Arc::clone(&p1), Arc::clone(&p2));
            move || {
                assert_eq!(p1.started(), 1, "A1: call 1 notified");
                assert_eq!(p2.started(), 1, "A1: call 2 notified");
            }
        };
        let faulter = {
            let channel = channel.clone();
            let check = check.clone();
            loom::thread::spawn(move || {
                channel.fault();
                check();
            })
        };
        let aborter = {
            let host = host.clone();
            loom::thread::spawn(move || {
                host.abort();
                check();
            })
        };
        faulter.join().unwrap();
        aborter.join().unwrap();

        assert_eq!((p1.cancels(), p2.cancels()), (1, 1), "R1");
        assert_eq!(call1.cancel_reason(), p1.reason(), "R5");
        assert_eq!(call2.cancel_reason(), p2.reason(), "R5");
        assert_eq!(host.state(), HostState::Aborted);
        call1.complete();
        call2.complete();
        p1.assert_settled();
        p2.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}
