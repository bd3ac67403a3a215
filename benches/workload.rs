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
//!   `callcancel_cancel_registered`: `OperationContext::cancel()` (v2) of a
//!   call with a registered cancel closure, which runs inside it (target
//!   <= 150 ns); `tokio_util_cancel_waiter`: `cancel()` of a child token
//!   whose `cancelled_owned()` future was polled once (one waiter). The
//!   calls are completed, and tokens and futures dropped, after the timing.
//! * `w2_fault_2threads`: aggregate fault throughput, 2 threads vs 1, on
//!   different channels of one host (no busy sibling). `iter_custom`: one
//!   iteration is a round in which each faulting thread opens `B` channels
//!   (untimed), waits at a spinning barrier, faults its `B` channels, waits
//!   at the barrier again; the clock of the bench's own thread (one of the
//!   faulting threads) runs from the first barrier to the second. Throughput is `B` elements, so the per-element
//!   time is per fault per thread; throughput of 2 over 1 = 2·t1 / t2
//!   (target >= 1.8). tokio-util peers: `cancel()` of child tokens of one
//!   root, the same way.
//! * `w3_open_drop`: `open_channel()` + drop vs `child_token()` + drop of a
//!   root (target <= 1.5x).

mod common;

use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use callcancel::{Channel, ServiceHost};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tokio_util::sync::CancellationToken;

const KS: [u64; 3] = [1, 10, 100];
/// Faults per thread per round of `w2_fault_2threads`.
const B: usize = 1024;
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
    // v2: per-call cancel of one registered call (its callback runs inside
    // `cancel()`), vs tokio-util `cancel()` of a child token whose
    // `cancelled()` future was polled once (one waiter to wake).
    let channel = host.open_channel().unwrap();
    g.bench_function("callcancel_cancel_registered", |b| {
        b.iter_batched(
            || common::registered(|| channel.begin_call(), 7),
            |call| {
                assert!(call.cancel());
                call
            },
            BatchSize::NumIterations(BATCH),
        )
    });
    g.bench_function("tokio_util_cancel_waiter", |b| {
        b.iter_batched(
            || {
                let token = root.child_token();
                let mut waiter = Box::pin(token.clone().cancelled_owned());
                let mut cx = Context::from_waker(Waker::noop());
                assert!(waiter.as_mut().poll(&mut cx).is_pending());
                (token, waiter)
            },
            |input| {
                input.0.cancel();
                input
            },
            BatchSize::NumIterations(BATCH),
        )
    });
    g.finish();
}

/// A barrier that spins (yielding after a while): waking a thread parked
/// in `std::sync::Barrier` takes microseconds, as long as a whole round of
/// fast faults, and would be timed.
struct SpinBarrier {
    parties: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(parties: usize) -> Self {
        SpinBarrier {
            parties,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.parties {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// `iters` rounds of `threads` threads (the calling thread and
/// `threads - 1` spawned ones) each doing `B` operations on inputs it made
/// itself before the round's start barrier. The time is the calling thread's,
/// from leaving the start barrier to leaving the end barrier (which waits
/// for every thread), summed over the rounds.
fn rounds<I>(
    iters: u64,
    threads: usize,
    make: impl Fn() -> I + Sync,
    op: impl Fn(&I) + Sync,
) -> Duration {
    let barrier = SpinBarrier::new(threads);
    let round = |timed: bool| {
        let mut elapsed = Duration::ZERO;
        for _ in 0..iters {
            let inputs: Vec<I> = (0..B).map(|_| make()).collect();
            barrier.wait();
            let t0 = Instant::now();
            for input in &inputs {
                op(input);
            }
            barrier.wait();
            if timed {
                elapsed += t0.elapsed();
            }
            drop(inputs);
        }
        elapsed
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(|| round(false));
        }
        round(true)
    })
}

fn w2_fault_2threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("w2_fault_2threads");
    // The untimed opening of each round's channels costs several times the
    // faults: keep the wall time down.
    g.measurement_time(Duration::from_secs(1));
    g.sample_size(10);
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
