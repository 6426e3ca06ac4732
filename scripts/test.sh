#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, property,
# crash, system). CI runs exactly this. Set CELER_SKIP_SLOW=1 to skip the
# slowest system tests locally (CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --release --locked
cargo nextest run --workspace --release --locked --no-fail-fast
