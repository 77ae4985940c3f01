#!/usr/bin/env bash
# Builds the Debian package, installs it with apt-get as a user would, and
# checks what it promises: `kmsfs` on PATH, man pages and completions in
# place, `mount -t kmsfs` and `mount -t fuse.kmsfs` (fstab's way) mounting a
# volume that plain `umount` unmounts, the systemd template unit. Purges it
# again. Needs root, on a machine without kmsfs installed (CI's).
set -euo pipefail
cd "$(dirname "$0")/.."

# It installs into /usr and /etc and purges again: never over a real setup.
if dpkg -s kmsfs >/dev/null 2>&1 || [ -e /etc/kmsfs ] || [ -e /usr/bin/kmsfs ] || [ -e /usr/sbin/mount.kmsfs ]; then
    echo "package check: kmsfs is installed here or /etc/kmsfs exists; run it on a scratch machine" >&2
    exit 1
fi
deb=$(scripts/package.sh)
echo "== installing $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$deb" >/dev/null
work=$(mktemp -d)
cleanup() {
    for m in "$work/m1" "$work/m2"; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m" || umount -l "$m"; fi
    done
    rm -rf "$work"
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq kmsfs >/dev/null
    rm -rf /etc/kmsfs   # made by postinst on this scratch machine (checked absent above)
}
trap cleanup EXIT
fail() { echo "package check failed: $*" >&2; exit 1; }

[ "$(command -v kmsfs)" = /usr/bin/kmsfs ] || fail "kmsfs is not /usr/bin/kmsfs"
kmsfs --version | grep -q "^kmsfs " || fail "kmsfs --version"
for page in kmsfs kmsfs-mount kmsfs-fsck; do
    zcat "/usr/share/man/man1/$page.1.gz" | grep -q '^\.TH' || fail "man page $page"
done
grep -q "_kmsfs" /usr/share/bash-completion/completions/kmsfs || fail "bash completion"
[ -s /usr/share/zsh/vendor-completions/_kmsfs ] || fail "zsh completion"
[ -s /usr/share/fish/vendor_completions.d/kmsfs.fish ] || fail "fish completion"
grep -q "^Type=notify" /usr/lib/systemd/system/kmsfs@.service || fail "systemd unit"
if command -v systemd-analyze >/dev/null 2>&1; then
    verified=$(systemd-analyze verify --man=no kmsfs@check.service 2>&1 || true)
    if echo "$verified" | grep -q "kmsfs@"; then fail "systemd-analyze verify: $verified"; fi
fi
[ "$(stat -c %a /etc/kmsfs/providers.toml)" = 600 ] || fail "host configuration mode"

export KMSFS_KEYSTORE="$work/keystore.json"
unset KMSFS_PASSPHRASE
kmsfs --key-file "$work/key" init "$work/b" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
mkdir "$work/m1" "$work/m2"
mount -t kmsfs "$work/b" "$work/m1" -o "keystore=$work/keystore.json,key_file=$work/key"
findmnt -n -o FSTYPE "$work/m1" | grep -qx "fuse.kmsfs" || fail "mount -t kmsfs"
echo "through the package" > "$work/m1/f"
umount "$work/m1"
for _ in $(seq 100); do kmsfs status "$work/b" | grep -q "mounted: no" && break; sleep 0.1; done
mount -t fuse.kmsfs "$work/b" "$work/m2" -o "keystore=$work/keystore.json,key_file=$work/key"
[ "$(cat "$work/m2/f")" = "through the package" ] || fail "mount -t fuse.kmsfs reads back"
umount "$work/m2"
echo "test result: ok. 1 passed; 0 failed (the Debian package: install, mount -t kmsfs, mount -t fuse.kmsfs)"
