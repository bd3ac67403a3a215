//! Two threads (P5): the call lifecycle (begin_call + register_for_cancel
//! with free + complete) on two channels of one host, on one shared channel,
//! as host-scope calls, against one thread; tokio-util `child_token()` + drop
//! on one shared parent and on two parents; a shared `Mutex<HashMap>`.
//!
//! Each two-thread bench runs `iters` operations on *each* thread
//! (`iter_custom` + `thread::scope` + a three-party `Barrier`; the clock
//! starts when both workers are released and stops when both are done), so
//! the reported time is per operation per thread. Scaling of two threads over
//! one is `2 * t(one thread) / t(two threads)`; P5 asks for at least 1.8 on
//! two channels, and `t(one channel) / t(one thread)` at most 3.

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use callcancel::{Channel, ServiceHost};
use criterion::{criterion_group, criterion_main, Criterion};
use tokio_util::sync::CancellationToken;

use common::lifecycle;

/// Runs `op(thread, i)` for `i in 0..iters` on two threads at once; returns
/// the wall time from the release of both threads to the end of both.
fn two_threads(iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Barrier::new(3);
    let end = Barrier::new(3);
    thread::scope(|s| {
        for t in 0..2 {
            let (start, end, op) = (&start, &end, &op);
            s.spawn(move || {
                start.wait();
                for i in 0..iters {
                    op(t, i);
                }
                end.wait();
            });
        }
        start.wait();
        let t0 = Instant::now();
        end.wait();
        t0.elapsed()
    })
}

fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");

    let host = ServiceHost::new();
    let channels: [Channel; 2] = [host.open_channel().unwrap(), host.open_channel().unwrap()];

    g.bench_function("callcancel_1thread", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            lifecycle(|| channels[0].begin_call(), n)
        })
    });
    g.bench_function("callcancel_2threads_2channels", |b| {
        b.iter_custom(|iters| two_threads(iters, |t, i| lifecycle(|| channels[t].begin_call(), i)))
    });
    g.bench_function("callcancel_2threads_1channel", |b| {
        b.iter_custom(|iters| two_threads(iters, |_, i| lifecycle(|| channels[0].begin_call(), i)))
    });
    g.bench_function("callcancel_2threads_host_scope", |b| {
        b.iter_custom(|iters| two_threads(iters, |_, i| lifecycle(|| host.begin_call(), i)))
    });

    let parents = [CancellationToken::new(), CancellationToken::new()];
    g.bench_function("tokio_util_1thread", |b| {
        b.iter(|| drop(black_box(parents[0].child_token())))
    });
    g.bench_function("tokio_util_2threads_2parents", |b| {
        b.iter_custom(|iters| two_threads(iters, |t, _| drop(black_box(parents[t].child_token()))))
    });
    g.bench_function("tokio_util_2threads_1parent", |b| {
        b.iter_custom(|iters| two_threads(iters, |_, _| drop(black_box(parents[0].child_token()))))
    });

    type Registry = Mutex<HashMap<u64, Box<dyn FnOnce() + Send>>>;
    let registry: Registry = Mutex::new(HashMap::new());
    let op = |t: usize, i: u64| {
        let key = (i << 1) | t as u64;
        registry.lock().unwrap().insert(
            key,
            Box::new(move || {
                black_box(key);
            }),
        );
        black_box(registry.lock().unwrap().remove(&key));
    };
    g.bench_function("mutex_hashmap_1thread", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            op(0, i)
        })
    });
    g.bench_function("mutex_hashmap_2threads_shared", |b| {
        b.iter_custom(|iters| two_threads(iters, op))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(20);
    targets = contention
}
criterion_main!(benches);
