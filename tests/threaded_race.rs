//! Real threads racing register, abort, fault and complete over well over 100_000
//! calls in total. Every callback and every free is counted per call index and
//! checked against R1–R6 and A1 after each round.

mod common;

use std::{
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering::SeqCst},
        mpsc, Arc, Barrier, Mutex,
    },
    task::{Poll, Waker},
    thread,
};

use callcancel::{
    CancelReason, Error, HostState, OperationContext, RegisterErrorKind, ServiceHost,
};
use common::{jitter, poll_once, Rng};

const STARTED: u32 = 1;
const DONE: u32 = 2;
const FREED: u32 = 4;

const NONE: u8 = 0;
const ABORT: u8 = 1;
const FAULT: u8 = 2;

fn code(r: Option<CancelReason>) -> u8 {
    match r {
        None => NONE,
        Some(CancelReason::HostAbort) => ABORT,
        Some(CancelReason::ChannelFaulted) => FAULT,
        Some(_) => 99,
    }
}

/// Per-call bookkeeping, indexed by call number within a round.
#[derive(Default)]
struct Slot {
    cancels: AtomicU32,
    frees: AtomicU32,
    phase: AtomicU32,
    /// reason the callback received
    reason: AtomicU8,
    /// reason the owner read just before completing (NONE if not cancelled yet)
    observed: AtomicU8,
    used: AtomicBool,
    registered: AtomicBool,
    completing: AtomicBool,
    /// channel index + 1, or 0 for a host-scope call
    channel: AtomicU8,
}

struct Board {
    slots: Vec<Slot>,
    violations: AtomicUsize,
    first_violation: Mutex<Option<String>>,
    faulted: Vec<AtomicBool>,
    abort_started: AtomicBool,
    progress: AtomicUsize,
}

impl Board {
    fn new(n: usize, channels: usize) -> Self {
        Self {
            slots: (0..n).map(|_| Slot::default()).collect(),
            violations: AtomicUsize::new(0),
            first_violation: Mutex::new(None),
            faulted: (0..channels).map(|_| AtomicBool::new(false)).collect(),
            abort_started: AtomicBool::new(false),
            progress: AtomicUsize::new(0),
        }
    }

    fn violation(&self, msg: String) {
        self.violations.fetch_add(1, SeqCst);
        self.first_violation.lock().unwrap().get_or_insert(msg);
    }

    fn check_clean(&self, round: usize) {
        let v = self.violations.load(SeqCst);
        assert_eq!(
            v,
            0,
            "round {round}: {v} violations, first: {:?}",
            self.first_violation.lock().unwrap()
        );
    }
}

/// The registered state: knows its board and index.
struct Tag {
    board: Arc<Board>,
    idx: usize,
}

fn on_cancel(reason: CancelReason, t: &Tag) {
    let s = &t.board.slots[t.idx];
    let before = s.phase.fetch_or(STARTED, SeqCst);
    if before & FREED != 0 {
        t.board
            .violation(format!("call {}: cancel callback after free", t.idx));
    }
    if s.cancels.fetch_add(1, SeqCst) != 0 {
        t.board
            .violation(format!("call {}: second cancel callback", t.idx));
    }
    s.reason.store(code(Some(reason)), SeqCst);
    s.phase.fetch_or(DONE, SeqCst);
}

fn on_free(t: &Tag) {
    let s = &t.board.slots[t.idx];
    let before = s.phase.fetch_or(FREED, SeqCst);
    if before & STARTED != 0 && before & DONE == 0 {
        t.board.violation(format!(
            "call {}: free while the cancel callback runs",
            t.idx
        ));
    }
    if s.frees.fetch_add(1, SeqCst) != 0 {
        t.board.violation(format!("call {}: second free", t.idx));
    }
}

struct DropTag(Tag);
impl Drop for DropTag {
    fn drop(&mut self) {
        on_free(&self.0);
    }
}

