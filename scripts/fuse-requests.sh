#!/usr/bin/env bash
# Counts the FUSE requests kmsfs receives, by type, for each phase of a
# small-file workload: extract a tarball, `ls -lR` (cold, then warm), stat
# every file (warm), read every file, `rm -rf`.
# The figures in docs/DESIGN.md ("the levers and what each bought") come
# from here. Needs root (mounts, drop_caches).
#
#   scripts/fuse-requests.sh                    3,000 files in 100 directories
#   FILES=500 scripts/fuse-requests.sh          fewer
#   KMSFS_MOUNT_OPTS="-o open_requests" scripts/fuse-requests.sh   compare a setting
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "fuse-requests.sh: run as root (it mounts and drops caches)" >&2
    exit 2
fi
FILES=${FILES:-3000}
DIRS=${DIRS:-100}
cargo build --release --quiet
KMSFS=$PWD/target/release/kmsfs
WORK=$(mktemp -d /var/tmp/kmsfs-requests.XXXXXX)
export KMSFS_KEYSTORE=$WORK/keystore.json KMSFS_PASSPHRASE=requests
mkdir -p "$WORK/mnt"
"$KMSFS" init "$WORK/backing" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
# shellcheck disable=SC2086
# Per-request lines name files in plaintext: kmsfs writes them only when asked.
KMSFS_DEBUG_FUSE_REQUESTS=1 RUST_LOG=fuser=debug "$KMSFS" mount -f "$WORK/backing" "$WORK/mnt" ${KMSFS_MOUNT_OPTS:-} 2>"$WORK/log" &
DAEMON=$!
cleanup() {
    "$KMSFS" umount "$WORK/mnt" 2>/dev/null || umount "$WORK/mnt" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do
    awk -v m="$WORK/mnt" '$5 == m {found=1} END {exit !found}' /proc/self/mountinfo && break
    sleep 0.05
done

python3 scripts/make_tree.py "$WORK/tree.tar" "$FILES" "$DIRS" --flat

# A first open puts the kernel in its steady state (it learns whether the
# daemon wants OPEN requests), as on any mount that has served a read.
echo warm-up > "$WORK/mnt/warm-up" && cat "$WORK/mnt/warm-up" >/dev/null && rm "$WORK/mnt/warm-up"

phase() {
    local name=$1 before
    shift
    sync
    before=$(wc -l <"$WORK/log")
    "$@"
    sync
    sleep 0.5 # FORGETs and writeback arrive after the command returns
    echo "== $name ($FILES files)"
    tail -n +"$((before + 1))" "$WORK/log" |
        grep -oP 'FUSE\(\s*\d+\) ino 0x[0-9a-f]+ \K[A-Z_]+' |
        sort | uniq -c | sort -rn |
        awk '{total += $1; printf "  %8d %s\n", $1, $2} END {printf "  %8d total, %.1f per file\n", total, total / '"$FILES"'}'
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
phase "tar -x" tar -xf "$WORK/tree.tar" -C "$WORK/mnt"
drop_caches
phase "ls -lR" sh -c "ls -lR '$WORK/mnt/tree' >/dev/null"
phase "ls -lR again at once (warm)" sh -c "ls -lR '$WORK/mnt/tree' >/dev/null"
phase "stat every file (warm)" sh -c "find '$WORK/mnt/tree' -type f -print0 | xargs -0 stat >/dev/null"
drop_caches
phase "read every file" sh -c "find '$WORK/mnt/tree' -type f -print0 | xargs -0 cat >/dev/null"
phase "rm -rf" rm -rf "$WORK/mnt/tree"
