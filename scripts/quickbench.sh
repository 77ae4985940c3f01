#!/usr/bin/env bash
# Quick side-by-side benchmark: raw backing directory vs. kmsfs, on the same
# filesystem, interleaved, 3 rounds, medians. Writes docs/bench-quick.svg and
# prints a table with kmsfs/raw ratios. Root is needed to drop caches.
#   scripts/quickbench.sh [WORKDIR]      (default: a new directory under /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$(mktemp -d /tmp/kmsfs-bench.XXXXXX)}
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet
KMSFS=$ROOT/target/release/kmsfs
export KMSFS_KEYSTORE=$WORK/keystore.json KMSFS_PASSPHRASE=bench

mkdir -p "$WORK/raw" "$WORK/plain"
"$KMSFS" init "$WORK/cipher" --kdf-memory-mib 8 --kdf-iterations 1 >/dev/null
"$KMSFS" mount "$WORK/cipher" "$WORK/plain"
trap '"$KMSFS" umount "$WORK/plain" 2>/dev/null || true' EXIT

# A fixed-seed tree of 5,000 small files (0-16 KiB) in 250 directories.
python3 - "$WORK/tree.tar" <<'PY'
import io, random, sys, tarfile
rng = random.Random(1)
with tarfile.open(sys.argv[1], "w") as tar:
    for i in range(5000):
        data = rng.randbytes(rng.randrange(0, 16385))
        info = tarfile.TarInfo(f"tree/d{i % 250}/f{i}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
PY

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
timeit() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }

declare -A T
workloads=(write_1g_fsync read_1g_cold untar_5000 ls_lR read_all rm_rf)
for round in $(seq "$ROUNDS"); do
    for target in raw kmsfs; do
        dir=$WORK/raw; [ "$target" = kmsfs ] && dir=$WORK/plain
        T[$target,write_1g_fsync]+=" $(timeit dd if=/dev/zero of="$dir/big" bs=128K count=8192 conv=fsync)"
        drop_caches
        T[$target,read_1g_cold]+=" $(timeit dd if="$dir/big" of=/dev/null bs=128K)"
        rm -f "$dir/big"
        T[$target,untar_5000]+=" $(timeit tar -xf "$WORK/tree.tar" -C "$dir")"
        drop_caches
        T[$target,ls_lR]+=" $(timeit ls -lR "$dir/tree")"
        drop_caches
        T[$target,read_all]+=" $(timeit sh -c "find '$dir/tree' -type f -exec cat {} + >/dev/null")"
        T[$target,rm_rf]+=" $(timeit rm -rf "$dir/tree")"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
results=$WORK/results.tsv
printf "workload\traw_s\tkmsfs_s\tratio\n" > "$results"
for w in "${workloads[@]}"; do
    r=$(echo "${T[raw,$w]}" | median); k=$(echo "${T[kmsfs,$w]}" | median)
    printf "%s\t%.3f\t%.3f\t%.2f\n" "$w" "$r" "$k" "$(echo "$k / $r" | bc -l)" >> "$results"
done
column -t "$results"
python3 - "$results" "$ROOT/docs/bench-quick.svg" "$ROUNDS" <<'PY'
import sys, platform, os
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
w, bar_h, gap, left = 640, 22, 14, 150
h = 70 + len(rows) * (bar_h + gap)
maxr = max(float(r[3]) for r in rows) * 1.15
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
       f'<text x="10" y="20" font-size="14">kmsfs time / raw disk time (lower is better; median of {sys.argv[3]} rounds)</text>',
       f'<text x="10" y="38" fill="#555">{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}; scripts/quickbench.sh</text>']
x1 = left + (w - left - 60) / maxr
out.append(f'<line x1="{x1:.0f}" y1="45" x2="{x1:.0f}" y2="{h-5}" stroke="#999" stroke-dasharray="4"/>')
for i, (name, raw, km, ratio) in enumerate(rows):
    y = 55 + i * (bar_h + gap)
    bw = (w - left - 60) * float(ratio) / maxr
    out.append(f'<text x="10" y="{y+15}">{name}</text>')
    out.append(f'<rect x="{left}" y="{y}" width="{bw:.0f}" height="{bar_h}" fill="#3b7dd8"/>')
    out.append(f'<text x="{left+bw+5:.0f}" y="{y+15}">{float(ratio):.2f}x</text>')
out.append('</svg>')
open(sys.argv[2], "w").write("\n".join(out))
PY
echo "chart: docs/bench-quick.svg"
