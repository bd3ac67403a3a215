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
