//! Randomized multi-threaded stress against a reference model of the rules.
//!
//! A seeded generator drives several threads through random mixes of
//! `open_channel`, `begin_call` (channel and host scope), registration with
//! and without `on_free`, second registrations, `complete` and drop,
//! `cancelled()` polling, `'static` watch futures, `fault`, `abort`,
//! `close(timeout)` and `wait_idle`, all on one host per round. The model is a
//! set of per-call records and per-round event counters; every outcome is
//! checked against it:
//!
//! * **R1** a callback runs at most once (checked on entry);
//! * **R2** every accepted state is freed exactly once, every refused state
//!   comes back in the error (same token) and none of its closures ever runs;
//! * **R3** no free while the callback runs, and the callback never sees a
//!   freed state;
//! * **R4/A1** after `abort`/`fault`/a timed-out `close` returns, every call
//!   that was in flight before it started and has not begun completing is
//!   cancelled, and a call registered before it started has had its callback
//!   return (unless another canceller that claimed it is still running); a
//!   registration on an already-cancelled call runs the callback inline;
//! * **R5** `cancel_reason()`, the callback's reason, a polled `cancelled()`
//!   and the watch agree, and the reason is one a canceller actually raised;
//! * **R6** a call during whose whole life no canceller ran is never
//!   cancelled and its callback never runs;
//! * **A1** `begin_call`/`open_channel` fail after an abort/fault/close
//!   returned, and every refusal names an event that really started;
//! * **A2** a successful `close` means every call completed and every state
//!   was freed; an idle host after an abort has freed every state (in-flight
//!   counts a call until its callback and free finished); at the end of each
//!   round in-flight is zero on the host and every channel;
//! * every watch future left pending is woken by the end of the round.
//!
//! Knobs (environment): `STRESS_CALLS` (calls to begin in total; default
//! 1_000_000, 400 under miri), `STRESS_SEED`
//! (replay a run), `STRESS_ROUND` (replay one round of that seed),
//! `STRESS_THREADS` (default 4; 2 under miri). A failure prints the seed and
//! round to replay. Run with `-- --nocapture` to see the figures.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use callcancel::{
    Call, CancelReason, CancelWatch, Channel, Error, HostState, RegisterErrorKind, ServiceHost,
    WatchCancelled,
};

// ---------------------------------------------------------------- randomness

/// splitmix64: tiny, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

fn mix(a: u64, b: u64) -> u64 {
    Rng::new(a ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next()
}

// ------------------------------------------------------------------- config

struct Config {
    seed: u64,
    calls: u64,
    threads: usize,
    only_round: Option<u64>,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be an integer"))
    })
}

fn config() -> Config {
    let default_calls = if cfg!(miri) { 400 } else { 1_000_000 };
    let seed = env_u64("STRESS_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        mix(t, u64::from(std::process::id()))
    });
    Config {
        seed,
        calls: env_u64("STRESS_CALLS").unwrap_or(default_calls),
        threads: env_u64("STRESS_THREADS")
            .map_or(if cfg!(miri) { 2 } else { 4 }, |t| t.max(1) as usize),
        only_round: env_u64("STRESS_ROUND"),
    }
}

// -------------------------------------------------------------------- model

const REG_OK: u32 = 1;
const COMPLETING: u32 = 2;
const CB_START: u32 = 4;
const CB_DONE: u32 = 8;
const FREED: u32 = 16;
const NO_CANCEL: u32 = 32;

fn code(r: Option<CancelReason>) -> u32 {
    match r {
        None => 0,
        Some(CancelReason::HostAbort) => 1,
        Some(CancelReason::ChannelFaulted) => 2,
        Some(_) => 3,
    }
}

struct ChanInfo {
    id: usize,
    channel: Channel,
    faults_started: AtomicUsize,
    faults_finished: AtomicUsize,
}

/// What the model knows about one call.
struct Rec {
    id: u64,
    chan: Option<Arc<ChanInfo>>,
    watch: CancelWatch,
    phase: AtomicU32,
    cancels: AtomicU32,
    frees: AtomicU32,
    cb_reason: AtomicU32,
}

#[derive(Default)]
struct Counters {
    begun: AtomicU64,
    refused: AtomicU64,
    reg_ok: AtomicU64,
    second_reg: AtomicU64,
    inline_cb: AtomicU64,
    cb_started: AtomicU64,
    cb_done: AtomicU64,
    frees: AtomicU64,
    faults: AtomicU64,
    aborts: AtomicU64,
    closes_ok: AtomicU64,
    closes_timeout: AtomicU64,
    polls: AtomicU64,
    watches: AtomicU64,
    idle_checks: AtomicU64,
    r4_checked: AtomicU64,
    r6_checked: AtomicU64,
}

