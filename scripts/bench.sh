#!/usr/bin/env bash
# Side-by-side filesystem benchmark. One run mounts, on the same backing
# filesystem: the raw directory, a plain FUSE passthrough (bindfs
# --multithreaded), gocryptfs, securefs (lite format), the FUSE floor (an
# in-memory FUSE filesystem with kmsfs's kernel settings and no disk or
# crypto: examples/fuse_floor.rs) and kmsfs, and runs every
# workload on each, interleaved (round 1: workload 1 on A B C D E, workload 2
# on A B C D E, ...; then round 2 in the order B C D E A ...). Prints medians, min-max and the ratios
# kmsfs/gocryptfs and kmsfs/raw, and writes docs/bench.svg, target/bench/latest.md
# (to be added to docs/bench.md under its date and commit) and $WORK/results.json. Needs root (mounts, drop_caches).
# Each measurement also records the CPU steal in its window (a shared VM's
# hypervisor running others): the log marks rounds above 5%, the report
# gives each target's share.
#
#   scripts/bench.sh                  one round per target (6), full size (about 30 minutes)
#   ROUNDS=3 scripts/bench.sh         fewer rounds
#   BENCH_SCALE=small scripts/bench.sh   a quick look: 1/8 of the sizes
#   TARGETS="raw kmsfs" scripts/bench.sh only some targets
#   WORKLOADS="dd_write dd_read_cold" scripts/bench.sh  only some workloads
#                                     (in the order below; a read workload
#                                     needs the write that makes its file)
#   BENCH_DIR=/mnt/disk/x scripts/bench.sh  where the backing dirs live
#                                     (default /var/tmp/kmsfs-bench)
#   BENCH_FS=ext4-image scripts/bench.sh  the backing dirs on a fresh ext4
#                                     with a journal (a sparse image beside
#                                     BENCH_DIR on a loop device with direct
#                                     I/O, removed afterwards): what a user's
#                                     disk is, where this VM's root is ext4
#                                     without a journal
#   KMSFS_MOUNT_OPTS="-o foo" scripts/bench.sh  extra kmsfs mount options
#   FLOOR_OPTS="--no-writeback-cache" scripts/bench.sh  options of the FUSE floor
#
# The reverse_* workloads back the tree up through an encrypted reverse view
# of it (gocryptfs -reverse, kmsfs --reverse; raw: the plaintext itself) to a
# plain directory; the other targets have no reverse mode and skip them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The report names the command with the settings it was given.
RUN_SETTINGS=
for v in BENCH_SCALE ROUNDS TARGETS WORKLOADS BENCH_DIR BENCH_FS KMSFS_MOUNT_OPTS FLOOR_OPTS; do
    if [ -n "${!v:-}" ]; then
        printf -v quoted '%q' "${!v}"
        RUN_SETTINGS+="$v=$quoted "
    fi
done
TARGETS=(${TARGETS:-raw bindfs gocryptfs securefs floor kmsfs})
ALL_WORKLOADS=(dd_write dd_read_cold untar ls_lR ls_lR_warm read_all rm_rf
    fio_seq_write fio_seq_read fio_rand_read_qd1 fio_rand_read_4jobs fio_rand_write_qd1 fio_rand_write_4jobs
    meta_create meta_stat_warm meta_stat meta_unlink rsync_initial rsync_incremental restic_backup
    reverse_rsync_initial reverse_rsync_incremental)
WANTED_WORKLOADS=${WORKLOADS:-${ALL_WORKLOADS[*]}}
for w in $WANTED_WORKLOADS; do
    if [[ " ${ALL_WORKLOADS[*]} " != *" $w "* ]]; then
        echo "bench.sh: unknown workload '$w' (known: ${ALL_WORKLOADS[*]})" >&2
        exit 2
    fi
done
WORKLOADS=()
for w in "${ALL_WORKLOADS[@]}"; do
    if [[ " $WANTED_WORKLOADS " == *" $w "* ]]; then WORKLOADS+=("$w"); fi
