#!/usr/bin/env bash
# Builds kmsfs and mounts a demo encrypted directory with the embedded KMS.
#   scripts/demo.sh [DIR]      (default DIR: /tmp/kmsfs-demo)
# The passphrase comes from KMSFS_PASSPHRASE, or a prompt on a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/kmsfs-demo}

if ! command -v cargo >/dev/null; then echo "demo.sh: cargo is needed" >&2; exit 1; fi
[ -c /dev/fuse ] || { echo "demo.sh: /dev/fuse is missing (modprobe fuse)" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ] && ! command -v fusermount3 >/dev/null; then
    echo "demo.sh: as a non-root user you need fusermount3 (apt-get install fuse3)" >&2; exit 1
fi

cargo build --release --quiet
KMSFS=$PWD/target/release/kmsfs
export KMSFS_KEYSTORE=${KMSFS_KEYSTORE:-$DIR/keystore.json}
mkdir -p "$DIR/plain"
if [ ! -e "$DIR/cipher/kmsfs.db" ]; then
    "$KMSFS" init "$DIR/cipher"
fi
if mountpoint -q "$DIR/plain"; then "$KMSFS" umount "$DIR/plain"; fi
"$KMSFS" mount "$DIR/cipher" "$DIR/plain" --log-file "$DIR/kmsfs.log"

echo "Hello from kmsfs" > "$DIR/plain/hello.txt"
mkdir -p "$DIR/plain/photos 2026"
head -c 200000 /dev/urandom > "$DIR/plain/photos 2026/beach.jpg"
ln -sf hello.txt "$DIR/plain/greeting"

echo
echo "== what programs see ($DIR/plain):"
ls -la "$DIR/plain"
echo
echo "== what is stored ($DIR/cipher):"
ls -la "$DIR/cipher"
echo
"$KMSFS" status "$DIR/cipher"
echo
echo "Unmount with: $KMSFS umount $DIR/plain"
