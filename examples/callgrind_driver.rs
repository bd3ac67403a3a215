//! Driver loops for `ci/callgrind.sh`: each mode runs one loop of `N`
//! operations inside a function whose name starts with `measured_`, after an
//! untimed warm-up. The script runs the binary under
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured_*'`,
//! so only the loop (and everything it calls) is counted, and divides the
//! instructions by `N`. Set-up (registering the calls an abort will sweep,
//! creating the children a cancel will visit) happens outside the measured
//! function, and so does the tear-down.
//!
//! ```sh
//! cargo run --release --example callgrind_driver -- <mode> <n>
//! ```
//!
//! Modes: `lifecycle-callcancel`, `lifecycle-callcancel-host`,
//! `lifecycle-tokio-util`, `lifecycle-floor`, `is-cancelled-callcancel`,
//! `is-cancelled-tokio-util`, `abort-callcancel`, `abort-callcancel-one-channel`,
//! `complete-orphaned`, `abort-tokio-util`,
//! `abort-vec`, `churn-callcancel-1`, `churn-callcancel-10`,
//! `churn-tokio-util-1`, `churn-tokio-util-10` (W1 per connection),
//! `open-drop-callcancel`, `open-drop-tokio-util` (W3), `begin-call-with-n-in-flight` (instructions per
//! `begin_call` made while 0..n calls are in flight on one channel; a flat
//! figure means O(1)).

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use callcancel::{Call, Channel, ServiceHost};
use tokio_util::sync::CancellationToken;

#[inline(always)]
fn lifecycle_on(begin: impl Fn() -> Call, n: u64) {
    for i in 0..n {
        let call = begin();
        call.register_for_cancel_with_free(
            i,
            move |_, s| {
                black_box((s, i));
            },
            |s| {
                black_box(s);
            },
        )
        .unwrap();
        call.complete();
    }
}

#[inline(never)]
fn measured_lifecycle_callcancel(channel: &Channel, n: u64) {
    lifecycle_on(|| channel.begin_call().unwrap(), n);
}

#[inline(never)]
fn measured_lifecycle_callcancel_host(host: &ServiceHost, n: u64) {
    lifecycle_on(|| host.begin_call().unwrap(), n);
}

#[inline(never)]
fn measured_lifecycle_tokio_util(parent: &CancellationToken, n: u64) {
    for _ in 0..n {
        drop(black_box(parent.child_token()));
    }
}

struct Node<F> {
    state: AtomicUsize,
    cb: F,
}

#[inline(never)]
fn measured_lifecycle_floor(n: u64) {
    for i in 0..n {
        let node = Box::new(Node {
            state: AtomicUsize::new(0),
            cb: move || {
                black_box(i);
            },
        });
        node.state.fetch_or(1, Ordering::AcqRel);
        let _ = node
            .state
            .compare_exchange(1, 3, Ordering::AcqRel, Ordering::Acquire);
        black_box(&node.cb);
        drop(black_box(node));
    }
}

#[inline(never)]
fn measured_is_cancelled_callcancel(call: &Call, n: u64) -> usize {
    let mut hits = 0;
    for _ in 0..n {
        hits += usize::from(black_box(call).is_cancelled());
    }
    hits
}

#[inline(never)]
fn measured_is_cancelled_tokio_util(token: &CancellationToken, n: u64) -> usize {
    let mut hits = 0;
    for _ in 0..n {
        hits += usize::from(black_box(token).is_cancelled());
    }
    hits
}

/// Begins two more calls while `channel` has `calls.len()` calls in flight
/// (two, because consecutive claims alternate between the slab's hint and a
/// scan).
#[inline(never)]
fn measured_begin_two_calls(channel: &Channel, calls: &mut Vec<Call>) {
    calls.push(channel.begin_call().unwrap());
    calls.push(channel.begin_call().unwrap());
}

#[inline(never)]
fn measured_abort_callcancel(host: &ServiceHost) {
    host.abort();
}

#[inline(never)]
fn measured_complete_all(calls: Vec<Call>) {
    for call in calls {
        call.complete();
    }
}

#[inline(never)]
fn measured_abort_tokio_util(parent: &CancellationToken) {
    parent.cancel();
}

/// W1: per connection `open_channel`, `k` lifecycles, `fault`, drop.
#[inline(never)]
fn measured_churn_callcancel(host: &ServiceHost, n: u64, k: u64) {
    for _ in 0..n {
        let channel = host.open_channel().unwrap();
        lifecycle_on(|| channel.begin_call().unwrap(), k);
        channel.fault();
        drop(channel);
    }
}

/// W1's peer: a child token per connection, `k` children, `cancel`, drop.
#[inline(never)]
fn measured_churn_tokio_util(root: &CancellationToken, n: u64, k: u64) {
    for _ in 0..n {
        let conn = root.child_token();
        for _ in 0..k {
            drop(black_box(conn.child_token()));
        }
        conn.cancel();
        drop(conn);
    }
}

/// W3: `open_channel` + drop.
#[inline(never)]
fn measured_open_drop_callcancel(host: &ServiceHost, n: u64) {
    for _ in 0..n {
        drop(black_box(host.open_channel().unwrap()));
    }
}

/// W3's peer: `child_token` + drop.
#[inline(never)]
fn measured_open_drop_tokio_util(root: &CancellationToken, n: u64) {
    for _ in 0..n {
        drop(black_box(root.child_token()));
    }
}