struct Round {
    seed: u64,
    index: u64,
    host: ServiceHost,
    channels: Mutex<Vec<Arc<ChanInfo>>>,
    next_chan: AtomicUsize,
    next_call: AtomicU64,
    /// Cancellers (abort, fault, close) currently running.
    active: AtomicUsize,
    /// Cancellers ever started (bumped after `active`).
    seq: AtomicU64,
    aborts_started: AtomicUsize,
    aborts_finished: AtomicUsize,
    closes_started: AtomicUsize,
    closes_finished: AtomicUsize,
    live: Vec<Mutex<HashMap<u64, Arc<Rec>>>>,
    ghost_runs: AtomicUsize,
    violations: Mutex<Vec<String>>,
    c: Counters,
    abort_at: Option<u64>,
    abort_fired: AtomicBool,
    close_fired: AtomicBool,
    close_at: Option<(u64, u64)>,
    quota: u64,
    max_live: usize,
    fault_one_in: u64,
}

impl Round {
    fn violation(&self, msg: String) {
        let mut v = self.violations.lock().unwrap();
        if v.len() < 20 {
            v.push(msg);
        }
    }

    fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.violation(msg());
        }
    }

    fn host_abort_raised(&self) -> bool {
        self.aborts_started.load(SeqCst) + self.closes_started.load(SeqCst) > 0
    }

    fn reason_allowed(&self, rec: &Rec, r: CancelReason) -> bool {
        match r {
            CancelReason::HostAbort => self.host_abort_raised(),
            CancelReason::ChannelFaulted => rec
                .chan
                .as_ref()
                .is_some_and(|c| c.faults_started.load(SeqCst) > 0),
            _ => false,
        }
    }
}

/// The registered state. Its drop is the free-state when no `on_free` is
/// given; with `on_free`, the hook frees and disarms the drop.
struct Tok {
    rec: Arc<Rec>,
    round: Arc<Round>,
    count_drop: bool,
}

impl Tok {
    fn on_cancel(&self, reason: CancelReason) {
        let (rec, round) = (&self.rec, &self.round);
        round.c.cb_started.fetch_add(1, SeqCst);
        let n = rec.cancels.fetch_add(1, SeqCst);
        round.check(n == 0, || format!("R1: call {} callback ran twice", rec.id));
        let before = rec.phase.fetch_or(CB_START, SeqCst);
        round.check(before & FREED == 0, || {
            format!("R3: call {} callback saw freed state", rec.id)
        });
        round.check(before & NO_CANCEL == 0, || {
            format!(
                "R6: call {} callback ran after an uncancelled completion",
                rec.id
            )
        });
        round.check(round.reason_allowed(rec, reason), || {
            format!(
                "R5: call {} cancelled with {reason:?} nobody raised",
                rec.id
            )
        });
        rec.cb_reason.store(code(Some(reason)), SeqCst);
        rec.phase.fetch_or(CB_DONE, SeqCst);
        round.c.cb_done.fetch_add(1, SeqCst);
    }

    fn free(&mut self) {
        let (rec, round) = (&self.rec, &self.round);
        let n = rec.frees.fetch_add(1, SeqCst);
        round.check(n == 0, || format!("R2: call {} freed twice", rec.id));
        let before = rec.phase.fetch_or(FREED, SeqCst);
        round.check(before & CB_START == 0 || before & CB_DONE != 0, || {
            format!("R3: call {} freed while its callback runs", rec.id)
        });
        round.c.frees.fetch_add(1, SeqCst);
        self.count_drop = false;
    }
}

impl Drop for Tok {
    fn drop(&mut self) {
        if self.count_drop {
            self.free();
        }
    }
}

/// A refused registration's state: its closures must never run.
struct Ghost {
    round: Arc<Round>,
    marker: u64,
}

// ------------------------------------------------------------------- wakers

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, SeqCst);
    }
}

struct PendingWatch {
    rec: Arc<Rec>,
    fut: Pin<Box<WatchCancelled>>,
    flag: Arc<Flag>,
}

// ------------------------------------------------------------------- worker

struct Live {
    call: Call,
    rec: Arc<Rec>,
    seq0: u64,
    quiet0: bool,
    registered: bool,
}

