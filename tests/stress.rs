//! Randomized multi-threaded stress against a reference model of the rules.
//!
//! A seeded generator drives several threads through random mixes of
//! `open_channel`, `begin_call` and `begin_call_with_deadline` (channel and
//! host scope), registration with and without `on_free`, second
//! registrations, `complete` and drop, `cancelled()` polling, `'static` watch
//! futures, per-call `cancel()` on the context (before and after
//! registering), `Canceller`s shared between threads (of calls in flight and
//! of long completed ones whose slot now serves another call), `fault`,
//! `abort`, `close(timeout)` and `wait_idle`, all on one host per round.
//! Deadlines (in three of four rounds; never under miri) are already past at
//! `begin`, 0–3 ms away (half of those calls are held until the deadline
//! passed, so the timer thread expires calls in flight and runs their
//! callbacks) or a minute away (the calls complete first). The model is a set
//! of per-call records and per-round event counters; every outcome is checked
//! against it:
//!
//! * **R1** a callback runs at most once (checked on entry); at most one
//!   `cancel()` request of a call returns true;
//! * **R2** every accepted state is freed exactly once, every refused state
//!   comes back in the error (same token) and none of its closures ever runs;
//! * **R3** no free while the callback runs, and the callback never sees a
//!   freed state;
//! * **R4/A1** after `abort`/`fault`/a timed-out `close` returns, every call
//!   that was in flight before it started and has not begun completing is
//!   cancelled, and a call registered before it started has had its callback
//!   return (unless another canceller that claimed it — a sweep, a per-call
//!   cancel, the timer — is still running); a registration on an
//!   already-cancelled call runs the callback inline; a call begun past its
//!   deadline is in flight and already cancelled; after its own `cancel()` a
//!   call is cancelled and, if registered, its callback has run; a deadline
//!   is not lost (a call still uncancelled 2 s after its deadline fails; in a
//!   quarter of the rounds one thread waits for a 0–300 us deadline of a
//!   registered call and reports the worst lateness);
//! * **R5** every observation of a call's reason — `cancel_reason()`, the
//!   callback, a polled `cancelled()`, the watch, at registration, at
//!   completion — agrees with the first one, and the reason is one somebody
//!   raised *for that call* (`CallCancelled` needs a cancel request on it);
//!   `cancel()`/`Canceller::cancel()` returns true iff its CallCancelled won:
//!   at the end of the round a call ended with `CallCancelled` exactly when
//!   one request returned true;
//! * **R6** a call during whose whole life no sweep ran, nobody cancelled it
//!   and whose deadline had not passed when it completed is never cancelled
//!   and its callback never runs; a `Canceller` of a completed call returns
//!   false, reports `is_finished()`, and never cancels the later call in the
//!   same slot (that call would show a `CallCancelled` nobody requested);
//! * **R7** a `DeadlineExceeded` is only observed (in the callback or
//!   anywhere else) once `Instant::now() >= deadline`;
//! * **A1** `begin_call`/`open_channel` fail after an abort/fault/close
//!   returned, and every refusal names an event that really started;
//! * **A2** a successful `close` means every call completed and every state
//!   was freed; an idle host after an abort has freed every state (in-flight
//!   counts a call until its callback and free finished); at the end of each
//!   round in-flight is zero on the host and every channel;
//! * **HostStats** at the end of each round: `in_flight` is zero, `refused`
//!   equals every refusal the round saw, and `cancelled(reason)` per reason
//!   (and summed) equals the calls the model saw cancelled with it — a
//!   registered call's callback tells, an unregistered one's reason read at
//!   completion, or nobody could have cancelled it since. A call that a
//!   canceller raced between that read and its completion is allowed within
//!   its possible reasons (the figures print how many rounds were exact).
//!   A `begin_call` refused while a sweep ran is never counted cancelled
//!   (this model found that bug; `Round::raced_refusals` counts such races);
//! * every watch future left pending is woken by the end of the round.
//!
//! Knobs (environment): `STRESS_CALLS` (calls to begin in total; default
//! 1_000_000, 400 under miri), `STRESS_SEED`
//! (replay a run), `STRESS_ROUND` (replay one round of that seed),
//! `STRESS_THREADS` (default 4; 2 under miri). A failure prints the seed and round to replay. Run with
//! `-- --nocapture` to see the figures.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use callcancel::{
    Call, CancelReason, CancelWatch, Canceller, Channel, Error, HostState, RegisterErrorKind,
    ServiceHost, WatchCancelled,
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
/// `complete()` returned.
const DONE: u32 = 64;

const REASONS: [CancelReason; 4] = [
    CancelReason::HostAbort,
    CancelReason::ChannelFaulted,
    CancelReason::CallCancelled,
    CancelReason::DeadlineExceeded,
];

