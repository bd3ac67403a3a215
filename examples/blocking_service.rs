//! WWSAPI's `BlockingServiceExample`, rebuilt on callcancel.
//!
//! In the original sample a `Block` operation creates an event, registers it
//! with `WsRegisterOperationForCancel(AbortNotification, FreeState, event)`
//! and waits on it. `AbortNotification` sets the event, `FreeState` closes
//! it, and the main thread ends the service with `WsAbortServiceHost` and
//! then `WsCloseServiceHost`.
//!
//! Here the same pattern runs on several channels at once:
//!
//! * every channel has `BLOCKERS` workers that run `Block` calls (register,
//!   then wait on an event until cancelled) and one worker that churns
//!   through quick calls (register, do a little work, complete);
//! * one host-scope call (no channel) blocks as well: only an abort reaches it;
//! * once every `Block` call is known to be blocked (counters, not sleeps),
//!   one channel is faulted: its blocked calls must wake with
//!   `ChannelFaulted` and its workers are refused; the other channels keep
//!   running new calls;
//! * then the host is aborted: every blocked call must have been notified
//!   with `HostAbort` when `abort()` returns; a call that began before the
//!   abort but registers after it gets its callback inside the registration;
//!   every worker is refused, the host becomes idle, and `close()` moves it
//!   to `Closed`.
//!
//! * v2, before the fault: one `Block` call on channel 0 is begun with a
//!   deadline and must wake with `DeadlineExceeded` (never before the
//!   deadline, driven by the crate's own timer thread: no async runtime
//!   here), and one on channel 1 is cancelled alone through a `Canceller`
//!   (`CallCancelled`, as when its client resets the stream) while its
//!   neighbours run on; a stale canceller of it then does nothing.
//!
//! The event checks the rules it relies on: the cancel callback runs at most
//! once, never after the free-state, and the free-state never overlaps the
//! cancel callback and runs exactly once. Any broken count makes the example
//! exit with status 1.
//!
//! Run it with `cargo run --release --example blocking_service`.

use std::process;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use callcancel::{Call, CancelReason, Channel, Error, HostState, ServiceHost};

/// Number of channels the host serves.
const CHANNELS: usize = 4;
/// `Block` workers per channel.
const BLOCKERS: usize = 2;
/// The channel that faults part-way (a client dropping its session).
const FAULTED: usize = 2;
/// Quick calls every churn worker must finish before the fault, and again
/// between the fault and the abort, to show the other channels keep working.
const CHURN_ROUNDS: usize = 500;
/// Only a hang detector: correctness never depends on it.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The event: the sample's auto-reset event handle, with misuse detection.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct EventInner {
    signalled: bool,
    /// Set by the free-state: the "handle" is closed, nobody may touch it.
    closed: bool,
    /// True while a cancel callback is inside `signal`.
    cancel_running: bool,
    cancels: u32,
    reason: Option<CancelReason>,
}

#[derive(Default)]
struct Event {
    inner: Mutex<EventInner>,
    cv: Condvar,
}

enum Misuse {
    UseAfterFree,
    SecondCancel,
}

impl Event {
    /// `AbortNotification`: `SetEvent(state)`.
    fn signal(&self, reason: CancelReason) -> Result<(), Misuse> {
        {
            let mut g = self.inner.lock().unwrap();
            if g.closed {
                return Err(Misuse::UseAfterFree);
            }
            g.cancels += 1;
            if g.cancels > 1 {
                return Err(Misuse::SecondCancel);
            }
            g.signalled = true;
            g.reason = Some(reason);
            g.cancel_running = true;
        }
        self.cv.notify_all();
        // The woken `Block` call may complete right now, on its own thread:
        // give it the chance, so an early free-state would be caught below.
        thread::yield_now();
        self.inner.lock().unwrap().cancel_running = false;
        Ok(())
    }

