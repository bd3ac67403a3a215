#!/usr/bin/env python3
"""Build BENCHMARKS.md's tables from criterion's estimates.json files.

    cargo bench                                  # writes target/criterion/
    python3 ci/bench_table.py                    # markdown on stdout
    python3 ci/bench_table.py /other/target/criterion

Medians are `median.point_estimate` of each bench's `new/estimates.json`
(criterion prints the mean/slope, not the median). For benches with a
throughput of N elements, "per call" is median / N. "vs callcancel" is this
row's median over the callcancel reference of the same group and parameter
(above 1: slower than callcancel). The P1, P4, P5 and P6 verdicts are
computed from the same medians; P2 and P3 are checked by tests/alloc.rs.

The server-shaped workloads: W1-W3 from the groups of benches/workload.rs
(`w1_churn`, `w2_fault`, `w2_fault_2threads`, `w3_open_drop`), W4 from the
`memory.json` that `cargo bench --bench memory` writes into the same
criterion directory. `--workloads` prints only those rows and verdicts.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# The reference row of each group (same parameter), for "vs callcancel".
REFERENCE = {
    "lifecycle": "callcancel_channel",
    "is_cancelled": "callcancel_live",
    "register_after_cancel": "callcancel_channel",
    "abort": "callcancel_host",
    "fault": "callcancel_channel",
    "contention": "callcancel_1thread",
    # Server-shaped workloads (benches/workload.rs), W1-W3.
    "w1_churn": "callcancel",
    "w2_fault": "callcancel_fault_idle",
    "w2_fault_2threads": "callcancel_1thread",
    "w3_open_drop": "callcancel",
}
GROUP_ORDER = list(REFERENCE)


def criterion_dir():
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    return Path(target) / "criterion"


def load(root):
    rows = {}
    for bench in root.rglob("new/benchmark.json"):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        med = est["median"]
        elements = None
        tp = meta.get("throughput") or {}
        if isinstance(tp, dict) and "Elements" in tp:
            elements = tp["Elements"]
        key = (meta["group_id"], meta["function_id"], meta.get("value_str"))
        rows[key] = {
            "median": med["point_estimate"],
            "lo": med["confidence_interval"]["lower_bound"],
            "hi": med["confidence_interval"]["upper_bound"],
            "elements": elements,
        }
    return rows


def fmt_time(ns):
    if ns is None:
        return "–"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def param_key(value):
    if value is None:
        return (0, 0)
    try:
        return (1, float(value))
    except ValueError:
        return (2, value)


def median(rows, group, function, value=None):
    r = rows.get((group, function, value))
    return None if r is None else r["median"]


def per_call(rows, group, function, value):
    r = rows.get((group, function, value))
    if r is None:
        return None
    return r["median"] / (r["elements"] or 1)


def tables(rows):
    out = []
    groups = sorted({g for g, _, _ in rows}, key=lambda g: (g not in GROUP_ORDER, GROUP_ORDER.index(g) if g in GROUP_ORDER else 0, g))
    for group in groups:
        keys = [k for k in rows if k[0] == group]
        keys.sort(key=lambda k: (param_key(k[2]), not (k[1] or "").startswith("callcancel"), k[1] or ""))
        out.append(f"### {group}\n")
        out.append("| bench | param | median | 95% CI of median | per call | vs callcancel |")
        out.append("|---|---|---|---|---|---|")
        ref_name = REFERENCE.get(group)
        for key in keys:
            r = rows[key]
            _, function, value = key
            ref = rows.get((group, ref_name, value))
            ratio = "–" if ref is None else f"{r['median'] / ref['median']:.2f}x"
            pc = fmt_time(r["median"] / r["elements"]) if r["elements"] else "–"
            out.append(
                f"| {function} | {value or ''} | {fmt_time(r['median'])} "
                f"| {fmt_time(r['lo'])} – {fmt_time(r['hi'])} | {pc} | {ratio} |"
            )
        out.append("")
    return out


def verdict(ok):
    return "**met**" if ok else "**not met**"


def targets(rows):
    out = ["### Targets (from the medians above)\n"]
    L = "lifecycle"
    cc = median(rows, L, "callcancel_channel")
    floor = median(rows, L, "floor_boxed_node_two_rmw")
    tok = median(rows, L, "tokio_util_child_token")
    host = median(rows, L, "callcancel_host_scope")
    stdcb = median(rows, L, "libstdcxx_stop_callback")
    if None not in (cc, floor, tok):
        a, b = cc / floor, tok / cc
        cpp = (
            f"libstdc++ `std::stop_callback` construct + destroy {fmt_time(stdcb)} "
            f"= {stdcb / cc:.2f}x callcancel's time (target >= 1: no slower)"
            if stdcb else "libstdc++ `std::stop_callback`: not measured (no C++20 compiler)"
        )
        out.append(
            f"- **P1** lifecycle {fmt_time(cc)} on a channel ({fmt_time(host)} host-scope): "
            f"{a:.2f}x the floor {fmt_time(floor)} (target <= 1.5x); {cpp}; "
            f"tokio-util child_token {fmt_time(tok)} is {b:.2f}x slower: "
            f"{verdict(a <= 1.5 and (stdcb is None or cc <= stdcb))}"
        )
    I = "is_cancelled"
    live = median(rows, I, "callcancel_live")
    load = median(rows, I, "floor_acquire_load")
    tli = median(rows, I, "tokio_util_live")
    if None not in (live, load, tli):
        out.append(
            f"- **P4** is_cancelled {fmt_time(live)} vs a bare Acquire load {fmt_time(load)} "
            f"({live / load:.2f}x) and tokio-util {fmt_time(tli)}; the instruction count "
            f"(ci/callgrind.sh) is the real check"
        )
    C = "contention"
    one = median(rows, C, "callcancel_1thread")
    two = median(rows, C, "callcancel_2threads_2channels")
    same = median(rows, C, "callcancel_2threads_1channel")
    hs = median(rows, C, "callcancel_2threads_host_scope")
    t1 = median(rows, C, "tokio_util_1thread")
    tsame = median(rows, C, "tokio_util_2threads_1parent")
    if None not in (one, two, same):
        scale = 2 * one / two
        slow = same / one
        out.append(
            f"- **P5** two threads on two channels: {scale:.2f}x the throughput of one "
            f"(target >= 1.8): {verdict(scale >= 1.8)}; on one channel {fmt_time(same)} per op "
            f"= {slow:.2f}x one thread (target <= 3): {verdict(slow <= 3)}"
            + (f"; host-scope {2 * one / hs:.2f}x throughput" if hs else "")
            + (f"; tokio-util on one parent {tsame / t1:.2f}x one thread" if t1 and tsame else "")
        )
    A = "abort"
    sizes = sorted({v for g, _, v in rows if g == A and v}, key=float)
    parts, ok = [], True
    for n in sizes:
        c = per_call(rows, A, "callcancel_host", n)
        v = per_call(rows, A, "vec_boxed_fnonce_drain", n)
        m = per_call(rows, A, "vec_boxed_fnmut", n)
        t = per_call(rows, A, "tokio_util_children", n)
        if None in (c, v, t, m):
            continue
        ok &= c <= 1.5 * v
        parts.append(
            f"N={n}: {fmt_time(c)}/call = {c / v:.2f}x the Vec floor "
            f"({c / m:.1f}x the in-place FnMut loop), {c / t:.2f}x tokio-util"
        )
    if parts:
        first = per_call(rows, A, "callcancel_host", sizes[0])
        last = per_call(rows, A, "callcancel_host", sizes[-1])
        out.append(
            "- **P6** abort " + "; ".join(parts)
            + f"; per call at N={sizes[-1]} is {last / first:.2f}x that at N={sizes[0]} "
            f"(linear = 1): {verdict(ok)} (target: <= 1.5x the Vec floor, i.e. draining and "
            f"calling N `Box<dyn FnOnce>`, at every N)"
        )
    out.append("- **P2**, **P3**: counted by `tests/alloc.rs` (`cargo test --test alloc -- --nocapture`)")
    out.append("")
    return out


def machine():
    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    return [
        f"Machine: {os.cpu_count()} CPUs, {cpu}, {platform.system()} {platform.release()}; "
        f"{sh('rustc', '--version')}; load average when the table was built: {load}.",
        "",
    ]


WORKLOAD_GROUPS = ("w1_churn", "w2_fault", "w2_fault_2threads", "w3_open_drop")


def faster(speedup):
    """callcancel's speed-up over the peer, in words."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def ratio_cell(x):
    return "–" if x is None else f"{x:.2f}x"


