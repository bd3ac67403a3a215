//! Leased slots change hands: a thread's lease slot is freed by another
//! thread, its tag passes to a new thread at exit, and the new holder takes
//! the slot with a plain store (`CallState::occupy_leased`).
//!
//! One test per binary, so this file's threads are the only ones taking
//! lease tags: the exiting thread's tag is the lowest free one and goes to
//! the next thread that begins a call. The hand-offs are ordered only by
//! `Relaxed` flags, which create no happens-before edge: so under miri and
//! ThreadSanitizer a missing `Release`/`Acquire` pair on the state word or
//! the tag pool shows up as a data race on the slot's callback storage, and
//! under miri's weak-memory emulation the abort must find D's calls through
//! the R4 fence pair alone. The assertions count callbacks and frees (R1,
//! R2, R4). (Under miri the `SeqCst` fence standing in for `asym::light`
//! also acquires, so it would mask a too-weak load in `occupy_leased`:
//! checked by hand, a `Relaxed` load there passes under miri.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use callcancel::{Call, CancelReason, ServiceHost};

struct Counts {
    cancels: AtomicUsize,
    frees: AtomicUsize,
}

fn register(call: &Call, counts: &Arc<Counts>, payload: u64) {
    let (c, f) = (Arc::clone(counts), Arc::clone(counts));
    call.register_for_cancel_with_free(
        payload,
        move |_, s| {
            assert_eq!(*s, payload);
            // Relaxed, like every hand-off flag here: a SeqCst access would
            // give miri (which treats SeqCst as a global clock) an edge the
            // state word is supposed to provide.
            c.cancels.fetch_add(1, Ordering::Relaxed);
        },
        move |s| {
            assert_eq!(s, payload);
            f.frees.fetch_add(1, Ordering::Relaxed);
        },
    )
    .map_err(|_| "already registered")
    .unwrap();
}

fn spin_until(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        std::hint::spin_loop();
        thread::yield_now();
    }
}

#[test]
fn a_lease_slot_passes_between_threads_without_losing_state() {
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let counts = Arc::new(Counts {
        cancels: AtomicUsize::new(0),
        frees: AtomicUsize::new(0),
    });

    // Thread A: its first call leases its slot, its second call occupies it
    // with a plain store; it hands that call to us and exits (tag given back).
    let (tx, rx) = mpsc::channel();
    {
        let channel = channel.clone();
        let counts = Arc::clone(&counts);
        thread::spawn(move || {
            let first = channel.begin_call().unwrap();
            register(&first, &counts, 1);
            first.complete();
            let second = channel.begin_call().unwrap();
            register(&second, &counts, 2);
            tx.send(second).unwrap();
        })
        .join()
        .unwrap();
    }
    let held = rx.recv().unwrap();

    // Thread D: takes the tag A gave back; A's slot is still occupied by
    // `held`, so its first call goes elsewhere. Once we complete `held` (on
    // this thread), D's next call re-occupies the leased slot, ordered after
    // our release only through the state word.
    let released = Arc::new(AtomicBool::new(false));
    let d_ready = Arc::new(AtomicBool::new(false));
    let go_abort = Arc::new(AtomicBool::new(false));
    let d = {
        let channel = channel.clone();
        let counts = Arc::clone(&counts);
        let (released, d_ready, go_abort) = (
            Arc::clone(&released),
            Arc::clone(&d_ready),
            Arc::clone(&go_abort),
        );
        thread::spawn(move || {
            let other = channel.begin_call().unwrap();
            register(&other, &counts, 3);
            other.complete();
            spin_until(&released);
            let mut calls = Vec::new();
            for payload in 4..8 {
                let call = channel.begin_call().unwrap();
                register(&call, &counts, payload);
                calls.push(call);
            }
            d_ready.store(true, Ordering::Relaxed);
            // Acquire: reading the reasons below must come after the abort
            // returned (R4 speaks of observers ordered after it).
            while !go_abort.load(Ordering::Acquire) {
                thread::yield_now();
            }
            // Every call of D was in flight across the abort (R4).
            let reasons: Vec<_> = calls.iter().map(|c| c.cancel_reason()).collect();
            drop(calls);
            reasons
        })
    };
    held.complete();
    released.store(true, Ordering::Relaxed);
    spin_until(&d_ready);
    // `d_ready` was Relaxed: this abort is not ordered after D's calls began,
    // so finding them rests on the R4 fence pair alone.
    host.abort();
    go_abort.store(true, Ordering::Release);
    let reasons = d.join().unwrap();
    assert_eq!(reasons, vec![Some(CancelReason::HostAbort); 4]);
    // Seven registrations: the four of D were cancelled once each (R1), and
    // every state was freed exactly once (R2).
    assert_eq!(counts.cancels.load(Ordering::SeqCst), 4);
    assert_eq!(counts.frees.load(Ordering::SeqCst), 7);
    assert_eq!(host.in_flight(), 0);
}
