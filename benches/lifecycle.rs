//! Uncontended call lifecycle (P1): begin_call + register_for_cancel +
//! complete, against the peers a user would pick instead, in one group.
//! Every callback captures data, so no peer gets a free zero-sized closure.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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
            let call = channel.begin_call().unwrap();
            call.register_for_cancel_with_free(
                n,
                |_, s| {
                    black_box(s);
                },
                |s| {
                    black_box(s);
                },
            )
            .unwrap();
            call.complete();
        })
    });

    let parent = CancellationToken::new();
    g.bench_function("tokio_util_child_token", |b| {
        b.iter(|| {
            let child = parent.child_token();
            black_box(&child);
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

    struct Node {
        state: AtomicUsize,
        cb: Box<dyn FnOnce() + Send>,
    }
    g.bench_function("floor_boxed_node_two_rmw", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let node = Box::new(Node {
                state: AtomicUsize::new(0),
                cb: Box::new(move || {
                    black_box(n);
                }),
            });
            node.state.fetch_or(1, Ordering::AcqRel);
            let _ = node
                .state
                .compare_exchange(1, 3, Ordering::AcqRel, Ordering::Acquire);
            black_box(&node.cb);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(500))
        .sample_size(30);
    targets = lifecycle
}
criterion_main!(benches);
