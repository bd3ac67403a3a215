//! Fuzzing the API sequence (issue 6, item 6): a proptest state machine.
//!
//! proptest generates single-threaded sequences of operations (open channel,
//! begin call on a channel or the host — with no deadline, one already past,
//! one an hour away, or one 0–3 ms away — register with or without
//! `on_free`, with a callback that may panic, a second registration,
//! complete or drop, fault, abort, `close(0)`, `wait_idle(0)`, `cancelled()`
//! polling, `'static` watch futures, `OperationContext::cancel()`, taking a
//! `Canceller` and using one later — here or from another thread, often after
//! its call completed and its slot serves another call). Each operation runs
//! against the library and a reference model that predicts its exact
//! outcome: the result, which callbacks and frees run (and in which order per
//! call), the panic that is re-raised, `cancel_reason()`, `deadline()`, host
//! state, in-flight counts on the host and every channel, `HostStats`
//! (`cancelled(reason)` for each of the four reasons, `refused`,
//! `in_flight`), and which parked watch futures are woken. In particular:
//!
//! * **R5** `cancel()` returns true exactly when its `CallCancelled` is the
//!   call's first reason (then a registered callback runs at once, here, and
//!   a panic in it propagates from `cancel()`), false once another reason
//!   was decided;
//! * **R6** a `Canceller` of a completed call reports `is_finished()`,
//!   returns false and leaves every later call alone (each live call's
//!   reason is compared after every operation);
//! * **R4/R7** a call begun past its deadline is in flight and already
//!   cancelled with `DeadlineExceeded` (a later registration runs the
//!   callback inline); a short deadline is expired by the crate's timer
//!   thread, which runs a callback registered before it (catching its panic)
//!   and never before the deadline (`Instant::now()` is checked in the
//!   callback and after); an hour-away deadline never fires. To keep the
//!   model exact, the operation that begins a short-deadline call (and
//!   registers on it, if drawn) waits until the timer cancelled it; the
//!   timer racing other operations is the stress test's part
//!   (`tests/stress.rs`).
//!
//! proptest shrinks a failing sequence to a minimal one.
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
//! on stable and under miri (16 cases; deadlines become plain calls there,
//! since the timer thread sleeps in interpreted time).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use callcancel::{
    Call, CancelReason, Canceller, Channel, Error, HostState, RegisterErrorKind, ServiceHost,
    WatchCancelled,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// The deadline a call is begun with.
#[derive(Debug, Clone, Copy)]
enum Dl {
    None,
    /// `micros` in the past at `begin`: in flight and already cancelled.
    Past {
        micros: u64,
    },
    /// An hour away: the call completes (or is cancelled otherwise) first.
    Far,
    /// `micros` (0–3 ms) away. The op begins the call, registers at once if
    /// `register` (the callback then runs on the timer thread, or inline if
    /// the deadline passed first; a panicking one is caught there), and
    /// waits until the timer cancelled it, so the model stays deterministic.
    Short {
        micros: u64,
        register: bool,
        panic_cb: bool,
    },
}