done
ROUNDS=${ROUNDS:-${#TARGETS[@]}}
WORK=${BENCH_DIR:-/var/tmp/kmsfs-bench}
SCALE=${BENCH_SCALE:-full}
OUT_SVG=${BENCH_SVG:-$ROOT/docs/bench.svg}
OUT_MD=${BENCH_MD:-$ROOT/target/bench/latest.md}
mkdir -p "$(dirname "$OUT_MD")"

if [ "$(id -u)" -ne 0 ]; then
    echo "bench.sh: run as root (it mounts filesystems and drops caches)" >&2
    exit 2
fi

need=()
command -v gocryptfs >/dev/null || need+=(gocryptfs)
command -v securefs >/dev/null || need+=(securefs)
command -v bindfs >/dev/null || need+=(bindfs)
command -v fio >/dev/null || need+=(fio)
command -v bc >/dev/null || need+=(bc)
command -v rsync >/dev/null || need+=(rsync)
command -v restic >/dev/null || need+=(restic)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --quiet --bin kmsfs --example fuse_floor
KMSFS=$ROOT/target/release/kmsfs
FLOOR=$ROOT/target/release/examples/fuse_floor

case ${BENCH_FS:-} in
    "" | ext4-image) ;;
    *) echo "BENCH_FS must be unset or ext4-image" >&2; exit 2 ;;
esac

case $SCALE in
    full) FILES=20000 DIRS=1000 SEQ=1G RAND=256M RANDIO=32M META=10000 DD_COUNT=2000 ;;
    small) FILES=2500 DIRS=125 SEQ=128M RAND=64M RANDIO=4M META=1250 DD_COUNT=250 ;;
    *) echo "BENCH_SCALE must be full or small" >&2; exit 2 ;;
esac

if [ -e "$WORK" ]; then
    if awk -v w="$WORK/" 'index($5, w) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
        echo "bench.sh: something is still mounted under $WORK; unmount it first" >&2
        exit 2
    fi
    rm -rf "$WORK"
fi
mkdir -p "$WORK"
export KMSFS_KEYSTORE=$WORK/kmsfs-keystore.json KMSFS_PASSPHRASE=bench
# Where the targets' backing directories (and the reverse backups' copies) live.
BACK=$WORK
FS_IMAGE= LOOP_DEV=

mounted=()
cleanup() {
    rm -rf /dev/shm/kmsfs-bench-tree.tar /dev/shm/kmsfs-bench-src
    for m in "${mounted[@]}"; do
        if [[ $m == */kmsfs || $m == */rev-kmsfs ]]; then
            "$KMSFS" umount "$m" 2>/dev/null || umount "$m" 2>/dev/null || true
        else
            umount "$m" 2>/dev/null || true
        fi
    done
    if [ -n "$LOOP_DEV" ]; then
        # The daemons may still be closing their backing files.
        for _ in $(seq 50); do umount "$BACK" 2>/dev/null && break; sleep 0.1; done
        losetup -d "$LOOP_DEV" 2>/dev/null || true
        rm -f "$FS_IMAGE"
    fi
}
trap cleanup EXIT
if [ "${BENCH_FS:-}" = ext4-image ]; then
    FS_IMAGE=$WORK.img BACK=$WORK/fs
    rm -f "$FS_IMAGE"
    truncate -s 32G "$FS_IMAGE"
    LOOP_DEV=$(losetup --find --show --direct-io=on "$FS_IMAGE")
    mkfs.ext4 -q -F "$LOOP_DEV"
    mkdir -p "$BACK"
    mount "$LOOP_DEV" "$BACK"
fi

wait_mounted() {
    for _ in $(seq 200); do
        awk -v m="$1" '$5 == m {found=1} END {exit !found}' /proc/self/mountinfo && return 0
        sleep 0.05
    done
    echo "bench.sh: $1 did not mount" >&2
    exit 1
}

