//! Issue 12 figures, as benchmarks:
//!
//! * `fault_with_two_watches_per_call/{5000,20000}`: faulting a channel whose
//!   N calls each have two parked watch futures (v1 re-partitioned one
//!   channel-wide list on every cancel: quadratic). Per-call time should be
//!   flat in N.
//! * `complete_after_abort/{no_waiter,idle_waiter}`: completing 20k aborted
//!   calls with and without a thread blocked in `wait_idle` (v1: every
//!   freer queued behind the waiter's census under the idle mutex).

mod common;

use std::future::Future;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use callcancel::ServiceHost;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};

fn fault_with_watches(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_with_two_watches_per_call");
    g.sample_size(10);
    for n in [5_000u64, 20_000] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_batched(
                || {
                    let host = ServiceHost::new();
                    let ch = host.open_channel().unwrap();
                    let calls: Vec<_> = (0..n)
                        .map(|i| common::registered(|| ch.begin_call(), i))
                        .collect();
                    let mut cx = Context::from_waker(Waker::noop());
                    let futs: Vec<_> = calls
                        .iter()
                        .flat_map(|c| [c.watch().cancelled(), c.watch().cancelled()])
                        .map(|f| {
                            let mut f = Box::pin(f);
                            assert!(f.as_mut().poll(&mut cx).is_pending());
                            f
                        })
                        .collect();
                    (host, ch, calls, futs)
                },
                |(host, ch, calls, futs)| {
                    ch.fault();
                    (host, ch, calls, futs)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn complete_after_abort(c: &mut Criterion) {
    const N: u64 = 20_000;
    let mut g = c.benchmark_group("complete_after_abort");
    g.sample_size(10);
    for waiter in [false, true] {
        let name = if waiter { "idle_waiter" } else { "no_waiter" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let host = ServiceHost::new();
                    let ch = host.open_channel().unwrap();
                    let calls: Vec<_> = (0..N)
                        .map(|i| common::registered(|| ch.begin_call(), i))
                        .collect();
                    host.abort();
                    let w = waiter.then(|| {
                        let host = host.clone();
                        std::thread::spawn(move || assert!(host.wait_idle(Duration::from_secs(60))))
                    });
                    if waiter {
                        std::thread::sleep(Duration::from_millis(5)); // let it block
                    }
                    let t0 = Instant::now();
                    drop(calls);
                    total += t0.elapsed();
                    if let Some(w) = w {
                        w.join().unwrap();
                    }
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(10);
    targets = fault_with_watches, complete_after_abort
}
criterion_main!(benches);
