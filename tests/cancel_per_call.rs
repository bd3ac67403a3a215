//! v2 per-call cancel: `OperationContext::cancel`, `Canceller`, and the
//! rules it must keep (R1–R6), plus `HostStats` by reason.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::thread;

use callcancel::{CancelReason, ServiceHost};
use common::Probe;

#[test]
fn cancel_runs_the_callback_of_that_call_only() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let (a, b) = (ch.begin_call().unwrap(), ch.begin_call().unwrap());
    let (pa, pb) = (Probe::new(), Probe::new());
    pa.register(&a).unwrap();
    pb.register(&b).unwrap();
    assert!(a.cancel(), "this request decided it");
    assert_eq!(
        (pa.cancels(), pa.reason()),
        (1, Some(CancelReason::CallCancelled))
    );
    assert!(!a.cancel(), "R1: already decided");
    assert_eq!(pa.cancels(), 1);
    assert_eq!(pb.cancels(), 0, "the sibling is untouched");
    // R5: a later fault does not change the reason, and runs nothing again.
    ch.fault();
    assert_eq!(a.cancel_reason(), Some(CancelReason::CallCancelled));
    assert_eq!(
        (pa.cancels(), pb.reason()),
        (1, Some(CancelReason::ChannelFaulted))
    );
    a.complete();
    b.complete();
    assert_eq!((pa.frees(), pb.frees()), (1, 1));
    let stats = host.stats();
    assert_eq!(stats.cancelled(CancelReason::CallCancelled), 1);
    assert_eq!(stats.cancelled(CancelReason::ChannelFaulted), 1);
    assert_eq!(stats.cancelled(CancelReason::HostAbort), 0);
    assert_eq!(stats.in_flight, 0);
}

#[test]
fn cancel_before_registration_runs_inline_in_register() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    assert!(call.cancel());
    let p = Probe::new();
    p.register(&call).unwrap();
    assert_eq!(p.cancels(), 1, "R4: ran inside register");
    assert_eq!(p.reason(), Some(CancelReason::CallCancelled));
    call.complete();
    assert_eq!(p.frees(), 1);
}

#[test]
fn a_canceller_never_touches_a_later_call_in_the_same_slot() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let first = ch.begin_call().unwrap();
    let stale = first.canceller();
    assert!(!stale.is_finished());
    first.complete();
    assert!(stale.is_finished());
    // The thread hint makes the next call take the same slot.
    for _ in 0..100 {
        let next = ch.begin_call().unwrap();
        let p = Probe::new();
        p.register(&next).unwrap();
        assert!(!stale.cancel(), "R6: completed, so nothing to do");
        assert_eq!(p.cancels(), 0);
        assert!(!next.is_cancelled());
        next.complete();
    }
    assert_eq!(host.stats().cancelled(CancelReason::CallCancelled), 0);
}

/// R1 and R5 under a race: many cancellers, a fault and an abort at once on
/// each call; exactly one decides, and every observer agrees with the
/// callback.
#[test]
fn racing_cancellers_faults_and_aborts_decide_once() {
    for round in 0..200 {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let call = ch.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let decided = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(Barrier::new(4));
        let mut ts = Vec::new();
        for i in 0..4 {
            let (go, decided) = (Arc::clone(&go), Arc::clone(&decided));
            let (c, ch, host) = (call.canceller(), ch.clone(), host.clone());
            ts.push(thread::spawn(move || {
                go.wait();
                match (i + round) % 4 {
                    0 | 1 => {
                        if c.cancel() {
                            decided.fetch_add(1, SeqCst);
                        }
                    }
                    2 => ch.fault(),
                    _ => host.abort(),
                }
            }));
        }
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(p.cancels(), 1, "R1");
        let reason = call.cancel_reason();
        assert_eq!(reason, p.reason(), "R5");
        assert!(decided.load(SeqCst) <= 1);
        assert_eq!(
            decided.load(SeqCst) == 1,
            reason == Some(CancelReason::CallCancelled),
            "cancel() returned true iff its reason won"
        );
        let stats = host.stats();
        let total: u64 = [
            CancelReason::HostAbort,
            CancelReason::ChannelFaulted,
            CancelReason::CallCancelled,
            CancelReason::DeadlineExceeded,
        ]
        .iter()
        .map(|r| stats.cancelled(*r))
        .sum();
        assert_eq!(total, 1, "counted once, under the winning reason");
        call.complete();
        assert_eq!(p.frees(), 1);
    }
}

#[test]
fn canceller_is_static_send_sync_clone_debug() {
    fn assert_traits<T: Clone + Send + Sync + 'static + std::fmt::Debug>() {}
    assert_traits::<callcancel::Canceller>();
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let c = call.canceller();
    assert!(format!("{c:?}").contains("Canceller"));
    drop(call);
    assert!(!c.clone().cancel());
}
