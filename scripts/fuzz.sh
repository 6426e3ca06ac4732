#!/usr/bin/env bash
# Runs a cargo-fuzz target for a while (default: the vhost request parser,
# 120 s). Works on the stable toolchain: RUSTC_BOOTSTRAP=1 unlocks the
# sanitizer flags cargo-fuzz needs. Installs cargo-fuzz if missing.
# Usage: scripts/fuzz.sh [TARGET] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../crates/celer-vhost/fuzz"
target=${1:-parse_request}
seconds=${2:-120}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
RUSTC_BOOTSTRAP=1 exec cargo fuzz run "$target" -- -max_total_time="$seconds"
