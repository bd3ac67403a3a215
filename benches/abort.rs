//! Host abort of N registered calls (P6), N = 10^3, 10^5, 10^6, against
//! tokio-util's `cancel()` of a parent with N children and against calling N
//! boxed closures out of a `Vec`.
//!
//! Every input is built outside the timing (`iter_batched`, one input per
//! iteration) and handed back from the routine, so completing the calls
//! (freeing their state) and dropping the tokens happen outside it too. Only
//! the sweep is timed. Throughput is set to N elements, so per-call time is
//! median / N (`ci/bench_table.py` prints it).
//!
//! * `callcancel_host`: N calls on channels of `PER_CHANNEL` calls each (a
//!   host with many channels, the usual shape), each registered with a `u64`
//!   state and a cancel closure capturing a `u64`; time `host.abort()`.
//! * `callcancel_one_channel`: the same N calls all on one channel.
//! * `tokio_util_children`: N `child_token()`s of one parent; time
//!   `parent.cancel()`.
//! * `vec_boxed_fnmut`: N `Box<dyn FnMut()>` capturing a `u64`; time calling
//!   each in place (the strict floor: no free inside the timing, like the
//!   abort, which leaves the freeing to completion).
//! * `vec_boxed_fnonce_drain`: N `Box<dyn FnOnce()>`; time draining and
//!   calling them (each box is freed inside the timing).

mod common;

use std::hint::black_box;
use std::time::Duration;

use callcancel::{Call, Channel, ServiceHost};
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio_util::sync::CancellationToken;

const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
/// Calls per channel in the callcancel set-up.
const PER_CHANNEL: usize = 100;

/// The calls come first so that they are completed (dropped) while their
/// host and channels are still open: completing the calls of an orphaned
/// channel is quadratic today (see BENCHMARKS.md), which would make the
/// untimed tear-down of 10^6 calls take minutes.
fn registered_host(n: usize, per_channel: usize) -> (Vec<Call>, Vec<Channel>, ServiceHost) {
    let host = ServiceHost::new();
    let channels: Vec<Channel> = (0..n.div_ceil(per_channel))
        .map(|_| host.open_channel().unwrap())
        .collect();
    let calls: Vec<Call> = (0..n as u64)
        .map(|i| common::registered(|| channels[i as usize / per_channel].begin_call(), i))
        .collect();
    (calls, channels, host)
}

fn abort(c: &mut Criterion) {
    let mut g = c.benchmark_group("abort");
    g.sampling_mode(SamplingMode::Flat);
    for n in SIZES {
        g.throughput(Throughput::Elements(n as u64));
        if n >= 1_000_000 {
            g.sample_size(10);
            g.measurement_time(Duration::from_secs(2));
        } else {
            g.sample_size(20);
            g.measurement_time(Duration::from_secs(1));
        }

        g.bench_with_input(BenchmarkId::new("callcancel_host", n), &n, |b, &n| {
            b.iter_batched(
                || registered_host(n, PER_CHANNEL),
                |input| {
                    input.2.abort();
                    input
                },
                BatchSize::PerIteration,
            )
        });

        g.bench_with_input(
            BenchmarkId::new("callcancel_one_channel", n),
            &n,
            |b, &n| {
                b.iter_batched(
                    || registered_host(n, n),
                    |input| {
                        input.2.abort();
                        input
                    },
                    BatchSize::PerIteration,
                )
            },
        );

        g.bench_with_input(BenchmarkId::new("tokio_util_children", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    let parent = CancellationToken::new();
                    let children: Vec<_> = (0..n).map(|_| parent.child_token()).collect();
                    (parent, children)
                },
                |input| {
                    input.0.cancel();
                    input
                },
                BatchSize::PerIteration,
            )
        });

        g.bench_with_input(BenchmarkId::new("vec_boxed_fnmut", n), &n, |b, &n| {
            b.iter_batched(
                || common::boxed_fnmut(n),
                common::call_in_place,
                BatchSize::PerIteration,
            )
        });

        g.bench_with_input(
            BenchmarkId::new("vec_boxed_fnonce_drain", n),
            &n,
            |b, &n| {
                b.iter_batched(
                    || {
                        (0..n as u64)
                            .map(|i| {
                                Box::new(move || {
                                    black_box(i);
                                }) as Box<dyn FnOnce() + Send>
                            })
                            .collect::<Vec<_>>()
                    },
                    |mut v| {
                        for f in v.drain(..) {
                            f();
                        }
                        v
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(20);
    targets = abort
}
criterion_main!(benches);