    /// `WaitForSingleObject(event, INFINITE)`.
    fn wait(&self) -> Option<CancelReason> {
        let mut g = self.inner.lock().unwrap();
        while !g.signalled {
            g = self.cv.wait(g).unwrap();
        }
        g.reason
    }

    /// `FreeState`: `CloseHandle(state)`. Returns what the handle saw.
    fn close(&self) -> EventInner {
        let mut g = self.inner.lock().unwrap();
        let seen = EventInner {
            signalled: g.signalled,
            closed: g.closed,
            cancel_running: g.cancel_running,
            cancels: g.cancels,
            reason: g.reason,
        };
        g.closed = true;
        seen
    }
}

// ---------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Block,
    Quick,
}

/// Per-call state handed to `register_for_cancel_with_free`.
struct CallState {
    event: Event,
    kind: Kind,
    /// `None` for the host-scope call.
    channel: Option<usize>,
    /// The thread that registered, to spot callbacks run inside registration.
    registrar: ThreadId,
    /// The cancel callback ran on `registrar`, i.e. inside the registration.
    ran_inline: AtomicBool,
}

#[derive(Default)]
struct Stats {
    calls_run: AtomicUsize,
    block_calls: AtomicUsize,
    quick_calls: AtomicUsize,
    registered: AtomicUsize,
    register_failed: AtomicUsize,
    frees: AtomicUsize,

    cancel_host_abort: AtomicUsize,
    cancel_channel_faulted: AtomicUsize,
    cancel_other: AtomicUsize,
    cancel_inline: AtomicUsize,
    /// Cancellations delivered to `Block` calls, by reason.
    block_cancel_host_abort: AtomicUsize,
    block_cancel_channel_faulted: AtomicUsize,
    /// Cancellations delivered to calls of the faulted channel.
    cancels_on_faulted_channel: AtomicUsize,

    refused_channel_faulted: AtomicUsize,
    refused_host_aborted: AtomicUsize,
    refused_other: AtomicUsize,
    /// Refusals that did not match the worker's situation.
    refused_unexpected: AtomicUsize,

    // Rule violations: each must stay 0.
    use_after_free: AtomicUsize,
    double_cancel: AtomicUsize,
    double_free: AtomicUsize,
    free_during_cancel: AtomicUsize,
    wrong_reason: AtomicUsize,
    block_not_cancelled_once: AtomicUsize,
    reason_disagrees: AtomicUsize,

    /// `Block` calls registered and not yet woken, per channel (+1: host scope).
    blocked_now: [AtomicUsize; CHANNELS + 1],
    /// Calls begun per channel (+1: host scope).
    calls_per_channel: [AtomicUsize; CHANNELS + 1],
}

fn slot(channel: Option<usize>) -> usize {
    channel.unwrap_or(CHANNELS)
}

/// The only reason a call may see: calls of the faulted channel can only
/// have begun before the fault, so the fault reaches them first.
fn expected_reason(channel: Option<usize>) -> CancelReason {
    if channel == Some(FAULTED) {
        CancelReason::ChannelFaulted
    } else {
        CancelReason::HostAbort
    }
}

fn bump(c: &AtomicUsize) {
    c.fetch_add(1, SeqCst);
}

fn get(c: &AtomicUsize) -> usize {
    c.load(SeqCst)
}

// ---------------------------------------------------------------------------
// One call: the `Block` operation, or a quick one.
// ---------------------------------------------------------------------------

/// Where a worker gets its calls from.
enum Source {
    Host(ServiceHost),
    Channel(Channel),
}