#[derive(Debug, Clone)]
enum Op {
    OpenChannel,
    BeginCall {
        chan: Option<usize>,
        deadline: Dl,
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
    /// `OperationContext::cancel()`.
    Cancel {
        call: usize,
    },
    /// Keeps `call.canceller()` for later (it outlives the call).
    TakeCanceller {
        call: usize,
    },
    /// `Canceller::cancel()` of a kept canceller, whose call may have
    /// completed long ago (its slot serving another call), here or on
    /// another thread.
    UseCanceller {
        which: usize,
        other_thread: bool,
    },
}

fn deadline() -> impl Strategy<Value = Dl> {
    prop_oneof![
        12 => Just(Dl::None),
        1 => (0..1000u64).prop_map(|micros| Dl::Past { micros }),
        1 => Just(Dl::Far),
        1 => (0..3000u64, prop::bool::weighted(0.7), prop::bool::weighted(0.2))
            .prop_map(|(micros, register, panic_cb)| Dl::Short { micros, register, panic_cb }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::OpenChannel),
        6 => (prop::option::weighted(0.7, 0..4usize), deadline())
            .prop_map(|(chan, deadline)| Op::BeginCall { chan, deadline }),
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
        2 => (0..8usize).prop_map(|call| Op::Cancel { call }),
        1 => (0..8usize).prop_map(|call| Op::TakeCanceller { call }),
        2 => (0..8usize, prop::bool::weighted(0.3))
            .prop_map(|(which, other_thread)| Op::UseCanceller { which, other_thread }),
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
    deadline: Option<Instant>,
    reg: Option<(u64, bool, bool)>, // id, panic_cb, panic_free
    /// Its callback ran on the timer thread.
    timer_cb: bool,
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
    /// Kept cancellers and the key of the call each was taken from.
    cancellers: Vec<(Canceller, u64)>,
    /// Calls the model cancelled, per reason (`reason_index`), and refusals:
    /// `HostStats` must match exactly.
    cancelled: [u64; 4],
    refused: u64,
    /// Of `refused`: begins refused because the channel was faulted.
    refused_faulted: u64,
    /// DeadlineExceeded callbacks that ran before their deadline (R7).
    early: Arc<std::sync::atomic::AtomicUsize>,
}

fn reason_index(r: CancelReason) -> usize {
    match r {
        CancelReason::HostAbort => 0,
        CancelReason::ChannelFaulted => 1,
        CancelReason::CallCancelled => 2,
        CancelReason::DeadlineExceeded => 3,
        other => panic!("unknown reason {other:?}"),
    }
}

const REASONS: [CancelReason; 4] = [
    CancelReason::HostAbort,
    CancelReason::ChannelFaulted,
    CancelReason::CallCancelled,
    CancelReason::DeadlineExceeded,
];

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
            cancellers: Vec::new(),
            cancelled: [0; 4],
            refused: 0,
            refused_faulted: 0,
            early: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
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
            self.cancelled[reason_index(reason)] += 1;
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
            // R5/R6: also never touched by a stale canceller or a deadline.
            assert_eq!(c.call.cancel_reason(), c.reason);
            assert_eq!(c.call.deadline(), c.deadline);
        }
        let stats = self.host.stats();
        for r in REASONS {
            assert_eq!(
                stats.cancelled(r),
                self.cancelled[reason_index(r)],
                "HostStats::cancelled({r:?})"
            );
        }
        assert_eq!(stats.refused, self.refused, "HostStats::refused");
        assert_eq!(
            stats.refused_channel_faulted, self.refused_faulted,
            "HostStats::refused_channel_faulted"
        );
        assert_eq!(stats.in_flight, self.in_flight_model(None));
        assert_eq!(self.early.load(SeqCst), 0, "R7: a deadline fired early");
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::OpenChannel => match (self.host.open_channel(), self.host_refusal()) {
                (Ok(channel), None) => self.chans.push(MChan {
                    channel,
                    faulted: false,
                }),
                (res, want) => {
                    self.refused += 1;
                    assert_eq!(res.err(), want)
                }
            },
            Op::BeginCall { chan, deadline } => {
                let chan = chan.filter(|&i| i < self.chans.len());
                // No timer thread under miri (it sleeps in interpreted time).
                let deadline = if cfg!(miri) { Dl::None } else { deadline };
                let now = Instant::now();
                let at = match deadline {
                    Dl::None => None,
                    Dl::Past { micros } => Some(
                        now.checked_sub(Duration::from_micros(micros))
                            .unwrap_or(now),
                    ),
                    Dl::Far => Some(now + Duration::from_secs(3600)),
                    Dl::Short { micros, .. } => Some(now + Duration::from_micros(micros)),
                };
                let res = match (chan, at) {
                    (Some(i), None) => self.chans[i].channel.begin_call(),
                    (Some(i), Some(at)) => self.chans[i].channel.begin_call_with_deadline(at),
                    (None, None) => self.host.begin_call(),
                    (None, Some(at)) => self.host.begin_call_with_deadline(at),
                };
                let want = self.host_refusal().or(match chan {
                    Some(i) if self.chans[i].faulted => Some(Error::ChannelFaulted),
                    _ => None,
                });
                match (res, want) {
                    (Ok(call), None) => {
                        let key = self.next_key;
                        self.next_key += 1;
                        // R4/R7: begun past its deadline: in flight and
                        // already cancelled (no callback yet to run).
                        let past = matches!(deadline, Dl::Past { .. });
                        let reason = past.then_some(CancelReason::DeadlineExceeded);
                        if past {
                            self.cancelled[reason_index(CancelReason::DeadlineExceeded)] += 1;
                        }
                        self.calls.push((
                            key,
                            MCall {
                                call,
                                chan,
                                deadline: at,
                                reg: None,
                                timer_cb: false,
                                reason,
                            },
                        ));
                        assert!(self.take_log().is_empty());
                        if let Dl::Short {
                            register, panic_cb, ..
                        } = deadline
                        {
                            self.expire(self.calls.len() - 1, register, panic_cb);
                        }
                    }
                    (res, want) => {
                        self.refused += 1;
                        self.refused_faulted += u64::from(want == Some(Error::ChannelFaulted));
                        assert_eq!(res.err(), want)
                    }
                }
            }
            Op::Register {
                call,
                free,
                panic_cb,
                panic_free,
            } => {
                let Some(i) = self.pick(call) else { return };
                if self.calls[i].1.reg.is_some() {
                    return self.apply(&Op::SecondRegister { call });
                }
                let (id, res) = self.register(i, free, panic_cb, panic_free);
                let reason = self.calls[i].1.reason;
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
                let timer_cb = c.timer_cb;
                let res = catch_unwind(AssertUnwindSafe(move || {
                    if by_drop {
                        drop(c.call)
                    } else {
                        c.call.complete()
                    }
                }));
                let mut got = self.take_log();
                if let (true, Some((id, _, _))) = (timer_cb, c.reg) {
                    // The timer thread ran the callback: it may still be
                    // finishing it, and then it frees (R3: completion does
                    // not wait). Wait for the free and the in-flight count.
                    let give_up = Instant::now() + Duration::from_secs(10);
                    while !got.contains(&Ev::Free(id))
                        || self.host.in_flight() != self.in_flight_model(None)
                    {
                        assert!(Instant::now() < give_up, "timer-run call {id} never freed");
                        std::thread::yield_now();
                        got.extend(self.take_log());
                    }
                }
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
            Op::Cancel { call } => {
                let Some(i) = self.pick(call) else { return };
                let key = self.calls[i].0;
                let want = self.model_cancel(Some(key));
                let c = &self.calls[i].1;
                let got = catch_unwind(AssertUnwindSafe(|| c.call.cancel()));
                self.check_cancel(want, got, "cancel()");
                assert_eq!(self.calls[i].1.call.cancel_reason(), self.calls[i].1.reason);
            }
            Op::TakeCanceller { call } => {
                let Some(i) = self.pick(call) else { return };
                let (key, c) = (self.calls[i].0, &self.calls[i].1);
                let canceller = c.call.canceller();
                assert!(!canceller.is_finished());
                if self.cancellers.len() >= 8 {
                    self.cancellers.remove(0);
                }
                self.cancellers.push((canceller, key));
            }
            Op::UseCanceller {
                which,
                other_thread,
            } => {
                if self.cancellers.is_empty() {
                    return;
                }
                let (canceller, key) = self.cancellers[which % self.cancellers.len()].clone();
                let live = self.calls.iter().any(|(k, _)| *k == key);
                // R6: a canceller of a completed call is finished.
                assert_eq!(canceller.is_finished(), !live, "Canceller::is_finished");
                let want = self.model_cancel(live.then_some(key));
                let got = if other_thread {
                    let c = canceller.clone();
                    std::thread::scope(|s| s.spawn(move || c.cancel()).join())
                } else {
                    catch_unwind(AssertUnwindSafe(|| canceller.cancel()))
                };
                self.check_cancel(want, got, "Canceller::cancel()");
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

    /// Registers on call `i` (which has no registration yet); returns the
    /// registration id and what `register_for_cancel*` did (a panic of an
    /// inline callback is caught).
    #[allow(clippy::type_complexity)]
    fn register(
        &mut self,
        i: usize,
        free: bool,
        panic_cb: bool,
        panic_free: bool,
    ) -> (u64, std::thread::Result<Result<(), RegisterErrorKind>>) {
        let id = self.next_reg;
        self.next_reg += 1;
        let c = &mut self.calls[i].1;
        let (l1, l2) = (Arc::clone(&self.log), Arc::clone(&self.log));
        let (deadline, early) = (c.deadline, Arc::clone(&self.early));
        let on_cancel = move |r: CancelReason, _: &u64| {
            // R7: never before the deadline, as seen by the callback.
            if r == CancelReason::DeadlineExceeded && deadline.is_none_or(|d| Instant::now() < d) {
                early.fetch_add(1, SeqCst);
            }
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
        self.regs += 1;
        (id, res)
    }

    /// A per-call cancel (`OperationContext::cancel` or a `Canceller`) of the
    /// call with key `key` (`None`: completed): the model's answer and
    /// expected events.
    fn model_cancel(&mut self, key: Option<u64>) -> (bool, Vec<Ev>, Option<String>) {
        let Some((_, c)) = self.calls.iter_mut().find(|(k, _)| Some(*k) == key) else {
            return (false, Vec::new(), None); // R6: completed: nothing
        };
        if c.reason.is_some() {
            return (false, Vec::new(), None); // R5: the first reason stays
        }
        c.reason = Some(CancelReason::CallCancelled);
        self.cancelled[reason_index(CancelReason::CallCancelled)] += 1;
        match c.reg {
            Some((id, panic_cb, _)) => (
                true,
                vec![Ev::Cancel(id, CancelReason::CallCancelled)],
                panic_cb.then(|| format!("cb-{id}")),
            ),
            None => (true, Vec::new(), None),
        }
    }

    /// Checks a per-call cancel's answer, events and panic.
    fn check_cancel(
        &mut self,
        want: (bool, Vec<Ev>, Option<String>),
        got: std::thread::Result<bool>,
        what: &str,
    ) {
        let (won, events, panic) = want;
        assert_eq!(self.take_log(), events, "{what}: callbacks run");
        match got {
            Ok(g) => {
                assert!(panic.is_none(), "{what}: swallowed a callback panic");
                assert_eq!(g, won, "{what}: returned");
            }
            Err(p) => assert_eq!(Some(text(&*p)), panic, "{what}: panic"),
        }
        self.check_watches(&[]);
    }

    /// The rest of a `Dl::Short` begin for call `i`: registers at once if
    /// asked, then waits until the timer thread cancelled the call with
    /// DeadlineExceeded (R4/R7: not lost; never early, checked in the
    /// callback) and its callback, if any, ran — inline in the registration
    /// if the deadline came first (a panic then propagates), else on the
    /// timer thread (a panic is caught there).
    fn expire(&mut self, i: usize, register: bool, panic_cb: bool) {
        let reg = register.then(|| self.register(i, true, panic_cb, false));
        let c = &self.calls[i].1;
        let at = c.deadline.expect("a short deadline");
        let give_up = Instant::now() + Duration::from_secs(10);
        let want = Ev::Cancel(
            reg.as_ref().map_or(u64::MAX, |r| r.0),
            CancelReason::DeadlineExceeded,
        );
        let mut log = Vec::new();
        loop {
            log.extend(self.take_log());
            // The timer thread counts the cancellation right after its
            // deciding CAS: wait for the count too (a snapshot may lag the
            // decision by that much; `HostStats` docs).
            let dx = reason_index(CancelReason::DeadlineExceeded);
            let fired = c.call.cancel_reason() == Some(CancelReason::DeadlineExceeded)
                && (reg.is_none() || log.contains(&want))
                && self.host.stats().cancelled(CancelReason::DeadlineExceeded) > self.cancelled[dx];
            if fired {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "R4/R7: deadline {:?} ago never fired (reason {:?}, log {log:?})",
                Instant::now() - at,
                c.call.cancel_reason()
            );
            std::thread::yield_now();
        }
        assert!(Instant::now() >= at, "R7: cancelled before its deadline");
        if let Some((id, res)) = reg {
            assert_eq!(log, vec![want], "deadline callback");
            match res {
                // Inline or on the timer thread (the first if the reason was
                // decided before the registration).
                Ok(r) => {
                    assert!(r.is_ok());
                    self.calls[i].1.timer_cb = true;
                }
                Err(p) => {
                    // Inline: the deadline passed before the registration.
                    assert!(panic_cb);
                    assert_eq!(text(&*p), format!("cb-{id}"));
                }
            }
        } else {
            assert!(log.is_empty());
        }
        self.calls[i].1.reason = Some(CancelReason::DeadlineExceeded);
        self.cancelled[reason_index(CancelReason::DeadlineExceeded)] += 1;
        self.check_watches(&[]);
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
