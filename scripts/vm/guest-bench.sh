#!/bin/bash
# guest-bench.sh - in-guest fio (QEMU TCG) on a vhost-user-blk disk served by
# Celer, then by qemu-storage-daemon over a local file (durable per write,
# writethrough=on, as Celer), and optionally Ceph RBD through QEMU's librbd,
# in one run. Prints the fio summaries, medians and the ratios. TCG dominates the numbers (the
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
#   --repeat   rounds (default 1); the order rotates (Celer, qsd[, rbd] in
#              round 1, qsd first in round 2, ...) and medians are shown
#   --qsd-writethrough on|off  qsd's durability (default on: every write
#              durable before it completes, as Celer's durable mode)
#   --rbd POOL/IMAGE[,conf=FILE]  also Ceph RBD through QEMU's librbd (the
#              image is overwritten; scripts/peers/ceph/ceph-up.sh makes
#              rbd/peer with conf /var/tmp/celer-ceph/ceph.conf); installs
#              QEMU's rbd driver (build-guest.sh --with-rbd) if missing
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN="" FILE=/tmp/celer-vm/bench.img RUNTIME=5 QUEUES=1 REPEAT=1 CELER_DEVICE="" QSD_WT=on RBD=""
while [ $# -gt 0 ]; do
	case $1 in
	--bin) BIN=$2; shift 2 ;;
	--file) FILE=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--queues) QUEUES=$2; shift 2 ;;
	--repeat) REPEAT=$2; shift 2 ;;
	--celer-device) CELER_DEVICE=$2; shift 2 ;;
	--qsd-writethrough) QSD_WT=$2; shift 2 ;;
	--rbd) RBD=$2; shift 2 ;;
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
# A cluster volume is attached exclusively and a back end keeps its
# attachment when stopped (for restarts): each round's back end resumes it
# from this file instead of being refused.
case $CELER_DEVICE in cluster:*) CELER_DEVICE+=",attachment-file=$OUT/celer.attachment" ;; esac
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
	"$HERE/run-guest.sh" --disk "qsd:$FILE,queues=$QUEUES,writethrough=$QSD_WT" "${COMMON[@]}" --out "$1" >/dev/null
}
run_rbd() { # OUTDIR
	"$HERE/run-guest.sh" --disk "rbd:$RBD,queues=$QUEUES" "${COMMON[@]}" --out "$1" >/dev/null
}

case $QSD_WT in on | off) ;; *) echo "--qsd-writethrough on|off" >&2; exit 2 ;; esac
TARGETS=(celer qsd)
if [ -n "$RBD" ]; then
	TARGETS+=(rbd)
	"$HERE/build-guest.sh" --host-only --with-rbd >&2
fi
N=${#TARGETS[@]}
for r in $(seq "$REPEAT"); do
	for k in $(seq 0 $((N - 1))); do
		t=${TARGETS[$(((r - 1 + k) % N))]}
		"run_$t" "$OUT/$t.$r"
	done
done
echo "in-guest fio, TCG, $QUEUES queue(s), ${RUNTIME}s per job, $REPEAT round(s): Celer ${CELER_DEVICE%%,*}; qsd file $FILE writethrough=$QSD_WT${RBD:+; Ceph RBD $RBD (librbd)}"
for t in "${TARGETS[@]}"; do
	echo "== $t (round 1)"
	column -t -s $'\t' "$OUT/$t.1/summary.tsv"
done
# Median over rounds of a target's IOPS and mean latency per job.
medians() { # TARGET
	for r in $(seq "$REPEAT"); do
		awk -F'\t' 'NR > 1 { j = $1; sub(/^vda-/, "", j); printf "%s\t%s\t%s\t%s\n", j, $2, $3, $5 }' "$OUT/$1.$r/summary.tsv"
	done | sort -k1,1 | awk -F'\t' '
		{ n[$1]++; iops[$1, n[$1]] = $3; lat[$1, n[$1]] = $4; dir[$1] = $2 }
		function med(a, j, k, i, m, t, v) { for (i = 1; i <= n[j]; i++) v[i] = a[j, i]
			for (i = 1; i <= n[j]; i++) for (k = i + 1; k <= n[j]; k++) if (v[k] < v[i]) { t = v[i]; v[i] = v[k]; v[k] = t }
			return v[int((n[j] + 1) / 2)] }
		END { for (j in n) printf "%s\t%s\t%s\t%s\n", j, dir[j], med(iops, j), med(lat, j) }' | sort
}
for t in "${TARGETS[@]}"; do medians "$t" >"$OUT/$t.median"; done
echo "== medians over rounds: IOPS and mean latency (µs); ratios are Celer's over the peer's latency"
{
	printf 'job\tdir'
	for t in "${TARGETS[@]}"; do printf '\t%s IOPS\t%s µs' "$t" "$t"; done
	for t in "${TARGETS[@]:1}"; do printf '\tceler/%s lat' "$t"; done
	printf '\n'
	cut -f1,2 "$OUT/celer.median" | while IFS=$'\t' read -r j d; do
		printf '%s\t%s' "$j" "$d"
		for t in "${TARGETS[@]}"; do awk -F'\t' -v j="$j" '$1 == j { printf "\t%s\t%s", $3, $4 }' "$OUT/$t.median"; done
		cl=$(awk -F'\t' -v j="$j" '$1 == j { print $4 }' "$OUT/celer.median")
		for t in "${TARGETS[@]:1}"; do
			awk -F'\t' -v j="$j" -v c="$cl" '$1 == j { printf "\t%.2fx", c / $4 }' "$OUT/$t.median"
		done
		printf '\n'
	done
} | column -t -s $'\t'
rm -rf "$OUT"
