#!/usr/bin/env python3
"""Draws benchmarks/syncvm/syncvm.svg from the benchmark's JSON (standard library only).

Left: bytes on the wire per configuration, syncvm vs sending every dirty page (log scale).
Right: where syncvm's time goes, stacked by phase.
"""
import json
import math
import sys

src, dst = sys.argv[1], sys.argv[2]
report = json.load(open(src))
rows = report["syncs"]
labels = [f"d={int(r['dirtyFraction']*100)}% v={int(r['divergentFraction']*100)}%" for r in rows]

W, H = 1100, 460
PANEL_W, PANEL_H = 460, 300
TOP, LEFT1, LEFT2 = 60, 80, 620
out = []
def text(x, y, s, size=12, anchor="start", rotate=None, weight="normal"):
    t = f' transform="rotate({rotate} {x} {y})"' if rotate is not None else ""
    out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}"{t}>{s}</text>')
def rect(x, y, w, h, fill):
    out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w,0):.1f}" height="{max(h,0):.1f}" fill="{fill}"/>')
def line(x1, y1, x2, y2, stroke="#999", width=1, dash=None):
    d = f' stroke-dasharray="{dash}"' if dash else ""
    out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" stroke-width="{width}"{d}/>')

out.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">')
rect(0, 0, W, H, "white")
text(W / 2, 24, f"syncvm on a {report['gib']} GiB image ({report['cores']} cores, {report['sideThreads']} hashing thread per peer)", 15, "middle", weight="bold")

# Panel 1: bytes, log scale.
MIB = 1048576
vals = [r["syncWireBytes"] / MIB for r in rows] + [r["allDirtyWireBytes"] / MIB for r in rows]
lo = 10 ** math.floor(math.log10(min(vals)))
hi = 10 ** math.ceil(math.log10(max(vals)))
def ybytes(v):
    return TOP + PANEL_H - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * PANEL_H
text(LEFT1 + PANEL_W / 2, TOP - 8, "Bytes on the wire (log scale)", 13, "middle")
e = lo
while e <= hi:
    y = ybytes(e)
    line(LEFT1, y, LEFT1 + PANEL_W, y, "#ddd")
    lab = f"{e:g} MiB"
    text(LEFT1 - 6, y + 4, lab, 10, "end")
    e *= 10
group = PANEL_W / len(rows)
bw = group * 0.35
for i, r in enumerate(rows):
    x = LEFT1 + i * group + group * 0.12
    for j, (v, color) in enumerate([(r["syncWireBytes"] / MIB, "#2b6cb0"), (r["allDirtyWireBytes"] / MIB, "#c05621")]):
        y = ybytes(v)
        rect(x + j * bw, y, bw, TOP + PANEL_H - y, color)
    text(x + bw, TOP + PANEL_H + 12, labels[i], 10, "end", rotate=-40)
line(LEFT1, TOP + PANEL_H, LEFT1 + PANEL_W, TOP + PANEL_H, "#333")
rect(LEFT1 + 10, TOP + 6, 12, 12, "#2b6cb0"); text(LEFT1 + 26, TOP + 16, "syncvm (control + divergent pages)", 11)
rect(LEFT1 + 10, TOP + 22, 12, 12, "#c05621"); text(LEFT1 + 26, TOP + 32, "every dirty page (Remus/COLO-style)", 11)

# Panel 2: stacked phase times.
phases = ["handshake", "bitmaps", "hashing", "hash exchange", "transfer", "commit+verify"]
colors = ["#a0aec0", "#718096", "#2b6cb0", "#63b3ed", "#c05621", "#38a169"]
tmax = max(r["syncSeconds"] for r in rows) * 1000
step = 10 ** math.floor(math.log10(tmax))
while tmax / step < 4: step /= 2
def yms(v):
    return TOP + PANEL_H - v / (math.ceil(tmax / step) * step) * PANEL_H
text(LEFT2 + PANEL_W / 2, TOP - 8, "syncvm time by phase (primary, ms)", 13, "middle")
t = 0.0
while t <= math.ceil(tmax / step) * step + 1e-9:
    y = yms(t); line(LEFT2, y, LEFT2 + PANEL_W, y, "#ddd"); text(LEFT2 - 6, y + 4, f"{t:g}", 10, "end")
    t += step
bw2 = group * 0.6
for i, r in enumerate(rows):
    x = LEFT2 + i * group + group * 0.2
    acc = 0.0
    for p, c in zip(phases, colors):
        v = r["phases"][p] * 1000
        rect(x, yms(acc + v), bw2, yms(acc) - yms(acc + v), c)
        acc += v
    text(x + bw2, TOP + PANEL_H + 12, labels[i], 10, "end", rotate=-40)
line(LEFT2, TOP + PANEL_H, LEFT2 + PANEL_W, TOP + PANEL_H, "#333")
for k, (p, c) in enumerate(zip(phases, colors)):
    rect(LEFT2 + 10, TOP + 6 + k * 15, 12, 12, c); text(LEFT2 + 26, TOP + 16 + k * 15, p, 11)

out.append("</svg>")
open(dst, "w").write("\n".join(out) + "\n")
