//! W4 memory (DESIGN.md, "Performance targets"; issue 13): live heap bytes
//! counted by a `#[global_allocator]` of this binary (all threads, allocated
//! minus freed), and the time of `in_flight()` / `fault()` before, at the
//! peak of and after a burst. Not criterion: it prints a table and writes the
//! figures to `<criterion dir>/memory.json` for `ci/bench_table.py`
//! (`$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else
//! `target/criterion`).
//!
//! ```sh
//! cargo bench --bench memory
//! ```
//!
//! Run without `--bench` (as `cargo test --benches` does) it makes a quick
//! small-size pass and writes nothing.
//!
//! * **idle channel**: open `IDLE` channels on a fresh host, live bytes
//!   delta / `IDLE` (target <= 256 B); tokio-util `child_token()` of a root
//!   the same way.
//! * **burst 1**: one channel of a host; `CALLS` calls begun and registered
//!   (a `u64` state, a closure capturing a `u64`) on it, then completed.
//!   Live bytes, `channel.in_flight()`, `host.in_flight()` before, at the
//!   peak and after; `fault()` of a fresh idle channel of the same host
//!   before and after, and `fault()` of the burst channel itself after it is
//!   idle again (a fault is once: its "before" is the median fault of
//!   channels that ran one call and are idle again, the burst channel's
//!   state without the burst; the "after" is one sample; both right after a
//!   census of the channel, which warms the lines the fault reads). Target: live
//!   bytes and times after within 2x of before.
//! * **burst 2**: `CHANNELS` channels opened (all held), then dropped. Live
//!   bytes, `host.in_flight()`, `open_channel()` + drop and `fault()` of a
//!   fresh channel before, at the peak and after.
//!
//! Live bytes are the whole process's, less the bench's own `Vec` holding
//! the calls or channels of the burst.
//!
//! "after" is measured right after the burst ends, and again ("settled")
//! after one more walk of the host's table (`in_flight()`): a channel
//! dropped while a walk read the table has its table reference parked
//! until a walker leaves (`src/store/table.rs`); everything else is
//! released at once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use callcancel::{Call, Channel, ServiceHost};
use tokio_util::sync::CancellationToken;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every request to `System` unchanged; the counter is a
// static atomic that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// One more walk of the host's table, which releases the table
/// references parked during a walk (if any).
fn settle(host: &ServiceHost) {
    black_box(host.in_flight());
}

