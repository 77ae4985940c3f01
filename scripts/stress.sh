#!/usr/bin/env bash
# Long stress run: 4 threads of seeded random operations against a mount,
# checked against models, then the daemon's peak RSS.
#   scripts/stress.sh [SECONDS]     (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
export KMSFS_STRESS_SECONDS=${1:-600}
cargo test --release --quiet --test stress -- --nocapture 2>&1 | grep -E "stress:|test result|panicked"
