#!/usr/bin/env python3
"""Draws benchmarks/vm-bytes/vm-bytes.svg from benchmarks/vm-bytes/results.md (standard library only).

Left: mean RAM + disk bytes per steady-state checkpoint, what VMReplica sent against an
all-dirty (Remus-style) transfer, per release rule and redis-benchmark run, with the ratio.
Right: the primary's pause per checkpoint, p50 and p99, for the same runs.
"""
import math
import sys

if len(sys.argv) != 3:
    sys.exit("usage: plot.py RESULTS.md OUT.svg")
src, dst = sys.argv[1], sys.argv[2]
lines = open(src).read().splitlines()


def section(title):
    """Header and rows of the first table under the '## ' heading that starts with `title`."""
    at = [i for i, l in enumerate(lines) if l.startswith("## " + title)]
    if not at:
        sys.exit(f"{src}: no section '{title}'; was it written by `plover bench vm-bytes`?")
    rows = []
    for l in lines[at[0] + 1:]:
        if l.startswith("## "):
            break
        if l.startswith("|") and not l.startswith("|---"):
            rows.append([c.strip().strip("*") for c in l.strip().strip("|").split("|")])
    if len(rows) < 2:
        sys.exit(f"{src}: the table under '{title}' has no rows")
    return rows[0], rows[1:]


def col(header, name):
    if name not in header:
        sys.exit(f"{src}: no column '{name}' in the table ({', '.join(header)})")
    return header.index(name)


def number(cell):
    """A table cell as a number; a run without steady-state checkpoints ("-", "nan") draws no bar."""
    try:
        v = float(cell)
    except ValueError:
        return 0.0
    return v if math.isfinite(v) else 0.0


sh, srows = section("Summary per run")
ph, prows = section("Pause per checkpoint")
short = {"checkpoint release": "ckpt release", "release on match": "on match"}
runs = [(r[col(sh, "release")], r[col(sh, "C×P")]) for r in srows]
labels = [f"{short.get(m, m)} {c}" for m, c in runs]
sent = [number(r[col(sh, "RAM sent (mean B)")]) + number(r[col(sh, "disk sent (mean B)")]) for r in srows]
every = [number(r[col(sh, "RAM all-dirty (mean B)")]) + number(r[col(sh, "disk all-dirty (mean B)")]) for r in srows]
ratio = [r[col(sh, "RAM+disk all-dirty / sent")] for r in srows]
pauses = {(r[col(ph, "release")], r[col(ph, "C×P")]): (number(r[col(ph, "pause p50")]), number(r[col(ph, "pause p99")])) for r in prows}
missing = [k for k in runs if k not in pauses]
if missing:
    sys.exit(f"{src}: no pause row for {missing}")

W, H, PW, PH, TOP = 1160, 500, 470, 300, 70
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
       f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>']


def label(x, y, s, size=11, anchor="start", turn=None, bold=False):
    t = f' transform="rotate({turn} {x:.1f} {y:.1f})"' if turn is not None else ""
    w = ' font-weight="bold"' if bold else ""
    svg.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{w}{t}>{s}</text>')


def box(x, y, w, h, fill):
    svg.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" fill="{fill}"/>')


def rule(x1, y1, x2, y2, colour):
    svg.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}"/>')


def panel(left, title, unit, scale, series, colours, names, notes=None):
    """Grouped bars: one group per run, one bar per series; `notes` above each group."""
    high = max(max(s) for s in series) * 1.15
    # A round tick step (1, 2 or 5 times a power of ten, in the axis' unit) giving at most 6 ticks.
    step = scale * 10 ** math.floor(math.log10(high / scale / 6))
    step *= next(m for m in (1, 2, 5, 10) if high / (step * m) <= 6)
    top = step * math.ceil(high / step)

    def y(v):
        return TOP + PH - v / top * PH

    label(left + PW / 2, TOP - 42, title, 14, "middle", bold=True)
    label(left - 58, TOP + PH / 2, unit, 12, "middle", turn=-90)
    for i in range(round(top / step) + 1):
        v = step * i
        rule(left - 4, y(v), left + PW, y(v), "#ddd")
        label(left - 8, y(v) + 4, f"{v / scale:g}", 10, "end")
    rule(left, TOP + PH, left + PW, TOP + PH, "#333")
    rule(left, TOP, left, TOP + PH, "#333")
    group = PW / len(labels)
    width = group * 0.8 / len(series)
    for i, name in enumerate(labels):
        x0 = left + i * group + group * 0.1
        for j, s in enumerate(series):
            box(x0 + j * width, y(s[i]), width - 1, TOP + PH - y(s[i]), colours[j])
        if notes:
            label(left + i * group + group / 2, y(max(s[i] for s in series)) - 5, notes[i], 10, "middle")
        label(left + i * group + group / 2, TOP + PH + 12, name, 10, "end", turn=-35)
    for j, name in enumerate(names):
        box(left + 10 + j * 170, TOP - 28, 12, 12, colours[j])
        label(left + 28 + j * 170, TOP - 18, name)


panel(80, "Bytes per checkpoint, RAM + disk (mean)", "MB", 1e6, [sent, every], ["#2b7bb9", "#d9822b"],
      ["VMReplica (divergent)", "all dirty pages and blocks"], ratio)
panel(660, "Primary's pause per checkpoint", "ms", 1, [[pauses[k][0] for k in runs], [pauses[k][1] for k in runs]],
      ["#4a9c5d", "#b94a48"], ["p50", "p99"])
svg.append("</svg>")
open(dst, "w").write("\n".join(svg) + "\n")