struct Worker {
    t: usize,
    round: Arc<Round>,
    rng: Rng,
    live: Vec<Live>,
    chan: Option<Arc<ChanInfo>>,
    recs: Vec<Arc<Rec>>,
    watches: Vec<PendingWatch>,
    last_state: u8,
}

fn state_rank(s: HostState) -> u8 {
    match s {
        HostState::Open => 0,
        HostState::Closing => 1,
        HostState::Aborted => 2,
        HostState::Closed => 3,
        _ => 4,
    }
}

impl Worker {
    fn observe_state(&mut self) -> HostState {
        let s = self.round.host.state();
        let r = state_rank(s);
        let last = self.last_state;
        self.round.check(r >= last && r < 4, || {
            format!("host state went backwards or unknown: rank {last} -> {s:?}")
        });
        self.last_state = r;
        s
    }

    /// Returns false once the host refuses new work.
    fn open_channel(&mut self) -> bool {
        let round = Arc::clone(&self.round);
        let aborted_before = round.aborts_finished.load(SeqCst) > 0;
        let closed_before = round.closes_finished.load(SeqCst) > 0;
        match round.host.open_channel() {
            Ok(channel) => {
                round.check(!aborted_before && !closed_before, || {
                    "A1: open_channel succeeded after abort/close returned".into()
                });
                let info = Arc::new(ChanInfo {
                    id: round.next_chan.fetch_add(1, SeqCst),
                    channel,
                    faults_started: AtomicUsize::new(0),
                    faults_finished: AtomicUsize::new(0),
                });
                round.channels.lock().unwrap().push(Arc::clone(&info));
                self.chan = Some(info);
                true
            }
            Err(e) => {
                self.check_host_refusal(e);
                false
            }
        }
    }

    fn check_host_refusal(&self, e: Error) {
        let round = &self.round;
        match e {
            Error::HostAborted => round.check(round.host_abort_raised(), || {
                "A1: HostAborted but nobody aborted".into()
            }),
            Error::HostClosed => round.check(round.closes_started.load(SeqCst) > 0, || {
                "HostClosed but nobody closed".into()
            }),
            other => round.violation(format!("unexpected host refusal {other:?}")),
        }
    }

    fn pick_channel(&mut self) -> Option<Arc<ChanInfo>> {
        let chans = self.round.channels.lock().unwrap();
        if chans.is_empty() {
            return None;
        }
        let i = self.rng.below(chans.len() as u64) as usize;
        Some(Arc::clone(&chans[i]))
    }

    /// Returns false once the host refuses new work.
    fn begin_call(&mut self) -> bool {
        let round = Arc::clone(&self.round);
        let host_scope = self.rng.chance(4);
        let chan = if host_scope {
            None
        } else {
            if self.chan.is_none() || self.rng.chance(8) {
                self.chan = self.pick_channel();
            }
            if self.chan.is_none() && !self.open_channel() {
                return false;
            }
            self.chan.clone()
        };
        let seq0 = round.seq.load(SeqCst);
        let quiet0 = round.active.load(SeqCst) == 0;
        let host_done = round.aborts_finished.load(SeqCst) + round.closes_finished.load(SeqCst);
        let fault_done = chan.as_ref().map_or(0, |c| c.faults_finished.load(SeqCst));
        let res = match &chan {
            Some(c) => c.channel.begin_call(),
            None => round.host.begin_call(),
        };
        match res {
            Ok(call) => {
                round.check(host_done == 0 && fault_done == 0, || {
                    format!("A1: begin_call succeeded after a finished abort/close ({host_done}) or fault ({fault_done})")
                });
                round.c.begun.fetch_add(1, SeqCst);
                let rec = Arc::new(Rec {
                    id: round.next_call.fetch_add(1, SeqCst),
                    chan: chan.clone(),
                    watch: call.watch(),
                    phase: AtomicU32::new(0),
                    cancels: AtomicU32::new(0),
                    frees: AtomicU32::new(0),
                    cb_reason: AtomicU32::new(0),
                });
                round.live[self.t]
                    .lock()
                    .unwrap()
                    .insert(rec.id, Arc::clone(&rec));
                self.recs.push(Arc::clone(&rec));
                self.live.push(Live {
                    call,
                    rec,
                    seq0,
                    quiet0,
                    registered: false,
                });
                true
            }
            Err(Error::ChannelFaulted) => {
                round.c.refused.fetch_add(1, SeqCst);
                let c = chan.expect("host-scope calls never see ChannelFaulted");
                round.check(c.faults_started.load(SeqCst) > 0, || {
                    format!("ChannelFaulted on channel {} nobody faulted", c.id)
                });
                round.channels.lock().unwrap().retain(|x| x.id != c.id);
                self.chan = None;
                true
            }
            Err(e) => {
                round.c.refused.fetch_add(1, SeqCst);
                self.check_host_refusal(e);
                false
            }
        }
    }