/// Registers (or not) for call `idx` according to `mode`; checks R4 inline rule.
fn register(board: &Arc<Board>, ctx: &OperationContext, idx: usize, mode: u64) {
    let slot = &board.slots[idx];
    let before = ctx.cancel_reason();
    let tag = Tag {
        board: Arc::clone(board),
        idx,
    };
    match mode {
        0 => return, // never registers
        1 => ctx
            .register_for_cancel(DropTag(tag), |r, t: &DropTag| on_cancel(r, &t.0))
            .unwrap(),
        _ => ctx
            .register_for_cancel_with_free(tag, on_cancel, |t| on_free(&t))
            .unwrap(),
    }
    if before.is_some() {
        // The cancel came first: the callback ran inside register_for_cancel.
        if slot.cancels.load(SeqCst) != 1 || slot.phase.load(SeqCst) & DONE == 0 {
            board.violation(format!(
                "call {idx}: cancelled before register, callback did not run inline"
            ));
        }
        if slot.reason.load(SeqCst) != code(before) {
            board.violation(format!(
                "call {idx}: inline callback reason differs from cancel_reason()"
            ));
        }
    }
    slot.registered.store(true, SeqCst);
    if mode == 2 {
        // A second registration must fail and run nothing.
        let bad = Tag {
            board: Arc::clone(board),
            idx,
        };
        let err = ctx
            .register_for_cancel_with_free(
                bad,
                |_, t: &Tag| {
                    t.board
                        .violation(format!("call {}: rejected cancel ran", t.idx))
                },
                |t| {
                    t.board
                        .violation(format!("call {}: rejected free ran", t.idx))
                },
            )
            .unwrap_err();
        if err.kind() != RegisterErrorKind::AlreadyRegistered {
            board.violation(format!("call {idx}: wrong RegisterError kind"));
        }
        drop(err.into_state());
    }
}

/// Reads the reason three ways, records it, then completes the call.
fn finish(board: &Board, idx: usize, call: callcancel::Call) {
    let slot = &board.slots[idx];
    let r1 = call.cancel_reason();
    let r2 = match poll_once(pin!(call.cancelled()), Waker::noop()) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    };
    let r3 = call.cancel_reason();
    if r1.is_some() && r1 != r3 {
        board.violation(format!(
            "call {idx}: cancel_reason changed {r1:?} -> {r3:?}"
        ));
    }
    if r2.is_some() && r2 != r3 {
        board.violation(format!(
            "call {idx}: cancelled() gave {r2:?}, cancel_reason() {r3:?}"
        ));
    }
    slot.observed.store(code(r3), SeqCst);
    slot.completing.store(true, SeqCst);
    call.complete();
    board.progress.fetch_add(1, SeqCst);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    AbortAndFault,
    AbortOnly,
    FaultOnly,
}

