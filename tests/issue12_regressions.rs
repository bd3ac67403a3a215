//! Regression tests for issue 12 items that are not loom models: each one
//! failed (hung, leaked or spun) on the v1 core.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use callcancel::ServiceHost;
use common::{within_watchdog, Probe};

/// A waker whose `wake` blocks until released.
struct SlowWaker {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Wake for SlowWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            tx.send(()).unwrap();
            let _ = self.release.lock().unwrap().recv_timeout(common::WATCHDOG);
        }
    }
}

/// #3: thread A faults and stalls in a parked watch's waker; thread B's
/// fault must not return before the callback A claimed has been invoked
/// (A1 for every caller). v1 woke waiters before running the callback, so B
/// returned with the callback not run.
#[test]
fn a_losing_sweeper_returns_only_after_the_callback_started() {
    within_watchdog("A1 with a slow waker", || {
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let call = ch.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let waker = Waker::from(Arc::new(SlowWaker {
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(release_rx),
        }));
        let mut watch = Box::pin(call.watch().cancelled());
        assert!(watch
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        let a = {
            let ch = ch.clone();
            thread::spawn(move || ch.fault())
        };
        entered_rx.recv().unwrap(); // A is inside the waker now
        ch.fault(); // B
        assert_eq!(p.cancels(), 1, "A1: invoked when B's fault returned");
        release_tx.send(()).unwrap();
        a.join().unwrap();
        drop(watch);
        call.complete();
        assert_eq!(p.frees(), 1);
    });
}

struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// #4: `idle()` woke itself (`wake_by_ref`) on every poll while a call was
/// finishing, for as long as the free-state ran. Now it parks until the
/// freer notifies: a 200 ms free-state costs a handful of polls.
#[test]
fn idle_does_not_spin_while_a_free_state_runs() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let (in_free_tx, in_free_rx) = mpsc::channel();
    call.register_for_cancel_with_free(
        (),
        |_, _| {},
        move |()| {
            in_free_tx.send(()).unwrap();
            thread::sleep(Duration::from_millis(200));
        },
    )
    .unwrap();
    let owner = thread::spawn(move || call.complete());
    in_free_rx.recv().unwrap(); // the call is finishing now
    let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    let mut idle = pin!(host.idle());
    let mut polls = 0;
    let deadline = std::time::Instant::now() + common::WATCHDOG;
    loop {
        polls += 1;
        if idle.as_mut().poll(&mut cx).is_ready() {
            break;
        }
        // Poll again only when woken (as an executor would).
        while wakes.0.load(SeqCst) < polls {
            assert!(std::time::Instant::now() < deadline, "never woken");
            thread::sleep(Duration::from_millis(1));
        }
    }
    owner.join().unwrap();
    assert!(polls <= 3, "idle() was polled {polls} times");
}

/// A waker whose `clone` and `drop` touch the same channel's waiter list.
struct ReentrantWaker {
    watch: Mutex<Option<callcancel::CancelWatch>>,
}

impl ReentrantWaker {
    fn poke(&self) {
        // Polling another watch future of the channel takes its overflow
        // lock: a deadlock if our own clone/drop ran under it.
        if let Ok(guard) = self.watch.try_lock() {
            if let Some(w) = guard.as_ref() {
                // Two waiters of one call: at least one parks in the list.
                let mut f1 = pin!(w.cancelled());
                let mut f2 = pin!(w.cancelled());
                let mut cx = Context::from_waker(Waker::noop());
                let _ = f1.as_mut().poll(&mut cx);
                let _ = f2.as_mut().poll(&mut cx);
            }
        }
    }
}

impl Wake for ReentrantWaker {
    fn wake(self: Arc<Self>) {}
}

/// #8: user code (waker clone and drop) ran under the overflow mutex.
#[test]
fn waker_clone_and_drop_run_outside_our_locks() {
    within_watchdog("waker re-entering the channel", || {
        use std::task::RawWaker;
        let host = ServiceHost::new();
        let ch = host.open_channel().unwrap();
        let a = ch.begin_call().unwrap();
        let b = ch.begin_call().unwrap();
        let inner = Arc::new(ReentrantWaker {
            watch: Mutex::new(Some(b.watch())),
        });
        // A raw waker whose clone and drop re-enter the channel.
        fn vtable() -> &'static std::task::RawWakerVTable {
            &std::task::RawWakerVTable::new(clone, wake, wake, drop_w)
        }
        unsafe fn clone(p: *const ()) -> RawWaker {
            // SAFETY: `p` came from `Arc::into_raw` below.
            let arc = unsafe { Arc::<ReentrantWaker>::from_raw(p.cast()) };
            arc.poke();
            let c = Arc::clone(&arc);
            std::mem::forget(arc);
            RawWaker::new(Arc::into_raw(c).cast(), vtable())
        }
        unsafe fn wake(p: *const ()) {
            // SAFETY: as in `clone`.
            unsafe { drop_w(p) }
        }
        unsafe fn drop_w(p: *const ()) {
            // SAFETY: as in `clone`.
            let arc = unsafe { Arc::<ReentrantWaker>::from_raw(p.cast()) };
            arc.poke();
        }
        let raw = RawWaker::new(Arc::into_raw(Arc::clone(&inner)).cast(), vtable());
        // SAFETY: the vtable upholds the RawWaker contract (Arc refcounts).
        let waker = unsafe { Waker::from_raw(raw) };
        // Two waiters of `a`: the second parks in the channel's list, whose
        // lock must not be held while our waker is cloned or dropped.
        let mut first = Box::pin(a.watch().cancelled());
        let mut watch = Box::pin(a.watch().cancelled());
        let mut cx = Context::from_waker(&waker);
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        assert!(watch.as_mut().poll(&mut cx).is_pending()); // replaces: drops the old
        drop(first);
        assert!(a.cancel());
        assert_eq!(
            watch.as_mut().poll(&mut cx),
            Poll::Ready(Some(callcancel::CancelReason::CallCancelled))
        );
        drop(watch);
        inner.watch.lock().unwrap().take();
    });
}

/// #2 at scale: 10,000 channels whose registered state owns the last handle
/// are all disposed of by their calls' freers.
#[test]
fn ten_thousand_orphaned_channels_are_all_freed() {
    let host = ServiceHost::new();
    for _ in 0..10_000 {
        let ch = host.open_channel().unwrap();
        let call = ch.begin_call().unwrap();
        call.register_for_cancel(ch, |_, _| {}).unwrap();
        call.complete();
    }
    let stats = host.stats();
    assert_eq!(stats.channels, 0, "no orphaned channel left behind");
    assert_eq!(stats.in_flight, 0);
}
