#!/usr/bin/env python3
"""Draw W1 (connection churn) per-connection cost against k, log-log, as SVG.

    cargo bench --bench workload -- w1_churn    # writes target/criterion/w1_churn/
    python3 ci/plot_churn.py                    # writes benches/churn.svg
    python3 ci/plot_churn.py /other/target/criterion out.svg

Reads every `w1_churn/<bench>/<k>/new/benchmark.json` + `estimates.json`
under the criterion directory (`$CARGO_TARGET_DIR/criterion` when set, else
`target/criterion`) and plots the median (`median.point_estimate`) with its
95% confidence interval as an error bar, one line per bench (callcancel,
tokio_util). The dashed line is W1's target for callcancel: tokio-util's cost
at k < 10 (no slower), half of it at k >= 10 (>= 2x faster).
Python 3 standard library only; the SVG is written by hand.
"""

import json
import math
import os
import sys
from pathlib import Path

GROUP = "w1_churn"
COLORS = {"callcancel": "#1f77b4", "tokio_util": "#d62728"}
LABELS = {"callcancel": "callcancel", "tokio_util": "tokio-util"}
W, H = 640, 420
LEFT, RIGHT, TOP, BOTTOM = 80, 200, 50, 60


def criterion_dir():
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    return Path(target) / "criterion"


def load(root):
    series = {}
    for meta_path in (root / GROUP).rglob("new/benchmark.json"):
        meta = json.loads(meta_path.read_text())
        if meta.get("group_id") != GROUP:
            continue
        med = json.loads((meta_path.parent / "estimates.json").read_text())["median"]
        k = float(meta["value_str"])
        series.setdefault(meta["function_id"], []).append(
            (
                k,
                med["point_estimate"],
                med["confidence_interval"]["lower_bound"],
                med["confidence_interval"]["upper_bound"],
            )
        )
    for pts in series.values():
        pts.sort()
    return series


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def svg(series):
    ks = sorted({k for pts in series.values() for k, *_ in pts})
    ys = [y for pts in series.values() for _, m, lo, hi in pts for y in (m, lo, hi) if y > 0]
    x0, x1 = math.floor(math.log10(min(ks))), math.ceil(math.log10(max(ks)))
    if x1 == x0:
        x1 += 1
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    if y1 == y0:
        y1 += 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(k):
        return LEFT + (math.log10(k) - x0) / (x1 - x0) * pw

    def py(ns):
        return TOP + ph - (math.log10(ns) - y0) / (y1 - y0) * ph

    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT + pw / 2}" y="24" text-anchor="middle" font-size="15">'
        "W1 connection churn: time per connection (median, 95% CI)</text>",
    ]
    # Grid and ticks: decades, with 2 and 5 as minor lines on y.
    for e in range(x0, x1 + 1):
        x = px(10**e)
        o.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#ddd"/>')
        o.append(f'<text x="{x:.1f}" y="{TOP + ph + 18}" text-anchor="middle">{10**e:g}</text>')
    for e in range(y0, y1 + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if v > 10.0**y1:
                break
            y = py(v)
            o.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" '
                f'stroke="{"#ccc" if m == 1 else "#eee"}"/>'
            )
            if m == 1:
                o.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt_time(v)}</text>')
    o.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    o.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">'
        "k = calls per connection (log)</text>"
    )
    o.append(
        f'<text x="18" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + ph / 2})">time per connection (log)</text>'
    )
    # W1's target for callcancel, from tokio-util's medians.
    tok = series.get("tokio_util")
    if tok:
        pts = [(k, m if k < 10 else m / 2) for k, m, _, _ in tok]
        path = " ".join(f"{px(k):.1f},{py(v):.1f}" for k, v in pts)
        o.append(f'<polyline points="{path}" fill="none" stroke="#888" stroke-dasharray="5,4"/>')
    legend_y = TOP + 10
    for name in sorted(series, key=lambda n: (n != "callcancel", n)):
        pts = series[name]
        color = COLORS.get(name, "#2ca02c")
        path = " ".join(f"{px(k):.1f},{py(m):.1f}" for k, m, _, _ in pts)
        o.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for k, m, lo, hi in pts:
            x = px(k)
            o.append(
                f'<line x1="{x:.1f}" y1="{py(max(lo, 1e-9)):.1f}" x2="{x:.1f}" y2="{py(hi):.1f}" '
                f'stroke="{color}"/>'
            )
            o.append(f'<circle cx="{x:.1f}" cy="{py(m):.1f}" r="4" fill="{color}"/>')
            o.append(
                f'<text x="{x + 7:.1f}" y="{py(m) - 6:.1f}" fill="{color}" font-size="11">'
                f"{fmt_time(m)}</text>"
            )
        lx = LEFT + pw + 14
        o.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 24}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>')
        o.append(f'<text x="{lx + 30}" y="{legend_y + 4}">{LABELS.get(name, name)}</text>')
        legend_y += 22
    if tok:
        lx = LEFT + pw + 14
        o.append(
            f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 24}" y2="{legend_y}" stroke="#888" '
            'stroke-dasharray="5,4"/>'
        )
        o.append(f'<text x="{lx + 30}" y="{legend_y + 4}">W1 target for</text>')
        o.append(f'<text x="{lx + 30}" y="{legend_y + 18}">callcancel (at or</text>')
        o.append(f'<text x="{lx + 30}" y="{legend_y + 32}">below)</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    root = criterion_dir()
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "benches" / "churn.svg"
    series = load(root)
    if not series:
        sys.exit(f"no {GROUP} results under {root}: run `cargo bench --bench workload` first")
    out.write_text(svg(series))
    for name, pts in sorted(series.items()):
        print(name, ", ".join(f"k={k:g}: {fmt_time(m)}" for k, m, _, _ in pts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
