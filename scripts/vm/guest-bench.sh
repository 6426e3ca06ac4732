#!/bin/bash
# guest-bench.sh - in-guest fio (QEMU TCG) on a vhost-user-blk disk served by
# Celer and then by qemu-storage-daemon, over the same host file, in one run.
# Prints both fio summaries and the ratios. TCG dominates the numbers (the
# guest's own CPU is emulated), so read them as "what a guest sees here",
# not as back-end speed; `celer-vhost bench` measures the back ends alone.
#
# Usage: guest-bench.sh [--bin PATH] [--file PATH] [--runtime S] [--queues N]
#   --bin      celer-vhost binary (default: target/release/celer-vhost,
#              built with cargo if missing), or the celer binary (its
#              `vhost serve` is used)
#   --celer-device SPEC  what Celer serves instead of file:FILE, e.g. a
#              replicated volume cluster:NAME,meta=URL (with
#              --bin .../celer; the token from CELER_TOKEN); qsd still
#              serves FILE
#   --file     host file (default /tmp/celer-vm/bench.img, 1 GiB, created)
#   --runtime  seconds per fio job (default 5)
#   --queues   virtqueues and vCPUs (default 1)
#   --repeat   rounds (default 1); the order alternates (Celer first in odd
#              rounds, qsd first in even ones) and the median ratio is shown
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN="" FILE=/tmp/celer-vm/bench.img RUNTIME=5 QUEUES=1 REPEAT=1 CELER_DEVICE=""
while [ $# -gt 0 ]; do
	case $1 in
	--bin) BIN=$2; shift 2 ;;
	--file) FILE=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--queues) QUEUES=$2; shift 2 ;;
	--repeat) REPEAT=$2; shift 2 ;;
	--celer-device) CELER_DEVICE=$2; shift 2 ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1" >&2; exit 2 ;;
	esac
done
if [ -z "$BIN" ]; then
	BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/celer-vhost
	[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release -p celer-vhost)
fi
CELER_DEVICE=${CELER_DEVICE:-file:$FILE}
SERVE=("$BIN" serve)
[ "$(basename "$BIN")" = celer ] && SERVE=("$BIN" vhost serve)
"$HERE/build-guest.sh" >&2
mkdir -p "$(dirname "$FILE")"
[ -s "$FILE" ] || { dd if=/dev/urandom of="$FILE" bs=1M count=1024 status=none; sync; }
OUT=$(mktemp -d /tmp/celer-guest-bench.XXXXXX)
SOCK=$OUT/celer.sock
PRESET=qd1-randread,qd32-randread,qd1-randwrite
COMMON=(--smp "$QUEUES" --mem 512 --runtime "$RUNTIME" --preset "$PRESET")
CELER=""
trap '[ -n "$CELER" ] && kill $CELER 2>/dev/null; wait 2>/dev/null || true' EXIT

run_celer() { # OUTDIR
	rm -f "$SOCK"
	"${SERVE[@]}" --socket "$SOCK" --device "$CELER_DEVICE" --queues "$QUEUES" >>"$OUT/celer.log" 2>&1 &
	CELER=$!
	for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
	"$HERE/run-guest.sh" --disk "vhost:$SOCK,queues=$QUEUES" "${COMMON[@]}" --out "$1" >/dev/null
	kill $CELER; wait $CELER 2>/dev/null || true
	CELER=""
}
run_qsd() { # OUTDIR
	"$HERE/run-guest.sh" --disk "qsd:$FILE,queues=$QUEUES" "${COMMON[@]}" --out "$1" >/dev/null
}

for r in $(seq "$REPEAT"); do
	if [ $((r % 2)) = 1 ]; then
		run_celer "$OUT/celer.$r"; run_qsd "$OUT/qsd.$r"
	else
		run_qsd "$OUT/qsd.$r"; run_celer "$OUT/celer.$r"
	fi
done
echo "in-guest fio, TCG, $QUEUES queue(s), Celer ${CELER_DEVICE%%,*} vs qsd file $FILE, ${RUNTIME}s per job, $REPEAT round(s)"
for t in celer qsd; do
	echo "== $t (round 1)"
	column -t -s $'\t' "$OUT/$t.1/summary.tsv"
done
echo "== ratios (celer / qsd): per round, then the median"
for r in $(seq "$REPEAT"); do
	paste "$OUT/celer.$r/summary.tsv" "$OUT/qsd.$r/summary.tsv" | awk -F'\t' -v r="$r" 'NR > 1 {
		j = $1; sub(/^vda-/, "", j); printf "%s\t%s\t%s\t%.3f\t%.3f\n", j, $2, r, $3 / $12, $5 / $14 }'
done | sort -k1,1 -k4,4n | awk -F'\t' '
	{ n[$1]++; iops[$1, n[$1]] = $4; dir[$1] = $2; rounds[$1] = rounds[$1] sprintf(" %.2f", $4) }
	END { for (j in n) { m = iops[j, int((n[j] + 1) / 2)]
		printf "  %-14s %-5s IOPS median %.2fx  (all rounds, sorted:%s)\n", j, dir[j], m, rounds[j] } }' | sort
rm -rf "$OUT"
