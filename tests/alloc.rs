//! Allocation and memory targets, counted (not timed), so they are ordinary
//! tests that CI runs:
//!
//! * **P2**: after warm-up, a call lifecycle (begin_call, register with small
//!   state and closures, complete) allocates nothing.
//! * **P3**: an in-flight registered call costs at most 64 bytes plus what
//!   does not fit inline (128 bytes is the hard ceiling).
//!
//! A counting `#[global_allocator]` (this test binary only) keeps per-thread
//! counters, so tests running in parallel on other threads do not disturb
//! each other. Everything a test measures runs on the test's own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use callcancel::{Call, Channel, ServiceHost};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// Live bytes of this thread: allocated minus freed (may go negative when
    /// a thread frees what another allocated).
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

fn note(allocs: u64, bytes: i64) {
    // `try_with`: the allocator may run while thread-locals are torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + allocs));
    let _ = LIVE.try_with(|c| c.set(c.get() + bytes));
}

// SAFETY: forwards every request to `System` unchanged; the counters are
// plain thread-local cells that never allocate (const-initialised).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(1, layout.size() as i64);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(1, layout.size() as i64);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, -(layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(1, new_size as i64 - layout.size() as i64);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

fn live() -> i64 {
    LIVE.with(Cell::get)
}

/// Allocations made by `f` on this thread.
fn count_allocs(f: impl FnOnce()) -> u64 {
    let before = allocs();
    f();
    allocs() - before
}

const WARM_UP: u64 = 1_000;
/// In-flight calls of the P3 tests: past several storage growths of a slab
/// that doubles from a few slots, and quick in a debug build.
const MAX_IN_FLIGHT: usize = 20_000;
const CALLS: u64 = 10_000;

/// Small state and closures: a `u64` state, a cancel closure capturing a
/// `u64`, a free closure capturing nothing (three words in all).
fn small_lifecycle(call: Call, n: u64) {
    call.register_for_cancel_with_free(
        n,
        move |_, s| {
            black_box((s, n));
        },
        |s| {
            black_box(s);
        },
    )
    .unwrap();
    call.complete();
}

fn steady_state_allocs(begin: impl Fn() -> Call, op: impl Fn(Call, u64)) -> u64 {
    for i in 0..WARM_UP {
        op(begin(), i);
    }
    count_allocs(|| {
        for i in 0..CALLS {
            op(begin(), i);
        }
    })
}

#[test]
fn the_counter_counts() {
    assert_eq!(count_allocs(|| drop(black_box(Box::new(1u64)))), 1);
    let before = live();
    let b = black_box(vec![0u8; 100]);
    assert_eq!(live() - before, 100);
    drop(b);
    assert_eq!(live(), before);
}

#[test]
fn p2_begin_complete_without_registration_allocates_nothing() {
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let n = steady_state_allocs(|| channel.begin_call().unwrap(), |call, _| call.complete());
    assert_eq!(n, 0, "{n} allocations in {CALLS} unregistered calls");
}

#[test]
fn p2_is_cancelled_allocates_nothing() {
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let call = channel.begin_call().unwrap();
    let n = count_allocs(|| {
        for _ in 0..CALLS {
            black_box(call.is_cancelled());
        }
    });
    assert_eq!(n, 0);
}

#[test]
fn p2_channel_lifecycle_small_state_allocates_nothing() {
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let n = steady_state_allocs(|| channel.begin_call().unwrap(), small_lifecycle);
    assert_eq!(n, 0, "{n} allocations in {CALLS} calls (P2 wants 0)");
}

#[test]
fn p2_host_scope_lifecycle_small_state_allocates_nothing() {
    let host = ServiceHost::new();
    let n = steady_state_allocs(|| host.begin_call().unwrap(), small_lifecycle);
    assert_eq!(n, 0, "{n} allocations in {CALLS} calls (P2 wants 0)");
}

#[test]
fn p2_register_for_cancel_three_word_state_allocates_nothing() {
    // The largest "small" case: the state is an `Arc` (one word) and the
    // cancel closure captures two words.
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let shared = Arc::new(AtomicU64::new(0));
    let n = steady_state_allocs(
        || channel.begin_call().unwrap(),
        |call, i| {
            let (a, b) = (i, i ^ 1);
            call.register_for_cancel(Arc::clone(&shared), move |_, s| {
                s.fetch_add(a + b, Ordering::Relaxed);
            })
            .unwrap();
            call.complete();
        },
    );
    assert_eq!(n, 0, "{n} allocations in {CALLS} calls (P2 wants 0)");
}