    fn register(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        let with_free = self.rng.chance(2);
        let live = &mut self.live[i];
        let pre = live.call.cancel_reason();
        let tok = Tok {
            rec: Arc::clone(&live.rec),
            round: Arc::clone(&round),
            count_drop: true,
        };
        let res = if with_free {
            live.call.register_for_cancel_with_free(
                tok,
                |r, t: &Tok| t.on_cancel(r),
                |mut t: Tok| t.free(),
            )
        } else {
            live.call
                .register_for_cancel(tok, |r, t: &Tok| t.on_cancel(r))
        };
        match res {
            Ok(()) => {
                live.registered = true;
                live.rec.phase.fetch_or(REG_OK, SeqCst);
                round.c.reg_ok.fetch_add(1, SeqCst);
                if let Some(r) = pre {
                    round.c.inline_cb.fetch_add(1, SeqCst);
                    let ph = live.rec.phase.load(SeqCst);
                    round.check(ph & CB_DONE != 0, || {
                        format!("R4: call {} cancelled before registering but the callback did not run inline", live.rec.id)
                    });
                    round.check(live.rec.cb_reason.load(SeqCst) == code(Some(r)), || {
                        format!(
                            "R5: call {} inline reason differs from cancel_reason",
                            live.rec.id
                        )
                    });
                }
            }
            Err(e) => {
                let kind = e.kind();
                let mut t = e.into_state();
                t.count_drop = false;
                round.violation(format!(
                    "R2: first registration of call {} refused ({kind:?})",
                    t.rec.id
                ));
            }
        }
    }

    fn second_register(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        round.c.second_reg.fetch_add(1, SeqCst);
        let marker = self.rng.next();
        let ghost = Ghost {
            round: Arc::clone(&round),
            marker,
        };
        let live = &self.live[i];
        let res = if self.rng.chance(2) {
            live.call.register_for_cancel_with_free(
                ghost,
                |_, g: &Ghost| {
                    g.round.ghost_runs.fetch_add(1, SeqCst);
                },
                |g: Ghost| {
                    g.round.ghost_runs.fetch_add(1, SeqCst);
                },
            )
        } else {
            live.call.register_for_cancel(ghost, |_, g: &Ghost| {
                g.round.ghost_runs.fetch_add(1, SeqCst);
            })
        };
        match res {
            Ok(()) => round.violation(format!(
                "R2: second registration of call {} accepted",
                live.rec.id
            )),
            Err(e) => {
                round.check(e.kind() == RegisterErrorKind::AlreadyRegistered, || {
                    "wrong RegisterErrorKind".into()
                });
                let g = e.into_state();
                round.check(g.marker == marker, || {
                    "R2: refused registration handed back another state".into()
                });
            }
        }
    }

    /// R5: the reason read three ways agrees.
    fn poll_cancelled(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        round.c.polls.fetch_add(1, SeqCst);
        let live = &self.live[i];
        let r1 = live.call.cancel_reason();
        let mut cx = Context::from_waker(Waker::noop());
        let p = {
            let mut fut = std::pin::pin!(live.call.cancelled());
            fut.as_mut().poll(&mut cx)
        };
        let r2 = live.call.cancel_reason();
        let w = live.rec.watch.cancel_reason();
        let id = live.rec.id;
        if let Some(r) = r1 {
            round.check(p == Poll::Ready(r) && r2 == Some(r), || {
                format!("R5: call {id}: cancel_reason {r1:?}, cancelled() {p:?}, then {r2:?}")
            });
        }
        if let Poll::Ready(x) = p {
            round.check(r2 == Some(x), || {
                format!("R5: call {id}: cancelled() {x:?} but cancel_reason {r2:?}")
            });
        }
        round.check(r2.is_none() || w == r2, || {
            format!("R5: call {id}: watch says {w:?}, context {r2:?}")
        });
    }

