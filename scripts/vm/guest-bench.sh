#!/bin/bash
# guest-bench.sh - in-guest fio (QEMU TCG) on a vhost-user-blk disk served by
# Celer and then by qemu-storage-daemon, over the same host file, in one run.
# Prints both fio summaries and the ratios. TCG dominates the numbers (the
# guest's own CPU is emulated), so read them as "what a guest sees here",
# not as back-end speed; `celer-vhost bench` measures the back ends alone.
#
# Usage: guest-bench.sh [--bin PATH] [--file PATH] [--runtime S] [--queues N]
#   --bin      celer-vhost binary (default: target/release/celer-vhost,
#              built with cargo if missing)
#   --file     host file (default /tmp/celer-vm/bench.img, 1 GiB, created)
#   --runtime  seconds per fio job (default 5)
#   --queues   virtqueues and vCPUs (default 1)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN="" FILE=/tmp/celer-vm/bench.img RUNTIME=5 QUEUES=1
while [ $# -gt 0 ]; do
	case $1 in
	--bin) BIN=$2; shift 2 ;;
	--file) FILE=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--queues) QUEUES=$2; shift 2 ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1" >&2; exit 2 ;;
	esac
done
if [ -z "$BIN" ]; then
	BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/celer-vhost
	[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release -p celer-vhost)
fi
"$HERE/build-guest.sh" >&2
mkdir -p "$(dirname "$FILE")"
[ -s "$FILE" ] || { dd if=/dev/urandom of="$FILE" bs=1M count=1024 status=none; sync; }
OUT=$(mktemp -d /tmp/celer-guest-bench.XXXXXX)
SOCK=$OUT/celer.sock
"$BIN" serve --socket "$SOCK" --device "file:$FILE" --queues "$QUEUES" >"$OUT/celer.log" 2>&1 &
CELER=$!
trap 'kill $CELER 2>/dev/null || true; wait $CELER 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
PRESET=qd1-randread,qd32-randread,qd1-randwrite
COMMON=(--smp "$QUEUES" --mem 512 --runtime "$RUNTIME" --preset "$PRESET")
"$HERE/run-guest.sh" --disk "vhost:$SOCK,queues=$QUEUES" "${COMMON[@]}" --out "$OUT/celer" >/dev/null
kill $CELER; wait $CELER 2>/dev/null || true
"$HERE/run-guest.sh" --disk "qsd:$FILE,queues=$QUEUES" "${COMMON[@]}" --out "$OUT/qsd" >/dev/null
echo "in-guest fio, TCG, $QUEUES queue(s), file $FILE, ${RUNTIME}s per job"
for t in celer qsd; do
	echo "== $t"
	column -t -s $'\t' "$OUT/$t/summary.tsv"
done
echo "== ratios (celer / qsd)"
paste "$OUT/celer/summary.tsv" "$OUT/qsd/summary.tsv" | awk -F'\t' 'NR > 1 {
	j = $1; sub(/^vda-/, "", j)
	printf "  %-14s %-5s IOPS %.2fx  mean latency %.2fx\n", j, $2, $3 / $12, $5 / $14 }'
rm -rf "$OUT"