# Every target gets a backing directory $BACK/back-NAME and is used at $WORK/NAME.
setup_target() {
    local t=$1 back=$BACK/back-$1 mnt=$WORK/$1
    mkdir -p "$back" "$mnt"
    case $t in
        raw) rmdir "$mnt"; ln -s "$back" "$mnt"; return ;;
        bindfs) bindfs --multithreaded "$back" "$mnt" ;;
        floor)
            # In memory: $back stays empty. Runs until unmounted.
            # shellcheck disable=SC2086
            "$FLOOR" "$mnt" ${FLOOR_OPTS:-} >"$WORK/floor.log" 2>&1 & ;;
        gocryptfs)
            gocryptfs -init -q -extpass "echo bench" "$back" >/dev/null
            gocryptfs -q -extpass "echo bench" "$back" "$mnt" ;;
        securefs)
            securefs create --format 4 --pass bench --pbkdf pkcs5-pbkdf2-hmac-sha256 -r 1000 "$back" >/dev/null
            securefs mount -b --pass bench "$back" "$mnt" >/dev/null 2>&1 ;;
        kmsfs)
            rmdir "$back"
            "$KMSFS" init "$back" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
            # shellcheck disable=SC2086
            "$KMSFS" mount "$back" "$mnt" ${KMSFS_MOUNT_OPTS:-} ;;
        *) echo "unknown target $t" >&2; exit 2 ;;
    esac
    mounted+=("$mnt")
    wait_mounted "$mnt"
}

# The tarball lives in /dev/shm: the source must not be what is measured
# (this VM's page cache does not reliably keep a file that size).
TREE_TAR=/dev/shm/kmsfs-bench-tree.tar
echo "== generating a tarball of $FILES small files (0-16 KiB) in $DIRS directories (seed 1)"
python3 "$ROOT/scripts/make_tree.py" "$TREE_TAR" "$FILES" "$DIRS"

BACKUP_SRC=/dev/shm/kmsfs-bench-src
if [[ " ${WORKLOADS[*]} " == *" rsync_"* || " ${WORKLOADS[*]} " == *" restic_"* || " ${WORKLOADS[*]} " == *" reverse_"* ]]; then
    rm -rf "$BACKUP_SRC" && mkdir -p "$BACKUP_SRC" && tar -xf "$TREE_TAR" -C "$BACKUP_SRC"
fi

for t in "${TARGETS[@]}"; do setup_target "$t"; done

# Reverse views of the backup source, each leaving out the other's configuration.
setup_reverse() {
    local view=$WORK/rev-$1
    case $1 in
        gocryptfs)
            gocryptfs -init -reverse -q -extpass "echo bench" "$BACKUP_SRC" >/dev/null
            mkdir -p "$view"
            gocryptfs -reverse -q -extpass "echo bench" -exclude .kmsfs-reverse "$BACKUP_SRC" "$view" ;;
        kmsfs)
            "$KMSFS" init --reverse "$BACKUP_SRC" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
            mkdir -p "$view"
            "$KMSFS" mount --reverse "$BACKUP_SRC" "$view" --exclude /.gocryptfs.reverse.conf ;;
        *) return ;;
    esac
    mounted+=("$view")
    wait_mounted "$view"
}
if [[ " ${WORKLOADS[*]} " == *" reverse_"* ]]; then
    for t in "${TARGETS[@]}"; do setup_reverse "$t"; done