#[inline(never)]
fn measured_abort_vec(v: &mut [Box<dyn FnMut() + Send>]) {
    for f in v.iter_mut() {
        f();
    }
}

fn registered_calls(channel: &Channel, n: u64) -> Vec<Call> {
    (0..n)
        .map(|i| {
            let call = channel.begin_call().unwrap();
            call.register_for_cancel(i, move |reason, s| {
                black_box((reason, s, i));
            })
            .unwrap();
            call
        })
        .collect()
}

const WARM_UP: u64 = 1_000;
/// Calls per channel for `abort-callcancel` (as in benches/abort.rs).
const PER_CHANNEL: u64 = 100;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(n)) = (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!("usage: callgrind_driver <mode> <n>  (modes: see the source)");
        return ExitCode::from(2);
    };
    match mode.as_str() {
        "lifecycle-callcancel" => {
            let host = ServiceHost::new();
            let channel = host.open_channel().unwrap();
            lifecycle_on(|| channel.begin_call().unwrap(), WARM_UP);
            measured_lifecycle_callcancel(&channel, n);
        }
        "lifecycle-callcancel-host" => {
            let host = ServiceHost::new();
            lifecycle_on(|| host.begin_call().unwrap(), WARM_UP);
            measured_lifecycle_callcancel_host(&host, n);
        }
        "lifecycle-tokio-util" => {
            let parent = CancellationToken::new();
            for _ in 0..WARM_UP {
                drop(parent.child_token());
            }
            measured_lifecycle_tokio_util(&parent, n);
        }
        "lifecycle-floor" => measured_lifecycle_floor(n),
        "is-cancelled-callcancel" => {
            let host = ServiceHost::new();
            let channel = host.open_channel().unwrap();
            let call = channel.begin_call().unwrap();
            black_box(measured_is_cancelled_callcancel(&call, n));
        }
        "is-cancelled-tokio-util" => {
            let parent = CancellationToken::new();
            let child = parent.child_token();
            black_box(measured_is_cancelled_tokio_util(&child, n));
        }
        "abort-callcancel" => {
            let host = ServiceHost::new();
            let channels: Vec<Channel> = (0..n.div_ceil(PER_CHANNEL))
                .map(|_| host.open_channel().unwrap())
                .collect();
            let calls: Vec<Call> = channels
                .iter()
                .flat_map(|ch| registered_calls(ch, PER_CHANNEL.min(n)))
                .take(n as usize)
                .collect();
            measured_abort_callcancel(&host);
            assert!(calls.iter().all(|c| c.is_cancelled()));
            drop(calls);
        }
        "begin-call-with-n-in-flight" => {
            // Two measured begin_calls per 100 begun, up to n in flight.
            let host = ServiceHost::new();
            let channel = host.open_channel().unwrap();
            let mut calls = Vec::with_capacity(n as usize + 1);
            while (calls.len() as u64) < n {
                for _ in 0..98 {
                    calls.push(channel.begin_call().unwrap());
                }
                measured_begin_two_calls(&channel, &mut calls);
            }
        }
        "abort-callcancel-one-channel" => {
            let host = ServiceHost::new();
            let channel = host.open_channel().unwrap();
            let calls = registered_calls(&channel, n);
            measured_abort_callcancel(&host);
            assert!(calls.iter().all(|c| c.is_cancelled()));
            drop(calls);
        }
        "complete-orphaned" => {
            // n calls in flight on a channel whose host and channel handles
            // are gone (a service tearing down): complete them all.
            let host = ServiceHost::new();
            let channel = host.open_channel().unwrap();
            let calls = registered_calls(&channel, n);
            drop(host);
            drop(channel);
            measured_complete_all(calls);
        }
        "abort-tokio-util" => {
            let parent = CancellationToken::new();
            let children: Vec<_> = (0..n).map(|_| parent.child_token()).collect();
            measured_abort_tokio_util(&parent);
            assert!(children.iter().all(|c| c.is_cancelled()));
        }
        "abort-vec" => {
            let mut v: Vec<Box<dyn FnMut() + Send>> = (0..n)
                .map(|i| {
                    Box::new(move || {
                        black_box(i);
                    }) as Box<dyn FnMut() + Send>
                })
                .collect();
            measured_abort_vec(&mut v);
        }
        "churn-callcancel-1" | "churn-callcancel-10" => {
            let k = if mode.ends_with("-10") { 10 } else { 1 };
            let host = ServiceHost::new();
            measured_churn_callcancel(&host, WARM_UP, k);
            measured_churn_callcancel(&host, n, k);
        }
        "churn-tokio-util-1" | "churn-tokio-util-10" => {
            let k = if mode.ends_with("-10") { 10 } else { 1 };
            let root = CancellationToken::new();
            measured_churn_tokio_util(&root, WARM_UP, k);
            measured_churn_tokio_util(&root, n, k);
        }
        "open-drop-callcancel" => {
            let host = ServiceHost::new();
            measured_open_drop_callcancel(&host, WARM_UP);
            measured_open_drop_callcancel(&host, n);
        }
        "open-drop-tokio-util" => {
            let root = CancellationToken::new();
            measured_open_drop_tokio_util(&root, WARM_UP);
            measured_open_drop_tokio_util(&root, n);
        }
        other => {
            eprintln!("unknown mode {other}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
