#!/usr/bin/env python3
"""Summarises scripts/bench-scale.sh results: a Markdown table per volume
size, the scale goals met or not, an SVG chart of the cost per file against
the number of files, and a JSON file."""
import argparse
import json
import math
from collections import defaultdict

from bench_report import esc

PER_FILE = [  # (measure, label, colour): seconds of work whose cost per file should stay flat
    ("init_fill_s", "init+fill", "#1565c0"),
    ("ls_lR_s", "ls -lR", "#2e7d32"),
    ("rotate_s", "rotate", "#ef6c00"),
    ("fsck_s", "fsck", "#7b1fa2"),
]
FLAT = 1.3  # cost per file at the largest size over the smallest


def load(path):
    sizes, sparse = defaultdict(dict), {}
    with open(path) as f:
        next(f)
        for line in f:
            n, measure, value = line.rstrip("\n").split("\t")
            if n == "sparse":
                sparse[measure] = float(value)
            else:
                sizes[int(n)][measure] = float(value)
    return dict(sorted(sizes.items())), sparse


def per_file_us(sizes, n, measure):
    v = sizes[n].get(measure)
    return v / n * 1e6 if v is not None else None


def goals(sizes):
    out = []
    if len(sizes) >= 2:
        small, large = min(sizes), max(sizes)
        for measure, label, _ in PER_FILE:
            a, b = per_file_us(sizes, small, measure), per_file_us(sizes, large, measure)
            if a and b:
                r = b / a
                out.append((f"{label}: cost per file at {large:,} over {small:,} files", f"{r:.2f}", f"<= {FLAT}", r <= FLAT))
    if sizes:
        large = max(sizes)
        row = sizes[large]
        for measure, desc, limit in (("mount_s", "mount (s)", 1.0), ("rss_mb", "daemon RSS after ls -lR (MB)", 200.0),
                                     ("rotate_s", "rotate (s)", 10.0)):
            if measure in row:
                out.append((f"{desc} at {large:,} files", f"{row[measure]:.2f}", f"< {limit:g}", row[measure] < limit))
    return out


def markdown(sizes, sparse, args):
    lines = [
        f"Machine: {args.machine}. Commit {args.commit}. Command: `scripts/bench-scale.sh`.",
        "",
        "| files | init+fill s (µs/file) | mount s | ls -lR s (entries/s) | backing ls -lR s | daemon RSS MB | "
        "rotate s (files/s) | fsck s (files/s) | DB MB (bytes/file) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in sizes.items():
        entries = n + (n + 499) // 500 + 1

        def rate(measure, count):
            v = row.get(measure)
            return f"{v:.2f} ({count / v:,.0f})" if v else "-"

        fill = row.get("init_fill_s")
        db = row.get("db_mb")
        lines.append(
            f"| {n:,} | {fill:.1f} ({fill / n * 1e6:.0f}) | {row.get('mount_s', 0):.2f} | {rate('ls_lR_s', entries)} | "
            f"{row.get('raw_ls_lR_s', 0):.2f} | "
            f"{row.get('rss_mb', 0):.0f} | {rate('rotate_s', row.get('rotate_files', n))} | "
            f"{rate('fsck_s', row.get('fsck_files', n))} | {db:.1f} ({db * 1048576 / n:.0f}) |"
        )
    g = goals(sizes)
    if g:
        lines += ["", "| goal | measured | limit | met |", "|---|---|---|---|"]
        lines += [f"| {d} | {v} | {limit} | {'yes' if met else 'NO'} |" for d, v, limit, met in g]
    if sparse:
        lines += [
            "",
            "One 64 GiB sparse file (16 MiB of data, one 1 MiB piece every 4 GiB): "
            f"created in {sparse.get('create_s', 0):.2f} s, backing directory {sparse.get('backing_mb', 0):.0f} MB on disk, "
            f"mounted in {sparse.get('mount_s', 0):.2f} s, its data read in {sparse.get('read_data_s', 0):.2f} s, "
            f"fsck in {sparse.get('fsck_s', 0):.2f} s.",
        ]
    return "\n".join(lines) + "\n"


def svg(sizes, args):
    """Cost per file of each step relative to the smallest size, against the number of files (log x)."""
    width, height, left, top, plot_w, plot_h = 640, 340, 60, 60, 430, 230
    ns = list(sizes)
    if len(ns) < 2:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n'
    lo, hi = math.log10(ns[0]), math.log10(ns[-1])
    series = []
    for measure, label, colour in PER_FILE:
        base = per_file_us(sizes, ns[0], measure)
        pts = [(n, per_file_us(sizes, n, measure) / base) for n in ns if base and per_file_us(sizes, n, measure)]
        series.append((label, colour, pts))
    ymax = max([2.0] + [r for _, _, pts in series for _, r in pts]) * 1.1

    def x(n):
        return left + plot_w * (math.log10(n) - lo) / (hi - lo)

    def y(r):
        return top + plot_h * (1 - r / ymax)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="18" font-size="14">kmsfs: cost per file relative to {ns[0]:,} files (flat is 1; goal under {FLAT})</text>',
        f'<text x="10" y="34" fill="#444">{esc(args.machine)}, commit {esc(args.commit)}, scripts/bench-scale.sh</text>',
        f'<rect x="{left}" y="{y(FLAT):.1f}" width="{plot_w}" height="{y(0) - y(FLAT):.1f}" fill="#e8f5e9"/>',
        f'<line x1="{left}" y1="{y(1):.1f}" x2="{left + plot_w}" y2="{y(1):.1f}" stroke="#000"/>',
    ]
    tick = 0.0
    while tick <= ymax:
        out.append(f'<text x="{left - 30}" y="{y(tick) + 4:.1f}" fill="#444">{tick:.1f}x</text>')
        tick += 0.5
    for n in ns:
        out.append(f'<line x1="{x(n):.1f}" y1="{top}" x2="{x(n):.1f}" y2="{top + plot_h}" stroke="#ddd"/>')
        out.append(f'<text x="{x(n) - 20:.1f}" y="{top + plot_h + 16}" fill="#444">{n:,}</text>')
    for i, (label, colour, pts) in enumerate(series):
        if not pts:
            continue
        path = " ".join(f"{x(n):.1f},{y(r):.1f}" for n, r in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for n, r in pts:
            out.append(f'<circle cx="{x(n):.1f}" cy="{y(r):.1f}" r="3" fill="{colour}"/>')
        ly = top + 10 + i * 18
        out.append(f'<rect x="{left + plot_w + 20}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{left + plot_w + 34}" y="{ly}">{label} ({pts[-1][1]:.2f}x)</text>')
    out.append(f'<text x="{left + plot_w / 2 - 30:.0f}" y="{height - 12}" fill="#444">files in the volume</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("markdown")
    p.add_argument("svg")
    p.add_argument("json")
    p.add_argument("--machine", default="")
    p.add_argument("--commit", default="")
    args = p.parse_args()
    sizes, sparse = load(args.results)
    md = markdown(sizes, sparse, args)
    print(md)
    open(args.markdown, "w").write(md)
    open(args.svg, "w").write(svg(sizes, args))
    json.dump(
        {"machine": args.machine, "commit": args.commit, "sizes": {str(n): row for n, row in sizes.items()},
         "sparse": sparse, "goals": [{"goal": d, "value": v, "limit": limit, "met": met} for d, v, limit, met in goals(sizes)]},
        open(args.json, "w"), indent=1)
    print(f"wrote {args.markdown}, {args.svg}, {args.json}")


if __name__ == "__main__":
    main()
