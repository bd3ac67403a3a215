//! loom model: two registrations race each other and a host abort on one
//! call (three threads).
//!
//! Rules: R2 (exactly one registration succeeds; the refused one gets its
//! state back and none of its callbacks ever runs; the winner's state is
//! freed exactly once), R1 and R4 for the winner.
//!
//! Bound: `LOOM_MAX_PREEMPTIONS=2` in CI (three threads).
#![cfg(loom)]

mod common;

use std::sync::Arc;

use callcancel::{RegisterErrorKind, ServiceHost};
use common::{spawn_abort, Probe};

#[test]
fn second_registration_vs_abort() {
    loom::model(|| {
        let host = ServiceHost::new();
        let call = Arc::new(host.begin_call().unwrap());
        let (a, b) = (Probe::new(), Probe::new());

        let aborter = spawn_abort(&host);
        let other = {
            let call = Arc::clone(&call);
            let b = Arc::clone(&b);
            loom::thread::spawn(move || b.register(&call).map_err(|e| e.kind()))
        };
        let mine = a.register(&call);
        let theirs = other.join().unwrap();
        aborter.join().unwrap();

        let (winner, loser) = match (mine, theirs) {
            (Ok(()), Err(kind)) => {
                assert_eq!(kind, RegisterErrorKind::AlreadyRegistered);
                (a, b)
            }
            (Err(e), Ok(())) => {
                assert_eq!(e.kind(), RegisterErrorKind::AlreadyRegistered);
                // The refused registration hands its state back.
                assert!(Arc::ptr_eq(&e.into_state(), &a));
                (b, a)
            }
            (x, y) => panic!(
                "R2: exactly one registration succeeds: {:?} {:?}",
                x.is_ok(),
                y.is_ok()
            ),
        };
        assert_eq!(winner.cancels(), 1, "R1/R4: the winner is cancelled once");
        Arc::try_unwrap(call).unwrap().complete();
        winner.assert_settled();
        assert_eq!(loser.started(), 0, "R2: a refused callback never runs");
        assert_eq!(loser.frees(), 0, "R2: a refused free-state never runs");
        assert_eq!(host.in_flight(), 0);
    });
}