/// Median time of one `f()`, in ns: 11 batches of as many calls as fill
/// about 1 ms (at least one call each).
fn time_ns(mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    f();
    let one = t0.elapsed().max(Duration::from_nanos(1));
    let per_batch = (Duration::from_millis(1).as_nanos() / one.as_nanos()).clamp(1, 100_000) as u32;
    let mut samples: Vec<f64> = (0..11)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Median time of `fault()` of a fresh idle channel of `host`, in ns (each
/// fault is once: a new channel per sample, opened and dropped untimed).
/// Median of 101 single `fault()`s of fresh channels.
fn fault_fresh_ns(host: &ServiceHost) -> f64 {
    median_fault_ns(host, false)
}

/// Median of 101 single `fault()`s of channels that each ran one call and
/// are idle again (the state of the burst channel after its burst, without
/// the burst): the "before" of the burst channel's own fault.
fn fault_used_ns(host: &ServiceHost) -> f64 {
    median_fault_ns(host, true)
}

fn median_fault_ns(host: &ServiceHost, used: bool) -> f64 {
    let mut samples: Vec<f64> = (0..101)
        .map(|_| {
            let channel = host.open_channel().unwrap();
            if used {
                channel.begin_call().unwrap().complete();
                // As for the burst channel below: a census first (the
                // fault's lines warm, as in a server that polls `in_flight`).
                black_box(channel.in_flight());
            }
            let t = Instant::now();
            channel.fault();
            let ns = t.elapsed().as_nanos() as f64;
            drop(channel);
            ns
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

struct Sizes {
    idle: usize,
    calls: usize,
    channels: usize,
}

#[derive(Default)]
struct Report {
    json: Vec<(String, f64)>,
    text: String,
}

impl Report {
    fn put(&mut self, key: &str, value: f64) {
        self.json.push((key.to_string(), value));
    }
    fn line(&mut self, s: impl AsRef<str>) {
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }
    fn to_json(&self) -> String {
        let mut s = String::from("{\n");
        for (i, (k, v)) in self.json.iter().enumerate() {
            let sep = if i + 1 == self.json.len() { "" } else { "," };
            let _ = writeln!(s, "  \"{k}\": {v}{sep}");
        }
        s.push_str("}\n");
        s
    }
}

fn bytes(b: f64) -> String {
    if b.abs() >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b.abs() >= 1e4 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn ns(t: f64) -> String {
    if t >= 1e6 {
        format!("{:.2} ms", t / 1e6)
    } else if t >= 1e3 {
        format!("{:.2} µs", t / 1e3)
    } else {
        format!("{t:.1} ns")
    }
}

fn idle_channels(r: &mut Report, n: usize) {
    let host = ServiceHost::new();
    // Warm the host (first-use tables) and this thread, then count.
    drop(host.open_channel().unwrap());
    settle(&host);
    let mut held = Vec::with_capacity(n);
    let base = live();
    for _ in 0..n {
        held.push(host.open_channel().unwrap());
    }
    let per = (live() - base) as f64 / n as f64;
    drop(held);

    let root = CancellationToken::new();
    drop(root.child_token());
    let mut held = Vec::with_capacity(n);
    let base = live();
    for _ in 0..n {
        held.push(root.child_token());
    }
    let tok = (live() - base) as f64 / n as f64;
    drop(held);

    r.put("idle_channel_bytes", per);
    r.put("idle_child_token_bytes", tok);
    r.line(format!("## W4 idle channels ({n} open)\n"));
    r.line("| what | bytes each | target |");
    r.line("|---|---|---|");
    r.line(format!(
        "| callcancel open idle channel | {per:.1} B | <= 256 B: {} |",
        if per <= 256.0 { "met" } else { "not met" }
    ));
    r.line(format!(
        "| tokio-util child token of a root | {tok:.1} B | (peer) |"
    ));
    r.line("");
}

/// One row of a before / peak / after table.
fn row(r: &mut Report, what: &str, key: &str, v: [f64; 4], fmt: fn(f64) -> String) {
    for (suffix, x) in ["before", "peak", "after", "settled"].iter().zip(v) {
        if !x.is_nan() {
            r.put(&format!("{key}_{suffix}"), x);
        }
    }
    let cell = |x: f64| {
        if x.is_nan() {
            "–".to_string()
        } else {
            fmt(x)
        }
    };
    let ratio = v[3] / v[0];
    r.line(format!(
        "| {what} | {} | {} | {} | {} | {} |",
        cell(v[0]),
        cell(v[1]),
        cell(v[2]),
        cell(v[3]),
        if ratio.is_nan() {
            "–".to_string()
        } else {
            format!("{ratio:.2}x")
        }
    ));
}

const HEADER: &str =
    "| what | before | peak | after | settled | settled / before |\n|---|---|---|---|---|---|";

fn burst_calls(r: &mut Report, n: usize) {
    let host = ServiceHost::new();
    let channel = host.open_channel().unwrap();
    // Warm: the thread's lease, a first call, a first fault.
    drop(channel.begin_call().unwrap());
    let _ = fault_fresh_ns(&host);
    settle(&host);
    let mut calls: Vec<Call> = Vec::with_capacity(n);
    // Live bytes without the bench's own `Vec` of calls (kept to the end).
    let harness = (calls.capacity() * size_of::<Call>()) as i64;
    let core_live = || (live() - harness) as f64;

    let live0 = core_live();
    let ch_if0 = time_ns(|| {
        black_box(channel.in_flight());
    });
    let host_if0 = time_ns(|| {
        black_box(host.in_flight());
    });
    let fault0 = fault_fresh_ns(&host);
    let fault_used0 = fault_used_ns(&host);

    for i in 0..n as u64 {
        let call = channel.begin_call().unwrap();
        call.register_for_cancel(i, move |reason, s| {
            black_box((reason, s, i));
        })
        .unwrap();
        calls.push(call);
    }
    assert_eq!(channel.in_flight(), n);
    let live1 = core_live();
    let ch_if1 = time_ns(|| {
        black_box(channel.in_flight());
    });
    let host_if1 = time_ns(|| {
        black_box(host.in_flight());
    });
    let fault1 = fault_fresh_ns(&host);

    for call in calls.drain(..) {
        call.complete();
    }
    assert_eq!(channel.in_flight(), 0);
    let live2 = core_live();
    let ch_if2 = time_ns(|| {
        black_box(channel.in_flight());
    });
    let host_if2 = time_ns(|| {
        black_box(host.in_flight());
    });
    let fault2 = fault_fresh_ns(&host);
    settle(&host);
    let live3 = core_live();
    let ch_if3 = time_ns(|| {
        black_box(channel.in_flight());
    });
    let host_if3 = time_ns(|| {
        black_box(host.in_flight());
    });
    let fault3 = fault_fresh_ns(&host);
    // The burst channel itself, idle again, right after a census (as
    // `fault_used_ns` does). Its first fault is one sample (printed and kept
    // as `b1_fault_own_first_ns`); a fault is idempotent and every later one
    // runs the same sweep, so the row's figure is the median of that first
    // and 20 more, comparable with the median of `fault_used_ns`.
    black_box(channel.in_flight());
    let t = Instant::now();
    channel.fault();
    let own_first = t.elapsed().as_nanos() as f64;
    let mut own_samples: Vec<f64> = std::iter::once(own_first)
        .chain((0..20).map(|_| {
            let t = Instant::now();
            channel.fault();
            t.elapsed().as_nanos() as f64
        }))
        .collect();
    own_samples.sort_by(f64::total_cmp);
    let own = own_samples[own_samples.len() / 2];
    r.put("b1_fault_own_first_ns", own_first);
    drop(channel);
    settle(&host);
    let live4 = core_live();

    r.line(format!(
        "## W4 burst 1: {n} calls in flight on one channel, then completed\n"
    ));
    r.line(HEADER);
    row(
        r,
        "live bytes (process)",
        "b1_live",
        [live0, live1, live2, live3],
        bytes,
    );
    row(
        r,
        "`channel.in_flight()`",
        "b1_channel_in_flight_ns",
        [ch_if0, ch_if1, ch_if2, ch_if3],
        ns,
    );
    row(
        r,
        "`host.in_flight()`",
        "b1_host_in_flight_ns",
        [host_if0, host_if1, host_if2, host_if3],
        ns,
    );
    row(
        r,
        "`fault()` of a fresh idle channel",
        "b1_fault_fresh_ns",
        [fault0, fault1, fault2, fault3],
        ns,
    );
    row(
        r,
        "`fault()` of the burst channel, idle (median of its first and 20 repeated faults; before: first faults of channels that ran one call)",
        "b1_fault_own_ns",
        [fault_used0, f64::NAN, f64::NAN, own],
        ns,
    );
    r.put("b1_live_dropped", live4);
    r.line(format!(
        "\nlive bytes once the burst channel is faulted and dropped: {} ({} above before)\n",
        bytes(live4),
        bytes(live4 - live0)
    ));
    r.put("b1_calls", n as f64);
}

fn burst_channels(r: &mut Report, n: usize) {
    let host = ServiceHost::new();
    let lifecycle = |host: &ServiceHost| {
        time_ns(|| {
            drop(black_box(host.open_channel().unwrap()));
        })
    };
    drop(host.open_channel().unwrap());
    let _ = fault_fresh_ns(&host);
    settle(&host);
    let mut held: Vec<Channel> = Vec::with_capacity(n);
    // Live bytes without the bench's own `Vec` of channels (kept to the end).
    let harness = (held.capacity() * size_of::<Channel>()) as i64;
    let core_live = || (live() - harness) as f64;

    let live0 = core_live();
    let if0 = time_ns(|| {
        black_box(host.in_flight());
    });
    let open0 = lifecycle(&host);
    let fault0 = fault_fresh_ns(&host);

    for _ in 0..n {
        held.push(host.open_channel().unwrap());
    }
    let live1 = core_live();
    let if1 = time_ns(|| {
        black_box(host.in_flight());
    });
    let open1 = lifecycle(&host);
    let fault1 = fault_fresh_ns(&host);

    held.clear();
    let live2 = core_live();
    let if2 = time_ns(|| {
        black_box(host.in_flight());
    });
    let open2 = lifecycle(&host);
    let fault2 = fault_fresh_ns(&host);
    settle(&host);
    let live3 = core_live();
    let if3 = time_ns(|| {
        black_box(host.in_flight());
    });
    let open3 = lifecycle(&host);
    let fault3 = fault_fresh_ns(&host);

    r.line(format!(
        "## W4 burst 2: {n} channels opened (all held), then dropped\n"
    ));
    r.line(HEADER);
    row(
        r,
        "live bytes (process)",
        "b2_live",
        [live0, live1, live2, live3],
        bytes,
    );
    row(
        r,
        "`host.in_flight()`",
        "b2_host_in_flight_ns",
        [if0, if1, if2, if3],
        ns,
    );
    row(
        r,
        "`open_channel()` + drop",
        "b2_open_drop_ns",
        [open0, open1, open2, open3],
        ns,
    );
    row(
        r,
        "`fault()` of a fresh idle channel",
        "b2_fault_fresh_ns",
        [fault0, fault1, fault2, fault3],
        ns,
    );
    r.line("");
    r.put("b2_channels", n as f64);
}

fn out_path() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home).join("memory.json");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    PathBuf::from(target).join("criterion").join("memory.json")
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            idle: 10_000,
            calls: 1_000_000,
            channels: 200_000,
        }
    } else {
        Sizes {
            idle: 1_000,
            calls: 10_000,
            channels: 2_000,
        }
    };
    let mut r = Report::default();
    idle_channels(&mut r, sizes.idle);
    burst_calls(&mut r, sizes.calls);
    burst_channels(&mut r, sizes.channels);
    print!("{}", r.text);
    if full {
        let path = out_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the criterion directory");
        }
        std::fs::write(&path, r.to_json()).expect("write memory.json");
        println!("figures written to {}", path.display());
    }
}
