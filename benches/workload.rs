//! Server-shaped workloads W1–W3 (DESIGN.md, "Performance targets"; issue
//! 13). W4 (memory) is `benches/memory.rs`.
//!
//! Every group except `w2_fault_2threads` runs with a [`common::BusySibling`]
//! spinning on the other core, as a server's other workers do; in
//! `w2_fault_2threads` the second faulting thread is that sibling. Every
//! target is a ratio to a peer of the same group, measured in the same run.
//!
//! * `w1_churn/{callcancel,tokio_util}/k` (k = 1, 10, 100): one iteration is
//!   one connection. callcancel: `open_channel`, k × (`begin_call` +
//!   `register_for_cancel` of a closure capturing a `u64` + `complete`),
//!   `fault()`, drop the channel. tokio-util: `child_token()` of a root, k ×
//!   (`child_token()` of it + drop), `cancel()`, drop. The median is the
//!   time per connection. Target: no slower at k = 1, >= 2x faster at k >= 10.
//! * `w2_fault`: only the fault is timed. Channels are opened (and, after
//!   the timing, dropped) by `iter_batched` in batches of 64
//!   (`BatchSize::NumIterations`), so the clock is read once per 64 faults,
//!   not around each. `callcancel_fault_idle`: `fault()` of a channel with no
//!   call in flight (target <= 150 ns); `tokio_util_cancel_idle`: `cancel()`
//!   of a child token with no child and no waiter, the same act for it.
//!   The v2 per-call `cancel()` case is added when the core has it.
//! * `w2_fault_2threads`: aggregate fault throughput, 2 threads vs 1, on
//!   different channels of one host (no busy sibling). `iter_custom`: one
//!   iteration is a round in which each faulting thread opens `B` channels
//!   (untimed), waits at a barrier with the timing thread, faults its `B`
//!   channels, waits at the barrier again; the timing thread's clock runs
//!   between the two barriers. Throughput is `B` elements, so the per-element
//!   time is per fault per thread; throughput of 2 over 1 = 2·t1 / t2
//!   (target >= 1.8). tokio-util peers: `cancel()` of child tokens of one
//!   root, the same way.
//! * `w3_open_drop`: `open_channel()` + drop vs `child_token()` + drop of a
//!   root (target <= 1.5x).

mod common;

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use callcancel::{Channel, ServiceHost};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tokio_util::sync::CancellationToken;

const KS: [u64; 3] = [1, 10, 100];
/// Faults per thread per round of `w2_fault_2threads`.
const B: usize = 512;
/// Inputs per timed batch of `w2_fault` (one clock read per 64 operations).
const BATCH: u64 = 64;

/// One W1 connection on callcancel.
#[inline]
fn churn_callcancel(host: &ServiceHost, k: u64) {
    let channel = host.open_channel().unwrap();
    for i in 0..k {
        let call = channel.begin_call().unwrap();
        call.register_for_cancel(i, move |reason, s| {
            black_box((reason, s, i));
        })
        .unwrap();
        call.complete();
    }
    channel.fault();
    drop(channel);
}

/// One W1 connection on tokio-util.
#[inline]
fn churn_tokio(root: &CancellationToken, k: u64) {
    let conn = root.child_token();
    for _ in 0..k {
        drop(black_box(conn.child_token()));
    }
    conn.cancel();
    drop(conn);
}

fn w1_churn(c: &mut Criterion) {
    let _sibling = common::BusySibling::start();
    let mut g = c.benchmark_group("w1_churn");
    g.measurement_time(Duration::from_millis(1500));
    let host = ServiceHost::new();
    let root = CancellationToken::new();
    for k in KS {
        g.bench_with_input(BenchmarkId::new("callcancel", k), &k, |b, &k| {
            b.iter(|| churn_callcancel(&host, black_box(k)))
        });
        g.bench_with_input(BenchmarkId::new("tokio_util", k), &k, |b, &k| {
            b.iter(|| churn_tokio(&root, black_box(k)))
        });
    }
    g.finish();
    assert_eq!(host.in_flight(), 0);
}

fn w2_fault(c: &mut Criterion) {
    let _sibling = common::BusySibling::start();
    let mut g = c.benchmark_group("w2_fault");
    g.measurement_time(Duration::from_millis(1500));
    let host = ServiceHost::new();
    g.bench_function("callcancel_fault_idle", |b| {
        b.iter_batched(
            || host.open_channel().unwrap(),
            |channel| {
                channel.fault();
                channel
            },
            BatchSize::NumIterations(BATCH),
        )
    });
    let root = CancellationToken::new();
    g.bench_function("tokio_util_cancel_idle", |b| {
        b.iter_batched(
            || root.child_token(),
            |token| {
                token.cancel();
                token
            },
            BatchSize::NumIterations(BATCH),
        )
    });
    g.finish();
}

/// `iters` rounds of `threads` threads each doing `B` operations on inputs
/// they made themselves before the round's start barrier; the clock runs
/// from the start barrier to the end barrier.
fn rounds<I>(
    iters: u64,
    threads: usize,
    make: impl Fn() -> I + Sync,
    op: impl Fn(&I) + Sync,
) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let mut elapsed = Duration::ZERO;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters {
                    let inputs: Vec<I> = (0..B).map(|_| make()).collect();
                    barrier.wait();
                    for input in &inputs {
                        op(input);
                    }
                    barrier.wait();
                    drop(inputs);
                }
            });
        }
        for _ in 0..iters {
            barrier.wait();
            let t0 = Instant::now();
            barrier.wait();
            elapsed += t0.elapsed();
        }
    });
    elapsed
}

fn w2_fault_2threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("w2_fault_2threads");
    g.measurement_time(Duration::from_millis(1500));
    g.throughput(Throughput::Elements(B as u64));
    let host = ServiceHost::new();
    let root = CancellationToken::new();
    for (name, threads) in [("1thread", 1), ("2threads", 2)] {
        g.bench_function(format!("callcancel_{name}"), |b| {
            b.iter_custom(|iters| {
                rounds(
                    iters,
                    threads,
                    || host.open_channel().unwrap(),
                    Channel::fault,
                )
            })
        });
        g.bench_function(format!("tokio_util_{name}"), |b| {
            b.iter_custom(|iters| {
                rounds(
                    iters,
                    threads,
                    || root.child_token(),
                    CancellationToken::cancel,
                )
            })
        });
    }
    g.finish();
}

fn w3_open_drop(c: &mut Criterion) {
    let _sibling = common::BusySibling::start();
    let mut g = c.benchmark_group("w3_open_drop");
    g.measurement_time(Duration::from_millis(1500));
    let host = ServiceHost::new();
    g.bench_function("callcancel", |b| {
        b.iter(|| drop(black_box(host.open_channel().unwrap())))
    });
    let root = CancellationToken::new();
    g.bench_function("tokio_util", |b| {
        b.iter(|| drop(black_box(root.child_token())))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(20);
    targets = w1_churn, w2_fault, w2_fault_2threads, w3_open_drop
}
criterion_main!(benches);