fi
KMSFS_PID=
if [[ " ${TARGETS[*]} " == *" kmsfs "* ]]; then
    KMSFS_PID=$("$KMSFS" status --json "$BACK/back-kmsfs" | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon_pid"])')
fi

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# CPU time the hypervisor gave to others ("steal", summed over the CPUs, in
# clock ticks). On a shared VM it comes and goes and can double a
# workload's time; each measurement records how much of it fell in its
# window, and the report says how much each target got.
steal_ticks() { awk '/^cpu / {print $9}' /proc/stat; }
TICKS_PER_CPU_SECOND=$(( $(getconf CLK_TCK) * $(nproc) ))
# fio's own start-up takes about 0.3 s, so a fio workload's time is the
# runtime fio reports (which includes its end_fsync), not the wall clock.
fio_timed() {
    fio --output-format=json --output="$WORK/fio.json" --ioengine=psync --group_reporting --fallocate=none "$@"
    python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print(max(job["read"]["runtime"], job["write"]["runtime"]) / 1000)' "$WORK/fio.json" > "$WORK/measured"
}
FIO=(fio --output-format=terse --ioengine=psync --group_reporting --fallocate=none)

# Each workload: `prepare_W DIR` (untimed, optional) then `run_W DIR` (timed).
run_dd_write() { dd if=/dev/zero of="$1/dd.bin" bs=128k count="$DD_COUNT" conv=fsync status=none; }
prepare_dd_read_cold() { drop_caches; }
run_dd_read_cold() { dd if="$1/dd.bin" of=/dev/null bs=128k status=none; rm -f "$1/dd.bin"; }
run_untar() { tar -xf "$TREE_TAR" -C "$1"; }
prepare_ls_lR() { drop_caches; }
run_ls_lR() { ls -lR "$1/tree" >/dev/null; }
# Again at once: what the kernel's caches answer.
run_ls_lR_warm() { run_ls_lR "$1"; }
prepare_read_all() { drop_caches; }
run_read_all() { find "$1/tree" -type f -print0 | xargs -0 cat >/dev/null; }
# The removals start cold for every target: otherwise the cache drops of the
# targets after this one in a round (before their reads) make it cold for all
# but the round's last target, which then removes names it still knows.
prepare_rm_rf() { drop_caches; }
run_rm_rf() { rm -rf "$1/tree"; }
run_fio_seq_write() { fio_timed --name=seqw --filename="$1/seq.bin" --rw=write --bs=1M --size="$SEQ" --end_fsync=1 >/dev/null; }
prepare_fio_seq_read() { drop_caches; }
run_fio_seq_read() { fio_timed --name=seqr --filename="$1/seq.bin" --rw=read --bs=1M --size="$SEQ" >/dev/null; rm -f "$1/seq.bin"; }
prepare_fio_rand_read_qd1() {
    "${FIO[@]}" --name=layout --filename="$1/rand.bin" --rw=write --bs=1M --size="$RAND" --end_fsync=1 >/dev/null
    drop_caches
}
run_fio_rand_read_qd1() { fio_timed --name=rr1 --filename="$1/rand.bin" --rw=randread --bs=4k --size="$RAND" --io_size="$RANDIO" --randseed=1 >/dev/null; }
prepare_fio_rand_read_4jobs() { drop_caches; }
run_fio_rand_read_4jobs() { fio_timed --name=rr4 --filename="$1/rand.bin" --rw=randread --bs=4k --size="$RAND" --io_size="$RANDIO" --numjobs=4 --randseed=2 >/dev/null; }
run_fio_rand_write_qd1() { fio_timed --name=rw1 --filename="$1/rand.bin" --rw=randwrite --bs=4k --size="$RAND" --io_size="$RANDIO" --end_fsync=1 --randseed=3 >/dev/null; }
run_fio_rand_write_4jobs() {
    fio_timed --name=rw4 --filename="$1/rand.bin" --rw=randwrite --bs=4k --size="$RAND" --io_size="$RANDIO" --numjobs=4 --end_fsync=1 --randseed=4 >/dev/null
    rm -f "$1/rand.bin"
}
run_meta_create() { python3 "$ROOT/scripts/meta_ops.py" "$1/meta" "$META" create; }
# Right after creating them, caches warm.
run_meta_stat_warm() { python3 "$ROOT/scripts/meta_ops.py" "$1/meta" "$META" stat; }
prepare_meta_stat() { drop_caches; }
run_meta_stat() { python3 "$ROOT/scripts/meta_ops.py" "$1/meta" "$META" stat; }
prepare_meta_unlink() { drop_caches; } # cold for every target, as rm_rf
run_meta_unlink() { python3 "$ROOT/scripts/meta_ops.py" "$1/meta" "$META" unlink; }
# Backups into the mount: the same tree (extracted once in /dev/shm) copied
# with rsync, then again with nothing changed, then backed up with restic.
prepare_rsync_initial() { rm -rf "$1/rsync" "$1/restic"; }
run_rsync_initial() { rsync -a "$BACKUP_SRC/" "$1/rsync/"; }
prepare_rsync_incremental() { drop_caches; }
run_rsync_incremental() { rsync -a "$BACKUP_SRC/" "$1/rsync/"; }
prepare_restic_backup() {
    rm -rf "$1/rsync"
    RESTIC_PASSWORD=bench restic --no-cache --quiet --repo "$1/restic" init >/dev/null
}
run_restic_backup() { RESTIC_PASSWORD=bench restic --no-cache --quiet --repo "$1/restic" backup "$BACKUP_SRC" >/dev/null; }
# Backups of the tree through its reverse view to a plain directory: the
# first copy, then again with nothing changed.
applies_reverse_rsync_initial() { [[ " raw gocryptfs kmsfs " == *" $1 "* ]]; }
applies_reverse_rsync_incremental() { applies_reverse_rsync_initial "$1"; }
reverse_source() { if [ "$1" = raw ]; then echo "$BACKUP_SRC"; else echo "$WORK/rev-$1"; fi; }
prepare_reverse_rsync_initial() { rm -rf "$BACK/revdest-$(basename "$1")"; }
run_reverse_rsync_initial() { rsync -a "$(reverse_source "$(basename "$1")")/" "$BACK/revdest-$(basename "$1")/"; }
run_reverse_rsync_incremental() { run_reverse_rsync_initial "$1"; }

RESULTS=$WORK/results.tsv
printf "round\tworkload\ttarget\tseconds\tstolen\n" > "$RESULTS"
for round in $(seq "$ROUNDS"); do
    # Each round starts one target later (raw bindfs ... kmsfs, then bindfs
    # ... kmsfs raw, ...): this VM's disk slows down after a few GiB of
    # writes, so a fixed order would always bill the same target for the
    # others' writes. With as many rounds as targets, each target runs once
    # in each position.
    shift_by=$(((round - 1) % ${#TARGETS[@]}))
    order=("${TARGETS[@]:shift_by}" "${TARGETS[@]:0:shift_by}")
    for w in "${WORKLOADS[@]}"; do
        line="round $round  $w:"
        for t in "${order[@]}"; do
            if declare -F "applies_$w" >/dev/null && ! "applies_$w" "$t"; then continue; fi
            dir=$WORK/$t
            if declare -F "prepare_$w" >/dev/null; then "prepare_$w" "$dir"; fi
            rm -f "$WORK/measured"
            sync # no target pays for the previous one's writeback
            steal_before=$(steal_ticks)
            s=$(now)
            "run_$w" "$dir"
            e=$(now)
            steal_after=$(steal_ticks)
            secs=$(echo "$e - $s" | bc)
            # The share of the wall-clock window the CPUs were taken away.
            stolen=$(echo "scale=3; ($steal_after - $steal_before) / $TICKS_PER_CPU_SECOND / ($secs + 0.001)" | bc)
            if [ -s "$WORK/measured" ]; then secs=$(cat "$WORK/measured"); fi
            printf "%s\t%s\t%s\t%s\t%s\n" "$round" "$w" "$t" "$secs" "$stolen" >> "$RESULTS"
            line+=" $t $(printf %.2f "$secs")"
            if [ "$(echo "$stolen > 0.05" | bc)" = 1 ]; then
                line+=" (steal $(echo "$stolen * 100 / 1" | bc)%)"
            fi
        done
        echo "$line"
    done
done

RSS_KB=
if [ -n "$KMSFS_PID" ] && [ -r "/proc/$KMSFS_PID/status" ]; then
    RSS_KB=$(awk '/^VmHWM/ {print $2}' "/proc/$KMSFS_PID/status")
fi
versions="kmsfs $("$KMSFS" --version | awk '{print $2}'), gocryptfs $(gocryptfs -version | awk '{print $2}' | tr -d ';'), securefs $(dpkg-query -W -f='${Version}' securefs), bindfs $(bindfs --version | awk '{print $2}'), $(fio --version)"
machine="$(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), backing fs $(stat -f -c %T "$BACK")${LOOP_DEV:+ (ext4 with a journal on a loop image, BENCH_FS=ext4-image)}"
python3 "$ROOT/scripts/bench_report.py" "$RESULTS" "$OUT_MD" "$OUT_SVG" "$WORK/results.json" \
    --machine "$machine" --versions "$versions" --scale "$SCALE" --rounds "$ROUNDS" \
    --rss-kb "${RSS_KB:-0}" --command "${RUN_SETTINGS}scripts/$(basename "$0")"
