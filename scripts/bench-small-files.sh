#!/usr/bin/env bash
# Small-file and metadata steps on two kmsfs builds side by side, interleaved
# (A B A B …), on the disk under WORK: 3,000 empty files created, 3,000
# one-line files written, `ls -l` warm and after a remount with caches
# dropped, every file read, `rm -rf`. Needs root (drop_caches).
#
#   scripts/bench-small-files.sh OLD_KMSFS NEW_KMSFS [ROUNDS]
#
# Each binary gets its own keystore and volume; times are seconds.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OLD_KMSFS NEW_KMSFS [ROUNDS]" >&2; exit 2; }
ROUNDS=${3:-3}
WORK=${WORK:-$(mktemp -d /var/tmp/kmsfs-small-XXXXXX)}
export KMSFS_PASSPHRASE=bench

seconds() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }

one_run() {
    local kmsfs=$1 label=$2 t="$WORK/$2"
    rm -rf "$t"; mkdir -p "$t/m"
    export KMSFS_KEYSTORE="$t/ks.json" KMSFS_CONFIG="$t/providers.toml"
    "$kmsfs" init "$t/b" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
    "$kmsfs" mount "$t/b" "$t/m"
    mkdir "$t/m/d"
    local create write warm cold read rm
    create=$(seconds bash -c "cd '$t/m/d' && for i in \$(seq 3000); do : > e\$i; done")
    write=$(seconds bash -c "cd '$t/m/d' && for i in \$(seq 3000); do echo file \$i > w\$i; done; sync")
    warm=$(seconds bash -c "ls -l '$t/m/d' >/dev/null")
    "$kmsfs" umount "$t/m"; sync; echo 3 > /proc/sys/vm/drop_caches
    "$kmsfs" mount "$t/b" "$t/m"
    cold=$(seconds bash -c "ls -l '$t/m/d' >/dev/null")
    read=$(seconds bash -c "cat '$t/m/d'/w* >/dev/null")
    rm=$(seconds bash -c "rm -rf '$t/m/d'; sync")
    "$kmsfs" umount "$t/m"
    rm -rf "$t"
    echo "$label create=$create write=$write ls_warm=$warm ls_cold=$cold read=$read rm_rf=$rm"
}

for round in $(seq "$ROUNDS"); do
    one_run "$1" "A-$round"
    one_run "$2" "B-$round"
done
rmdir "$WORK" 2>/dev/null || true