    fn add_watch(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        round.c.watches.fetch_add(1, SeqCst);
        let live = &self.live[i];
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&flag));
        let mut fut = Box::pin(live.rec.watch.cancelled());
        match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(Some(r)) => {
                let now = live.call.cancel_reason();
                round.check(now == Some(r), || {
                    format!("R5: call {}: watch {r:?}, context {now:?}", live.rec.id)
                });
            }
            Poll::Ready(None) => round.violation(format!(
                "watch of in-flight call {} reported it finished",
                live.rec.id
            )),
            Poll::Pending => self.watches.push(PendingWatch {
                rec: Arc::clone(&live.rec),
                fut,
                flag,
            }),
        }
    }

    fn complete(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        let live = self.live.swap_remove(i);
        let rec = Arc::clone(&live.rec);
        let before = live.call.cancel_reason();
        if let Some(r) = before {
            round.check(round.reason_allowed(&rec, r), || {
                format!("R5: call {} has reason {r:?} nobody raised", rec.id)
            });
            let cb = rec.cb_reason.load(SeqCst);
            round.check(cb == 0 || cb == code(Some(r)), || {
                format!("R5: call {}: callback reason {cb} vs context {r:?}", rec.id)
            });
        }
        rec.phase.fetch_or(COMPLETING, SeqCst);
        if self.rng.chance(2) {
            live.call.complete();
        } else {
            drop(live.call);
        }
        let seq1 = round.seq.load(SeqCst);
        round.live[self.t].lock().unwrap().remove(&rec.id);
        if live.quiet0 && seq1 == live.seq0 {
            // No canceller ran at any time in this call's life (R6 and no
            // spurious cancellation).
            round.c.r6_checked.fetch_add(1, SeqCst);
            let ph = rec.phase.fetch_or(NO_CANCEL, SeqCst);
            round.check(before.is_none() && ph & CB_START == 0, || {
                format!("R6: call {} cancelled with no canceller running", rec.id)
            });
        }
        if live.registered {
            // Freed at completion, unless a canceller claimed the callback:
            // then that canceller frees and is still running.
            let ph = rec.phase.load(SeqCst);
            let cancellers = round.active.load(SeqCst);
            round.check(ph & FREED != 0 || cancellers > 0, || {
                format!(
                    "R2/R3: call {} not freed at completion and no canceller running",
                    rec.id
                )
            });
        } else {
            round.check(rec.frees.load(SeqCst) == 0, || {
                format!("R2: unregistered call {} freed", rec.id)
            });
        }
    }

    /// The records in flight (begun, not yet completing), with their phase.
    fn snapshot(&self, chan: Option<usize>) -> Vec<(Arc<Rec>, u32)> {
        let mut out = Vec::new();
        for reg in &self.round.live {
            for rec in reg.lock().unwrap().values() {
                if chan.is_none() || rec.chan.as_ref().map(|c| c.id) == chan {
                    out.push((Arc::clone(rec), rec.phase.load(SeqCst)));
                }
            }
        }
        out
    }

    /// R4/A1 after a canceller returned.
    fn check_cancelled(&self, what: &str, snap: Vec<(Arc<Rec>, u32)>) {
        let round = &self.round;
        for (rec, ph0) in snap {
            let reason = rec.watch.cancel_reason();
            let ph = rec.phase.load(SeqCst);
            if ph & COMPLETING != 0 {
                continue;
            }
            round.c.r4_checked.fetch_add(1, SeqCst);
            round.check(reason.is_some(), || {
                format!(
                    "R4: call {} in flight across {what} is not cancelled",
                    rec.id
                )
            });
            if ph0 & REG_OK != 0 && ph & CB_DONE == 0 {
                let others = round.active.load(SeqCst);
                round.check(others >= 2, || {
                    format!(
                        "A1: {what} returned before the callback of registered call {} ran",
                        rec.id
                    )
                });
            }
        }
    }

    fn start_canceller(&self) {
        self.round.active.fetch_add(1, SeqCst);
        self.round.seq.fetch_add(1, SeqCst);
    }

    fn end_canceller(&self) {
        self.round.active.fetch_sub(1, SeqCst);
    }

    fn fault(&mut self) {
        let Some(c) = self.pick_channel() else {
            return;
        };
        let round = Arc::clone(&self.round);
        self.start_canceller();
        c.faults_started.fetch_add(1, SeqCst);
        let snap = self.snapshot(Some(c.id));
        c.channel.fault();
        c.faults_finished.fetch_add(1, SeqCst);
        round.c.faults.fetch_add(1, SeqCst);
        round.check(c.channel.is_faulted(), || "fault: not is_faulted".into());
        self.check_cancelled("fault", snap);
        round.check(c.channel.begin_call().is_err(), || {
            "A1: faulted channel accepted a call".into()
        });
        self.end_canceller();
    }

    fn abort(&mut self) {
        let round = Arc::clone(&self.round);
        self.start_canceller();
        round.aborts_started.fetch_add(1, SeqCst);
        let snap = self.snapshot(None);
        round.host.abort();
        round.aborts_finished.fetch_add(1, SeqCst);
        round.c.aborts.fetch_add(1, SeqCst);
        let s = self.observe_state();
        round.check(matches!(s, HostState::Aborted | HostState::Closed), || {
            format!("A1: state {s:?} after abort")
        });
        self.check_cancelled("abort", snap);
        round.check(round.host.open_channel().is_err(), || {
            "A1: open_channel after abort".into()
        });
        self.end_canceller();
    }

    fn close(&mut self, micros: u64) {
        let round = Arc::clone(&self.round);
        // Our own calls could never complete while we wait: finish them first
        // (or hold them on purpose half the time, forcing the timeout path).
        if self.rng.chance(2) {
            while !self.live.is_empty() {
                self.complete(0);
            }
        }
        self.start_canceller();
        round.closes_started.fetch_add(1, SeqCst);
        let snap = self.snapshot(None);
        let res = round.host.close(Duration::from_micros(micros));
        round.closes_finished.fetch_add(1, SeqCst);
        match res {
            Ok(()) => {
                round.c.closes_ok.fetch_add(1, SeqCst);
                let s = self.observe_state();
                round.check(s == HostState::Closed, || format!("A2: close Ok but {s:?}"));
                for (rec, _) in &snap {
                    round.check(rec.phase.load(SeqCst) & COMPLETING != 0, || {
                        format!("A2: close Ok while call {} never completed", rec.id)
                    });
                }
                self.check_idle_frees("close Ok");
            }
            Err(Error::Timeout) => {
                round.c.closes_timeout.fetch_add(1, SeqCst);
                let s = self.observe_state();
                round.check(matches!(s, HostState::Aborted | HostState::Closed), || {
                    format!("A2: close timed out but state {s:?}")
                });
                self.check_cancelled("close timeout", snap);
            }
            Err(e) => round.violation(format!("close returned {e:?}")),
        }
        self.end_canceller();
    }

    /// Idle on a host that accepts nothing: every state is freed and every
    /// callback returned (in-flight counts a call until both finished).
    fn check_idle_frees(&self, what: &str) {
        let round = &self.round;
        round.c.idle_checks.fetch_add(1, SeqCst);
        let (reg, frees) = (round.c.reg_ok.load(SeqCst), round.c.frees.load(SeqCst));
        let (cs, cd) = (
            round.c.cb_started.load(SeqCst),
            round.c.cb_done.load(SeqCst),
        );
        round.check(reg == frees && cs == cd, || {
            format!("A2: {what}: idle with {reg} registrations, {frees} frees, {cs} callbacks started, {cd} done")
        });
    }

    fn wait_idle(&mut self, micros: u64) {
        let round = Arc::clone(&self.round);
        let s = self.observe_state();
        if round.host.wait_idle(Duration::from_micros(micros)) && s != HostState::Open {
            self.check_idle_frees("wait_idle");
        }
    }

    fn run(mut self) -> (Vec<Arc<Rec>>, Vec<PendingWatch>) {
        let round = Arc::clone(&self.round);
        let mut accepting = true;
        while accepting && round.c.begun.load(SeqCst) < round.quota {
            let roll = self.rng.below(1000);
            let n = self.live.len();
            if n >= round.max_live || (n > 0 && roll < 250) {
                let i = self.rng.below(n as u64) as usize;
                self.complete(i);
            } else if roll < 500 {
                let before = round.c.begun.load(SeqCst);
                accepting = self.begin_call();
                if round.abort_at.is_some_and(|at| before >= at)
                    && !round.abort_fired.swap(true, SeqCst)
                {
                    self.abort();
                }
                if let Some((at, micros)) = round.close_at {
                    if before >= at && !round.close_fired.swap(true, SeqCst) {
                        self.close(micros);
                    }
                }
            } else if n > 0 && roll < 800 {
                let i = self.rng.below(n as u64) as usize;
                if !self.live[i].registered {
                    self.register(i);
                } else if roll < 560 {
                    self.second_register(i);
                } else if roll < 700 {
                    self.poll_cancelled(i);
                } else if roll < 720 {
                    self.add_watch(i);
                } else {
                    self.poll_cancelled(i);
                }
            } else if roll < 820 && n > 0 {
                let i = self.rng.below(n as u64) as usize;
                self.add_watch(i);
            } else if self.rng.chance(round.fault_one_in) {
                self.fault();
            } else if roll > 990 && self.rng.chance(20) {
                let micros = self.rng.below(200);
                self.wait_idle(micros);
            } else if roll > 980 && self.rng.chance(40) {
                accepting = self.open_channel();
            } else {
                self.observe_state();
            }
        }
        // Drain: every call completes; idle waits see it.
        while !self.live.is_empty() {
            let i = self.rng.below(self.live.len() as u64) as usize;
            self.complete(i);
        }
        (self.recs, self.watches)
    }
}

