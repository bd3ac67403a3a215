//! R3: the free-state never starts before the cancel callback returned, and the
//! callback never sees freed state. complete() does not block on a running cancel
//! callback: whoever finishes last frees.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        mpsc, Arc, Barrier,
    },
    thread,
    time::Duration,
};

use callcancel::{CancelReason, ServiceHost};
use common::{within_watchdog, Probe, WATCHDOG};

/// Registers a callback that signals `entered`, then blocks until `release`.
fn register_blocking(
    ctx: &callcancel::OperationContext,
    probe: &Arc<Probe>,
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
) {
    let release = std::sync::Mutex::new(release);
    ctx.register_for_cancel_with_free(
        Arc::clone(probe),
        move |reason, p: &Arc<Probe>| {
            entered.send(()).unwrap();
            release
                .lock()
                .unwrap()
                .recv_timeout(WATCHDOG)
                .expect("never released");
            p.on_cancel(reason);
        },
        |p| p.on_free(),
    )
    .unwrap();
}

#[test]
fn complete_does_not_block_on_a_running_cancel_callback_and_the_canceller_frees() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    register_blocking(&call, &probe, entered_tx, release_rx);

    let aborter = {
        let host = host.clone();
        thread::spawn(move || {
            host.abort();
            thread::current().id()
        })
    };
    entered_rx
        .recv_timeout(WATCHDOG)
        .expect("abort did not run the callback");

    // The callback is blocked; complete() must return anyway.
    within_watchdog("complete() while the cancel callback runs", move || {
        call.complete()
    });
    assert_eq!(
        probe.frees(),
        0,
        "free must wait for the running cancel callback"
    );
    assert_eq!(
        host.in_flight(),
        1,
        "call counts until its cancel callback and free finished"
    );
    assert_eq!(ch.in_flight(), 1);
    assert!(!host.wait_idle(Duration::from_millis(20)));

    release_tx.send(()).unwrap();
    let aborter_id = aborter.join().unwrap();
    assert_eq!(probe.cancels(), 1);
    assert_eq!(
        probe.frees(),
        1,
        "the canceller finished last, so it frees before abort returns"
    );
    assert_eq!(
        probe.free_thread(),
        Some(aborter_id),
        "free runs on the canceller's thread"
    );
    assert_eq!(probe.violations(), 0);
    assert!(host.wait_idle(WATCHDOG));
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn fault_callback_running_while_call_completes_frees_once_after_callback() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let call = ch.begin_call().unwrap();
    let probe = Probe::new();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    register_blocking(&call, &probe, entered_tx, release_rx);

    let faulter = {
        let ch = ch.clone();
        thread::spawn(move || ch.fault())
    };
    entered_rx.recv_timeout(WATCHDOG).unwrap();
    let completer = thread::spawn(move || call.complete());
    completer.join().unwrap();
    assert_eq!(probe.frees(), 0);
    release_tx.send(()).unwrap();
    faulter.join().unwrap();
    assert_eq!(probe.reason(), Some(CancelReason::ChannelFaulted));
    assert_eq!(
        (probe.cancels(), probe.frees(), probe.violations()),
        (1, 1, 0)
    );
    assert!(host.wait_idle(WATCHDOG));
}

