//! Registration after the cancellation was decided: the callback runs
//! inline, inside `register_for_cancel` (R4). Per op: register on a call
//! whose channel already faulted (the callback runs at once).
//!
//! The calls are prepared in batches of `BATCH` outside the timing (begin
//! `BATCH` calls on a fresh channel, fault it); only the registrations are
//! timed, and the calls are completed (their state freed) outside the timing.
//!
//! Peers: tokio-util (a child of an already cancelled parent, then one poll
//! of `cancelled()`, which is ready, then run the callback), and the floor
//! (call a capturing boxed closure).

mod common;

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use callcancel::ServiceHost;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio_util::sync::CancellationToken;

const BATCH: u64 = 1000;

fn register_after_cancel(c: &mut Criterion) {
    let mut g = c.benchmark_group("register_after_cancel");

    let host = ServiceHost::new();
    g.bench_function("callcancel_channel", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                left -= n;
                let channel = host.open_channel().unwrap();
                let calls: Vec<_> = (0..n).map(|_| channel.begin_call().unwrap()).collect();
                channel.fault();
                let t0 = Instant::now();
                for (i, call) in calls.iter().enumerate() {
                    let i = i as u64;
                    call.register_for_cancel(i, move |reason, s| {
                        black_box((reason, s, i));
                    })
                    .unwrap();
                }
                total += t0.elapsed();
                drop(calls);
            }
            total
        })
    });

    let parent = CancellationToken::new();
    parent.cancel();
    g.bench_function("tokio_util_child_of_cancelled", |b| {
        let mut cx = Context::from_waker(Waker::noop());
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            let mut children = Vec::with_capacity(BATCH as usize);
            while left > 0 {
                let n = left.min(BATCH);
                left -= n;
                let t0 = Instant::now();
                for i in 0..n {
                    let child = parent.child_token();
                    let cb = move || {
                        black_box(i);
                    };
                    let ready = {
                        let mut fut = pin!(child.cancelled());
                        fut.as_mut().poll(&mut cx).is_ready()
                    };
                    if ready {
                        cb();
                    }
                    children.push(child);
                }
                total += t0.elapsed();
                children.clear();
            }
            total
        })
    });

    g.bench_function("floor_boxed_closure_call", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let cb: Box<dyn FnOnce() + Send> = Box::new(move || {
                black_box(n);
            });
            black_box(cb)();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(20);
    targets = register_after_cancel
}
criterion_main!(benches);