#[test]
fn p2_large_state_allocates_at_most_once_per_call() {
    // What does not fit inline may take one allocation, no more.
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let n = steady_state_allocs(
        || channel.begin_call().unwrap(),
        |call, i| {
            call.register_for_cancel([i; 16], |_, s| {
                black_box(s);
            })
            .unwrap();
            call.complete();
        },
    );
    assert!(n <= CALLS, "{n} allocations in {CALLS} calls");
}

/// Live heap bytes per in-flight call on one channel, sampled as calls are
/// added one at a time up to `max` (each begun and registered by `register`).
///
/// Returns `(full, worst)`: `full` is the bytes per call just before the
/// last storage growth seen past 1000 calls, i.e. with the channel's storage
/// full (the per-call footprint itself); `worst` is the largest bytes per call
/// seen past 1000 calls (just after a growth: the footprint plus the slack
/// the growth policy leaves).
fn bytes_per_inflight_call(max: usize, register: impl Fn(&Call, u64)) -> (f64, f64) {
    // A jump in live bytes bigger than this is storage growth, not one call.
    const GROWTH: i64 = 4096;
    let host = ServiceHost::new();
    let mut calls: Vec<Call> = Vec::with_capacity(max);
    let channel: Channel = host.open_channel().unwrap();
    // The channel's fixed storage (its segment directory and first segment,
    // allocated with its first call) is not per call: count it in the base.
    channel.begin_call().unwrap().complete();
    let base = live();
    let mut prev = 0i64;
    let mut full = None;
    let mut worst = 0f64;
    for i in 1..=max {
        let call = channel.begin_call().unwrap();
        register(&call, i as u64);
        calls.push(call);
        let now = live() - base;
        if i > 1_000 {
            if now - prev > GROWTH {
                full = Some(prev as f64 / (i - 1) as f64);
            }
            worst = worst.max(now as f64 / i as f64);
        }
        prev = now;
    }
    let full = full.unwrap_or(prev as f64 / max as f64);
    drop(calls);
    (full, worst)
}

fn register_small(call: &Call, i: u64) {
    call.register_for_cancel(i, move |_, s| {
        black_box((s, i));
    })
    .unwrap();
}

#[test]
fn p3_small_call_within_hard_ceiling() {
    let (full, worst) = bytes_per_inflight_call(MAX_IN_FLIGHT, register_small);
    eprintln!("P3 small state: {full:.1} B per in-flight call at full storage, {worst:.1} B worst");
    assert!(
        full <= 128.0,
        "{full:.1} B per in-flight call (hard ceiling 128)"
    );
}

#[test]
fn p3_small_call_at_most_64_bytes() {
    // Small state and closure fit inline: nothing may be added to the slot.
    let (full, _) = bytes_per_inflight_call(MAX_IN_FLIGHT, register_small);
    assert!(
        full <= 64.0,
        "{full:.1} B per in-flight call (P3 wants <= 64)"
    );
}

#[test]
fn p3_large_call_costs_64_bytes_plus_its_overflow() {
    type Big = [u64; 16];
    let (full, _) = bytes_per_inflight_call(MAX_IN_FLIGHT, |call, i| {
        call.register_for_cancel([i; 16], move |_, s: &Big| {
            black_box((s, i));
        })
        .unwrap();
    });
    // The state and the closure's capture do not fit inline; allow them plus
    // three words of bookkeeping (tags, the free-state hook).
    let overflow = (size_of::<Big>() + 4 * size_of::<u64>()) as f64;
    eprintln!("P3 128-byte state: {full:.1} B per in-flight call (64 + {overflow} allowed)");
    assert!(
        full <= 64.0 + overflow,
        "{full:.1} B per in-flight call with a {}-byte state",
        size_of::<Big>()
    );
}

/// W1's connection: `open_channel`, one registered call, `fault`, drop.
fn short_connection(host: &ServiceHost, n: u64) {
    let channel = host.open_channel().unwrap();
    let call = channel.begin_call().unwrap();
    register_small(&call, n);
    call.complete();
    channel.fault();
    drop(channel);
}

#[test]
fn w1_a_short_connection_allocates_its_channel_only() {
    // Issue 13: a connection's slot storage (segment 0 and the segment
    // directory) comes from this thread's spare block, left by the previous
    // connection: in steady state a connection allocates its channel and
    // nothing else (its table entry is released at once, nothing deferred).
    let host = ServiceHost::new();
    for i in 0..WARM_UP {
        short_connection(&host, i);
    }
    let n = count_allocs(|| {
        for i in 0..CALLS {
            short_connection(&host, i);
        }
    });
    let per = n as f64 / CALLS as f64;
    eprintln!("W1: {per:.3} allocations per connection");
    assert_eq!(
        n, CALLS,
        "{n} allocations in {CALLS} connections ({per:.3} each; 1 is the channel)"
    );
}
