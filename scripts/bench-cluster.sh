#!/usr/bin/env bash
# bench-cluster.sh - Celer on a 3-replica cluster against its peers, in one run:
#
#  1. `celer bench cluster --ceph`: a control service and 3 storage-node
#     processes on this machine (one disk file each, same disk), 4 KiB
#     randwrite/randread at QD1 and QD32 through celer-client, beside the
#     Ceph 16 peer (scripts/peers/ceph: 3 BlueStore OSDs, size 3, fio rbd)
#     and the physical floor (fio durable write + O_DIRECT read on the same
#     disk, loopback TCP round trip), with the ratios and the issue's targets.
#  2. In a QEMU guest (scripts/vm/guest-bench.sh): fio on the same Celer
#     volume served by `celer vhost serve --device cluster:...`, beside
#     qemu-storage-daemon serving a local file with writethrough=on (durable
#     per write, as Celer) and the Ceph peer's image through QEMU's librbd
#     (run while the cluster of the last round is still up, through
#     `celer bench cluster --exec`).
#
# Usage: scripts/bench-cluster.sh [--runtime S] [--repeat N] [--guest-runtime S]
#          [--guest-repeat N] [--guest-queues N] [--no-guest] [--keep-ceph]
#          [-- extra `celer bench cluster` arguments]
#   --runtime S        seconds per workload (default 10)
#   --repeat N         bench rounds (default 1; the machine is noisy: 3 is better)
#   --guest-runtime S  seconds per in-guest fio job (default 5)
#   --guest-repeat N   in-guest rounds, alternating who goes first (default 1)
#   --guest-queues N   virtqueues / vCPUs of the guest disk (default 1)
#   --no-guest         skip the in-guest comparison
#   --keep-ceph        leave the Ceph peer running at the end (a peer that was
#                      already running is always left running)
# Output: printed, and kept in $OUT_DIR (default
# /var/tmp/celer-bench-cluster/results/<date>).
# Needs root (QEMU guest, apt for the Ceph packages on first use).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=10 REPEAT=1 GUEST_RUNTIME=5 GUEST_REPEAT=1 GUEST_QUEUES=1 GUEST=1 KEEP_CEPH=0
EXTRA=()
while [ $# -gt 0 ]; do
	case $1 in
	--runtime) RUNTIME=$2; shift 2 ;;
	--repeat) REPEAT=$2; shift 2 ;;
	--guest-runtime) GUEST_RUNTIME=$2; shift 2 ;;
	--guest-repeat) GUEST_REPEAT=$2; shift 2 ;;
	--guest-queues) GUEST_QUEUES=$2; shift 2 ;;
	--no-guest) GUEST=0; shift ;;
	--keep-ceph) KEEP_CEPH=1; shift ;;
	--) shift; EXTRA=("$@"); break ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done

log() { printf '[bench-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
export CEPH_BASE=${CEPH_BASE:-/var/tmp/celer-ceph}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/celer
if [ ! -x "$BIN" ]; then
	log "building $BIN"
	(cd "$ROOT" && cargo build --release -p celer)
fi
OUT_DIR=${OUT_DIR:-/var/tmp/celer-bench-cluster/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"

# The Ceph peer once for all rounds (bring-up is the slow part); stopped at
# the end if this script started it.
ceph_running() {
	local f p
	for f in "$CEPH_BASE"/run/osd.*.pid; do
		[ -e "$f" ] || return 1
		p=$(cat "$f")
		[ -d "/proc/$p" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -q -- "$CEPH_BASE/ceph.conf" && return 0
	done
	return 1
}
STARTED_CEPH=0
ceph_running || STARTED_CEPH=1
stop_ceph() {
	if [ $STARTED_CEPH = 1 ] && [ $KEEP_CEPH = 0 ]; then
		log "stopping the Ceph peer this script started"
		BASE=$CEPH_BASE bash "$ROOT/scripts/peers/ceph/ceph-down.sh" >&2 || true
	fi
}
trap stop_ceph EXIT
BASE=$CEPH_BASE IMAGE_SIZE=${IMAGE_SIZE:-1G} bash "$ROOT/scripts/peers/ceph/ceph-up.sh" >"$OUT_DIR/ceph-up.log" 2>&1 ||
	{ tail -30 "$OUT_DIR/ceph-up.log" >&2; log "ceph-up.sh failed"; exit 1; }
log "Ceph peer up ($CEPH_BASE); results go to $OUT_DIR"

GUEST_CMD='"$ROOT"/scripts/vm/guest-bench.sh --bin "$CELER_BIN" --celer-device "cluster:$CELER_VOLUME,meta=$CELER_META"'
GUEST_CMD+=" --runtime $GUEST_RUNTIME --repeat $GUEST_REPEAT --queues $GUEST_QUEUES"
# The Ceph peer's image in the guest too, through QEMU's librbd.
GUEST_CMD+=" --rbd rbd/peer,conf=$CEPH_BASE/ceph.conf"
for r in $(seq "$REPEAT"); do
	args=(bench cluster --ceph --runtime "$RUNTIME" --ceph-scripts "$ROOT/scripts/peers/ceph"
		--ceph-base "$CEPH_BASE" "${EXTRA[@]}")
	if [ "$GUEST" = 1 ] && [ "$r" = "$REPEAT" ]; then
		args+=(--exec "$GUEST_CMD")
	fi
	log "round $r of $REPEAT"
	ROOT=$ROOT "$BIN" "${args[@]}" 2> >(grep -v '^\[ceph-up\|^ \|^daemon\|^m[go][rn]\.\|^osd\.\|^$\|^export CEPH' >&2) |
		tee "$OUT_DIR/round-$r.txt"
done
if [ "$REPEAT" -gt 1 ]; then
	echo
	echo "== medians over $REPEAT rounds (each column on its own; ratios are medians of the per-round ratios)"
	python3 - "$OUT_DIR"/round-*.txt <<'PY'
import re, statistics, sys
rows = {}
for f in sys.argv[1:]:
    for line in open(f):
        m = re.match(r"^(rand(?:write|read) QD\d+(?: 2q)?)\s+(.*)$", line.rstrip())
        if not m:
            continue
        nums = [float(x) for x in re.findall(r"[\d.]+", m.group(2).replace("|", " "))]
        rows.setdefault(m.group(1), []).append(nums)
cols = ["IOPS", "mean", "p99", "node", "CPU/IO", "other", "Ceph IOPS", "mean", "p99", "CPU/IO", "other", "IOPS x", "lat /"]
print("%-18s" % "workload" + "".join("%10s" % c for c in cols))
for name, runs in rows.items():
    n = min(len(r) for r in runs)
    med = [statistics.median(r[i] for r in runs) for i in range(n)]
    print("%-18s" % name + "".join("%10.1f" % x for x in med))
PY
fi
log "done; results in $OUT_DIR"
