//! loom models: a cancellation races the call's completion.
//!
//! * `cancel_vs_complete_while_callback_runs` (R3): the callback blocks until
//!   the owner's `complete()` has *returned*, so completion must not wait for
//!   it (a wait would deadlock, which loom reports), and the free-state must
//!   come after the callback, on whichever thread finishes last.
//! * `complete_vs_abort` (R6, R2): once the call completed uncancelled,
//!   nothing runs its callback; the state is freed exactly once.
#![cfg(loom)]

mod common;

use std::sync::Arc;

use callcancel::ServiceHost;
use common::{spawn_abort, Probe};
use loom::sync::atomic::{AtomicBool, Ordering};

#[test]
fn cancel_vs_complete_while_callback_runs() {
    loom::model(|| {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let p = Probe::new();
        // Set by the owner once `complete()` returned.
        let completed = Arc::new(AtomicBool::new(false));
        let c = Arc::clone(&completed);
        p.register_with(&call, move || {
            // The callback is still running: block until the owner has
            // completed (it must not wait for us).
            while !c.load(Ordering::Acquire) {
                loom::thread::yield_now();
            }
        })
        .unwrap();

        let aborter = spawn_abort(&host);
        call.complete();
        completed.store(true, Ordering::Release);
        aborter.join().unwrap();

        // Either the abort claimed the callback before completion (it ran and
        // the canceller freed), or it came after (R6: nothing ran).
        assert!(p.cancels() <= 1);
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn complete_vs_abort() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();

        let aborter = spawn_abort(&host);
        let before = call.cancel_reason();
        call.complete();
        aborter.join().unwrap();

        if before.is_some() {
            // Seen cancelled before completing: the callback ran (A1 is the
            // aborter's, but the claim decided before our completion).
            assert_eq!(p.cancels(), 1);
        }
        // R6: a callback never starts after the (uncancelled) completion
        // freed the state; `assert_settled` checks nothing ran after the free.
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}
