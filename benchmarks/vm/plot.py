#!/usr/bin/env python3
"""Draws benchmarks/vm/vm.svg from benchmarks/vm/results.md (standard library only).

Left: mean bytes per steady-state syncvm, VMReplica (divergent pages) vs an all-dirty
checkpoint (Remus/COLO-style), per workload, clients and minimum gap (log scale).
Right: pause per checkpoint, p50 and p99, for the same configurations.
"""
import math
import sys

src, dst = sys.argv[1], sys.argv[2]


def table(after_heading):
    """Rows (lists of cells) of the first markdown table after the heading `after_heading`."""
    lines = open(src).read().splitlines()
    try:
        start = next(i for i, l in enumerate(lines) if l.startswith("## ") and after_heading in l)
    except StopIteration:
        sys.exit(f"{src}: no section '{after_heading}'; was it written by `plover bench vm`?")
    rows = []
    for l in lines[start + 1:]:
        if l.startswith("## "):
            break
        if l.startswith("|") and not l.startswith("|---"):
            rows.append([c.strip().strip("*") for c in l.strip("|").split("|")])
    if len(rows) < 2:
        sys.exit(f"{src}: the table under '{after_heading}' has no rows")
    return rows[0], rows[1:]


def column(header, name):
    if name not in header:
        sys.exit(f"{src}: no column '{name}' in {header}")
    return header.index(name)


bh, brows = table("Bytes per syncvm")
ph, prows = table("Pause per checkpoint")
wl, cl, gp = column(bh, "workload"), column(bh, "clients"), column(bh, "min gap (ms)")
ours, alld = column(bh, "VMReplica bytes (mean)"), column(bh, "all-dirty bytes (mean)")
pw, pc, pg = column(ph, "workload"), column(ph, "clients"), column(ph, "min gap (ms)")
p50, p99 = column(ph, "p50"), column(ph, "p99")


def key(r, w, c, g):
    return (r[w], r[c], r[g])


pause = {key(r, pw, pc, pg): (float(r[p50]), float(r[p99])) for r in prows}
configs = [key(r, wl, cl, gp) for r in brows]
labels = [f"{w.split(' ')[0]} c={c} gap={g}" for (w, c, g) in configs]
bytes_ours = [float(r[ours]) for r in brows]
bytes_all = [float(r[alld]) for r in brows]

W, H = 1140, 480
PW, PH = 470, 300
TOP, L1, L2 = 60, 90, 650
out = []


def text(x, y, s, size=12, anchor="start", rotate=None, weight="normal"):
    t = f' transform="rotate({rotate} {x} {y})"' if rotate is not None else ""
    out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
               f'font-weight="{weight}"{t}>{s}</text>')


def rect(x, y, w, h, fill):
    out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" fill="{fill}"/>')


def line(x1, y1, x2, y2, stroke="#999"):
    out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>')


def bars(left, title, ylabel, series, colors, names, log):
    n, k = len(labels), len(series)
    top = max(max(s) for s in series) * 1.1
    lo = 1e4 if log else 0.0

    def y(v):
        if log:
            f = (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(top) - math.log10(lo))
        else:
            f = v / top
        return TOP + PH - f * PH

    text(left + PW / 2, TOP - 36, title, 14, "middle", weight="bold")
    text(left - 60, TOP + PH / 2, ylabel, 12, "middle", rotate=-90)
    line(left, TOP + PH, left + PW, TOP + PH, "#333")
    line(left, TOP, left, TOP + PH, "#333")
    ticks = [10 ** e for e in range(int(math.log10(lo)), int(math.log10(top)) + 1)] if log else \
        [top / 1.1 * f for f in (0, 0.25, 0.5, 0.75, 1.0)]
    for t in ticks:
        line(left - 4, y(t), left + PW, y(t), "#ddd")
        label = (f"{t / 1e6:g} MB" if t >= 1e6 else f"{t / 1e3:g} kB") if log else f"{t:.0f}"
        text(left - 8, y(t) + 4, label, 10, "end")
    group = PW / n
    bw = group * 0.8 / k
    for i in range(n):
        for j, s in enumerate(series):
            x = left + i * group + group * 0.1 + j * bw
            rect(x, y(s[i]), bw - 1, TOP + PH - y(s[i]), colors[j])
        text(left + i * group + group / 2, TOP + PH + 10, labels[i], 10, "end", rotate=-40)
    for j, name in enumerate(names):
        rect(left + 10 + j * 150, TOP - 22, 12, 12, colors[j])
        text(left + 28 + j * 150, TOP - 12, name, 11)


out.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">')
rect(0, 0, W, H, "white")
bars(L1, "Bytes per syncvm (mean, log scale)", "bytes", [bytes_ours, bytes_all],
     ["#2b7bb9", "#d9822b"], ["VMReplica (divergent)", "all dirty pages"], True)
bars(L2, "Pause per checkpoint (ms)", "ms", [[pause[c][0] for c in configs], [pause[c][1] for c in configs]],
     ["#4a9c5d", "#b94a48"], ["p50", "p99"], False)
out.append("</svg>")
open(dst, "w").write("\n".join(out) + "\n")