fn code(r: Option<CancelReason>) -> u32 {
    match r {
        None => 0,
        Some(CancelReason::HostAbort) => 1,
        Some(CancelReason::ChannelFaulted) => 2,
        Some(CancelReason::CallCancelled) => 3,
        Some(CancelReason::DeadlineExceeded) => 4,
        Some(other) => panic!("unknown reason {other:?}"),
    }
}

/// A reason's bit in a mask of possible reasons.
fn bit(r: CancelReason) -> u32 {
    1 << (code(Some(r)) - 1)
}

/// How long after its deadline an uncancelled call in flight counts as a lost
/// deadline (R4 for deadlines). R7's 2 ms is for an idle machine; this run
/// keeps every core busy, so only a lost expiry trips this.
const DEADLINE_GRACE: Duration = Duration::from_secs(2);

fn deadline_passed(rec: &Rec) -> bool {
    rec.deadline.is_some_and(|d| Instant::now() >= d)
}

struct ChanInfo {
    id: usize,
    channel: Channel,
    faults_started: AtomicUsize,
    faults_finished: AtomicUsize,
    /// Faults of this channel running now (bumped before `faults_started`).
    faults_active: AtomicUsize,
}

/// What the model knows about one call.
struct Rec {
    id: u64,
    chan: Option<Arc<ChanInfo>>,
    watch: CancelWatch,
    deadline: Option<Instant>,
    phase: AtomicU32,
    cancels: AtomicU32,
    frees: AtomicU32,
    cb_reason: AtomicU32,
    /// Per-call cancel requests ever issued for this call (bumped before the
    /// request), by its context or a `Canceller` taken from it.
    cc_req: AtomicU32,
    /// Per-call cancel requests running now.
    cc_active: AtomicU32,
    /// Requests that returned `true` (R5: at most one, and only with
    /// `CallCancelled` as the call's reason).
    cc_won: AtomicU32,
    /// The first reason anyone observed (`code`); every later observation
    /// must agree (R5).
    seen: AtomicU32,
    /// What the model knows at the end: `code` of the final reason, or
    /// `UNKNOWN` with the possible reasons in `maybe`.
    outcome: AtomicU32,
    maybe: AtomicU32,
}

