//! loom models for the per-call cancel of v2 (`OperationContext::cancel`,
//! `Canceller`).
//!
//! * `cancel_vs_fault`: a per-call cancel races a fault of the call's
//!   channel. R1: one callback; R5: the callback's reason, `cancel_reason()`,
//!   `cancelled()` and the watch agree, and it is the first decided (the
//!   cancel returned `true` iff its reason won).
//! * `canceller_vs_complete_and_reuse`: a `Canceller` fires while its call
//!   completes and the next call takes the same slot. R6: the completed call
//!   runs nothing after completion, and the later call is never touched.
#![cfg(loom)]

mod common;

use callcancel::{CancelReason, ServiceHost};
use common::Probe;

#[test]
fn cancel_vs_fault() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let canceller = call.canceller();
        let watch = call.watch();
        let t = loom::thread::spawn(move || canceller.cancel());
        channel.fault();
        let decided_by_cancel = t.join().unwrap();
        let want = if decided_by_cancel {
            CancelReason::CallCancelled
        } else {
            CancelReason::ChannelFaulted
        };
        assert_eq!(p.cancels(), 1, "R1");
        assert_eq!(p.reason(), Some(want), "R5: the first decided wins");
        assert_eq!(call.cancel_reason(), Some(want));
        assert_eq!(watch.cancel_reason(), Some(want));
        assert_eq!(loom::future::block_on(call.cancelled()), want);
        call.complete();
        p.assert_settled();
    });
}

#[test]
fn canceller_vs_complete_and_reuse() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let first = channel.begin_call().unwrap();
        // Occupy the segment's other slot: the second call below must reuse
        // the first one's slot.
        let filler = channel.begin_call().unwrap();
        let p1 = Probe::new();
        p1.register(&first).unwrap();
        let canceller = first.canceller();
        let t = loom::thread::spawn(move || canceller.cancel());
        first.complete();
        let second = channel.begin_call().unwrap();
        let p2 = Probe::new();
        p2.register(&second).unwrap();
        let cancelled_first = t.join().unwrap();
        p1.assert_settled();
        assert_eq!(p1.cancels(), usize::from(cancelled_first));
        assert_eq!(p2.cancels(), 0, "R6: the later call is never touched");
        assert_eq!(second.cancel_reason(), None);
        second.complete();
        p2.assert_settled();
        drop(filler);
    });
}
