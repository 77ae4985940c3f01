#!/usr/bin/env python3
"""Summarises scripts/bench.sh results: medians, min-max, ratios to raw and
to gocryptfs, the throughput targets met or not; writes a Markdown table,
an SVG chart and a JSON file."""
import argparse
import json
import math
import statistics
from collections import defaultdict

SMALL_FILE = {"untar", "ls_lR", "ls_lR_warm", "read_all", "rm_rf", "meta_create", "meta_stat_warm", "meta_stat",
              "meta_unlink"}
PEERS = ("gocryptfs", "securefs")  # the encrypted filesystems kmsfs must beat
HIDDEN = 1.2  # kmsfs over max(floor, raw): the daemon's own cost hidden behind FUSE or the disk
SEQ_WRITE = {"dd_write", "fio_seq_write"}
SEQ_READ = {"dd_read_cold", "fio_seq_read"}
COLORS = {
    "raw": "#9e9e9e",
    "bindfs": "#8d6e63",
    "gocryptfs": "#ef6c00",
    "securefs": "#7b1fa2",
    "floor": "#2e7d32",
    "kmsfs": "#1565c0",
}


def load(path):
    """Times per (workload, target), and the share of each measurement's
    wall-clock window the hypervisor took the CPUs away (steal)."""
    times, stolen = defaultdict(list), defaultdict(list)
    workloads, targets = [], []
    with open(path) as f:
        next(f)
        for line in f:
            fields = line.rstrip("\n").split("\t")
            _, w, t, s = fields[:4]
            times[w, t].append(float(s))
            if len(fields) > 4:
                stolen[w, t].append(float(fields[4]))
            if w not in workloads:
                workloads.append(w)
            if t not in targets:
                targets.append(t)
    return times, stolen, workloads, targets


def steal_note(stolen, workloads, targets):
    """Lines saying how much CPU steal each target's measurements had."""
    if not stolen:
        return []
    per_target = []
    for t in targets:
        shares = [s for w in workloads for s in stolen.get((w, t), [])]
        if shares:
            per_target.append(f"{t} {100 * statistics.mean(shares):.0f}%")
    hit = [(w, t, max(v)) for (w, t), v in stolen.items() if max(v) > 0.1]
    lines = [f"CPU steal (the hypervisor running others on this VM's CPUs) during the measurements, "
             f"mean share of their time: {', '.join(per_target)}."]
    if hit:
        worst = sorted(hit, key=lambda h: -h[2])[:6]
        lines.append(f"Measurements with more than 10% steal: {len(hit)} of {len(stolen)} workload/target pairs "
                     f"had at least one (worst: "
                     + ", ".join(f"{w} on {t} {100 * s:.0f}%" for w, t, s in worst)
                     + "); their min is a better guide than their median.")
    return lines


def ratio(times, w, a, b):
    if (w, a) not in times or (w, b) not in times:
        return None
    den = statistics.median(times[w, b])
    return statistics.median(times[w, a]) / den if den > 0 else None


def goals(times, workloads, rss_mb):
    """The throughput targets, each as (description, value, limit, met,
    floor): floor is the same ratio for the FUSE floor (None if it did not
    run); a floor above the limit means no FUSE filesystem meets that
    target here."""
    out = []
    for w in workloads:
        for base, limit in (("gocryptfs", 0.5 if w in SMALL_FILE else 0.6),
                            ("raw", 1.3 if w in SEQ_WRITE else 1.6 if w in SEQ_READ else None)):
            r = ratio(times, w, "kmsfs", base)
            if r is None or limit is None:
                continue
            out.append((f"{w}: kmsfs/{base}", r, limit, r <= limit, ratio(times, w, "floor", base)))
        peers = [(ratio(times, w, "kmsfs", p), p) for p in PEERS if ratio(times, w, "kmsfs", p) is not None]
        if peers:
            r, p = max(peers)
            out.append((f"{w}: kmsfs/fastest peer ({p})", r, 1.0, r <= 1.0, ratio(times, w, "floor", p)))
        bounds = [b for b in ("floor", "raw") if (w, b) in times]
        if bounds and (w, "kmsfs") in times:
            bound = max(statistics.median(times[w, b]) for b in bounds)
            if bound > 0:
                r = statistics.median(times[w, "kmsfs"]) / bound
                out.append((f"{w}: kmsfs/max({', '.join(bounds)})", r, HIDDEN, r <= HIDDEN, None))
    if rss_mb:
        out.append(("kmsfs daemon peak RSS (MB)", rss_mb, 200, rss_mb < 200, None))
    return out


