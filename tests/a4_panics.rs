//! A4: a panicking cancel callback does not stop abort/fault from notifying the
//! other calls and does not skip or double a free; abort()/fault() re-raise the
//! FIRST panic after the sweep. An inline callback's panic propagates out of
//! register_for_cancel but the registration stays recorded; a panicking on_free
//! still releases the call and its panic propagates out of complete().

mod common;

use std::{
    any::Any,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use callcancel::{CancelReason, RegisterErrorKind, ServiceHost};
use common::{Probe, WATCHDOG};

fn payload_text(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string payload>".to_string()
    }
}

#[test]
fn panicking_callback_does_not_stop_abort_from_notifying_the_others() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let mut calls = Vec::new();
    let mut probes = Vec::new();
    for i in 0..20 {
        let call = if i % 2 == 0 {
            ch.begin_call().unwrap()
        } else {
            host.begin_call().unwrap()
        };
        let p = Probe::new();
        call.register_for_cancel_with_free(
            Arc::clone(&p),
            move |r, p: &Arc<Probe>| {
                p.on_cancel(r);
                if i == 7 {
                    panic!("cancel-boom");
                }
            },
            |p| p.on_free(),
        )
        .unwrap();
        calls.push(call);
        probes.push(p);
    }
    let res = catch_unwind(AssertUnwindSafe(|| host.abort()));
    let payload = res.expect_err("abort must re-raise the callback's panic");
    assert_eq!(payload_text(&*payload), "cancel-boom");
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(p.cancels(), 1, "call {i} was not notified after the panic");
        assert_eq!(p.reason(), Some(CancelReason::HostAbort));
    }
    assert_eq!(host.state(), callcancel::HostState::Aborted);
    drop(calls);
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(p.frees(), 1, "call {i}: free skipped or doubled");
    }
    assert_eq!(host.in_flight(), 0);
    // A second abort has nothing left to run and does not panic again.
    host.abort();
}

#[test]
fn abort_re_raises_the_first_panic_of_the_sweep() {
    let host = ServiceHost::new();
    let order = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for _ in 0..10 {
        let call = host.begin_call().unwrap();
        let o = Arc::clone(&order);
        call.register_for_cancel((), move |_, _| {
            let n = o.fetch_add(1, SeqCst);
            panic!("panic #{n}");
        })
        .unwrap();
        calls.push(call);
    }
    let payload = catch_unwind(AssertUnwindSafe(|| host.abort())).unwrap_err();
    assert_eq!(
        order.load(SeqCst),
        10,
        "every callback ran despite the panics"
    );
    assert_eq!(
        payload_text(&*payload),
        "panic #0",
        "the first panic is re-raised"
    );
    drop(calls);
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn panicking_callback_in_fault_sweep_is_re_raised_and_others_notified() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let panicky = ch.begin_call().unwrap();
    let calm = ch.begin_call().unwrap();
    let p1 = Probe::new();
    let p2 = Probe::new();
    let q = Arc::clone(&p1);
    panicky
        .register_for_cancel(q, |r, p: &Arc<Probe>| {
            p.on_cancel(r);
            panic!("fault-boom");
        })
        .unwrap();
    // First registered call panics; the calm one must still run regardless of order.
    p2.register(&calm).unwrap();
    let payload = catch_unwind(AssertUnwindSafe(|| ch.fault())).unwrap_err();
    assert_eq!(payload_text(&*payload), "fault-boom");
    assert_eq!((p1.cancels(), p2.cancels()), (1, 1));
    assert!(ch.is_faulted());
    drop(panicky);
    calm.complete();
    assert_eq!(p2.frees(), 1);
    assert_eq!(
        Arc::strong_count(&p1),
        1,
        "state of the panicking registration freed once"
    );
}

#[test]
fn inline_callback_panic_propagates_from_register_but_registration_stays() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    host.abort();
    let probe = Probe::new();
    let p = Arc::clone(&probe);
    let res = catch_unwind(AssertUnwindSafe(|| {
        call.register_for_cancel_with_free(
            p,
            |r, p: &Arc<Probe>| {
                p.on_cancel(r);
                panic!("inline-boom");
            },
            |p| p.on_free(),
        )
    }));
    let payload = res.expect_err("inline panic must propagate out of register_for_cancel");
    assert_eq!(payload_text(&*payload), "inline-boom");
    assert_eq!(probe.cancels(), 1);
    assert_eq!(
        probe.frees(),
        0,
        "state is freed at completion, not at the panic"
    );
    let again = Probe::new();
    let err = again.register(&call).unwrap_err();
    assert_eq!(
        err.kind(),
        RegisterErrorKind::AlreadyRegistered,
        "registration stays recorded"
    );
    call.complete();
    assert_eq!(probe.frees(), 1, "state freed exactly once at completion");
    assert_eq!(probe.cancels(), 1);
    assert_eq!(again.cancels() + again.frees(), 0);
    assert_eq!(host.in_flight(), 0);
}

#[test]
fn panicking_callback_running_while_call_completes_still_frees_once() {
    let host = ServiceHost::new();
    let call = host.open_channel().unwrap().begin_call().unwrap();
    let probe = Probe::new();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    call.register_for_cancel_with_free(
        Arc::clone(&probe),
        move |r, p: &Arc<Probe>| {
            entered_tx.send(()).unwrap();
            release_rx.lock().unwrap().recv_timeout(WATCHDOG).unwrap();
            p.on_cancel(r);
            panic!("late-boom");
        },
        |p| p.on_free(),
    )
    .unwrap();
    let aborter = {
        let host = host.clone();
        thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| host.abort())).map_err(|p| payload_text(&*p))
        })
    };
    entered_rx.recv_timeout(WATCHDOG).unwrap();
    call.complete(); // callback still running: the canceller must free
    assert_eq!(probe.frees(), 0);
    release_tx.send(()).unwrap();
    assert_eq!(aborter.join().unwrap(), Err("late-boom".to_string()));
    assert_eq!(probe.frees(), 1, "panicking canceller must still free");
    assert!(host.wait_idle(WATCHDOG));
    assert_eq!(host.close(Duration::from_secs(5)), Ok(()));
}

#[test]
fn panicking_on_free_still_releases_the_call() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let frees = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&frees);
    call.register_for_cancel_with_free(
        (),
        |_, _| {},
        move |()| {
            f.fetch_add(1, SeqCst);
            panic!("free-boom");
        },
    )
    .unwrap();
    let payload = catch_unwind(AssertUnwindSafe(|| call.complete())).unwrap_err();
    assert_eq!(payload_text(&*payload), "free-boom");
    assert_eq!(frees.load(SeqCst), 1);
    assert_eq!(
        host.in_flight(),
        0,
        "the call must be released despite the panic"
    );
    assert_eq!(ch.in_flight(), 0);
    assert!(host.wait_idle(Duration::ZERO));
    assert!(ch.begin_call().is_ok(), "host keeps working");
    assert_eq!(host.close(Duration::from_secs(5)), Ok(()));
}

#[test]
fn panicking_state_drop_after_cancel_still_releases_the_call() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("drop-boom");
        }
    }
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&ran);
    call.register_for_cancel(Bomb, move |_, _| {
        r.fetch_add(1, SeqCst);
    })
    .unwrap();
    host.abort();
    assert_eq!(ran.load(SeqCst), 1);
    let payload = catch_unwind(AssertUnwindSafe(|| drop(call))).unwrap_err();
    assert_eq!(payload_text(&*payload), "drop-boom");
    assert_eq!(host.in_flight(), 0);
    assert_eq!(host.close(Duration::from_secs(5)), Ok(()));
}