/// Begins a call, counting it; `None` once the host or channel refused it.
fn begin(source: &Source, channel: Option<usize>, kind: Kind, stats: &Stats) -> Option<Call> {
    let begun = match source {
        Source::Host(h) => h.begin_call(),
        Source::Channel(c) => c.begin_call(),
    };
    let call = match begun {
        Ok(call) => call,
        Err(e) => {
            // A worker of the faulted channel is refused by the fault (the
            // abort comes only after all of them stopped); all others by the abort.
            let expected = if channel == Some(FAULTED) {
                Error::ChannelFaulted
            } else {
                Error::HostAborted
            };
            match e {
                Error::ChannelFaulted => bump(&stats.refused_channel_faulted),
                Error::HostAborted => bump(&stats.refused_host_aborted),
                _ => bump(&stats.refused_other),
            }
            if e != expected {
                bump(&stats.refused_unexpected);
                eprintln!("worker on {channel:?}: refused with {e:?}, expected {expected:?}");
            }
            return None;
        }
    };
    bump(&stats.calls_run);
    bump(&stats.calls_per_channel[slot(channel)]);
    bump(match kind {
        Kind::Block => &stats.block_calls,
        Kind::Quick => &stats.quick_calls,
    });
    Some(call)
}

/// Serves one call: `Block` (register, wait until cancelled) or a quick one
/// (register, a little work), then completes it. Returns whether the cancel
/// callback ran inside `register_for_cancel_with_free`.
fn serve(call: Call, channel: Option<usize>, kind: Kind, stats: &Arc<Stats>) -> bool {
    let state = Arc::new(CallState {
        event: Event::default(),
        kind,
        channel,
        registrar: thread::current().id(),
        ran_inline: AtomicBool::new(false),
    });

    // AbortNotification: record the reason, signal the event.
    let s = Arc::clone(stats);
    let on_cancel = move |reason: CancelReason, st: &Arc<CallState>| {
        if thread::current().id() == st.registrar {
            // The registering thread is inside register_for_cancel_with_free.
            st.ran_inline.store(true, SeqCst);
            bump(&s.cancel_inline);
        }
        match reason {
            CancelReason::HostAbort => bump(&s.cancel_host_abort),
            CancelReason::ChannelFaulted => bump(&s.cancel_channel_faulted),
            _ => bump(&s.cancel_other),
        }
        if st.kind == Kind::Block {
            match reason {
                CancelReason::HostAbort => bump(&s.block_cancel_host_abort),
                CancelReason::ChannelFaulted => bump(&s.block_cancel_channel_faulted),
                _ => {}
            }
        }
        if st.channel == Some(FAULTED) {
            bump(&s.cancels_on_faulted_channel);
        }
        if reason != expected_reason(st.channel) {
            bump(&s.wrong_reason);
        }
        match st.event.signal(reason) {
            Ok(()) => {}
            Err(Misuse::UseAfterFree) => bump(&s.use_after_free),
            Err(Misuse::SecondCancel) => bump(&s.double_cancel),
        }
    };

    // FreeState: close the event, and check what it went through.
    let s = Arc::clone(stats);
    let on_free = move |st: Arc<CallState>| {
        let seen = st.event.close();
        if seen.closed {
            bump(&s.double_free);
        }
        if seen.cancel_running {
            bump(&s.free_during_cancel);
        }
        if st.kind == Kind::Block && seen.cancels != 1 {
            bump(&s.block_not_cancelled_once);
        }
        bump(&s.frees);
    };

    match call.register_for_cancel_with_free(Arc::clone(&state), on_cancel, on_free) {
        Ok(()) => bump(&stats.registered),
        Err(e) => {
            // As in the sample: a failed registration keeps the state with
            // the caller, who closes the handle itself.
            eprintln!("register_for_cancel failed: {e}");
            bump(&stats.register_failed);
            e.into_state().event.close();
            return false;
        }
    }
    let ran_inline = state.ran_inline.load(SeqCst);

    match kind {
        Kind::Block => {
            let b = &stats.blocked_now[slot(channel)];
            bump(b);
            let seen = state.event.wait();
            b.fetch_sub(1, SeqCst);
            // R5: the callback, cancel_reason() and is_cancelled() agree.
            if !call.is_cancelled() || call.cancel_reason() != seen {
                bump(&stats.reason_disagrees);
            }
        }
        Kind::Quick => {
            // A little "work" that looks at the cancellation flag.
            for _ in 0..8 {
                if call.is_cancelled() {
                    break;
                }
                std::hint::spin_loop();
            }
        }
    }
    // Drop our handle on the state before completion, as the sample never
    // touches the event after `Block` returns.
    drop(state);
    call.complete();
    ran_inline
}