/// Runs one round; returns (calls exercised, cancel callbacks run).
fn run_round(
    round: usize,
    variant: Variant,
    precreated: usize,
    extra_per_worker: usize,
) -> (usize, usize) {
    const CHANNELS: usize = 4;
    let n = precreated + 2 * extra_per_worker;
    let board = Arc::new(Board::new(n, CHANNELS));
    let host = ServiceHost::new();
    let channels: Vec<_> = (0..CHANNELS)
        .map(|_| host.open_channel().unwrap())
        .collect();
    let mut rng = Rng::new(round as u64 * 7919 + 1);

    // Pre-create calls: all are in flight when the race starts.
    let mut lists: [Vec<(usize, callcancel::Call)>; 2] = [Vec::new(), Vec::new()];
    for idx in 0..precreated {
        let c = idx % (CHANNELS + 1);
        let call = if c == CHANNELS {
            host.begin_call().unwrap()
        } else {
            channels[c].begin_call().unwrap()
        };
        board.slots[idx].used.store(true, SeqCst);
        board.slots[idx]
            .channel
            .store(if c == CHANNELS { 0 } else { c as u8 + 1 }, SeqCst);
        lists[idx % 2].push((idx, call));
    }
    let abort_at = rng.below(precreated as u64 + 1) as usize;
    let fault_at: Vec<usize> = (0..CHANNELS)
        .map(|_| rng.below(precreated as u64 + 1) as usize)
        .collect();
    let seeds = [rng.next_u64(), rng.next_u64()];
    let [list0, list1] = lists;
    let (hand_tx, hand_rx) = mpsc::channel::<(usize, callcancel::Call)>();

    let used = AtomicUsize::new(precreated);
    let barrier = Barrier::new(4);
    thread::scope(|s| {
        // Worker: registers and completes its calls, hands some to the other
        // worker to complete there, and begins extra calls mid-race.
        let worker =
            |w: usize,
             list: Vec<(usize, callcancel::Call)>,
             hand: Option<mpsc::Sender<(usize, callcancel::Call)>>,
             inbox: Option<mpsc::Receiver<(usize, callcancel::Call)>>| {
                let (board, host, channels, barrier, used) =
                    (&board, &host, &channels, &barrier, &used);
                move || {
                    let mut rng = Rng::new(seeds[w]);
                    let mut next_extra = precreated + w * extra_per_worker;
                    barrier.wait();
                    for (k, (idx, call)) in list.into_iter().enumerate() {
                        register(board, &call, idx, rng.below(6));
                        jitter(&mut rng, 50);
                        match &hand {
                            Some(tx) if k % 2 == 0 => tx.send((idx, call)).unwrap(),
                            _ => finish(board, idx, call),
                        }
                        if let Some(rx) = &inbox {
                            while let Ok((i, c)) = rx.try_recv() {
                                finish(board, i, c);
                            }
                        }
                        if k % 5 == 0 && next_extra < precreated + (w + 1) * extra_per_worker {
                            let c = rng.below(CHANNELS as u64 + 1) as usize;
                            let res = if c == CHANNELS {
                                host.begin_call()
                            } else {
                                channels[c].begin_call()
                            };
                            match res {
                                Ok(call) => {
                                    let idx = next_extra;
                                    next_extra += 1;
                                    used.fetch_add(1, SeqCst);
                                    let slot = &board.slots[idx];
                                    slot.used.store(true, SeqCst);
                                    slot.channel
                                        .store(if c == CHANNELS { 0 } else { c as u8 + 1 }, SeqCst);
                                    register(board, &call, idx, rng.below(6));
                                    finish(board, idx, call);
                                }
                                Err(Error::HostAborted) if board.abort_started.load(SeqCst) => {}
                                Err(Error::ChannelFaulted)
                                    if c < CHANNELS && board.faulted[c].load(SeqCst) => {}
                                Err(e) => board
                                    .violation(format!("begin_call failed unexpectedly: {e:?}")),
                            }
                        }
                    }
                    drop(hand);
                    if let Some(rx) = inbox {
                        for (i, c) in rx {
                            finish(board, i, c);
                        }
                    }
                }
            };
        s.spawn(worker(0, list0, Some(hand_tx), None));
        s.spawn(worker(1, list1, None, Some(hand_rx)));

        // Aborter.
        s.spawn(|| {
            barrier.wait();
            if variant == Variant::FaultOnly {
                return;
            }
            while board.progress.load(SeqCst) < abort_at {
                thread::yield_now();
            }
            board.abort_started.store(true, SeqCst);
            host.abort();
            if variant == Variant::AbortOnly {
                // A1: every registered in-flight call has had its callback run.
                for (i, slot) in board.slots.iter().enumerate() {
                    let registered = slot.registered.load(SeqCst);
                    let completing = slot.completing.load(SeqCst);
                    if registered && !completing && (slot.cancels.load(SeqCst) != 1 || slot.phase.load(SeqCst) & DONE == 0) {
                        board.violation(format!("call {i}: registered and in flight, but abort returned without running its callback"));
                    }
                }
            }
        });

        // Faulter.
        s.spawn(|| {
            barrier.wait();
            if variant == Variant::AbortOnly {
                return;
            }
            let mut order: Vec<usize> = (0..CHANNELS).collect();
            order.sort_by_key(|&c| fault_at[c]);
            for c in order {
                while board.progress.load(SeqCst) < fault_at[c] {
                    thread::yield_now();
                }
                board.faulted[c].store(true, SeqCst);
                channels[c].fault();
            }
        });
    });

    board.check_clean(round);
    let aborted = variant != Variant::FaultOnly;
    for (i, s) in board.slots.iter().enumerate() {
        if !s.used.load(SeqCst) {
            continue;
        }
        let (cancels, frees) = (s.cancels.load(SeqCst), s.frees.load(SeqCst));
        let registered = s.registered.load(SeqCst);
        let reason = s.reason.load(SeqCst);
        let observed = s.observed.load(SeqCst);
        let ch = s.channel.load(SeqCst);
        let ctx = format!("round {round} ({variant:?}) call {i}");
        assert!(cancels <= 1, "{ctx}: {cancels} cancels");
        if registered {
            assert_eq!(frees, 1, "{ctx}: frees");
        } else {
            assert_eq!(
                (cancels, frees),
                (0, 0),
                "{ctx}: unregistered call got callbacks"
            );
        }
        if s.phase.load(SeqCst) & STARTED != 0 {
            assert!(
                s.phase.load(SeqCst) & DONE != 0,
                "{ctx}: callback never returned"
            );
        }
        if cancels == 1 {
            match reason {
                ABORT => assert!(aborted, "{ctx}: HostAbort without an abort"),
                FAULT => assert!(
                    ch != 0 && board.faulted[ch as usize - 1].load(SeqCst),
                    "{ctx}: ChannelFaulted on a host-scope call or an unfaulted channel"
                ),
                other => panic!("{ctx}: bad reason code {other}"),
            }
            if observed != NONE {
                assert_eq!(
                    observed, reason,
                    "{ctx}: callback reason vs cancel_reason()"
                );
            }
        }
        if registered && observed != NONE {
            assert_eq!(
                cancels, 1,
                "{ctx}: registered, cancelled while in flight, but no callback (lost cancel)"
            );
        }
    }
    assert_eq!(
        host.in_flight(),
        0,
        "round {round}: in_flight after all calls completed"
    );
    for ch in &channels {
        assert_eq!(ch.in_flight(), 0);
    }
    assert!(host.wait_idle(std::time::Duration::ZERO));
    if aborted {
        assert_eq!(host.state(), HostState::Aborted);
    } else {
        assert_eq!(host.state(), HostState::Open);
    }
    assert_eq!(host.close(std::time::Duration::from_secs(5)), Ok(()));
    assert_eq!(host.state(), HostState::Closed);
    let cancels = board
        .slots
        .iter()
        .map(|s| s.cancels.load(SeqCst) as usize)
        .sum();
    (used.load(SeqCst), cancels)
}

