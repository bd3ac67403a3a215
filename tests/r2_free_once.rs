//! R2: after a successful registration the free-state (on_free, or the drop of the
//! state) runs exactly once; a failed registration gives the state back and none
//! of its closures ever run.

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering::SeqCst},
    Arc, Mutex,
};

use callcancel::{CancelReason, RegisterErrorKind, ServiceHost};
use common::{Counted, Probe};

#[test]
fn uncancelled_call_frees_once_at_completion_not_before() {
    // T1
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    assert_eq!(probe.frees(), 0, "free must not run before completion");
    call.complete();
    assert_eq!(probe.frees(), 1);
    assert_eq!(probe.cancels(), 0);
    assert_eq!(probe.violations(), 0);
}

#[test]
fn dropping_the_call_frees_like_complete() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let probe = Probe::new();
    probe.register(&call).unwrap();
    drop(call);
    assert_eq!(probe.frees(), 1);
    assert_eq!(probe.cancels(), 0);
}

#[test]
fn without_on_free_the_state_is_dropped_once_at_completion() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    probe.register_drop(&call).unwrap();
    assert_eq!(probe.frees(), 0, "state must live until completion");
    ch.fault();
    assert_eq!(probe.cancels(), 1);
    assert_eq!(
        probe.frees(),
        0,
        "state must live until completion even when cancelled"
    );
    call.complete();
    assert_eq!(probe.frees(), 1);
    assert_eq!(probe.violations(), 0);
}

#[test]
fn on_free_receives_the_state_by_value_and_the_library_does_not_drop_it() {
    let drops = Arc::new(AtomicUsize::new(0));
    let kept: Arc<Mutex<Vec<Counted>>> = Arc::new(Mutex::new(Vec::new()));
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let sink = Arc::clone(&kept);
    call.register_for_cancel_with_free(
        Counted(Arc::clone(&drops)),
        |_, _: &Counted| {},
        move |state| sink.lock().unwrap().push(state),
    )
    .unwrap();
    call.complete();
    assert_eq!(
        kept.lock().unwrap().len(),
        1,
        "on_free must have received the state"
    );
    assert_eq!(
        drops.load(SeqCst),
        0,
        "the state moved into on_free must not be dropped by the library"
    );
    kept.lock().unwrap().clear();
    assert_eq!(drops.load(SeqCst), 1);
}

#[test]
fn on_free_gets_the_registered_value_after_cancel() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen_in_cancel = Arc::new(Mutex::new(Vec::new()));
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let (g, c) = (Arc::clone(&got), Arc::clone(&seen_in_cancel));
    call.register_for_cancel_with_free(
        String::from("state-42"),
        move |reason, s: &String| c.lock().unwrap().push((reason, s.clone())),
        move |s| g.lock().unwrap().push(s),
    )
    .unwrap();
    host.abort();
    assert_eq!(
        *seen_in_cancel.lock().unwrap(),
        vec![(CancelReason::HostAbort, "state-42".to_string())]
    );
    assert!(
        got.lock().unwrap().is_empty(),
        "free must wait for completion"
    );
    call.complete();
    assert_eq!(*got.lock().unwrap(), vec!["state-42".to_string()]);
}

#[test]
fn failed_registration_returns_the_state_and_runs_nothing() {
    // T7
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let first = Probe::new();
    first.register(&call).unwrap();

    let second = Probe::new();
    let err = second.register(&call).unwrap_err();
    assert_eq!(err.kind(), RegisterErrorKind::AlreadyRegistered);
    let back = err.into_state();
    assert!(
        Arc::ptr_eq(&back, &second),
        "into_state must return the very state passed in"
    );
    drop(back);

    let third_drops = Arc::new(AtomicUsize::new(0));
    let err = call
        .register_for_cancel(Counted(Arc::clone(&third_drops)), |_, _: &Counted| {
            panic!("closure of a failed registration must never run")
        })
        .unwrap_err();
    assert_eq!(
        third_drops.load(SeqCst),
        0,
        "a rejected state must not be dropped by the library"
    );
    let state = err.into_state();
    assert_eq!(third_drops.load(SeqCst), 0);
    drop(state);
    assert_eq!(third_drops.load(SeqCst), 1);

    host.abort();
    ch.fault();
    call.complete();
    assert_eq!(first.cancels(), 1);
    assert_eq!(first.frees(), 1);
    assert_eq!(
        second.cancels(),
        0,
        "second registration's cancel must never run"
    );
    assert_eq!(
        second.frees(),
        0,
        "second registration's free must never run"
    );
}

#[test]
fn failed_registration_after_inline_cancel_runs_nothing() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    host.abort();
    let first = Probe::new();
    first.register(&call).unwrap();
    assert_eq!(first.cancels(), 1);
    let second = Probe::new();
    let err = second.register_drop(&call).unwrap_err();
    assert_eq!(err.kind(), RegisterErrorKind::AlreadyRegistered);
    assert_eq!(second.frees(), 0);
    drop(err); // dropping the error drops our own DropToken: counted by us
    assert_eq!(second.frees(), 1);
    call.complete();
    assert_eq!(second.cancels(), 0);
    assert_eq!(second.frees(), 1, "library must not free a rejected state");
    assert_eq!(first.frees(), 1);
}

#[test]
fn many_calls_each_free_once() {
    let host = ServiceHost::new();
    let channels: Vec<_> = (0..3).map(|_| host.open_channel().unwrap()).collect();
    let mut probes = Vec::new();
    let mut calls = Vec::new();
    for i in 0..300 {
        let call = channels[i % 3].begin_call().unwrap();
        let p = Probe::new();
        if i % 2 == 0 {
            p.register(&call).unwrap();
        } else {
            p.register_drop(&call).unwrap();
        }
        probes.push(p);
        calls.push(Some(call));
    }
    // Complete a third before the fault, fault one channel, complete the rest.
    for (i, c) in calls.iter_mut().enumerate() {
        if i % 3 == 2 {
            c.take().unwrap().complete();
        }
    }
    channels[0].fault();
    drop(calls);
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(p.frees(), 1, "call {i}");
        let expect_cancel = usize::from(i % 3 == 0);
        assert_eq!(p.cancels(), expect_cancel, "call {i}");
        assert_eq!(p.violations(), 0, "call {i}");
    }
    assert_eq!(host.in_flight(), 0);
}
