#!/usr/bin/env bash
# Creates a volume with 100,000 files (each with its own data key) and times
# `kmsfs rotate` on it. Prints files/s; the target is under 5 s.
#   scripts/bench-rotate.sh [FILES]    (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-100000}
WORK=$(mktemp -d /tmp/kmsfs-rotate-bench.XXXXXX)
cargo build --release --quiet
KMSFS=$PWD/target/release/kmsfs
export KMSFS_KEYSTORE=$WORK/keystore.json KMSFS_PASSPHRASE=bench
mkdir -p "$WORK/plain"
"$KMSFS" init "$WORK/cipher" --kdf-memory-mib 19 --kdf-iterations 2 >/dev/null
"$KMSFS" mount "$WORK/cipher" "$WORK/plain"
trap '"$KMSFS" umount "$WORK/plain" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "creating $FILES files through the mount..."
start=$(date +%s.%N)
python3 - "$WORK/plain" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for d in range(100):
    os.mkdir(f"{root}/d{d}")
for i in range(n):
    with open(f"{root}/d{i % 100}/f{i}", "wb") as f:
        f.write(b"x")
PY
echo "created in $(echo "$(date +%s.%N) - $start" | bc) s"
"$KMSFS" umount "$WORK/plain"
"$KMSFS" status "$WORK/cipher" | grep "volume key"

echo "rotating (offline)..."
report=$("$KMSFS" rotate --json "$WORK/cipher")
echo "$report"
python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"rotate: {r['rewrapped_file_keys']} file keys in {r['seconds']:.2f} s = {r['rewrapped_file_keys']/r['seconds']:,.0f} files/s\")" "$report"

echo "rotating again, mounted..."
"$KMSFS" mount "$WORK/cipher" "$WORK/plain"
/usr/bin/time -f "rotate (mounted), wall clock incl. keystore unlock: %e s" "$KMSFS" rotate "$WORK/cipher"
