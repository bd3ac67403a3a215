//! Fuzzing the API sequence (issue 6, item 6): a proptest state machine.
//!
//! proptest generates single-threaded sequences of operations (open channel,
//! begin call on a channel or the host, register with or without `on_free`,
//! with a callback that may panic, a second registration, complete or drop,
//! fault, abort, `close(0)`, `wait_idle(0)`, `cancelled()` polling and
//! `'static` watch futures). Each operation runs against the library and a
//! reference model that predicts its exact outcome: the result, which
//! callbacks and frees run (and in which order per call), the panic that is
//! re-raised, `cancel_reason()`, host state and in-flight counts on the host
//! and every channel, and which parked watch futures are woken. proptest
//! shrinks a failing sequence to a minimal one.
//!
//! # Running it
//!
//! ```sh
//! cargo test --test model_fuzz                       # 256 sequences (default)
//! PROPTEST_CASES=100000 cargo test --release --test model_fuzz   # a long run
//! ```
//!
//! A failure prints the shrunk sequence and the seed; proptest's failure
//! persistence is off (the sequence is printed instead), so replay by pasting
//! the sequence into a test or rerun with `PROPTEST_RNG_SEED=<seed>`.
//! `cargo fuzz` (libFuzzer) needs a `fuzz/` crate and nightly; this proptest
//! target covers the same single-threaded API space with shrinking and runs
//! on stable and under miri (ci/miri.sh runs 16 cases).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use callcancel::{
    Call, CancelReason, Channel, Error, HostState, RegisterErrorKind, ServiceHost, WatchCancelled,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
enum Op {
    OpenChannel,
    BeginCall {
        chan: Option<usize>,
    },
    Register {
        call: usize,
        free: bool,
        panic_cb: bool,
        panic_free: bool,
    },
    SecondRegister {
        call: usize,
    },
    Complete {
        call: usize,
        by_drop: bool,
    },
    Fault {
        chan: usize,
    },
    Abort,
    Close,
    WaitIdle,
    Poll {
        call: usize,
    },
    Watch {
        call: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::OpenChannel),
        6 => prop::option::weighted(0.7, 0..4usize).prop_map(|chan| Op::BeginCall { chan }),
        5 => (0..8usize, any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.1))
            .prop_map(|(call, free, panic_cb, panic_free)| Op::Register { call, free, panic_cb, panic_free }),
        1 => (0..8usize).prop_map(|call| Op::SecondRegister { call }),
        4 => (0..8usize, any::<bool>()).prop_map(|(call, by_drop)| Op::Complete { call, by_drop }),
        1 => (0..4usize).prop_map(|chan| Op::Fault { chan }),
        1 => Just(Op::Abort),
        1 => Just(Op::Close),
        1 => Just(Op::WaitIdle),
        2 => (0..8usize).prop_map(|call| Op::Poll { call }),
        2 => (0..8usize).prop_map(|call| Op::Watch { call }),
    ]
}

/// What ran, in order: (registration id, event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Cancel(u64, CancelReason),
    Free(u64),
}

type Log = Arc<Mutex<Vec<Ev>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MState {
    Open,
    Aborted,
    Closed,
}

struct MCall {
    call: Call,
    chan: Option<usize>,
    reg: Option<(u64, bool, bool)>, // id, panic_cb, panic_free
    reason: Option<CancelReason>,
}

struct MChan {
    channel: Channel,
    faulted: bool,
}

struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, SeqCst);
    }
}

struct PendingWatch {
    call_key: u64,
    fut: Pin<Box<WatchCancelled>>,
    flag: Arc<Flag>,
}

struct Harness {
    host: ServiceHost,
    state: MState,
    chans: Vec<MChan>,
    calls: Vec<(u64, MCall)>,
    next_key: u64,
    next_reg: u64,
    log: Log,
    watches: Vec<PendingWatch>,
    freed: Rc<RefCell<HashMap<u64, usize>>>,
    regs: u64,
}

fn text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

impl Harness {
    fn new() -> Self {
        Self {
            host: ServiceHost::new(),
            state: MState::Open,
            chans: Vec::new(),
            calls: Vec::new(),
            next_key: 0,
            next_reg: 0,
            log: Arc::new(Mutex::new(Vec::new())),
            watches: Vec::new(),
            freed: Rc::new(RefCell::new(HashMap::new())),
            regs: 0,
        }
    }