#[test]
fn mixed_register_abort_fault_complete_race() {
    let (mut total, mut cancels) = (0, 0);
    for round in 0..60 {
        let (n, c) = run_round(round, Variant::AbortAndFault, 1_000, 100);
        total += n;
        cancels += c;
    }
    assert!(total >= 60_000, "only {total} calls exercised");
    assert!(
        cancels > 0,
        "no cancel callback ran at all: the race never hit an in-flight call"
    );
}

#[test]
fn abort_only_race_checks_a1() {
    let (mut total, mut cancels) = (0, 0);
    for round in 0..30 {
        let (n, c) = run_round(1_000 + round, Variant::AbortOnly, 1_000, 100);
        total += n;
        cancels += c;
    }
    assert!(total >= 30_000, "only {total} calls exercised");
    assert!(cancels > 0, "no cancel callback ran at all");
}

#[test]
fn fault_only_race_leaves_host_scope_calls_alone() {
    let (mut total, mut cancels) = (0, 0);
    for round in 0..20 {
        let (n, c) = run_round(2_000 + round, Variant::FaultOnly, 1_000, 100);
        total += n;
        cancels += c;
    }
    assert!(total >= 20_000, "only {total} calls exercised");
    assert!(cancels > 0, "no cancel callback ran at all");
}

/// Three threads per call: the owner registers then completes, one aborts, one
/// faults; the host and channel are fresh each iteration.
#[test]
fn single_call_three_way_race() {
    const ITERS: usize = 20_000;
    let board = Arc::new(Board::new(ITERS, 1));
    let slots: Vec<_> = (0..ITERS)
        .map(|_| Mutex::new(None::<(ServiceHost, callcancel::Channel)>))
        .collect();
    let barrier = Barrier::new(3);
    let turn = |i: usize| slots[i].lock().unwrap().clone().unwrap();
    thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng::new(1);
            for (i, slot) in slots.iter().enumerate() {
                let host = ServiceHost::new();
                let ch = host.open_channel().unwrap();
                let call = if i % 4 == 3 {
                    host.begin_call().unwrap()
                } else {
                    ch.begin_call().unwrap()
                };
                board.slots[i].used.store(true, SeqCst);
                board.slots[i]
                    .channel
                    .store(if i % 4 == 3 { 0 } else { 1 }, SeqCst);
                *slot.lock().unwrap() = Some((host.clone(), ch));
                barrier.wait();
                jitter(&mut rng, 100);
                register(&board, &call, i, 1 + rng.below(3));
                finish(&board, i, call);
                barrier.wait();
                let frees = board.slots[i].frees.load(SeqCst);
                if frees != 1 {
                    board.violation(format!("call {i}: {frees} frees after completion"));
                }
                if host.in_flight() != 0 {
                    board.violation(format!(
                        "call {i}: in_flight {} after completion",
                        host.in_flight()
                    ));
                }
            }
        });
        s.spawn(|| {
            let mut rng = Rng::new(2);
            for i in 0..ITERS {
                barrier.wait();
                let (host, _) = turn(i);
                jitter(&mut rng, 100);
                board.abort_started.store(true, SeqCst);
                host.abort();
                barrier.wait();
            }
        });
        s.spawn(|| {
            let mut rng = Rng::new(3);
            for i in 0..ITERS {
                barrier.wait();
                let (_, ch) = turn(i);
                jitter(&mut rng, 100);
                board.faulted[0].store(true, SeqCst);
                ch.fault();
                barrier.wait();
            }
        });
    });
    board.check_clean(0);
    for (i, s) in board.slots.iter().enumerate() {
        let (cancels, observed, reason) = (
            s.cancels.load(SeqCst),
            s.observed.load(SeqCst),
            s.reason.load(SeqCst),
        );
        assert!(cancels <= 1, "call {i}");
        assert_eq!(s.frees.load(SeqCst), 1, "call {i}");
        if observed != NONE {
            assert_eq!(cancels, 1, "call {i}: lost cancel");
            assert_eq!(reason, observed, "call {i}: reason mismatch");
        }
        if s.channel.load(SeqCst) == 0 && cancels == 1 {
            assert_eq!(
                reason, ABORT,
                "call {i}: host-scope call got ChannelFaulted"
            );
        }
    }
}
