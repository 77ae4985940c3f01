#!/usr/bin/env bash
# Small-file and metadata timings with the backing directory on tmpfs: no
# disk, so what is measured is the daemon and the FUSE round trips (the
# figures in docs/DESIGN.md "Request threads" come from here). Also times
# single `stat` calls with the kernel caches off, with the caller free to
# move between CPUs and pinned to CPU 0. Needs root (mounts).
#
#   scripts/tmpfs-bench.sh                          20,000 files, 2 rounds
#   KMSFS_MOUNT_OPTS="-o threads=2" scripts/tmpfs-bench.sh   compare a setting
#   FILES=5000 DIRS=250 ROUNDS=3 scripts/tmpfs-bench.sh
#
# Before comparing runs, check that nothing else is busy (`top`): a process
# spinning on one CPU makes the scheduler put the application and the
# daemon on the other, which halves the round-trip cost on this VM.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "tmpfs-bench.sh: run as root (it mounts)" >&2
    exit 2
fi
FILES=${FILES:-20000}
DIRS=${DIRS:-1000}
ROUNDS=${ROUNDS:-2}
META=${META:-10000}
cargo build --release --quiet
KMSFS=$PWD/target/release/kmsfs
WORK=$(mktemp -d /dev/shm/kmsfs-tmpfs-bench.XXXXXX)
export KMSFS_KEYSTORE=$WORK/keystore.json KMSFS_PASSPHRASE=tmpfs-bench
mounted=()
cleanup() {
    for m in "${mounted[@]}"; do "$KMSFS" umount "$m" 2>/dev/null || umount "$m" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

mount_kmsfs() { # NAME [extra mount args]
    local name=$1
    shift
    mkdir -p "$WORK/$name"
    "$KMSFS" init "$WORK/back-$name" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
    # shellcheck disable=SC2086
    "$KMSFS" mount "$WORK/back-$name" "$WORK/$name" ${KMSFS_MOUNT_OPTS:-} "$@"
    mounted+=("$WORK/$name")
}

python3 scripts/make_tree.py "$WORK/tree.tar" "$FILES" "$DIRS"
mount_kmsfs main
M=$WORK/main
timed() { # LABEL COMMAND...
    local label=$1 s e
    shift
    s=$(date +%s.%N)
    "$@"
    e=$(date +%s.%N)
    printf "%s %.3f  " "$label" "$(echo "$e - $s" | bc)"
}
meta() { python3 scripts/meta_ops.py "$M/meta" "$META" "$1"; }
echo "== $FILES files in $DIRS directories, $META empty files; seconds"
for round in $(seq "$ROUNDS"); do
    printf "round %s: " "$round"
    timed untar tar -xf "$WORK/tree.tar" -C "$M"
    timed ls_lR sh -c "ls -lR '$M/tree' >/dev/null"
    timed read_all sh -c "find '$M/tree' -type f -print0 | xargs -0 cat >/dev/null"
    timed rm_rf rm -rf "$M/tree"
    timed create meta create
    timed stat meta stat
    timed unlink meta unlink
    echo
done

mount_kmsfs nocache -o attr_timeout=0
echo hello >"$WORK/nocache/hello"
stat_loop() {
    python3 - "$WORK/nocache/hello" <<'EOF'
import os, sys, time
n = 20000
t = time.perf_counter()
for _ in range(n):
    os.stat(sys.argv[1])
print(f"{(time.perf_counter() - t) / n * 1e6:.1f} us per stat")
EOF
}
echo "== stat with attr_timeout=0 (LOOKUP and GETATTR round trips)"
printf "caller unpinned: "
stat_loop
printf "caller on CPU 0: "
taskset -c 0 bash -c "$(declare -f stat_loop); WORK='$WORK' stat_loop"
