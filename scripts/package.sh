#!/usr/bin/env bash
# Builds the Debian package target/debian/kmsfs_VERSION_ARCH.deb with
# dpkg-deb: the release binary as /usr/bin/kmsfs, /usr/sbin/mount.kmsfs and
# mount.fuse.kmsfs (so `mount -t kmsfs` and `mount -t fuse.kmsfs` and fstab
# work), man pages and shell completions generated from the binary, the
# kmsfs@.service template, an example volume file, and (created at install
# when missing) an empty host configuration. Install with `apt-get install ./target/debian/kmsfs_*.deb`.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
cargo build --release --quiet
bin=target/release/kmsfs
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$bin" "$root/usr/bin/kmsfs"
strip --strip-debug "$root/usr/bin/kmsfs"
install -d "$root/usr/sbin"
ln -s ../bin/kmsfs "$root/usr/sbin/mount.kmsfs"
ln -s ../bin/kmsfs "$root/usr/sbin/mount.fuse.kmsfs"

"$bin" manpages "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash > "$root/usr/share/bash-completion/completions/kmsfs"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_kmsfs"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/kmsfs.fish"

install -D -m 0644 packaging/systemd/kmsfs@.service "$root/usr/lib/systemd/system/kmsfs@.service"
install -D -m 0644 packaging/volume.conf.example "$root/usr/share/doc/kmsfs/volume.conf.example"
install -D -m 0644 README.md "$root/usr/share/doc/kmsfs/README.md"
# The host configuration is the host's (`kmsfs init` writes it): not a
# package file, which an upgrade would replace or a purge delete. postinst
# creates an empty one if there is none.
install -d "$root/usr/share/kmsfs"
cat > "$root/usr/share/kmsfs/providers.toml" <<'TOML'
# kmsfs: how this host reaches the key provider of each volume, by volume id.
# Written by `kmsfs init --kms URI`; edit freely. Connection settings
# (addresses, module paths, CA and token files) are read only from here,
# --kms and the environment, never from a volume's backing directory.
# Secrets (pin-value=) are never written here: use pin-source=file:PATH.
TOML

install -d "$root/DEBIAN"
cat > "$root/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    install -d -m 0700 /etc/kmsfs /etc/kmsfs/volumes
    [ -e /etc/kmsfs/providers.toml ] || install -m 0600 /usr/share/kmsfs/providers.toml /etc/kmsfs/providers.toml
fi
SH
chmod 0755 "$root/DEBIAN/postinst"
cat > "$root/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -f /etc/kmsfs/providers.toml
    rmdir /etc/kmsfs/volumes /etc/kmsfs 2>/dev/null || true
fi
SH
chmod 0755 "$root/DEBIAN/postrm"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: kmsfs
Version: $version
Architecture: $arch
Maintainer: kmsfs developers <kmsfs@localhost>
Installed-Size: $size
Depends: fuse3, libc6
Section: utils
Priority: optional
Homepage: https://localhost/kmsfs
Description: transparent encrypted filesystem with KMS-style key management
 A FUSE filesystem that encrypts each file with its own data key
 (AES-256-GCM-SIV), wraps data keys with a volume key and that with a
 master key held by a key provider: a local keystore, AWS KMS, Vault or
 OpenBao Transit, or a PKCS#11 HSM. Rotation re-wraps keys without
 rewriting data.
CONTROL

mkdir -p target/debian
out="target/debian/kmsfs_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$out" >/dev/null
echo "$out"
