//! Fault of one channel among many: the faulted channel holds `K` registered
//! calls; the host around it holds `M` other channels, each with `K`
//! registered calls in flight, which the fault must not touch. The cost should
//! be that of the faulted channel alone, whatever `M`.
//!
//! Each iteration opens a fresh channel with `K` registered calls (outside
//! the timing), times `channel.fault()`, and completes the calls outside the
//! timing. Peers: tokio-util (host token → channel tokens → call tokens;
//! cancel one channel token with `K` children) and the `Vec` floor (call `K`
//! boxed closures in place).

mod common;

use std::time::Duration;

use callcancel::{Call, Channel, ServiceHost};
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio_util::sync::CancellationToken;

/// Registered calls per channel.
const K: usize = 100;
/// Other channels on the host.
const OTHERS: [usize; 2] = [0, 1_000];

/// Calls first: they complete while their channel handle is still alive.
fn registered_channel(host: &ServiceHost) -> (Vec<Call>, Channel) {
    let channel = host.open_channel().unwrap();
    let calls = (0..K as u64)
        .map(|i| common::registered(|| channel.begin_call(), i))
        .collect();
    (calls, channel)
}

fn fault(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault");
    g.sampling_mode(SamplingMode::Flat);
    // The untimed set-up costs several times the fault: keep the wall time
    // down.
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(K as u64));
    for m in OTHERS {
        let host = ServiceHost::new();
        let background: Vec<_> = (0..m).map(|_| registered_channel(&host)).collect();
        g.bench_with_input(BenchmarkId::new("callcancel_channel", m), &m, |b, _| {
            b.iter_batched(
                || registered_channel(&host),
                |input| {
                    input.1.fault();
                    input
                },
                BatchSize::PerIteration,
            )
        });
        assert!(background.iter().all(|(_, ch)| !ch.is_faulted()));
        drop(background);

        let root = CancellationToken::new();
        let background: Vec<_> = (0..m)
            .map(|_| {
                let ch = root.child_token();
                let calls: Vec<_> = (0..K).map(|_| ch.child_token()).collect();
                (ch, calls)
            })
            .collect();
        g.bench_with_input(
            BenchmarkId::new("tokio_util_channel_token", m),
            &m,
            |b, _| {
                b.iter_batched(
                    || {
                        let ch = root.child_token();
                        let calls: Vec<_> = (0..K).map(|_| ch.child_token()).collect();
                        (ch, calls)
                    },
                    |input| {
                        input.0.cancel();
                        input
                    },
                    BatchSize::PerIteration,
                )
            },
        );
        drop(background);
    }
    g.bench_function("vec_boxed_fnmut", |b| {
        b.iter_batched(
            || common::boxed_fnmut(K),
            common::call_in_place,
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(20);
    targets = fault
}
criterion_main!(benches);
