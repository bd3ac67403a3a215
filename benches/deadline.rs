//! W5: deadlines. Peers in the same groups:
//!
//! * `deadline_lifecycle`: begin with a (far) deadline + register + complete,
//!   against the plain lifecycle (P1) and tokio-util's child token plus a
//!   `tokio::time::sleep` registered with the runtime's timer and dropped
//!   (what a tokio service writes for "a call with a deadline"). Target: ≤ 2x
//!   the plain lifecycle, faster than tokio-util.
//! * `deadline_expiry_vs_abort/100000`: 10^5 registered calls whose deadlines
//!   all pass at once, timed from the deadline until every callback ran,
//!   against aborting 10^5 registered calls. Target ≤ 3x.
//!
//! After the groups it prints R7's lateness (p50/p99/max of callback time
//! minus deadline for 1000 deadlines spread over 200 ms while 10^5 more are
//! pending) and writes it to `target/criterion/deadline_lateness.json`.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callcancel::ServiceHost;
use criterion::{criterion_group, BatchSize, Criterion};
use tokio_util::sync::CancellationToken;

fn deadline_lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("deadline_lifecycle");
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    g.bench_function("callcancel_plain", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            common::lifecycle(|| ch.begin_call(), n);
        })
    });
    g.bench_function("callcancel_deadline", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            common::lifecycle(|| ch.begin_call_with_deadline(far), n);
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let parent = CancellationToken::new();
    g.bench_function("tokio_util_child_and_sleep", |b| {
        let _guard = rt.enter();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        b.iter(|| {
            let child = parent.child_token();
            let mut sleep = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
            // Polling registers the sleep with the runtime's timer wheel.
            let _ = std::future::Future::poll(sleep.as_mut(), &mut cx);
            black_box(&child);
            drop(sleep);
            drop(child);
        })
    });
    g.finish();
}

fn expiry_vs_abort(c: &mut Criterion) {
    const N: usize = 100_000;
    let mut g = c.benchmark_group("deadline_expiry_vs_abort");
    g.sample_size(10);
    g.bench_function("deadline_expiry/100000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let host = ServiceHost::new();
                let ch = host.open_channel().unwrap();
                let done = Arc::new(AtomicUsize::new(0));
                let at = Instant::now() + Duration::from_millis(60);
                let calls: Vec<_> = (0..N)
                    .map(|_| {
                        let call = ch.begin_call_with_deadline(at).unwrap();
                        let d = Arc::clone(&done);
                        call.register_for_cancel((), move |_, _| {
                            d.fetch_add(1, SeqCst);
                        })
                        .unwrap();
                        call
                    })
                    .collect();
                assert!(Instant::now() < at, "set-up took longer than the deadline");
                while done.load(SeqCst) < N {
                    std::hint::spin_loop();
                }
                total += Instant::now().saturating_duration_since(at);
                drop(calls);
            }
            total
        })
    });
    g.bench_function("abort/100000", |b| {
        b.iter_batched(
            || {
                let host = ServiceHost::new();
                let ch = host.open_channel().unwrap();
                let calls: Vec<_> = (0..N as u64)
                    .map(|i| common::registered(|| ch.begin_call(), i))
                    .collect();
                (host, ch, calls)
            },
            |(host, ch, calls)| {
                host.abort();
                (host, ch, calls)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// R7's lateness with 10^5 deadlines pending (printed, and saved as JSON).
fn lateness() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    let pending: Vec<_> = (0..100_000)
        .map(|_| ch.begin_call_with_deadline(far).unwrap())
        .collect();
    let late = Arc::new(Mutex::new(Vec::with_capacity(1000)));
    let t0 = Instant::now() + Duration::from_millis(20);
    let calls: Vec<_> = (0..1000u64)
        .map(|i| {
            let at = t0 + Duration::from_micros(i * 200);
            let call = ch.begin_call_with_deadline(at).unwrap();
            let late = Arc::clone(&late);
            call.register_for_cancel((), move |_, _| {
                late.lock().unwrap().push(Instant::now().duration_since(at));
            })
            .unwrap();
            call
        })
        .collect();
    while late.lock().unwrap().len() < 1000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut v = late.lock().unwrap().clone();
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    let (p50, p99, max) = (p(0.5), p(0.99), v[v.len() - 1]);
    println!(
        "deadline lateness (1000 deadlines, 10^5 pending): p50 {p50:.1?}, p99 {p99:.1?}, max {max:.1?}"
    );
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let _ = std::fs::create_dir_all(format!("{dir}/criterion"));
    let _ = std::fs::write(
        format!("{dir}/criterion/deadline_lateness.json"),
        format!(
            "{{\"p50_ns\": {}, \"p99_ns\": {}, \"max_ns\": {}}}\n",
            p50.as_nanos(),
            p99.as_nanos(),
            max.as_nanos()
        ),
    );
    drop((calls, pending));
}

criterion_group! {
    name = benches;
    config = common::config(50);
    targets = deadline_lifecycle, expiry_vs_abort
}

fn main() {
    benches();
    lateness();
    Criterion::default().configure_from_args().final_summary();
}