    fn take_log(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn host_refusal(&self) -> Option<Error> {
        match self.state {
            MState::Open => None,
            MState::Aborted => Some(Error::HostAborted),
            MState::Closed => Some(Error::HostClosed),
        }
    }

    /// The model's sweep: which calls get cancelled, in any order.
    fn sweep(&mut self, chan: Option<usize>, reason: CancelReason) -> Vec<Ev> {
        let mut expect = Vec::new();
        for (_, c) in &mut self.calls {
            if c.reason.is_some() || (chan.is_some() && c.chan != chan) {
                continue;
            }
            c.reason = Some(reason);
            if let Some((id, _, _)) = c.reg {
                expect.push(Ev::Cancel(id, reason));
            }
        }
        expect
    }

    fn panicking(&self, evs: &[Ev]) -> Vec<String> {
        evs.iter()
            .filter_map(|e| match e {
                Ev::Cancel(id, _) => self
                    .calls
                    .iter()
                    .find(|(_, c)| c.reg.is_some_and(|r| r.0 == *id && r.1))
                    .map(|_| format!("cb-{id}")),
                Ev::Free(_) => None,
            })
            .collect()
    }

    /// Runs a sweep (fault/abort/close) and checks the events and the panic.
    fn check_sweep(&mut self, expect: Vec<Ev>, res: std::thread::Result<()>, what: &str) {
        let got = self.take_log();
        let mut a = got.clone();
        let mut b = expect.clone();
        let key = |e: &Ev| format!("{e:?}");
        a.sort_by_key(key);
        b.sort_by_key(key);
        assert_eq!(a, b, "{what}: callbacks run");
        let panics = self.panicking(&got);
        match res {
            Ok(()) => assert!(panics.is_empty(), "{what}: swallowed panics {panics:?}"),
            Err(p) => assert_eq!(
                Some(text(&*p)),
                panics.first().cloned(),
                "{what}: must re-raise the first panic in run order"
            ),
        }
        self.check_watches(&[]);
    }

    fn in_flight_model(&self, chan: Option<usize>) -> usize {
        self.calls
            .iter()
            .filter(|(_, c)| chan.is_none() || c.chan == chan)
            .count()
    }

    /// Watch futures of cancelled or completed calls must have been woken.
    fn check_watches(&mut self, completed: &[u64]) {
        let calls = &self.calls;
        self.watches.retain_mut(|w| {
            let live = calls.iter().find(|(k, _)| *k == w.call_key);
            let due = match live {
                None => true,
                Some((_, c)) => c.reason.is_some(),
            } || completed.contains(&w.call_key);
            if !due {
                return true;
            }
            assert!(
                w.flag.0.load(SeqCst),
                "watch of call {} not woken",
                w.call_key
            );
            let want = live.and_then(|(_, c)| c.reason);
            let got = w.fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(got, Poll::Ready(want), "watch of call {}", w.call_key);
            false
        });
    }

    fn check_counts(&self) {
        let want_state = match self.state {
            MState::Open => HostState::Open,
            MState::Aborted => HostState::Aborted,
            MState::Closed => HostState::Closed,
        };
        assert_eq!(self.host.state(), want_state);
        assert_eq!(self.host.in_flight(), self.in_flight_model(None));
        for (i, c) in self.chans.iter().enumerate() {
            assert_eq!(
                c.channel.in_flight(),
                self.in_flight_model(Some(i)),
                "chan {i}"
            );
            assert_eq!(c.channel.is_faulted(), c.faulted);
        }
        for (_, c) in &self.calls {
            assert_eq!(c.call.cancel_reason(), c.reason);
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::OpenChannel => match (self.host.open_channel(), self.host_refusal()) {
                (Ok(channel), None) => self.chans.push(MChan {
                    channel,
                    faulted: false,
                }),
                (res, want) => assert_eq!(res.err(), want),
            },
            Op::BeginCall { chan } => {
                let chan = chan.filter(|&i| i < self.chans.len());
                let res = match chan {
                    Some(i) => self.chans[i].channel.begin_call(),
                    None => self.host.begin_call(),
                };
                let want = self.host_refusal().or(match chan {
                    Some(i) if self.chans[i].faulted => Some(Error::ChannelFaulted),
                    _ => None,
                });
                match (res, want) {
                    (Ok(call), None) => {
                        let key = self.next_key;
                        self.next_key += 1;
                        self.calls.push((
                            key,
                            MCall {
                                call,
                                chan,
                                reg: None,
                                reason: None,
                            },
                        ));
                    }
                    (res, want) => assert_eq!(res.err(), want),
                }
            }
            Op::Register {
                call,
                free,
                panic_cb,
                panic_free,
            } => {
                let Some(i) = self.pick(call) else { return };
                let id = self.next_reg;
                self.next_reg += 1;
                let c = &mut self.calls[i].1;
                if c.reg.is_some() {
                    return self.apply(&Op::SecondRegister { call });
                }
                let (l1, l2) = (Arc::clone(&self.log), Arc::clone(&self.log));
                let on_cancel = move |r: CancelReason, _: &u64| {
                    l1.lock().unwrap().push(Ev::Cancel(id, r));
                    if panic_cb {
                        panic!("cb-{id}");
                    }
                };
                let res = catch_unwind(AssertUnwindSafe(|| {
                    if free || panic_free {
                        c.call
                            .register_for_cancel_with_free(id, on_cancel, move |s: u64| {
                                l2.lock().unwrap().push(Ev::Free(s));
                                if panic_free {
                                    panic!("free-{s}");
                                }
                            })
                            .map_err(|e| e.kind())
                    } else {
                        struct D(u64, Log);
                        impl Drop for D {
                            fn drop(&mut self) {
                                self.1.lock().unwrap().push(Ev::Free(self.0));
                            }
                        }
                        c.call
                            .register_for_cancel(D(id, l2), move |r, d: &D| on_cancel(r, &d.0))
                            .map_err(|e| e.kind())
                    }
                }));
                c.reg = Some((id, panic_cb, panic_free));
                let reason = c.reason;
                self.regs += 1;
                let got = self.take_log();
                match reason {
                    // R4: decided before: the callback runs inline, here.
                    Some(r) => {
                        assert_eq!(got, vec![Ev::Cancel(id, r)]);
                        match res {
                            Err(p) => {
                                assert!(panic_cb);
                                assert_eq!(text(&*p), format!("cb-{id}"));
                            }
                            Ok(r) => {
                                assert!(!panic_cb, "inline panic must propagate");
                                assert!(r.is_ok());
                            }
                        }
                    }
                    None => {
                        assert!(got.is_empty());
                        assert!(matches!(res, Ok(Ok(()))));
                    }
                }
            }
            Op::SecondRegister { call } => {
                let Some(i) = self.pick(call) else { return };
                let c = &self.calls[i].1;
                if c.reg.is_none() {
                    return;
                }
                let l = Arc::clone(&self.log);
                let e = c
                    .call
                    .register_for_cancel_with_free(
                        4242u64,
                        move |_, _| l.lock().unwrap().push(Ev::Free(u64::MAX)),
                        |_| panic!("a refused registration's on_free ran"),
                    )
                    .unwrap_err();
                assert_eq!(e.kind(), RegisterErrorKind::AlreadyRegistered);
                assert_eq!(e.into_state(), 4242);
                assert!(self.take_log().is_empty());
            }
            Op::Complete { call, by_drop } => {
                let Some(i) = self.pick(call) else { return };
                let (key, c) = self.calls.remove(i);
                let res = catch_unwind(AssertUnwindSafe(move || {
                    if by_drop {
                        drop(c.call)
                    } else {
                        c.call.complete()
                    }
                }));
                let got = self.take_log();
                match c.reg {
                    None => {
                        assert!(got.is_empty());
                        assert!(res.is_ok());
                    }
                    Some((id, _, panic_free)) => {
                        // R2/R6: exactly the free, nothing else.
                        assert_eq!(got, vec![Ev::Free(id)]);
                        *self.freed.borrow_mut().entry(id).or_default() += 1;
                        match res {
                            Err(p) => {
                                assert!(panic_free);
                                assert_eq!(text(&*p), format!("free-{id}"));
                            }
                            Ok(()) => assert!(!panic_free, "on_free panic must propagate"),
                        }
                    }
                }
                self.check_watches(&[key]);
            }
            Op::Fault { chan } => {
                if chan >= self.chans.len() {
                    return;
                }
                self.chans[chan].faulted = true;
                let expect = self.sweep(Some(chan), CancelReason::ChannelFaulted);
                let ch = self.chans[chan].channel.clone();
                let res = catch_unwind(AssertUnwindSafe(|| ch.fault()));
                self.check_sweep(expect, res, "fault");
            }
            Op::Abort => {
                let expect = if self.state == MState::Closed {
                    Vec::new()
                } else {
                    self.state = MState::Aborted;
                    self.sweep(None, CancelReason::HostAbort)
                };
                let h = self.host.clone();
                let res = catch_unwind(AssertUnwindSafe(|| h.abort()));
                self.check_sweep(expect, res, "abort");
            }
            Op::Close => {
                let idle = self.calls.is_empty();
                let want = if self.state == MState::Closed || idle {
                    Ok(())
                } else {
                    Err(Error::Timeout)
                };
                let expect = if want.is_ok() {
                    self.state = MState::Closed;
                    Vec::new()
                } else {
                    self.state = MState::Aborted;
                    self.sweep(None, CancelReason::HostAbort)
                };
                let h = self.host.clone();
                let mut got = None;
                let res = catch_unwind(AssertUnwindSafe(|| got = Some(h.close(Duration::ZERO))));
                if let Some(got) = got {
                    assert_eq!(got, want, "close");
                }
                self.check_sweep(expect, res, "close");
            }
            Op::WaitIdle => {
                assert_eq!(self.host.wait_idle(Duration::ZERO), self.calls.is_empty());
            }
            Op::Poll { call } => {
                let Some(i) = self.pick(call) else { return };
                let c = &self.calls[i].1;
                let mut fut = std::pin::pin!(c.call.cancelled());
                let got = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                let want = c.reason.map_or(Poll::Pending, Poll::Ready);
                assert_eq!(got, want, "cancelled()");
            }
            Op::Watch { call } => {
                let Some(i) = self.pick(call) else { return };
                let (key, c) = (self.calls[i].0, &self.calls[i].1);
                let flag = Arc::new(Flag(AtomicBool::new(false)));
                let waker = Waker::from(Arc::clone(&flag));
                let mut fut = Box::pin(c.call.watch().cancelled());
                let got = fut.as_mut().poll(&mut Context::from_waker(&waker));
                match c.reason {
                    Some(r) => assert_eq!(got, Poll::Ready(Some(r))),
                    None => {
                        assert_eq!(got, Poll::Pending);
                        self.watches.push(PendingWatch {
                            call_key: key,
                            fut,
                            flag,
                        });
                    }
                }
            }
        }
    }

    fn pick(&self, n: usize) -> Option<usize> {
        (!self.calls.is_empty()).then(|| n % self.calls.len())
    }

    /// End of a sequence: complete what is left, close, everything freed once.
    fn finish(mut self) {
        while !self.calls.is_empty() {
            self.apply(&Op::Complete {
                call: 0,
                by_drop: false,
            });
        }
        self.check_counts();
        assert!(self.watches.is_empty(), "watches left unresolved");
        assert_eq!(self.host.close(Duration::ZERO), Ok(()));
        assert_eq!(self.host.state(), HostState::Closed);
        assert!(self.freed.borrow().values().all(|&n| n == 1), "R2");
        assert_eq!(self.freed.borrow().len() as u64, self.regs, "R2");
    }
}

fn run(ops: &[Op]) {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op);
        h.check_counts();
    }
    h.finish();
}

fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let t = text(info.payload());
            if !(t.starts_with("cb-") || t.starts_with("free-")) {
                prev(info);
            }
        }));
    });
}

#[test]
fn api_sequences_match_the_reference_model() {
    quiet();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let t0 = std::time::Instant::now();
    let ops_run = std::cell::Cell::new(0usize);
    let result = runner.run(&prop::collection::vec(op(), 1..80), |ops| {
        ops_run.set(ops_run.get() + ops.len());
        run(&ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("model_fuzz: {e}");
    }
    println!(
        "model_fuzz: {cases} sequences, {} operations checked against the model in {:.1?}",
        ops_run.get(),
        t0.elapsed()
    );
}
