#!/usr/bin/env python3
"""Draws benchmarks/soak/soak.svg from benchmarks/soak/results.md (standard library only).

Top: puts/s per sample and p99 (ms) over time, with leader changes marked.
Bottom: RSS and disk use (MB, summed over the three replicas) over time.
"""
import sys

src, dst = sys.argv[1], sys.argv[2]
rows = []
for line in open(src).read().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 7 and cells[0].replace(".", "").isdigit():
        rows.append([float(c) for c in cells])
if not rows:
    sys.exit(f"{src}: no sample rows; was it written by `plover bench soak`?")

W, H, M = 760, 520, 60
panel_h = (H - 3 * M) / 2


def polyline(xs, ys, x0, y0, w, h, ymax, color):
    xmax = max(xs) or 1
    pts = " ".join(f"{x0 + w * x / xmax:.1f},{y0 + h - h * y / (ymax or 1):.1f}" for x, y in zip(xs, ys))
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>'


def axes(x0, y0, w, h, ymax, label, xmax):
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
           f'<text x="{x0 - 6}" y="{y0 + 4}" text-anchor="end" font-size="11">{ymax:.0f}</text>',
           f'<text x="{x0 - 6}" y="{y0 + h}" text-anchor="end" font-size="11">0</text>',
           f'<text x="{x0}" y="{y0 - 8}" font-size="12">{label}</text>',
           f'<text x="{x0 + w}" y="{y0 + h + 16}" text-anchor="end" font-size="11">{xmax:.0f} s</text>']
    return out


xs = [r[0] for r in rows]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
       '<rect width="100%" height="100%" fill="white"/>']
w = W - 2 * M
top = max(max(r[1] for r in rows), 1) * 1.1
svg += axes(M, M, w, panel_h, top, "puts/s (blue), p99 ms (orange, own scale), leader change (red)", max(xs))
svg.append(polyline(xs, [r[1] for r in rows], M, M, w, panel_h, top, "#1f77b4"))
p99max = max(max(r[2] for r in rows), 1) * 1.1
svg.append(polyline(xs, [r[2] for r in rows], M, M, w, panel_h, p99max, "#ff7f0e"))
svg.append(f'<text x="{M + w + 4}" y="{M + 4}" font-size="11" fill="#ff7f0e">{p99max:.0f} ms</text>')
prev = 0
for r in rows:
    if r[4] > prev:
        x = M + w * r[0] / max(xs)
        svg.append(f'<line x1="{x:.1f}" y1="{M}" x2="{x:.1f}" y2="{M + panel_h}" stroke="red"/>')
    prev = r[4]
y1 = 2 * M + panel_h
mem = max(max(r[5] for r in rows), max(r[6] for r in rows), 1) * 1.1
svg += axes(M, y1, w, panel_h, mem, "MB over 3 replicas: RSS (green), disk (purple)", max(xs))
svg.append(polyline(xs, [r[5] for r in rows], M, y1, w, panel_h, mem, "#2ca02c"))
svg.append(polyline(xs, [r[6] for r in rows], M, y1, w, panel_h, mem, "#9467bd"))
svg.append("</svg>")
open(dst, "w").write("\n".join(svg) + "\n")