const UNKNOWN: u32 = 99;

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
    cc_calls: AtomicU64,
    cc_won: AtomicU64,
    cancellers_taken: AtomicU64,
    canceller_calls: AtomicU64,
    canceller_won: AtomicU64,
    stale_cancels: AtomicU64,
    deadlines_past: AtomicU64,
    deadlines_short: AtomicU64,
    deadlines_far: AtomicU64,
    lingered: AtomicU64,
    expired_cb: AtomicU64,
    deadline_probes: AtomicU64,
    /// Worst probe latency past the deadline, in microseconds.
    probe_late_us: AtomicU64,
    stats_exact_rounds: AtomicU64,
    stats_uncertain_calls: AtomicU64,
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
    /// Host-wide cancellers (abort, close) running now (bumped before
    /// `aborts_started`/`closes_started`).
    host_active: AtomicUsize,
    /// `Canceller`s taken from calls of this round (live or long completed).
    cancellers: Mutex<Vec<(Canceller, Arc<Rec>)>>,
    /// Every refusal the round saw (`begin_call` and `open_channel`), for
    /// `HostStats::refused`.
    refusals: AtomicU64,
    /// `begin_call`s refused while an abort/close (`[0]`) or a fault of
    /// their channel (`[1]`) ran. This model found that a sweep meeting a
    /// call inside `begin_call` (between the slot claim and the re-check)
    /// counted it in `HostStats::cancelled` although `begin_call` then
    /// refused it; the core now takes that count back, and the model allows
    /// no excess (the races are counted for the figures only).
    raced_refusals: [AtomicU64; 2],
    /// Calls get deadlines this round (never under miri: the timer thread
    /// sleeps there in interpreted time).
    deadlines: bool,
    /// One thread measures a deadline this round (`deadline_probe`).
    probe: bool,
    probe_fired: AtomicBool,
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

    /// R5/R6/R7: `r` is a reason somebody raised for this call. Called when
    /// the reason is observed, so a deadline must have passed by now (R7:
    /// never early), and a `CallCancelled` needs a request on *this* call (a
    /// stale `Canceller` of an earlier call in the same slot counts for that
    /// call only: R6).
    fn reason_allowed(&self, rec: &Rec, r: CancelReason) -> bool {
        match r {
            CancelReason::HostAbort => self.host_abort_raised(),
            CancelReason::ChannelFaulted => rec
                .chan
                .as_ref()
                .is_some_and(|c| c.faults_started.load(SeqCst) > 0),
            CancelReason::CallCancelled => rec.cc_req.load(SeqCst) > 0,
            CancelReason::DeadlineExceeded => deadline_passed(rec),
            _ => false,
        }
    }

    /// R5: every observation of a call's reason agrees with the first one,
    /// and the reason is one somebody raised.
    fn observe(&self, rec: &Rec, r: CancelReason, how: &str) {
        self.check(self.reason_allowed(rec, r), || {
            format!(
                "R5/R7: call {} {how} {r:?} nobody raised (deadline {:?} vs now {:?}, cancel requests {})",
                rec.id,
                rec.deadline,
                Instant::now(),
                rec.cc_req.load(SeqCst)
            )
        });
        let c = code(Some(r));
        if let Err(prev) = rec.seen.compare_exchange(0, c, SeqCst, SeqCst) {
            self.check(prev == c, || {
                format!(
                    "R5: call {} {how} {r:?} but earlier observed code {prev}",
                    rec.id
                )
            });
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
        round.observe(rec, reason, "callback got");
        if reason == CancelReason::DeadlineExceeded {
            round.c.expired_cb.fetch_add(1, SeqCst);
        }
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

/// What kind of deadline a call gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dl {
    None,
    /// Already past at `begin`: in flight and cancelled at once.
    Past,
    /// 0–3 ms away: expires during the round if the call lives long enough.
    Short,
    /// A minute away: the call completes first; the timer never fires.
    Far,
}

struct Worker {
    t: usize,
    round: Arc<Round>,
    rng: Rng,
    live: Vec<Live>,
    /// Calls with a short deadline held until it passed (or the drain), so
    /// the timer thread expires calls in flight.
    lingering: Vec<Live>,
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
                    faults_active: AtomicUsize::new(0),
                });
                round.channels.lock().unwrap().push(Arc::clone(&info));
                self.chan = Some(info);
                true
            }
            Err(e) => {
                round.refusals.fetch_add(1, SeqCst);
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

    fn pick_deadline(&mut self) -> Dl {
        if !self.round.deadlines {
            return Dl::None;
        }
        match self.rng.below(32) {
            0..=1 => Dl::Past,
            2..=5 => Dl::Short,
            6 => Dl::Far,
            _ => Dl::None,
        }
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
        let dl = self.pick_deadline();
        let now = Instant::now();
        let at = match dl {
            Dl::None => None,
            Dl::Past => Some(
                now.checked_sub(Duration::from_micros(self.rng.below(1000)))
                    .unwrap_or(now),
            ),
            Dl::Short => Some(now + Duration::from_micros(self.rng.below(3000))),
            Dl::Far => Some(now + Duration::from_secs(60)),
        };
        let seq0 = round.seq.load(SeqCst);
        let quiet0 = round.active.load(SeqCst) == 0;
        let host0 = round.aborts_started.load(SeqCst) + round.closes_started.load(SeqCst);
        let fault0 = chan.as_ref().map_or(0, |c| c.faults_started.load(SeqCst));
        let host_busy = round.host_active.load(SeqCst) > 0;
        let fault_busy = chan
            .as_ref()
            .is_some_and(|c| c.faults_active.load(SeqCst) > 0);
        let host_done = round.aborts_finished.load(SeqCst) + round.closes_finished.load(SeqCst);
        let fault_done = chan.as_ref().map_or(0, |c| c.faults_finished.load(SeqCst));
        let res = match (&chan, at) {
            (Some(c), None) => c.channel.begin_call(),
            (Some(c), Some(at)) => c.channel.begin_call_with_deadline(at),
            (None, None) => round.host.begin_call(),
            (None, Some(at)) => round.host.begin_call_with_deadline(at),
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
                    deadline: at,
                    phase: AtomicU32::new(0),
                    cancels: AtomicU32::new(0),
                    frees: AtomicU32::new(0),
                    cb_reason: AtomicU32::new(0),
                    cc_req: AtomicU32::new(0),
                    cc_active: AtomicU32::new(0),
                    cc_won: AtomicU32::new(0),
                    seen: AtomicU32::new(0),
                    outcome: AtomicU32::new(0),
                    maybe: AtomicU32::new(0),
                });
                round.check(call.deadline() == at, || {
                    format!(
                        "call {}: deadline() {:?}, begun with {at:?}",
                        rec.id,
                        call.deadline()
                    )
                });
                match dl {
                    Dl::None => {}
                    Dl::Past => {
                        // R4/R7: a deadline already past gives a call in
                        // flight and already cancelled (DeadlineExceeded,
                        // unless a sweep got there first inside `begin`).
                        round.c.deadlines_past.fetch_add(1, SeqCst);
                        let r = call.cancel_reason();
                        round.check(r.is_some(), || {
                            format!(
                                "R4/R7: call {} begun past its deadline is not cancelled",
                                rec.id
                            )
                        });
                        if let Some(r) = r {
                            round.observe(&rec, r, "begun past its deadline has");
                        }
                    }
                    Dl::Short => {
                        round.c.deadlines_short.fetch_add(1, SeqCst);
                    }
                    Dl::Far => {
                        round.c.deadlines_far.fetch_add(1, SeqCst);
                    }
                }
                round.live[self.t]
                    .lock()
                    .unwrap()
                    .insert(rec.id, Arc::clone(&rec));
                self.recs.push(Arc::clone(&rec));
                let live = Live {
                    call,
                    rec,
                    seq0,
                    quiet0,
                    registered: false,
                };
                if dl == Dl::Short && self.lingering.len() < 8 && self.rng.chance(2) {
                    // Held until its deadline passed: registered mostly, so
                    // the timer thread runs callbacks.
                    round.c.lingered.fetch_add(1, SeqCst);
                    self.live.push(live);
                    let i = self.live.len() - 1;
                    if !self.rng.chance(4) {
                        self.register(i);
                    }
                    let live = self.live.pop().unwrap();
                    self.lingering.push(live);
                } else {
                    self.live.push(live);
                }
                true
            }
            Err(e) => {
                // A refusal that raced a sweep: see `Round::raced_refusals`.
                if host_busy
                    || round.aborts_started.load(SeqCst) + round.closes_started.load(SeqCst)
                        != host0
                {
                    round.raced_refusals[0].fetch_add(1, SeqCst);
                }
                if fault_busy
                    || chan.as_ref().map_or(0, |c| c.faults_started.load(SeqCst)) != fault0
                {
                    round.raced_refusals[1].fetch_add(1, SeqCst);
                }
                self.refused(chan, e)
            }
        }
    }

    fn refused(&mut self, chan: Option<Arc<ChanInfo>>, e: Error) -> bool {
        let round = Arc::clone(&self.round);
        match e {
            Error::ChannelFaulted => {
                round.c.refused.fetch_add(1, SeqCst);
                round.refusals.fetch_add(1, SeqCst);
                let c = chan.expect("host-scope calls never see ChannelFaulted");
                round.check(c.faults_started.load(SeqCst) > 0, || {
                    format!("ChannelFaulted on channel {} nobody faulted", c.id)
                });
                round.channels.lock().unwrap().retain(|x| x.id != c.id);
                self.chan = None;
                true
            }
            e => {
                round.c.refused.fetch_add(1, SeqCst);
                round.refusals.fetch_add(1, SeqCst);
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
        if let Some(r) = pre {
            round.observe(&live.rec, r, "before registering has");
        }
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
        for r in [r1, r2, w].into_iter().flatten() {
            round.observe(&live.rec, r, "polled");
        }
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
                round.observe(&live.rec, r, "watch says");
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
        let live = self.live.swap_remove(i);
        self.complete_live(live);
    }

    fn complete_live(&mut self, live: Live) {
        let round = Arc::clone(&self.round);
        let rec = Arc::clone(&live.rec);
        // Who could decide a cancellation between the read below and the
        // completion: started counters first, then the running ones (a
        // canceller bumps running before started).
        let chan = rec.chan.as_ref();
        let host0 = round.aborts_started.load(SeqCst) + round.closes_started.load(SeqCst);
        let fault0 = chan.map_or(0, |c| c.faults_started.load(SeqCst));
        let cc0 = rec.cc_req.load(SeqCst);
        let host_busy = round.host_active.load(SeqCst) > 0;
        let fault_busy = chan.is_some_and(|c| c.faults_active.load(SeqCst) > 0);
        let cc_busy = rec.cc_active.load(SeqCst) > 0;
        let before = live.call.cancel_reason();
        if let Some(r) = before {
            round.observe(&rec, r, "has at completion");
            let cb = rec.cb_reason.load(SeqCst);
            round.check(cb == 0 || cb == code(Some(r)), || {
                format!("R5: call {}: callback reason {cb} vs context {r:?}", rec.id)
            });
        } else if let Some(d) = rec.deadline {
            // R4 for deadlines: not lost (generous bound, see DEADLINE_GRACE).
            let now = Instant::now();
            round.check(now < d + DEADLINE_GRACE, || {
                format!(
                    "R4/R7: call {} still uncancelled {:?} after its deadline",
                    rec.id,
                    now - d
                )
            });
        }
        rec.phase.fetch_or(COMPLETING, SeqCst);
        if self.rng.chance(2) {
            live.call.complete();
        } else {
            drop(live.call);
        }
        let seq1 = round.seq.load(SeqCst);
        // Read after the completion: if the deadline had not passed by now,
        // the timer never cancelled this call (R7: never early; R6 after).
        let deadline_hit = deadline_passed(&rec);
        rec.phase.fetch_or(DONE, SeqCst);
        round.live[self.t].lock().unwrap().remove(&rec.id);
        // What the model knows of the call's final reason (for HostStats).
        // A registered call's callback tells (read at the end of the round).
        if let Some(r) = before {
            rec.outcome.store(code(Some(r)), SeqCst);
        } else if !live.registered {
            let mut maybe = 0;
            if host_busy
                || round.aborts_started.load(SeqCst) + round.closes_started.load(SeqCst) != host0
            {
                maybe |= bit(CancelReason::HostAbort);
            }
            if fault_busy || chan.map_or(0, |c| c.faults_started.load(SeqCst)) != fault0 {
                maybe |= bit(CancelReason::ChannelFaulted);
            }
            if cc_busy || rec.cc_req.load(SeqCst) != cc0 {
                maybe |= bit(CancelReason::CallCancelled);
            }
            if deadline_hit {
                maybe |= bit(CancelReason::DeadlineExceeded);
            }
            if maybe != 0 {
                rec.outcome.store(UNKNOWN, SeqCst);
                rec.maybe.store(maybe, SeqCst);
            }
        }
        if live.quiet0 && seq1 == live.seq0 && rec.cc_req.load(SeqCst) == 0 && !deadline_hit {
            // No canceller ran at any time in this call's life, nobody
            // cancelled it alone and its deadline (if any) had not passed
            // (R6 and no spurious cancellation).
            round.c.r6_checked.fetch_add(1, SeqCst);
            let ph = rec.phase.fetch_or(NO_CANCEL, SeqCst);
            round.check(before.is_none() && ph & CB_START == 0, || {
                format!("R6: call {} cancelled with no canceller running", rec.id)
            });
        }
        if live.registered {
            // Freed at completion, unless a canceller claimed the callback:
            // then that canceller frees and is still running. (Who runs is
            // read before the phase: one that finished has freed by then.)
            let cancellers = round.active.load(SeqCst) + rec.cc_active.load(SeqCst) as usize;
            let timer = deadline_passed(&rec);
            let ph = rec.phase.load(SeqCst);
            round.check(ph & FREED != 0 || cancellers > 0 || timer, || {
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

    /// The call's own `cancel()` (R5: true iff its CallCancelled won; then
    /// a registered callback has run, here, with that reason).
    fn cancel_own(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        round.c.cc_calls.fetch_add(1, SeqCst);
        let live = &self.live[i];
        let rec = &live.rec;
        rec.cc_req.fetch_add(1, SeqCst);
        rec.cc_active.fetch_add(1, SeqCst);
        let won = live.call.cancel();
        rec.cc_active.fetch_sub(1, SeqCst);
        let r = live.call.cancel_reason();
        round.check(r.is_some(), || {
            format!("R4: call {} not cancelled after its own cancel()", rec.id)
        });
        if let Some(r) = r {
            round.observe(rec, r, "after cancel() has");
        }
        if won {
            round.c.cc_won.fetch_add(1, SeqCst);
            let n = rec.cc_won.fetch_add(1, SeqCst);
            round.check(n == 0, || {
                format!(
                    "R1/R5: two cancel() requests of call {} returned true",
                    rec.id
                )
            });
            round.check(r == Some(CancelReason::CallCancelled), || {
                format!(
                    "R5: call {}: cancel() returned true but the reason is {r:?}",
                    rec.id
                )
            });
            if live.registered {
                let ph = rec.phase.load(SeqCst);
                round.check(
                    ph & CB_DONE != 0 && rec.cb_reason.load(SeqCst) == code(r),
                    || {
                        format!(
                            "R4: call {}: cancel() won but its callback did not run",
                            rec.id
                        )
                    },
                );
            }
        }
    }

    fn take_canceller(&mut self, i: usize) {
        let round = Arc::clone(&self.round);
        round.c.cancellers_taken.fetch_add(1, SeqCst);
        let live = &self.live[i];
        let entry = (live.call.canceller(), Arc::clone(&live.rec));
        let mut pool = round.cancellers.lock().unwrap();
        if pool.len() >= 32 {
            let j = self.rng.below(pool.len() as u64) as usize;
            pool.swap_remove(j);
        }
        pool.push(entry);
    }

    /// A `Canceller` from the pool: of a call of any thread, in flight or
    /// long completed (R6: a stale one returns false and touches nothing;
    /// the call now in the same slot has no request of its own, so a
    /// CallCancelled there is flagged by `reason_allowed`).
    fn use_canceller(&mut self) {
        let round = Arc::clone(&self.round);
        let picked = {
            let pool = round.cancellers.lock().unwrap();
            if pool.is_empty() {
                return;
            }
            // Half the time one of the newest (likely still in flight).
            let len = pool.len() as u64;
            let j = if self.rng.chance(2) {
                len - 1 - self.rng.below(len.min(4))
            } else {
                self.rng.below(len)
            } as usize;
            let (c, rec) = &pool[j];
            (c.clone(), Arc::clone(rec))
        };
        let (canceller, rec) = picked;
        round.c.canceller_calls.fetch_add(1, SeqCst);
        rec.cc_req.fetch_add(1, SeqCst);
        rec.cc_active.fetch_add(1, SeqCst);
        let done0 = rec.phase.load(SeqCst) & DONE != 0;
        let won = canceller.cancel();
        rec.cc_active.fetch_sub(1, SeqCst);
        if done0 {
            round.c.stale_cancels.fetch_add(1, SeqCst);
            round.check(!won, || {
                format!("R6: a Canceller of completed call {} returned true", rec.id)
            });
        }
        if won {
            round.c.canceller_won.fetch_add(1, SeqCst);
            let n = rec.cc_won.fetch_add(1, SeqCst);
            round.check(n == 0, || {
                format!(
                    "R1/R5: two cancel() requests of call {} returned true",
                    rec.id
                )
            });
            let (cb, ph) = (rec.cb_reason.load(SeqCst), rec.phase.load(SeqCst));
            round.check(
                cb == 0 || cb == code(Some(CancelReason::CallCancelled)),
                || {
                    format!(
                        "R5: Canceller of call {} won but its callback saw code {cb}",
                        rec.id
                    )
                },
            );
            round.check(ph & REG_OK == 0 || ph & CB_DONE != 0, || {
                format!(
                    "R4: Canceller of registered call {} won but no callback ran",
                    rec.id
                )
            });
        }
    }

    /// R4/R7 for deadlines, measured: a registered call whose deadline is
    /// 0–300 us away is cancelled by the timer thread with DeadlineExceeded,
    /// never before the deadline (checked in the callback), and not lost.
    fn deadline_probe(&mut self) {
        let round = Arc::clone(&self.round);
        let at = Instant::now() + Duration::from_micros(self.rng.below(300));
        let Ok(call) = round.host.begin_call_with_deadline(at) else {
            round.refusals.fetch_add(1, SeqCst);
            return;
        };
        round.c.begun.fetch_add(1, SeqCst);
        round.c.deadline_probes.fetch_add(1, SeqCst);
        let rec = Arc::new(Rec {
            id: round.next_call.fetch_add(1, SeqCst),
            chan: None,
            watch: call.watch(),
            deadline: Some(at),
            phase: AtomicU32::new(0),
            cancels: AtomicU32::new(0),
            frees: AtomicU32::new(0),
            cb_reason: AtomicU32::new(0),
            cc_req: AtomicU32::new(0),
            cc_active: AtomicU32::new(0),
            cc_won: AtomicU32::new(0),
            seen: AtomicU32::new(0),
            outcome: AtomicU32::new(0),
            maybe: AtomicU32::new(0),
        });
        round.live[self.t]
            .lock()
            .unwrap()
            .insert(rec.id, Arc::clone(&rec));
        self.recs.push(Arc::clone(&rec));
        self.live.push(Live {
            call,
            rec: Arc::clone(&rec),
            seq0: round.seq.load(SeqCst),
            quiet0: false,
            registered: false,
        });
        let i = self.live.len() - 1;
        self.register(i);
        let give_up = at + DEADLINE_GRACE;
        while rec.phase.load(SeqCst) & CB_DONE == 0 && Instant::now() < give_up {
            std::thread::yield_now();
        }
        let late = Instant::now().saturating_duration_since(at);
        round.check(rec.phase.load(SeqCst) & CB_DONE != 0, || {
            format!("R4/R7: deadline of call {} never fired", rec.id)
        });
        if rec.cb_reason.load(SeqCst) == code(Some(CancelReason::DeadlineExceeded)) {
            round
                .c
                .probe_late_us
                .fetch_max(late.as_micros() as u64, SeqCst);
        }
        let i = self.live.len() - 1;
        self.complete(i);
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
            // Who else may be running the callback, read *before* the phase:
            // a canceller that claimed it before we returned and has not
            // finished it when we read the phase below was active all along,
            // so it is counted here. (Read after the phase, a canceller that
            // finished in between looked like none: a false A1 report under
            // heavy preemption.)
            let others = round.active.load(SeqCst);
            let per_call = rec.cc_active.load(SeqCst) > 0 || deadline_passed(&rec);
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
                // Another canceller claimed the callback and still runs it:
                // a sweep, a per-call cancel or the timer thread.
                round.check(others >= 2 || per_call, || {
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
        // Only after the library call returned (its callbacks are done):
        // `check_cancelled` counts on a canceller still running a callback
        // being counted here.
        self.round.active.fetch_sub(1, SeqCst);
    }

    fn fault(&mut self) {
        let Some(c) = self.pick_channel() else {
            return;
        };
        let round = Arc::clone(&self.round);
        self.start_canceller();
        c.faults_active.fetch_add(1, SeqCst);
        c.faults_started.fetch_add(1, SeqCst);
        let snap = self.snapshot(Some(c.id));
        c.channel.fault();
        c.faults_finished.fetch_add(1, SeqCst);
        round.c.faults.fetch_add(1, SeqCst);
        round.check(c.channel.is_faulted(), || "fault: not is_faulted".into());
        self.check_cancelled("fault", snap);
        round.refusals.fetch_add(1, SeqCst);
        round.check(c.channel.begin_call().is_err(), || {
            "A1: faulted channel accepted a call".into()
        });
        c.faults_active.fetch_sub(1, SeqCst);
        self.end_canceller();
    }

    fn abort(&mut self) {
        let round = Arc::clone(&self.round);
        self.start_canceller();
        round.host_active.fetch_add(1, SeqCst);
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
        round.refusals.fetch_add(1, SeqCst);
        round.check(round.host.open_channel().is_err(), || {
            "A1: open_channel after abort".into()
        });
        round.host_active.fetch_sub(1, SeqCst);
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
            while let Some(l) = self.lingering.pop() {
                self.complete_live(l);
            }
        }
        self.start_canceller();
        round.host_active.fetch_add(1, SeqCst);
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
        round.host_active.fetch_sub(1, SeqCst);
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
                } else if roll < 750 {
                    self.poll_cancelled(i);
                } else if roll < 765 {
                    self.cancel_own(i);
                } else if roll < 785 {
                    self.take_canceller(i);
                } else {
                    self.use_canceller();
                }
            } else if roll < 820 && n > 0 {
                let i = self.rng.below(n as u64) as usize;
                self.add_watch(i);
            } else if roll < 826 && n > 0 {
                // Also before registering (R4: then the callback runs inside
                // the registration).
                let i = self.rng.below(n as u64) as usize;
                if roll < 823 {
                    self.cancel_own(i);
                } else {
                    self.take_canceller(i);
                }
            } else if roll < 840 && !self.lingering.is_empty() {
                // Complete the lingering calls whose deadline passed.
                let now = Instant::now();
                let mut j = 0;
                while j < self.lingering.len() {
                    if self.lingering[j].rec.deadline.is_some_and(|d| now >= d) {
                        let l = self.lingering.swap_remove(j);
                        self.complete_live(l);
                    } else {
                        j += 1;
                    }
                }
            } else if roll == 840 && round.probe && !round.probe_fired.swap(true, SeqCst) {
                self.deadline_probe();
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
        while let Some(l) = self.lingering.pop() {
            self.complete_live(l);
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

/// `HostStats` against the model, at the end of a round (every call
/// completed, every canceller returned): `refused` and `in_flight` exactly;
/// `cancelled(reason)` exactly for every call whose fate the model knows (a
/// registered call's callback tells; an unregistered one's reason read at
/// completion, or nobody able to cancel it in between; a `cancel()` that
/// returned true means CallCancelled), and within the possible reasons of
/// the few calls a canceller raced at completion.
fn check_stats(round: &Round, recs: &[Arc<Rec>]) {
    let cc = code(Some(CancelReason::CallCancelled));
    let mut exact = [0u64; 4];
    let mut possible = [0u64; 4];
    let mut uncertain = 0u64;
    for rec in recs {
        let (ph, won, seen) = (
            rec.phase.load(SeqCst),
            rec.cc_won.load(SeqCst),
            rec.seen.load(SeqCst),
        );
        round.check(won <= 1, || {
            format!(
                "R5: {won} cancel() requests of call {} returned true",
                rec.id
            )
        });
        let (mut fate, mut maybe) = if ph & REG_OK != 0 {
            let cb = rec.cb_reason.load(SeqCst);
            let at_completion = rec.outcome.load(SeqCst);
            round.check(at_completion == 0 || at_completion == cb, || {
                format!(
                    "R5: call {}: reason {at_completion} at completion, callback {cb}",
                    rec.id
                )
            });
            (cb, 0)
        } else {
            (rec.outcome.load(SeqCst), rec.maybe.load(SeqCst))
        };
        if fate == UNKNOWN {
            if won == 1 {
                fate = cc;
            } else {
                maybe &= !bit(CancelReason::CallCancelled);
                if maybe == 0 {
                    fate = 0;
                }
            }
        }
        if fate == UNKNOWN {
            round.check(seen == 0, || {
                format!("call {} observed cancelled but unknown at the end", rec.id)
            });
            uncertain += 1;
            for (k, r) in REASONS.iter().enumerate() {
                if maybe & bit(*r) != 0 {
                    possible[k] += 1;
                }
            }
            continue;
        }
        round.check(seen == 0 || seen == fate, || {
            format!(
                "R5: call {} observed code {seen}, ended with {fate}",
                rec.id
            )
        });
        round.check((won == 1) == (fate == cc), || {
            format!(
                "R5: call {}: {won} cancel() returned true, final reason code {fate}",
                rec.id
            )
        });
        if fate != 0 {
            exact[fate as usize - 1] += 1;
        }
    }
    let _ = (&round.raced_refusals, &mut possible, &mut uncertain);
    let stats = round.host.stats();
    round.check(stats.in_flight == 0, || {
        format!("HostStats: in_flight {}", stats.in_flight)
    });
    let refused = round.refusals.load(SeqCst);
    round.check(stats.refused == refused, || {
        format!(
            "HostStats: refused {}, the model saw {refused}",
            stats.refused
        )
    });
    let mut total = 0;
    for (k, r) in REASONS.iter().enumerate() {
        let got = stats.cancelled(*r);
        total += got;
        round.check(got >= exact[k] && got <= exact[k] + possible[k], || {
            format!(
                "HostStats: cancelled({r:?}) = {got}, the model saw {} (+ up to {} raced)",
                exact[k], possible[k]
            )
        });
    }
    let known: u64 = exact.iter().sum();
    round.check(total >= known && total <= known + uncertain, || {
        format!("HostStats: {total} cancelled in all, the model saw {known} (+ up to {uncertain} raced)")
    });
    if total == known {
        round.c.stats_exact_rounds.fetch_add(1, SeqCst);
    }
    round.c.stats_uncertain_calls.fetch_add(uncertain, SeqCst);
}

fn run_round(cfg: &Config, index: u64, quota: u64, totals: &Totals) {
    let seed = mix(cfg.seed, index);
    let mut rng = Rng::new(seed);
    let host = ServiceHost::new();
    let abort_at = rng.chance(2).then(|| rng.below(quota));
    let close_at = rng.chance(3).then(|| (rng.below(quota), rng.below(2000)));
    // Most rounds mix in deadlines; some run without, as before.
    let deadlines = !cfg!(miri) && !rng.chance(4);
    let round = Arc::new(Round {
        seed: cfg.seed,
        index,
        host: host.clone(),
        channels: Mutex::new(Vec::new()),
        next_chan: AtomicUsize::new(0),
        next_call: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        seq: AtomicU64::new(0),
        host_active: AtomicUsize::new(0),
        cancellers: Mutex::new(Vec::new()),
        refusals: AtomicU64::new(0),
        raced_refusals: [AtomicU64::new(0), AtomicU64::new(0)],
        deadlines,
        probe: deadlines && rng.chance(4),
        probe_fired: AtomicBool::new(false),
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
                lingering: Vec::new(),
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
    // End of round: every owner completed and every canceller thread of the
    // round returned; a deadline callback may still run on the crate's
    // runner threads (they free the call when it returns): wait for idle.
    round.check(round.host.wait_idle(Duration::from_secs(10)), || {
        "A2: not idle 10 s after every call completed".into()
    });
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
    // R6: every Canceller taken this round names a completed call now.
    for (c, rec) in round.cancellers.lock().unwrap().iter() {
        round.check(c.is_finished() && !c.cancel(), || {
            format!("R6: Canceller of completed call {} still live", rec.id)
        });
    }
    check_stats(&round, &recs);
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
        (&t.cc_calls, &c.cc_calls),
        (&t.cc_won, &c.cc_won),
        (&t.cancellers_taken, &c.cancellers_taken),
        (&t.canceller_calls, &c.canceller_calls),
        (&t.canceller_won, &c.canceller_won),
        (&t.stale_cancels, &c.stale_cancels),
        (&t.deadlines_past, &c.deadlines_past),
        (&t.deadlines_short, &c.deadlines_short),
        (&t.deadlines_far, &c.deadlines_far),
        (&t.lingered, &c.lingered),
        (&t.expired_cb, &c.expired_cb),
        (&t.deadline_probes, &c.deadline_probes),
        (&t.stats_exact_rounds, &c.stats_exact_rounds),
        (&t.stats_uncertain_calls, &c.stats_uncertain_calls),
    ] {
        add(a, b);
    }
    t.probe_late_us
        .fetch_max(c.probe_late_us.load(SeqCst), SeqCst);
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
    println!(
        "stress: per-call: {} cancel() ({} won), {} cancellers taken, {} Canceller::cancel ({} won, {} stale); \
         deadlines: {} past, {} short ({} held to expiry), {} far, {} DeadlineExceeded callbacks, \
         {} probes (latest {} us after the deadline); HostStats exact in {rounds_exact} of {rounds} rounds \
         ({} calls raced at completion, checked within bounds)",
        c.cc_calls.load(SeqCst),
        c.cc_won.load(SeqCst),
        c.cancellers_taken.load(SeqCst),
        c.canceller_calls.load(SeqCst),
        c.canceller_won.load(SeqCst),
        c.stale_cancels.load(SeqCst),
        c.deadlines_past.load(SeqCst),
        c.deadlines_short.load(SeqCst),
        c.lingered.load(SeqCst),
        c.deadlines_far.load(SeqCst),
        c.expired_cb.load(SeqCst),
        c.deadline_probes.load(SeqCst),
        c.probe_late_us.load(SeqCst),
        c.stats_uncertain_calls.load(SeqCst),
        rounds_exact = c.stats_exact_rounds.load(SeqCst),
    );
    if cfg.only_round.is_none() {
        assert!(c.begun.load(SeqCst) >= cfg.calls, "fewer calls than asked");
    }
}