def markdown(times, stolen, workloads, targets, args, rss_mb):
    head = ["workload"] + [f"{t} s" for t in targets]
    if "raw" in targets and "kmsfs" in targets:
        head.append("kmsfs/raw")
    if "gocryptfs" in targets and "kmsfs" in targets:
        head.append("kmsfs/gocryptfs")
    lines = [
        f"Median of {args.rounds} interleaved rounds, target order rotated each round (min-max), seconds; lower is better. "
        f"Scale: {args.scale}.",
        "",
        f"Machine: {args.machine}.  ",
        f"Versions: {args.versions}.  ",
        f"Command: `{args.command.strip()}`",
        "",
    ]
    note = steal_note(stolen, workloads, targets)
    lines += ["  \n".join(note), ""] if note else []
    lines += [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for w in workloads:
        row = [w]
        for t in targets:
            v = times.get((w, t))
            row.append(f"{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})" if v else "-")
        for other in ("raw", "gocryptfs"):
            if other in targets and "kmsfs" in targets:
                r = ratio(times, w, "kmsfs", other)
                row.append(f"{r:.2f}" if r is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    g = goals(times, workloads, rss_mb)
    if g:
        lines += ["", "Throughput targets. The last column is the same ratio for the FUSE floor (an in-memory",
                  "FUSE filesystem with kmsfs's kernel settings, no disk, no crypto); where it exceeds the",
                  "limit, no FUSE filesystem meets the target on this machine.", "",
                  "| target | measured | limit | met | FUSE floor |", "|---|---|---|---|---|"]
        for desc, v, limit, met, floor in g:
            shown = "-" if floor is None else f"{floor:.2f}" + (" (over the limit)" if floor > limit else "")
            lines.append(f"| {desc} | {v:.2f} | {limit} | {'yes' if met else 'NO'} | {shown} |")
    return "\n".join(lines) + "\n"


def svg(times, workloads, targets, args):
    """Grouped horizontal bars: each target's median time relative to raw (log scale)."""
    base = "raw" if "raw" in targets else targets[0]
    shown = [t for t in targets if t != base]
    bar_h, group_gap, left, width = 9, 10, 150, 820
    plot_w = width - left - 90
    vals = [ratio(times, w, t, base) for w in workloads for t in shown]
    hi = max([v for v in vals if v] + [2.0])
    lo = min([v for v in vals if v] + [0.5])
    lmin, lmax = math.floor(math.log10(lo) * 2) / 2, math.ceil(math.log10(hi) * 2) / 2

    def x(v):
        return left + plot_w * (math.log10(v) - lmin) / (lmax - lmin)

    group_h = bar_h * len(shown) + group_gap
    height = 95 + group_h * len(workloads) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="18" font-size="14">Time relative to the raw directory ({base} = 1, log scale, '
        f"lower is better; median of {args.rounds} rounds)</text>",
        f'<text x="10" y="34" fill="#444">{esc(args.machine)}</text>',
        f'<text x="10" y="48" fill="#444">{esc(args.versions)}</text>',
        f'<text x="10" y="62" fill="#444">scripts/bench.sh, scale {args.scale}</text>',
    ]
    for i, t in enumerate(shown):
        lx = left + i * 110
        out.append(f'<rect x="{lx}" y="70" width="10" height="10" fill="{COLORS.get(t, "#333")}"/>')
        out.append(f'<text x="{lx + 14}" y="79">{t}</text>')
    top = 92
    tick = lmin
    while tick <= lmax + 1e-9:
        v = 10**tick
        out.append(
            f'<line x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" y2="{height - 25}" '
            f'stroke="{"#000" if abs(v - 1) < 1e-9 else "#ddd"}"/>'
        )
        out.append(f'<text x="{x(v) - 8:.1f}" y="{height - 10}" fill="#444">{v:g}x</text>')
        tick += 0.5
    for gi, w in enumerate(workloads):
        y0 = top + gi * group_h
        out.append(f'<text x="10" y="{y0 + group_h / 2:.0f}">{w}</text>')
        for ti, t in enumerate(shown):
            r = ratio(times, w, t, base)
            if r is None:
                continue
            y = y0 + ti * bar_h
            x0, x1 = x(10**lmin), x(max(r, 10**lmin))
            out.append(
                f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="{bar_h - 1}" '
                f'fill="{COLORS.get(t, "#333")}"/>'
            )
            out.append(f'<text x="{x1 + 3:.1f}" y="{y + bar_h - 1}" font-size="9">{r:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("markdown")
    p.add_argument("svg")
    p.add_argument("json")
    p.add_argument("--machine", default="")
    p.add_argument("--versions", default="")
    p.add_argument("--scale", default="full")
    p.add_argument("--rounds", default="3")
    p.add_argument("--rss-kb", type=int, default=0)
    p.add_argument("--command", default="scripts/bench.sh")
    args = p.parse_args()
    times, stolen, workloads, targets = load(args.results)
    rss_mb = args.rss_kb / 1024 if args.rss_kb else None
    md = markdown(times, stolen, workloads, targets, args, rss_mb)
    if rss_mb:
        md += f"\nkmsfs daemon peak RSS over the whole run (VmHWM): {rss_mb:.1f} MB\n"
    print(md)
    open(args.markdown, "w").write(md)
    open(args.svg, "w").write(svg(times, workloads, targets, args))
    summary = {
        "machine": args.machine,
        "versions": args.versions,
        "scale": args.scale,
        "rounds": int(args.rounds),
        "kmsfs_peak_rss_mb": rss_mb,
        "times": {f"{w}/{t}": v for (w, t), v in times.items()},
        "steal_share": {f"{w}/{t}": v for (w, t), v in stolen.items()},
        "goals": [
            {"goal": d, "value": v, "limit": limit, "met": met, "floor": floor}
            for d, v, limit, met, floor in goals(times, workloads, rss_mb)
        ],
    }
    json.dump(summary, open(args.json, "w"), indent=1)
    print(f"wrote {args.markdown}, {args.svg}, {args.json}")


if __name__ == "__main__":
    main()
