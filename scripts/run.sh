#!/usr/bin/env bash
# Builds Celer and runs its main job. At this stage of the project that is the
# storage engine's benchmark against fio on the same file (`celer bench
# engine`); `celer up` (local cluster, vhost-user socket, NBD) replaces it when
# the distributed layers land. Extra arguments go to `celer bench engine`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked -p celer
exec ./target/release/celer bench engine "$@"