// -------------------------------------------------------------------- rounds

struct Totals {
    c: Counters,
}

fn add(into: &AtomicU64, from: &AtomicU64) {
    into.fetch_add(from.load(SeqCst), SeqCst);
}

fn run_round(cfg: &Config, index: u64, quota: u64, totals: &Totals) {
    let seed = mix(cfg.seed, index);
    let mut rng = Rng::new(seed);
    let host = ServiceHost::new();
    let abort_at = rng.chance(2).then(|| rng.below(quota));
    let close_at = rng.chance(3).then(|| (rng.below(quota), rng.below(2000)));
    let round = Arc::new(Round {
        seed: cfg.seed,
        index,
        host: host.clone(),
        channels: Mutex::new(Vec::new()),
        next_chan: AtomicUsize::new(0),
        next_call: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        seq: AtomicU64::new(0),
        aborts_started: AtomicUsize::new(0),
        aborts_finished: AtomicUsize::new(0),
        closes_started: AtomicUsize::new(0),
        closes_finished: AtomicUsize::new(0),
        live: (0..cfg.threads)
            .map(|_| Mutex::new(HashMap::new()))
            .collect(),
        ghost_runs: AtomicUsize::new(0),
        violations: Mutex::new(Vec::new()),
        c: Counters::default(),
        abort_at,
        abort_fired: AtomicBool::new(false),
        close_fired: AtomicBool::new(false),
        close_at,
        quota,
        max_live: 1 + rng.below(16) as usize,
        fault_one_in: 2 + rng.below(100),
    });
    let handles: Vec<_> = (0..cfg.threads)
        .map(|t| {
            let w = Worker {
                t,
                round: Arc::clone(&round),
                rng: Rng::new(mix(seed, t as u64 + 1)),
                live: Vec::new(),
                chan: None,
                recs: Vec::new(),
                watches: Vec::new(),
                last_state: 0,
            };
            std::thread::Builder::new()
                .name(format!("stress-{t}"))
                .spawn(move || w.run())
                .unwrap()
        })
        .collect();
    let replay = format!(
        "replay: STRESS_SEED={} STRESS_ROUND={} STRESS_THREADS={} (round quota {quota})",
        round.seed, round.index, cfg.threads
    );
    let mut recs = Vec::new();
    let mut watches = Vec::new();
    for h in handles {
        match h.join() {
            Ok((r, w)) => {
                recs.extend(r);
                watches.extend(w);
            }
            Err(p) => {
                eprintln!("stress: a worker panicked; {replay}");
                std::panic::resume_unwind(p);
            }
        }
    }
    // End of round: everything completed and every canceller returned.
    for rec in &recs {
        let (ph, frees, cancels) = (
            rec.phase.load(SeqCst),
            rec.frees.load(SeqCst),
            rec.cancels.load(SeqCst),
        );
        let want = u32::from(ph & REG_OK != 0);
        round.check(frees == want, || {
            format!("R2: call {} freed {frees} times, expected {want}", rec.id)
        });
        round.check(cancels <= 1, || {
            format!("R1: call {} cancelled {cancels}x", rec.id)
        });
        round.check(ph & NO_CANCEL == 0 || cancels == 0, || {
            format!("R6: call {} callback ran", rec.id)
        });
        round.check(rec.watch.is_finished(), || {
            format!("call {} completed but its watch is not finished", rec.id)
        });
    }
    for mut w in watches {
        round.check(w.flag.0.load(SeqCst), || {
            format!("lost wake-up: watch of call {} never woken", w.rec.id)
        });
        let poll = w.fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        round.check(poll.is_ready(), || {
            format!("watch of finished call {} still pending", w.rec.id)
        });
    }
    round.check(host.in_flight() == 0, || {
        format!(
            "A2: in_flight {} after every call completed",
            host.in_flight()
        )
    });
    for c in round.channels.lock().unwrap().iter() {
        round.check(c.channel.in_flight() == 0, || {
            format!("A2: channel {} in_flight {}", c.id, c.channel.in_flight())
        });
    }
    round.check(host.wait_idle(Duration::ZERO), || {
        "A2: wait_idle(0) false".into()
    });
    round.check(round.ghost_runs.load(SeqCst) == 0, || {
        "R2: a refused registration's closure ran".into()
    });
    let (reg, frees) = (round.c.reg_ok.load(SeqCst), round.c.frees.load(SeqCst));
    round.check(reg == frees, || {
        format!("R2: {reg} registrations, {frees} frees")
    });
    host.abort();
    round.check(host.close(Duration::from_secs(10)) == Ok(()), || {
        "A2: final close failed".into()
    });
    round.check(host.state() == HostState::Closed, || "not Closed".into());
    round.check(host.begin_call().err() == Some(Error::HostClosed), || {
        "begin_call on a Closed host".into()
    });
    let v = round.violations.lock().unwrap();
    if !v.is_empty() {
        panic!(
            "stress: {} violation(s) in round {index}:\n  {}\n{replay}",
            v.len(),
            v.join("\n  ")
        );
    }
    let (t, c) = (&totals.c, &round.c);
    for (a, b) in [
        (&t.begun, &c.begun),
        (&t.refused, &c.refused),
        (&t.reg_ok, &c.reg_ok),
        (&t.second_reg, &c.second_reg),
        (&t.inline_cb, &c.inline_cb),
        (&t.cb_started, &c.cb_started),
        (&t.frees, &c.frees),
        (&t.faults, &c.faults),
        (&t.aborts, &c.aborts),
        (&t.closes_ok, &c.closes_ok),
        (&t.closes_timeout, &c.closes_timeout),
        (&t.polls, &c.polls),
        (&t.watches, &c.watches),
        (&t.idle_checks, &c.idle_checks),
        (&t.r4_checked, &c.r4_checked),
        (&t.r6_checked, &c.r6_checked),
    ] {
        add(a, b);
    }
}