def workload_targets(rows, root):
    """The W1-W4 rows: one line per target with its ratio and verdict."""
    out = [
        "### Server-shaped workloads: targets (medians above; W4 from memory.json)\n",
        "| target | callcancel | peer | ratio | target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    W1 = "w1_churn"
    ks = sorted({v for g, _, v in rows if g == W1 and v}, key=float)
    for k in ks:
        cc = median(rows, W1, "callcancel", k)
        tok = median(rows, W1, "tokio_util", k)
        if None in (cc, tok):
            continue
        speedup = tok / cc
        want = 1.0 if float(k) < 10 else 2.0
        target = "no slower" if want == 1.0 else ">= 2x faster"
        out.append(
            f"| W1 churn, k = {k}, per connection | {fmt_time(cc)} | tokio-util {fmt_time(tok)} "
            f"| {faster(speedup)} | {target} | {verdict(speedup >= want)} |"
        )
    W2 = "w2_fault"
    f = median(rows, W2, "callcancel_fault_idle")
    t = median(rows, W2, "tokio_util_cancel_idle")
    if f is not None:
        out.append(
            f"| W2 `fault()` of an idle channel | {fmt_time(f)} | tokio-util `cancel()` {fmt_time(t)} "
            f"| {ratio_cell(None if t is None else f / t)} of the peer | <= 150 ns | {verdict(f <= 150)} |"
        )
    c = median(rows, W2, "callcancel_cancel_registered")
    t = median(rows, W2, "tokio_util_cancel_waiter")
    if c is not None:
        out.append(
            f"| W2 `cancel()` of a registered call | {fmt_time(c)} | tokio-util `cancel()` with a waiter "
            f"{fmt_time(t)} | {ratio_cell(None if t is None else c / t)} of the peer | <= 150 ns "
            f"| {verdict(c <= 150)} |"
        )
    else:
        out.append("| W2 `cancel()` of a registered call | not measured (no `OperationContext::cancel` in this core) | | | <= 150 ns | – |")
    T = "w2_fault_2threads"
    one = per_call(rows, T, "callcancel_1thread", None)
    two = per_call(rows, T, "callcancel_2threads", None)
    t1 = per_call(rows, T, "tokio_util_1thread", None)
    t2 = per_call(rows, T, "tokio_util_2threads", None)
    if None not in (one, two):
        scale = 2 * one / two
        peer = f"tokio-util {2 * t1 / t2:.2f}x" if None not in (t1, t2) else "–"
        out.append(
            f"| W2 two threads faulting different channels, aggregate throughput | "
            f"{fmt_time(one)} per fault on 1 thread, {fmt_time(two)} per fault per thread on 2 "
            f"| {peer} | {scale:.2f}x one thread | >= 1.8x | {verdict(scale >= 1.8)} |"
        )
    W3 = "w3_open_drop"
    cc = median(rows, W3, "callcancel")
    tok = median(rows, W3, "tokio_util")
    if None not in (cc, tok):
        out.append(
            f"| W3 `open_channel()` + drop | {fmt_time(cc)} | `child_token()` + drop {fmt_time(tok)} "
            f"| {cc / tok:.2f}x the peer | <= 1.5x | {verdict(cc / tok <= 1.5)} |"
        )
    out += memory_rows(root)
    out.append("")
    return out


def fmt_bytes(b):
    if abs(b) >= 1e6:
        return f"{b / 1e6:.2f} MB"
    if abs(b) >= 1e4:
        return f"{b / 1e3:.1f} kB"
    return f"{b:.0f} B"


def memory_rows(root):
    path = root / "memory.json"
    if not path.exists():
        return ["| W4 memory | not measured (run `cargo bench --bench memory`) | | | | |"]
    m = json.loads(path.read_text())
    out = []
    per, tok = m.get("idle_channel_bytes"), m.get("idle_child_token_bytes")
    if per is not None:
        out.append(
            f"| W4 bytes per open idle channel | {per:.0f} B | tokio-util child token {tok:.0f} B "
            f"| {per / tok:.2f}x the peer | <= 256 B | {verdict(per <= 256)} |"
        )

    def before_after(label, key, fmt, burst):
        b, p, a = m.get(f"{key}_before"), m.get(f"{key}_peak"), m.get(f"{key}_settled")
        if None in (b, a):
            return
        peak = "" if p is None else f", peak {fmt(p)}"
        out.append(
            f"| W4 {burst}: {label} | before {fmt(b)}{peak}, after {fmt(a)} | | "
            f"{a / b:.2f}x before | <= 2x | {verdict(a <= 2 * b)} |"
        )

    n1 = m.get("b1_calls")
    b1 = f"burst 1 ({n1:.0f} calls on one channel)" if n1 else "burst 1"
    before_after("live bytes", "b1_live", fmt_bytes, b1)
    before_after("`channel.in_flight()`", "b1_channel_in_flight_ns", fmt_time, b1)
    before_after("`host.in_flight()`", "b1_host_in_flight_ns", fmt_time, b1)
    before_after("`fault()` of the burst channel (before: a channel that ran one call)", "b1_fault_own_ns", fmt_time, b1)
    n2 = m.get("b2_channels")
    b2 = f"burst 2 ({n2:.0f} channels opened, dropped)" if n2 else "burst 2"
    before_after("live bytes", "b2_live", fmt_bytes, b2)
    before_after("`host.in_flight()`", "b2_host_in_flight_ns", fmt_time, b2)
    before_after("`fault()` of a fresh channel", "b2_fault_fresh_ns", fmt_time, b2)
    before_after("`open_channel()` + drop", "b2_open_drop_ns", fmt_time, b2)
    return out


def main():
    args = [a for a in sys.argv[1:] if a != "--workloads"]
    only_workloads = len(args) != len(sys.argv) - 1
    sys.argv[1:] = args
    root = criterion_dir()
    rows = load(root)
    if not rows:
        sys.exit(f"no criterion results under {root}: run `cargo bench` first")
    if only_workloads:
        rows = {k: v for k, v in rows.items() if k[0] in WORKLOAD_GROUPS}
        print("\n".join(machine() + tables(rows) + workload_targets(rows, root)))
        return
    print("\n".join(machine() + tables(rows) + targets(rows) + workload_targets(rows, root)))


if __name__ == "__main__":
    main()
