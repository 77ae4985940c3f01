#!/usr/bin/env bash
# How kmsfs scales with the number of files. For each size it builds a
# volume of that many small files (0-4 KiB, 500 per directory) through a
# mount, then measures, each step on its own:
#   init+fill   `kmsfs init`, mount, write every file, unmount
#   mount       `kmsfs mount` of the volume, caches dropped
#   ls -lR      of everything, caches dropped (entries/s), then the daemon's RSS;
#               and of the backing directory itself, for comparison
#   rotate      `kmsfs rotate` (offline; files/s from its own report)
#   fsck        `kmsfs fsck` right after the fill, the files still cached (files/s)
#   DB size     kmsfs.db after the unmount (checkpointed)
# and builds one volume holding a 64 GiB sparse file (16 MiB of data spread
# over it): create, mount, read of the data, fsck, backing disk use.
# Writes a table (target/bench/scale.md), a chart (docs/bench-scale.svg) and
# target/bench/scale.json. Needs root (drop_caches).
#
#   scripts/bench-scale.sh                      10,000, 100,000 and 1,000,000 files (about 40 minutes)
#   SIZES="10000 100000" scripts/bench-scale.sh  other sizes
#   SPARSE=0 scripts/bench-scale.sh              without the sparse file
#   BENCH_DIR=/mnt/x scripts/bench-scale.sh      where the volumes live (default /var/tmp/kmsfs-scale)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZES=(${SIZES:-10000 100000 1000000})
SPARSE=${SPARSE:-1}
WORK=${BENCH_DIR:-/var/tmp/kmsfs-scale}
OUT_MD=${BENCH_MD:-$ROOT/target/bench/scale.md}
OUT_SVG=${BENCH_SVG:-$ROOT/docs/bench-scale.svg}
OUT_JSON=$ROOT/target/bench/scale.json
mkdir -p "$(dirname "$OUT_MD")"
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-scale.sh: run as root (it drops caches)" >&2
    exit 2
fi
for n in "${SIZES[@]}"; do
    if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 500 ]; then
        echo "bench-scale.sh: SIZES must be whole numbers of at least 500 (got '$n')" >&2
        exit 2
    fi
done
command -v bc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc >/dev/null; }

cargo build --release --quiet --bin kmsfs
KMSFS=$ROOT/target/release/kmsfs

if [ -e "$WORK" ]; then
    if awk -v w="$WORK/" 'index($5, w) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
        echo "bench-scale.sh: something is still mounted under $WORK; unmount it first" >&2
        exit 2
    fi
    rm -rf "$WORK"
fi
mkdir -p "$WORK"
export KMSFS_KEYSTORE=$WORK/keystore.json KMSFS_PASSPHRASE=bench
MNT=$WORK/mnt
mkdir -p "$MNT"
cleanup() {
    if awk -v m="$MNT" '$5 == m {found=1} END {exit !found}' /proc/self/mountinfo; then
        "$KMSFS" umount "$MNT" 2>/dev/null || umount "$MNT" 2>/dev/null || true
    fi
}
trap cleanup EXIT

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
RESULTS=$WORK/results.tsv
printf "files\tmeasure\tvalue\n" >"$RESULTS"
record() { printf "%s\t%s\t%s\n" "$1" "$2" "$3" >>"$RESULTS"; echo "  $2: $3"; }
daemon_pid() { "$KMSFS" status --json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon_pid"])'; }

for n in "${SIZES[@]}"; do
    back=$WORK/vol-$n
    echo "== $n files ($((n / 500)) directories)"
    drop_caches
    s=$(now)
    "$KMSFS" init "$back" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
    "$KMSFS" mount "$back" "$MNT"
    python3 "$ROOT/scripts/fill_volume.py" "$MNT" "$n" 500
    "$KMSFS" umount "$MNT"
    sync
    record "$n" init_fill_s "$(since "$s")"

    # With the files still in the page cache: the check's own cost per
    # file. From a cold cache it reads each small file once, at the disk's
    # random-read rate (about 250 reads/s once this VM's disk is throttled:
    # an hour for a million files).
    s=$(now)
    "$KMSFS" fsck --json "$back" >"$WORK/fsck.json"
    record "$n" fsck_s "$(since "$s")"
    record "$n" fsck_files "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"])' "$WORK/fsck.json")"

    # The backing directory's own listing, for scale: what the disk and the
    # kernel's caches cost at this size without FUSE.
    drop_caches
    s=$(now)
    ls -lR "$back" >/dev/null
    record "$n" raw_ls_lR_s "$(since "$s")"

    drop_caches
    s=$(now)
    "$KMSFS" mount "$back" "$MNT"
    record "$n" mount_s "$(since "$s")"
    s=$(now)
    entries=$(ls -lR "$MNT" | wc -l)
    record "$n" ls_lR_s "$(since "$s")"
    record "$n" ls_lR_lines "$entries"
    pid=$(daemon_pid "$back")
    record "$n" rss_mb "$(awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")"
    "$KMSFS" umount "$MNT"
    record "$n" db_mb "$(du -bc "$back"/kmsfs.db* | awk 'END {printf "%.1f", $1 / 1048576}')"

    report=$("$KMSFS" rotate --json "$back")
    record "$n" rotate_s "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$report")"
    record "$n" rotate_files "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["rewrapped_file_keys"])' "$report")"

    rm -rf "$back"
done

if [ "$SPARSE" = 1 ]; then
    back=$WORK/vol-sparse
    echo "== one 64 GiB sparse file"
    "$KMSFS" init "$back" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
    "$KMSFS" mount "$back" "$MNT"
    s=$(now)
    # 16 pieces of 1 MiB, one every 4 GiB, the last ending at 64 GiB.
    truncate -s 64G "$MNT/sparse"
    for i in $(seq 0 15); do
        dd if=/dev/urandom of="$MNT/sparse" bs=1M count=1 seek=$((i * 4096 + 4095)) conv=notrunc,fsync status=none
    done
    record sparse create_s "$(since "$s")"
    "$KMSFS" umount "$MNT"
    record sparse backing_mb "$(du -s --block-size=1M "$back" | awk '{print $1}')"
    drop_caches
    s=$(now)
    "$KMSFS" mount "$back" "$MNT"
    record sparse mount_s "$(since "$s")"
    s=$(now)
    for i in $(seq 0 15); do
        dd if="$MNT/sparse" of=/dev/null bs=1M count=1 skip=$((i * 4096 + 4095)) status=none
    done
    record sparse read_data_s "$(since "$s")"
    "$KMSFS" umount "$MNT"
    drop_caches
    s=$(now)
    "$KMSFS" fsck --json "$back" >/dev/null
    record sparse fsck_s "$(since "$s")"
    rm -rf "$back"
fi

python3 "$ROOT/scripts/bench_scale_report.py" "$RESULTS" "$OUT_MD" "$OUT_SVG" "$OUT_JSON" \
    --machine "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), backing fs $(stat -f -c %T "$WORK")" \
    --commit "$(git rev-parse --short HEAD)"
