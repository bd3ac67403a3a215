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
        keys.sort(key=lambda k: (param_key(k[2]), not k[1].startswith("callcancel"), k[1]))
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
    if None not in (cc, floor, tok):
        a, b = cc / floor, tok / cc
        out.append(
            f"- **P1** lifecycle {fmt_time(cc)} on a channel ({fmt_time(host)} host-scope): "
            f"{a:.2f}x the floor {fmt_time(floor)} (target <= 1.5x), "
            f"tokio-util child_token {fmt_time(tok)} is {b:.2f}x slower (target >= 5x): "
            f"{verdict(a <= 1.5 and b >= 5)}"
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
        ok &= c <= 3 * v and c <= t
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
            f"(linear = 1): {verdict(ok)} (target: <= 3x the Vec floor, i.e. draining and "
            f"calling N `Box<dyn FnOnce>`, and <= tokio-util per call, at every N)"
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


def main():
    root = criterion_dir()
    rows = load(root)
    if not rows:
        sys.exit(f"no criterion results under {root}: run `cargo bench` first")
    print("\n".join(machine() + tables(rows) + targets(rows)))


if __name__ == "__main__":
    main()