fn spawn_worker(
    source: Source,
    channel: Option<usize>,
    kind: Kind,
    stats: &Arc<Stats>,
) -> thread::JoinHandle<()> {
    let stats = Arc::clone(stats);
    let name = match channel {
        Some(c) if kind == Kind::Block => format!("ch{c}-block"),
        Some(c) => format!("ch{c}-churn"),
        None => "host-block".to_string(),
    };
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            while let Some(call) = begin(&source, channel, kind, &stats) {
                serve(call, channel, kind, &stats);
            }
        })
        .expect("spawn worker")
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

fn fail(msg: &str) -> ! {
    eprintln!("blocking_service: FAILED: {msg}");
    process::exit(1);
}

/// Waits for a condition set by the workers. The deadline only catches a hang.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            fail(&format!("timed out waiting until {what}"));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    // Hang detector for the whole run (the waits below have their own).
    thread::spawn(|| {
        thread::sleep(3 * DEADLINE);
        fail("the example did not finish in time");
    });
    let stats = Arc::new(Stats::default());
    let host = ServiceHost::new();
    let channels: Vec<Channel> = (0..CHANNELS)
        .map(|_| {
            host.open_channel()
                .unwrap_or_else(|e| fail(&format!("open_channel: {e}")))
        })
        .collect();

    let mut workers = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        for _ in 0..BLOCKERS {
            workers.push(spawn_worker(
                Source::Channel(ch.clone()),
                Some(i),
                Kind::Block,
                &stats,
            ));
        }
        workers.push(spawn_worker(
            Source::Channel(ch.clone()),
            Some(i),
            Kind::Quick,
            &stats,
        ));
    }
    // A host-scope call (think: a background task of the host): only an
    // abort cancels it.
    workers.push(spawn_worker(
        Source::Host(host.clone()),
        None,
        Kind::Block,
        &stats,
    ));
    let n_workers = workers.len();

    println!(
        "blocking_service: {CHANNELS} channels x ({BLOCKERS} Block + 1 churn) workers, \
         + 1 host-scope Block call"
    );

    // Phase 1: every Block call is registered and waiting; churn is running.
    wait_until(
        "every Block call is blocked and every churn worker ran",
        || {
            (0..CHANNELS).all(|c| {
                get(&stats.blocked_now[c]) == BLOCKERS
                    && get(&stats.calls_per_channel[c]) >= BLOCKERS + CHURN_ROUNDS
            }) && get(&stats.blocked_now[CHANNELS]) == 1
        },
    );
    if get(&stats.cancel_host_abort) + get(&stats.cancel_channel_faulted) != 0 {
        fail("a call was cancelled before any fault or abort");
    }

    // Phase 1b (v2): a deadline and a per-call cancel, each on one Block call.
    let v2 = v2_phase(&channels);
    println!(
        "deadline: a Block call woke with DeadlineExceeded {:.2?} after its deadline; \
         cancel(): a Block call woke with CallCancelled, its neighbours ran on",
        v2.deadline_late
    );

    // Phase 2: fault one channel (a client dropped its session).
    let blocked_at_fault = get(&stats.blocked_now[FAULTED]);
    let before: Vec<usize> = (0..CHANNELS)
        .map(|c| get(&stats.calls_per_channel[c]))
        .collect();
    let fault_workers = BLOCKERS + 1;
    channels[FAULTED].fault();
    if !channels[FAULTED].is_faulted() {
        fail("is_faulted() is false after fault()");
    }
    // Its workers wake with ChannelFaulted and are refused (one refusal each).
    wait_until("the faulted channel's workers are refused", || {
        get(&stats.refused_channel_faulted) + get(&stats.refused_unexpected) >= fault_workers
    });
    // The woken calls complete on their own threads.
    wait_until("the faulted channel has no call in flight", || {
        channels[FAULTED].in_flight() == 0
    });
    // The other channels keep running new calls, and nothing else was cancelled.
    wait_until("the other channels ran new calls after the fault", || {
        (0..CHANNELS)
            .filter(|&c| c != FAULTED)
            .all(|c| get(&stats.calls_per_channel[c]) >= before[c] + CHURN_ROUNDS)
    });
    let after_fault_calls: usize = (0..CHANNELS)
        .filter(|&c| c != FAULTED)
        .map(|c| get(&stats.calls_per_channel[c]) - before[c])
        .sum();
    if get(&stats.cancel_host_abort) != 0 {
        fail("a call was cancelled with HostAbort before the abort");
    }
    if (0..CHANNELS).any(|c| c != FAULTED && channels[c].is_faulted()) {
        fail("a channel other than the faulted one reports is_faulted()");
    }
    if host.state() != HostState::Open {
        fail(&format!(
            "host state after a channel fault is {:?}, not Open",
            host.state()
        ));
    }
    println!(
        "fault(channel {FAULTED}): {blocked_at_fault} blocked calls woke with ChannelFaulted; \
         the other channels ran {after_fault_calls} more calls"
    );

    // Phase 3: abort the host (WsAbortServiceHost), wait for idle, close.
    let blocked_at_abort: usize = (0..=CHANNELS).map(|c| get(&stats.blocked_now[c])).sum();
    // One more `Block` call that begins now but registers only after the
    // abort (conformance test T5): its callback must run inside the
    // registration, on this thread.
    let late = begin(
        &Source::Channel(channels[0].clone()),
        Some(0),
        Kind::Block,
        &stats,
    )
    .unwrap_or_else(|| fail("begin_call refused before the abort"));
    let t0 = Instant::now();
    host.abort();
    let abort_returned = t0.elapsed();
    // A1: abort() has invoked every registered in-flight call's callback.
    let notified = get(&stats.block_cancel_host_abort);
    if notified != blocked_at_abort {
        fail(&format!(
            "abort() returned after notifying {notified} of {blocked_at_abort} blocked calls"
        ));
    }
    if host.open_channel().is_ok() {
        fail("open_channel() succeeded after abort()");
    }
    if !serve(late, Some(0), Kind::Block, &stats) {
        fail("a call that registered after abort() was not cancelled inside the registration");
    }
    if !host.wait_idle(DEADLINE) {
        fail(&format!(
            "host not idle {DEADLINE:?} after abort: {} in flight",
            host.in_flight()
        ));
    }
    let abort_to_idle = t0.elapsed();
    if host.in_flight() != 0 {
        fail(&format!(
            "in_flight() = {} after wait_idle",
            host.in_flight()
        ));
    }
    for w in workers {
        if w.join().is_err() {
            fail("a worker thread panicked");
        }
    }
    if let Err(e) = host.close(Duration::from_secs(5)) {
        fail(&format!("close() after abort returned {e:?}"));
    }
    let final_state = host.state();

    // Report.
    let calls_run = get(&stats.calls_run);
    let registered = get(&stats.registered);
    let frees = get(&stats.frees);
    let refused = get(&stats.refused_channel_faulted)
        + get(&stats.refused_host_aborted)
        + get(&stats.refused_other);
    let cancels = get(&stats.cancel_host_abort)
        + get(&stats.cancel_channel_faulted)
        + get(&stats.cancel_other);
    println!(
        "abort(): {blocked_at_abort} blocked calls notified before it returned ({abort_returned:.2?})"
    );
    println!("abort(): a call that registered afterwards was cancelled inside register_for_cancel");
    println!(
        "calls run:        {calls_run} ({} Block, {} quick); registered {registered}",
        get(&stats.block_calls),
        get(&stats.quick_calls)
    );
    println!(
        "calls refused:    {refused} (ChannelFaulted {}, HostAborted {}, other {})",
        get(&stats.refused_channel_faulted),
        get(&stats.refused_host_aborted),
        get(&stats.refused_other)
    );
    println!(
        "cancellations:    {cancels}: HostAbort {}, ChannelFaulted {} ({} inside register_for_cancel)",
        get(&stats.cancel_host_abort),
        get(&stats.cancel_channel_faulted),
        get(&stats.cancel_inline)
    );
    println!("frees:            {frees}");
    let hs = host.stats();
    println!(
        "host.stats():     refused {}, cancelled: HostAbort {}, ChannelFaulted {}, \
         CallCancelled {}, DeadlineExceeded {}",
        hs.refused,
        hs.cancelled(CancelReason::HostAbort),
        hs.cancelled(CancelReason::ChannelFaulted),
        hs.cancelled(CancelReason::CallCancelled),
        hs.cancelled(CancelReason::DeadlineExceeded)
    );
    println!("abort -> idle:    {abort_to_idle:.2?}");
    println!("final host state: {final_state:?}");

    // Checks.
    let mut errors = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            errors.push(msg);
        }
    };
    check(
        get(&stats.register_failed) == 0,
        format!("{} registrations failed", get(&stats.register_failed)),
    );
    check(
        registered == calls_run,
        format!("registered {registered} != calls run {calls_run}"),
    );
    check(
        frees == registered,
        format!("frees {frees} != registered calls {registered}"),
    );
    check(
        get(&stats.block_cancel_channel_faulted) == blocked_at_fault,
        format!(
            "ChannelFaulted cancels of Block calls {} != calls blocked on the faulted channel {}",
            get(&stats.block_cancel_channel_faulted),
            blocked_at_fault
        ),
    );
    check(
        get(&stats.cancel_channel_faulted) == get(&stats.cancels_on_faulted_channel),
        format!(
            "ChannelFaulted cancels {} != cancels on the faulted channel {}",
            get(&stats.cancel_channel_faulted),
            get(&stats.cancels_on_faulted_channel)
        ),
    );
    check(
        get(&stats.block_cancel_host_abort) + get(&stats.block_cancel_channel_faulted)
            == get(&stats.block_calls),
        format!(
            "Block calls {} != Block cancellations {}",
            get(&stats.block_calls),
            get(&stats.block_cancel_host_abort) + get(&stats.block_cancel_channel_faulted)
        ),
    );
    check(
        get(&stats.cancel_other) == 0,
        "a cancellation with an unknown reason".into(),
    );
    check(
        refused == n_workers,
        format!("{refused} refusals for {n_workers} workers"),
    );
    for (count, what) in [
        (
            &stats.refused_unexpected,
            "refusals with an unexpected error",
        ),
        (
            &stats.wrong_reason,
            "cancellations with the wrong reason for their channel",
        ),
        (
            &stats.use_after_free,
            "cancel callbacks after the free-state (use after free)",
        ),
        (&stats.double_cancel, "second cancel callbacks on one call"),
        (&stats.double_free, "second free-states on one call"),
        (
            &stats.free_during_cancel,
            "free-states that overlapped the cancel callback",
        ),
        (
            &stats.block_not_cancelled_once,
            "Block calls not cancelled exactly once",
        ),
        (
            &stats.reason_disagrees,
            "calls whose cancel_reason() disagrees with the callback",
        ),
    ] {
        check(get(count) == 0, format!("{} {what}", get(count)));
    }
    check(
        host.in_flight() == 0,
        format!("in_flight() = {} after idle", host.in_flight()),
    );
    check(
        hs.cancelled(CancelReason::DeadlineExceeded) == 1
            && hs.cancelled(CancelReason::CallCancelled) == 1,
        format!(
            "stats: DeadlineExceeded {} and CallCancelled {}, expected 1 and 1",
            hs.cancelled(CancelReason::DeadlineExceeded),
            hs.cancelled(CancelReason::CallCancelled)
        ),
    );
    check(
        hs.cancelled(CancelReason::ChannelFaulted) as usize == get(&stats.cancel_channel_faulted)
            && hs.cancelled(CancelReason::HostAbort) as usize == get(&stats.cancel_host_abort),
        "stats() disagrees with the callbacks' counts".into(),
    );
    for (i, ch) in channels.iter().enumerate() {
        check(
            ch.in_flight() == 0,
            format!("channel {i}: in_flight() = {}", ch.in_flight()),
        );
    }
    check(
        final_state == HostState::Closed,
        format!("final state {final_state:?}, not Closed"),
    );

    if !errors.is_empty() {
        fail(&errors.join("; "));
    }
    println!("OK: every count matches");
}

