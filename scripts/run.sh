#!/usr/bin/env bash
# Builds Celer and runs its main job: `celer up`, a local cluster (control
# service, 3 storage nodes on loopback, a 10 GiB volume with 3 replicas)
# serving the volume on a vhost-user-blk socket and over NBD. It prints how to
# attach a VM; Ctrl-C stops it; the data stays in ./celer-up for the next run.
# Extra arguments go to `celer up` (see `celer up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked -p celer
exec ./target/release/celer up "$@"