#[test]
fn randomized_stress_against_the_model() {
    let cfg = config();
    let quota = if cfg!(miri) { 100 } else { 2_000 };
    println!(
        "stress: seed {} (replay with STRESS_SEED={}), {} threads, {} calls, rounds of up to {}",
        cfg.seed, cfg.seed, cfg.threads, cfg.calls, quota
    );
    let totals = Totals {
        c: Counters::default(),
    };
    let t0 = Instant::now();
    let mut rounds = 0;
    if let Some(index) = cfg.only_round {
        run_round(&cfg, index, quota, &totals);
        rounds = 1;
    } else {
        // Rounds cut short by an abort or close begin fewer calls: go on
        // until the total is reached.
        while totals.c.begun.load(SeqCst) < cfg.calls {
            run_round(&cfg, rounds, quota, &totals);
            rounds += 1;
        }
    }
    let c = &totals.c;
    println!(
        "stress: {} calls checked in {rounds} rounds ({} refused) in {:.1?}: {} registered ({} inline cancels), \
         {} second registrations refused, {} cancel callbacks, {} frees, {} faults, {} aborts, \
         {} closes ok / {} timed out, {} polls, {} watches, {} idle checks, {} R4 checks, \
         {} R6 checks; seed {}",
        c.begun.load(SeqCst),
        c.refused.load(SeqCst),
        t0.elapsed(),
        c.reg_ok.load(SeqCst),
        c.inline_cb.load(SeqCst),
        c.second_reg.load(SeqCst),
        c.cb_started.load(SeqCst),
        c.frees.load(SeqCst),
        c.faults.load(SeqCst),
        c.aborts.load(SeqCst),
        c.closes_ok.load(SeqCst),
        c.closes_timeout.load(SeqCst),
        c.polls.load(SeqCst),
        c.watches.load(SeqCst),
        c.idle_checks.load(SeqCst),
        c.r4_checked.load(SeqCst),
        c.r6_checked.load(SeqCst),
        cfg.seed,
    );
    if cfg.only_round.is_none() {
        assert!(c.begun.load(SeqCst) >= cfg.calls, "fewer calls than asked");
    }
}