/// What the v2 phase saw.
struct V2 {
    deadline_late: Duration,
}

/// A `Block` call outside the counted workers: register the event, wait on
/// it on its own thread, complete. Returns the thread (yielding the reason
/// it woke with) and the free-state's count (the free may run on the
/// canceller's thread, if the call completed while the callback still ran).
type Blocked = (thread::JoinHandle<Option<CancelReason>>, Arc<AtomicUsize>);

fn block_alone(call: Call) -> Blocked {
    let event = Arc::new(Event::default());
    let freed = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&freed);
    call.register_for_cancel_with_free(
        Arc::clone(&event),
        |reason, ev: &Arc<Event>| {
            if ev.signal(reason).is_err() {
                fail("v2: a cancel callback misused its event");
            }
        },
        move |ev: Arc<Event>| {
            ev.close();
            f.fetch_add(1, SeqCst);
        },
    )
    .unwrap_or_else(|_| fail("v2: registration refused"));
    let t = thread::spawn(move || {
        let reason = event.wait();
        if call.cancel_reason() != reason {
            fail("v2: cancel_reason() disagrees with the callback");
        }
        call.complete();
        reason
    });
    (t, freed)
}

fn v2_phase(channels: &[Channel]) -> V2 {
    // A deadline: the timer thread cancels the call, never early.
    let at = Instant::now() + Duration::from_millis(50);
    let call = channels[0]
        .begin_call_with_deadline(at)
        .unwrap_or_else(|e| fail(&format!("begin_call_with_deadline: {e}")));
    if call.deadline() != Some(at) {
        fail("v2: deadline() is not the deadline given");
    }
    let (t, freed) = block_alone(call);
    let reason = t.join().unwrap_or_else(|_| fail("v2 panicked"));
    let woke = Instant::now();
    // The timer thread may still be finishing (and then frees): wait for it.
    wait_until("the deadline call is freed", || freed.load(SeqCst) == 1);
    let frees = freed.load(SeqCst);
    if reason != Some(CancelReason::DeadlineExceeded) || frees != 1 {
        fail(&format!(
            "v2: deadline call woke with {reason:?}, {frees} frees"
        ));
    }
    if woke < at {
        fail("v2: a deadline fired early");
    }
    // A per-call cancel: only that call, with CallCancelled.
    let call = channels[1]
        .begin_call()
        .unwrap_or_else(|e| fail(&format!("begin_call: {e}")));
    let canceller = call.canceller();
    let (blocked, freed) = block_alone(call);
    if !canceller.cancel() {
        fail("v2: the first cancel() did not decide the cancellation");
    }
    let reason = blocked.join().unwrap_or_else(|_| fail("v2 panicked"));
    // Both sides are done: whoever finished last has freed.
    let frees = freed.load(SeqCst);
    if reason != Some(CancelReason::CallCancelled) || frees != 1 {
        fail(&format!(
            "v2: cancelled call woke with {reason:?}, {frees} frees"
        ));
    }
    if canceller.cancel() || !canceller.is_finished() {
        fail("v2: a canceller of a completed call still acted");
    }
    V2 {
        deadline_late: woke - at,
    }
}