#[test]
fn callback_never_sees_freed_state() {
    // The callback lingers a little after starting (only to make the overlap
    // likely); the state records whether it was freed while the callback used it.
    struct State {
        freed: AtomicBool,
        saw_freed: AtomicBool,
    }
    for _ in 0..20 {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let st = Arc::new(State {
            freed: AtomicBool::new(false),
            saw_freed: AtomicBool::new(false),
        });
        let (entered_tx, entered_rx) = mpsc::channel();
        let observe = Arc::clone(&st);
        call.register_for_cancel_with_free(
            Arc::clone(&st),
            move |_, s: &Arc<State>| {
                entered_tx.send(()).unwrap();
                thread::sleep(Duration::from_millis(2));
                if s.freed.load(SeqCst) {
                    s.saw_freed.store(true, SeqCst);
                }
            },
            |s| s.freed.store(true, SeqCst),
        )
        .unwrap();
        let h = {
            let host = host.clone();
            thread::spawn(move || host.abort())
        };
        entered_rx.recv_timeout(WATCHDOG).unwrap();
        call.complete();
        h.join().unwrap();
        assert!(
            observe.freed.load(SeqCst),
            "state must be freed once both finished"
        );
        assert!(
            !observe.saw_freed.load(SeqCst),
            "cancel callback saw freed state"
        );
    }
}

#[test]
fn racing_complete_and_abort_never_free_during_the_callback() {
    for i in 0..2_000 {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let probe = Probe::new();
        probe.register(&call).unwrap();
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                host.abort();
            });
            barrier.wait();
            call.complete();
        });
        assert!(probe.cancels() <= 1, "iteration {i}");
        assert_eq!(probe.frees(), 1, "iteration {i}");
        assert_eq!(
            probe.violations(),
            0,
            "iteration {i}: free overlapped the callback"
        );
        assert_eq!(host.in_flight(), 0, "iteration {i}");
    }
}

#[test]
fn inline_callback_finishes_before_free() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    host.abort();
    let probe = Probe::new();
    probe.register_drop(&call).unwrap();
    assert!(
        probe.cancel_finished(),
        "inline callback returned before register returned"
    );
    assert_eq!(probe.frees(), 0);
    call.complete();
    assert_eq!(
        (probe.cancels(), probe.frees(), probe.violations()),
        (1, 1, 0)
    );
}

/// The batched finish of a sweep (pair 2b in `state.rs`): a fault runs the
/// callbacks of 70 calls (more than two batches) while their owner
/// completes them, in the sweep's order, on another thread. Whichever side frees, every
/// state is freed exactly once, never while its callback runs, and the
/// channel ends with nothing in flight (a call that neither side freed
/// would stay in flight for good). The sweep counts its cancellations once,
/// at its end: the host's counter matches the callbacks that ran.
#[test]
fn a_fault_racing_the_completions_frees_every_call_once() {
    let rounds = 200;
    const CALLS: usize = 70;
    let host = ServiceHost::new();
    let (mut cancelled, mut sweeper_freed) = (0, 0);
    for _ in 0..rounds {
        let ch = host.open_channel().unwrap();
        let probes: Vec<_> = (0..CALLS).map(|_| Probe::new()).collect();
        let calls: Vec<_> = probes
            .iter()
            .map(|p| {
                let call = ch.begin_call().unwrap();
                p.register(&call).unwrap();
                call
            })
            .collect();
        let start = Arc::new(Barrier::new(2));
        let faulter = {
            let (ch, start) = (ch.clone(), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                ch.fault();
                thread::current().id()
            })
        };
        start.wait();
        // In the sweep's order: the owner chases the sweeper, completing
        // calls whose callbacks run or just returned.
        for call in calls {
            call.complete();
        }
        let faulter = faulter.join().unwrap();
        assert_eq!(ch.in_flight(), 0, "a call nobody freed");
        for p in &probes {
            assert_eq!(p.frees(), 1, "R2: freed exactly once");
            assert_eq!(p.violations(), 0, "R3");
            cancelled += p.cancels();
            if p.cancels() == 1 && p.free_thread() == Some(faulter) {
                sweeper_freed += 1; // completed while its callback ran
            }
        }
    }
    assert_eq!(host.in_flight(), 0);
    assert_eq!(
        host.stats().cancelled(CancelReason::ChannelFaulted),
        cancelled as u64,
        "one count per callback run"
    );
    eprintln!(
        "{cancelled} of {} calls cancelled, {sweeper_freed} of them freed by the sweeper",
        rounds * CALLS
    );
}
