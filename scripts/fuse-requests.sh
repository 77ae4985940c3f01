#!/usr/bin/env bash
# Counts the FUSE requests the kernel sends to each filesystem, by type, for
# each phase of a small-file workload: extract a tarball, `ls -lR` (cold,
# then at once again), stat every file, create 1,000 empty files and stat
# them at once, read every file (cold), `rm -rf`. The kernel's own
# tracepoint (fuse:fuse_request_send) counts them, so any FUSE filesystem
# can be compared: kmsfs, gocryptfs and securefs by default, each on its own
# mount, one after the other. The figures in docs/DESIGN.md ("Warm
# metadata") come from here. Needs root (tracefs, mounts, drop_caches).
#
#   scripts/fuse-requests.sh                           3,000 files in 100 directories
#   FILES=500 scripts/fuse-requests.sh                 fewer
#   TARGETS="kmsfs" scripts/fuse-requests.sh           only some filesystems
#   KMSFS_MOUNT_OPTS="-o acl" scripts/fuse-requests.sh   compare a kmsfs setting
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "fuse-requests.sh: run as root (it reads kernel trace events, mounts and drops caches)" >&2
    exit 2
fi
FILES=${FILES:-3000}
DIRS=${DIRS:-100}
TARGETS=(${TARGETS:-kmsfs gocryptfs securefs})
for t in "${TARGETS[@]}"; do
    case $t in
        kmsfs) ;;
        gocryptfs | securefs) command -v "$t" >/dev/null || {
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$t" fuse3 >/dev/null
        } ;;
        *) echo "fuse-requests.sh: unknown target '$t' (kmsfs, gocryptfs, securefs)" >&2; exit 2 ;;
    esac
done
cargo build --release --quiet --bin kmsfs
KMSFS=$PWD/target/release/kmsfs
WORK=$(mktemp -d /var/tmp/kmsfs-requests.XXXXXX)
export KMSFS_KEYSTORE=$WORK/keystore.json KMSFS_PASSPHRASE=requests

TRACING=/sys/kernel/tracing
MOUNTED_TRACEFS=
if [ ! -e "$TRACING/events" ]; then
    mount -t tracefs nodev "$TRACING"
    MOUNTED_TRACEFS=1
fi
EVENT=$TRACING/events/fuse/fuse_request_send
if [ ! -e "$EVENT/enable" ]; then
    echo "fuse-requests.sh: this kernel has no fuse:fuse_request_send trace event (Linux 6.13 or later has it)" >&2
    exit 2
fi
MNT=
cleanup() {
    echo 0 >"$EVENT/enable" || true
    if [ -n "$MNT" ] && awk -v m="$MNT" '$5 == m {found=1} END {exit !found}' /proc/self/mountinfo; then
        umount "$MNT" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    if [ -n "$MOUNTED_TRACEFS" ]; then umount "$TRACING"; fi
}
trap cleanup EXIT
echo 16384 >"$TRACING/buffer_size_kb"
echo 1 >"$EVENT/enable"

python3 scripts/make_tree.py "$WORK/tree.tar" "$FILES" "$DIRS" --flat

mount_target() {
    local t=$1 back=$WORK/back-$1
    MNT=$WORK/mnt-$t
    mkdir -p "$MNT"
    case $t in
        kmsfs)
            "$KMSFS" init "$back" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
            # shellcheck disable=SC2086
            "$KMSFS" mount "$back" "$MNT" ${KMSFS_MOUNT_OPTS:-} ;;
        gocryptfs)
            mkdir -p "$back"
            gocryptfs -init -q -extpass "echo requests" "$back" >/dev/null
            gocryptfs -q -extpass "echo requests" "$back" "$MNT" ;;
        securefs)
            mkdir -p "$back"
            securefs create --format 4 --pass requests --pbkdf pkcs5-pbkdf2-hmac-sha256 -r 1000 "$back" >/dev/null
            securefs mount -b --pass requests "$back" "$MNT" >/dev/null 2>&1 ;;
    esac
    for _ in $(seq 100); do
        awk -v m="$MNT" '$5 == m {found=1} END {exit !found}' /proc/self/mountinfo && break
        sleep 0.05
    done
    # The trace event names the connection by the mount's device number (0:N).
    CONNECTION=$(awk -v m="$MNT" '$5 == m {split($3, d, ":"); print d[2]}' /proc/self/mountinfo)
}

SUMMARY=$WORK/summary.tsv
phase() {
    local t=$1 name=$2 count=$3
    shift 3
    sync
    echo >"$TRACING/trace"
    "$@"
    sync
    sleep 0.5 # FORGETs and writeback arrive after the command returns
    echo "== $t: $name ($count files)"
    grep -oP "connection $CONNECTION req \d+ opcode \d+ \(FUSE_\K[A-Z_0-9]+" "$TRACING/trace" |
        sort | uniq -c | sort -rn |
        awk -v t="$t" -v p="$name" -v n="$count" -v out="$SUMMARY" '
            {total += $1; printf "  %8d %s\n", $1, $2; if (NR <= 3) top = top (top ? ", " : "") $1 " " $2}
            END {printf "  %8d total, %.2f per file\n", total, total / n
                 printf "%s\t%s\t%.2f\t%s\n", p, t, total / n, top >> out}'
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
stat_new_files() {
    python3 scripts/meta_ops.py "$MNT/meta" 1000 create
    python3 scripts/meta_ops.py "$MNT/meta" 1000 stat
}

for t in "${TARGETS[@]}"; do
    mount_target "$t"
    # A first open puts the kernel in its steady state (it learns whether the
    # daemon wants OPEN and FLUSH requests), as on any mount that has served a read.
    echo warm-up >"$MNT/warm-up" && cat "$MNT/warm-up" >/dev/null && rm "$MNT/warm-up"
    phase "$t" "tar -x" "$FILES" tar -xf "$WORK/tree.tar" -C "$MNT"
    drop_caches
    phase "$t" "ls -lR" "$FILES" sh -c "ls -lR '$MNT/tree' >/dev/null"
    phase "$t" "ls -lR again at once" "$FILES" sh -c "ls -lR '$MNT/tree' >/dev/null"
    phase "$t" "stat every file" "$FILES" sh -c "find '$MNT/tree' -type f -print0 | xargs -0 stat >/dev/null"
    phase "$t" "create 1,000 empty files, then stat them" 1000 stat_new_files
    drop_caches
    phase "$t" "read every file" "$FILES" sh -c "find '$MNT/tree' -type f -print0 | xargs -0 cat >/dev/null"
    phase "$t" "rm -rf" "$FILES" rm -rf "$MNT/tree"
    if [ "$t" = kmsfs ]; then "$KMSFS" umount "$MNT"; else umount "$MNT"; fi
done

echo
echo "Requests per file (first three types):"
python3 - "$SUMMARY" "${TARGETS[@]}" <<'PY'
import sys
from collections import defaultdict
path, targets = sys.argv[1], sys.argv[2:]
rows, phases = defaultdict(dict), []
for line in open(path):
    phase, target, per_file, top = line.rstrip("\n").split("\t")
    if phase not in phases:
        phases.append(phase)
    rows[phase][target] = (per_file, top)
print("| phase | " + " | ".join(targets) + " |")
print("|---|" + "---|" * len(targets))
for p in phases:
    cells = [f"{rows[p][t][0]} ({rows[p][t][1]})" if t in rows[p] else "-" for t in targets]
    print(f"| {p} | " + " | ".join(cells) + " |")
PY
