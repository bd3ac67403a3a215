//! Set-up shared by the bench files (each includes it with `mod common;`
//! and uses part of it).
#![allow(dead_code)]

use std::hint::black_box;
use std::time::Duration;

use callcancel::{Call, Error};
use criterion::Criterion;

/// The short configuration every group uses on the 2-core machine
/// (BENCHMARKS.md, "Bench hygiene").
pub fn config(sample_size: usize) -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(sample_size)
}

/// One call lifecycle as P1 measures it: begin, register a `u64` state with
/// a cancel closure capturing a `u64` and a free closure, complete.
#[inline]
pub fn lifecycle(begin: impl FnOnce() -> Result<Call, Error>, n: u64) {
    let call = begin().unwrap();
    call.register_for_cancel_with_free(
        n,
        move |_, s| {
            black_box((s, n));
        },
        |s| {
            black_box(s);
        },
    )
    .unwrap();
    call.complete();
}

/// A begun call registered with state `i` and a cancel closure capturing
/// `i`, left in flight (the abort and fault set-ups).
pub fn registered(begin: impl FnOnce() -> Result<Call, Error>, i: u64) -> Call {
    let call = begin().unwrap();
    call.register_for_cancel(i, move |reason, s| {
        black_box((reason, s, i));
    })
    .unwrap();
    call
}

/// `n` boxed closures capturing a `u64`: the `Vec` floor's input.
pub fn boxed_fnmut(n: usize) -> Vec<Box<dyn FnMut() + Send>> {
    (0..n as u64)
        .map(|i| {
            Box::new(move || {
                black_box(i);
            }) as Box<dyn FnMut() + Send>
        })
        .collect()
}

/// The `Vec` floor: call every closure in place (no free in the timing);
/// hands the vector back so dropping it stays outside the timing.
pub fn call_in_place(mut v: Vec<Box<dyn FnMut() + Send>>) -> Vec<Box<dyn FnMut() + Send>> {
    for f in v.iter_mut() {
        f();
    }
    v
}

/// A sibling thread of this process kept busy on the other core while it
/// lives, as a server's other worker threads are (the W1–W4 groups run with
/// one, DESIGN.md "Performance targets"). It spins on arithmetic and on
/// atomics of its own cache line, so it shares nothing with the measured
/// code except the machine. Started by [`BusySibling::start`], stopped and
/// joined on drop.
pub struct BusySibling {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl BusySibling {
    pub fn start() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("busy-sibling".into())
            .spawn(move || {
                // Its own line: no false sharing with anything measured.
                #[repr(align(128))]
                struct Line(AtomicU64);
                let line = Line(AtomicU64::new(0));
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let mut rounds = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        // xorshift: a few dependent ALU ops per step.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                    }
                    line.0.fetch_add(black_box(x) & 0xff, Ordering::Relaxed);
                    rounds += 1;
                }
                black_box(line.0.load(Ordering::Relaxed));
                rounds
            })
            .expect("spawn the busy sibling");
        BusySibling {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BusySibling {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
