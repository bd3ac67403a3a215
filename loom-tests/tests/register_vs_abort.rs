//! loom model: a call registers its cancel callback while another thread
//! aborts the host. Checks R1 (cancel at most once), R2 (free exactly once)
//! and R4 (the call was in flight across the abort, so it is cancelled, with
//! `HostAbort`, exactly once), by counters.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release -p callcancel-loom-tests`
#![cfg(loom)]

mod common;

use common::spawn_abort;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use callcancel::{CancelReason, ServiceHost};

#[test]
fn register_vs_host_abort() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let cancels = Arc::new(AtomicUsize::new(0));
        let frees = Arc::new(AtomicUsize::new(0));

        let aborter = spawn_abort(&host);

        let c = Arc::clone(&cancels);
        let f = Arc::clone(&frees);
        let f_in_cancel = Arc::clone(&frees);
        call.register_for_cancel_with_free(
            (),
            move |reason, _| {
                assert_eq!(reason, CancelReason::HostAbort);
                // R3: the state is not freed while the callback runs.
                assert_eq!(f_in_cancel.load(SeqCst), 0);
                c.fetch_add(1, SeqCst);
            },
            move |_| {
                f.fetch_add(1, SeqCst);
            },
        )
        .unwrap();

        aborter.join().unwrap();
        // A1 + R4: abort returned and the call was in flight all along.
        assert_eq!(cancels.load(SeqCst), 1, "R1/R4: exactly one cancel");
        assert_eq!(call.cancel_reason(), Some(CancelReason::HostAbort));
        assert_eq!(frees.load(SeqCst), 0, "free only at completion");
        call.complete();
        assert_eq!(frees.load(SeqCst), 1, "R2: freed exactly once");
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn register_vs_abort_vs_complete() {
    // The abort may land before, during or after completion: at most one
    // cancel, exactly one free, and never a cancel after an uncancelled
    // completion (R6).
    loom::model(|| {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let cancels = Arc::new(AtomicUsize::new(0));
        let frees = Arc::new(AtomicUsize::new(0));

        let aborter = spawn_abort(&host);

        let c = Arc::clone(&cancels);
        let f = Arc::clone(&frees);
        let f_in_cancel = Arc::clone(&frees);
        call.register_for_cancel_with_free(
            (),
            move |_, _| {
                // R3/R6: nothing runs for a call whose state was freed, i.e.
                // the cancel was decided before the call completed.
                assert_eq!(f_in_cancel.load(SeqCst), 0, "callback after free");
                c.fetch_add(1, SeqCst);
            },
            move |_| {
                f.fetch_add(1, SeqCst);
            },
        )
        .unwrap();
        call.complete();

        aborter.join().unwrap();
        assert!(cancels.load(SeqCst) <= 1, "R1");
        assert_eq!(frees.load(SeqCst), 1, "R2");
        assert_eq!(host.in_flight(), 0);
    });
}
