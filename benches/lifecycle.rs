//! Uncontended call lifecycle (P1): begin_call + register_for_cancel +
//! complete, against the peers a user would pick instead, in one group.
//!
//! Every callback captures data (a `u64`), so no contender gets a free
//! zero-sized closure: `Box::new` of a capture-less closure does not allocate
//! and would flatter the result.
//!
//! * `callcancel_channel`: a call on a channel, `register_for_cancel_with_free`
//!   (state `u64`, a cancel closure capturing a `u64`, a free closure), then
//!   `complete` (which runs the free).
//! * `callcancel_channel_drop_free`: the same with `register_for_cancel` (the
//!   free-state is dropping the state).
//! * `callcancel_host_scope`: a host-scope call (`ServiceHost::begin_call`).
//! * `tokio_util_child_token`: `parent.child_token()` + drop, the cheapest
//!   way to get a cancellable per-call handle from tokio-util.
//! * `tokio_util_child_token_polled`: the same plus one poll of
//!   `child.cancelled()` (which is how async code actually waits on it).
//! * `mutex_hashmap_registry`: `Mutex<HashMap<u64, Box<dyn FnOnce>>>` insert
//!   under a fresh id, then remove.
//! * `libstdcxx_stop_callback`: `std::stop_callback` (libstdc++, C++20)
//!   constructed on a live `stop_token` with a capturing lambda, then
//!   destroyed: P1's other peer. The loop runs in C++ (`iter_custom`), so it
//!   pays no FFI call per operation; skipped where no C++20 compiler built
//!   `callcancel-cppbench`.
//! * `floor_boxed_node_two_rmw`: the floor of the design brief: one heap node
//!   holding an atomic and the (inline) capturing closure, two atomic
//!   read-modify-writes, free.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Waker};

use callcancel::ServiceHost;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio_util::sync::CancellationToken;

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("lifecycle");

    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    g.bench_function("callcancel_channel", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            common::lifecycle(|| channel.begin_call(), n)
        })
    });

    g.bench_function("callcancel_channel_drop_free", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let call = channel.begin_call().unwrap();
            call.register_for_cancel(n, move |_, s| {
                black_box((s, n));
            })
            .unwrap();
            call.complete();
        })
    });

    g.bench_function("callcancel_host_scope", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            common::lifecycle(|| host.begin_call(), n)
        })
    });

    match callcancel_cppbench::StopSource::new() {
        Some(source) => {
            g.bench_function("libstdcxx_stop_callback", |b| {
                b.iter_custom(|iters| {
                    let t0 = std::time::Instant::now();
                    source.lifecycles(iters);
                    t0.elapsed()
                })
            });
        }
        None => eprintln!(
            "lifecycle/libstdcxx_stop_callback: SKIPPED (no C++20 compiler at build time)"
        ),
    }

    let parent = CancellationToken::new();
    g.bench_function("tokio_util_child_token", |b| {
        b.iter(|| {
            let child = parent.child_token();
            black_box(&child);
            drop(child);
        })
    });

    g.bench_function("tokio_util_child_token_polled", |b| {
        let mut cx = Context::from_waker(Waker::noop());
        b.iter(|| {
            let child = parent.child_token();
            {
                let mut fut = pin!(child.cancelled());
                black_box(fut.as_mut().poll(&mut cx).is_pending());
            }
            drop(child);
        })
    });

    type Registry = Mutex<HashMap<u64, Box<dyn FnOnce() + Send>>>;
    let registry: Registry = Mutex::new(HashMap::new());
    g.bench_function("mutex_hashmap_registry", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            registry.lock().unwrap().insert(
                n,
                Box::new(move || {
                    black_box(n);
                }),
            );
            let cb = registry.lock().unwrap().remove(&n);
            black_box(cb);
        })
    });

    struct Node<F> {
        state: AtomicUsize,
        cb: F,
    }
    g.bench_function("floor_boxed_node_two_rmw", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let node = Box::new(Node {
                state: AtomicUsize::new(0),
                cb: move || {
                    black_box(n);
                },
            });
            node.state.fetch_or(1, Ordering::AcqRel);
            let _ = node
                .state
                .compare_exchange(1, 3, Ordering::AcqRel, Ordering::Acquire);
            black_box(&node.cb);
            drop(black_box(node));
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(30);
    targets = lifecycle
}
criterion_main!(benches);
