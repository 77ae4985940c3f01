#!/usr/bin/env bash
# What each switchable lever buys: runs scripts/bench.sh on raw and kmsfs
# once per kmsfs mount setting and prints kmsfs/raw per workload, side by
# side. Needs root. Writes $BENCH_DIR/levers.md.
#
#   scripts/bench-levers.sh                 (BENCH_SCALE=small, ROUNDS=3)
#   BENCH_SCALE=full ROUNDS=3 scripts/bench-levers.sh
#   LEVERS="default deferred_unlink" WORKLOADS="rm_rf meta_unlink" scripts/bench-levers.sh   some settings, some workloads
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_SCALE=${BENCH_SCALE:-small} ROUNDS=${ROUNDS:-3} TARGETS="raw kmsfs"
WORK=${BENCH_DIR:-/var/tmp/kmsfs-bench}
OUT=$(mktemp -d /tmp/kmsfs-levers.XXXXXX)
settings=(
    "default:"
    "no_writeback_cache:-o no_writeback_cache"
    "no_keep_cache:-o no_keep_cache"
    "attr_timeout=0:-o attr_timeout=0"
    "attr_timeout=10:-o attr_timeout=10"
    "threads=1:-o threads=1"
    "deferred_unlink:-o deferred_unlink"
)
if [ -n "${LEVERS:-}" ]; then
    chosen=()
    for s in "${settings[@]}"; do
        if [[ " $LEVERS " == *" ${s%%:*} "* ]]; then chosen+=("$s"); fi
    done
    if [ ${#chosen[@]} -eq 0 ]; then
        echo "bench-levers.sh: LEVERS names none of: ${settings[*]%%:*}" >&2
        exit 2
    fi
    settings=("${chosen[@]}")
fi
for s in "${settings[@]}"; do
    name=${s%%:*} opts=${s#*:}
    echo "== kmsfs with $name"
    KMSFS_MOUNT_OPTS="$opts" BENCH_SVG="$OUT/$name.svg" BENCH_MD="$OUT/$name.md" scripts/bench.sh >/dev/null
    cp "$WORK/results.tsv" "$OUT/$name.tsv"
done
python3 - "$OUT" "$WORK/levers.md" "${settings[@]%%:*}" <<'PY'
import statistics, sys
from collections import defaultdict
out, md, names = sys.argv[1], sys.argv[2], sys.argv[3:]
ratios, workloads = {}, []
for n in names:
    t = defaultdict(list)
    for line in list(open(f"{out}/{n}.tsv"))[1:]:
        _, w, target, s = line.rstrip("\n").split("\t")[:4]
        t[w, target].append(float(s))
        if w not in workloads:
            workloads.append(w)
    for w in workloads:
        ratios[n, w] = statistics.median(t[w, "kmsfs"]) / statistics.median(t[w, "raw"])
lines = ["kmsfs time / raw time, per kmsfs mount setting (lower is better)", "",
         "| workload | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
for w in workloads:
    lines.append(f"| {w} | " + " | ".join(f"{ratios[n, w]:.2f}" for n in names) + " |")
text = "\n".join(lines) + "\n"
print(text)
open(md, "w").write(text)
PY
