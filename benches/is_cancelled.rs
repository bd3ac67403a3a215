//! `is_cancelled()` (P4: one acquire load) against tokio-util's
//! `CancellationToken::is_cancelled()` and a plain `Acquire` load, on a live
//! call that is not cancelled and on one that is.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use callcancel::ServiceHost;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio_util::sync::CancellationToken;

fn is_cancelled(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_cancelled");

    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    let live = channel.begin_call().unwrap();
    live.register_for_cancel(7u64, |_, s| {
        black_box(s);
    })
    .unwrap();
    g.bench_function("callcancel_live", |b| {
        b.iter(|| black_box(black_box(&live).is_cancelled()))
    });

    let faulted = host.open_channel().unwrap();
    let cancelled = faulted.begin_call().unwrap();
    faulted.fault();
    g.bench_function("callcancel_cancelled", |b| {
        b.iter(|| black_box(black_box(&cancelled).is_cancelled()))
    });

    let parent = CancellationToken::new();
    let child = parent.child_token();
    g.bench_function("tokio_util_live", |b| {
        b.iter(|| black_box(black_box(&child).is_cancelled()))
    });

    let gone = CancellationToken::new();
    gone.cancel();
    g.bench_function("tokio_util_cancelled", |b| {
        b.iter(|| black_box(black_box(&gone).is_cancelled()))
    });

    let word = AtomicUsize::new(0);
    g.bench_function("floor_acquire_load", |b| {
        b.iter(|| black_box(black_box(&word).load(Ordering::Acquire) & 8 != 0))
    });
    g.finish();

    drop(live);
    drop(cancelled);
}

criterion_group! {
    name = benches;
    config = common::config(20);
    targets = is_cancelled
}
criterion_main!(benches);
