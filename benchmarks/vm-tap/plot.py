#!/usr/bin/env python3
"""Draws benchmarks/vm-tap/vm-tap.svg from benchmarks/vm-tap/results.md (standard library only).

One group of bars per redis-benchmark test and client count: request p50 and p99 (log scale,
milliseconds) of the unreplicated guest, the replicated guest with checkpoint release and the
replicated guest with release on match, as the results' "redis-benchmark" table gives them.
"""
import math
import sys

if len(sys.argv) != 3:
    sys.exit("usage: plot.py RESULTS.md OUT.svg")
src, dst = sys.argv[1], sys.argv[2]
lines = open(src).read().splitlines()

at = [i for i, l in enumerate(lines) if l.startswith("## redis-benchmark")]
if not at:
    sys.exit(f"{src}: no '## redis-benchmark' section; was it written by `plover bench vm-tap`?")
rows = []
for l in lines[at[0] + 1:]:
    if l.startswith("## "):
        break
    if l.startswith("|") and not l.startswith("|---"):
        rows.append([c.strip() for c in l.strip().strip("|").split("|")])
if len(rows) < 2:
    sys.exit(f"{src}: the redis-benchmark table has no rows")
head, body = rows[0], rows[1:]
col = {name: i for i, name in enumerate(head)}
for need in ("test", "clients", "configuration", "p50 ms", "p99 ms"):
    if need not in col:
        sys.exit(f"{src}: the redis-benchmark table has no '{need}' column")

configs = ["unreplicated", "replicated, checkpoint release", "replicated, release on match"]
colors = {configs[0]: "#4c78a8", configs[1]: "#e45756", configs[2]: "#54a24b"}
groups = []
for r in body:
    key = (r[col["test"]], r[col["clients"]])
    if key not in groups:
        groups.append(key)
value = {(r[col["test"]], r[col["clients"]], r[col["configuration"]]): (float(r[col["p50 ms"]]), float(r[col["p99 ms"]]))
         for r in body}

lo = min(v for p in value.values() for v in p if v > 0)
hi = max(v for p in value.values() for v in p)
lo_exp, hi_exp = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
width, height, left, top, bottom = 760, 360, 60, 40, 60
plot_h = height - top - bottom
group_w = (width - left - 20) / max(1, len(groups))
bar_w = group_w / (len(configs) + 1)


def y(v):
    frac = (math.log10(max(v, 10 ** lo_exp)) - lo_exp) / (hi_exp - lo_exp)
    return top + plot_h * (1 - frac)


out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
       f'<text x="{left}" y="18" font-size="13">redis-benchmark request latency in the VM over a tap: p50 (bar) and p99 (tick), ms, log scale</text>']
for e in range(lo_exp, hi_exp + 1):
    yy = y(10 ** e)
    out.append(f'<line x1="{left}" x2="{width - 20}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{10 ** e:g}</text>')
for g, (test, clients) in enumerate(groups):
    x0 = left + g * group_w + bar_w / 2
    for k, c in enumerate(configs):
        if (test, clients, c) not in value:
            continue
        p50, p99 = value[(test, clients, c)]
        x = x0 + k * bar_w
        out.append(f'<rect x="{x:.1f}" y="{y(p50):.1f}" width="{bar_w * 0.9:.1f}" height="{top + plot_h - y(p50):.1f}" fill="{colors[c]}"/>')
        out.append(f'<line x1="{x:.1f}" x2="{x + bar_w * 0.9:.1f}" y1="{y(p99):.1f}" y2="{y(p99):.1f}" stroke="#000" stroke-width="2"/>')
    out.append(f'<text x="{x0 + bar_w * 1.5:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{test}, {clients} client{"s" if clients != "1" else ""}</text>')
for k, c in enumerate(configs):
    x = left + k * 230
    out.append(f'<rect x="{x}" y="{height - 22}" width="12" height="12" fill="{colors[c]}"/>')
    out.append(f'<text x="{x + 16}" y="{height - 12}">{c}</text>')
out.append("</svg>")
open(dst, "w").write("\n".join(out) + "\n")
