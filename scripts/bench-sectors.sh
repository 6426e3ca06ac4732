#!/usr/bin/env bash
# bench-sectors.sh - what a sector write (a write smaller than a 4 KiB block,
# merged on every replica) costs beside a 4 KiB write, on a local 3-node
# cluster (`celer up`, 3 replicas, one process) through its NBD export.
#
# Usage: scripts/bench-sectors.sh [SECONDS per run, default 10] [ROUNDS, default 2]
#
# The first 64 MiB are written once (so sector writes merge into data, with
# the read that costs), then fio (nbd engine, QD1, random offsets within
# those 64 MiB) runs randwrite with bs=4k, 512 and 2k, in turn, ROUNDS times.
# Per run: IOPS, mean / p50 / p99 completion latency, and the CPU time the
# `celer up` process (control service, nodes, client, NBD server) used per
# I/O (utime + stime from /proc). Needs fio and a release build of celer.
set -euo pipefail
secs=${1:-10}
rounds=${2:-2}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
celer=${CELER:-$here/target/release/celer}
dir=$(mktemp -d /var/tmp/celer-bench-sectors.XXXXXX)
"$celer" up --dir "$dir/up" --size 1G --base-port "${PORT:-17700}" --nbd-listen 127.0.0.1:0 >"$dir/up.log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
sock="$dir/up/nbd.sock"
for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$dir/up.log"; echo "celer up did not start"; exit 1; }
uri="nbd+unix:///default?socket=$sock"
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --size=64M \
    --iodepth=4 --output=/dev/null
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
printf '%-6s %-4s %9s %9s %9s %9s %12s\n' round bs IOPS mean_us p50_us p99_us cpu_us_per_io
for r in $(seq "$rounds"); do
  for bs in 4k 512 2k; do
    t0=$(ticks)
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=$bs --size=64M \
        --iodepth=1 --time_based --runtime="$secs" --randrepeat=0 \
        --output-format=json --output="$dir/fio.json"
    t1=$(ticks)
    jq -r --arg bs "$bs" --arg r "$r" --argjson t "$((t1 - t0))" --argjson hz "$hz" '
      .jobs[0].write as $w
      | [$r, $bs, ($w.iops|floor), ($w.clat_ns.mean/1000|floor),
         ($w.clat_ns.percentile["50.000000"]/1000|floor),
         ($w.clat_ns.percentile["99.000000"]/1000|floor),
         (($t / $hz * 1e6) / ($w.total_ios) | floor)]
      | @tsv' "$dir/fio.json" | awk -F'\t' '{printf "%-6s %-4s %9s %9s %9s %9s %12s\n", $1,$2,$3,$4,$5,$6,$7}'
  done
done
