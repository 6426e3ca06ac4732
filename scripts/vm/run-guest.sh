#!/bin/bash
# run-guest.sh - boot a throw-away QEMU guest (Debian 6.1 kernel + busybox
# initramfs, built by build-guest.sh) and run fio INSIDE it against
# virtio-blk and/or vhost-user-blk disks; print a latency/IOPS summary.
#
# Usage:
#   run-guest.sh [options] --disk SPEC [--disk SPEC ...] \
#                    (--preset NAME | --job FILE | --fio 'ARGS' | --cmd FILE)
#
# Disk SPECs (1st --disk is /dev/vda in the guest, 2nd /dev/vdb, ...):
#   file:PATH[,size=1G][,aio=io_uring|native|threads][,cache=none|writeback|unsafe]
#            [,queues=N][,iothread=on|off]
#       QEMU's own virtio-blk-pci backed by host file PATH (created, fully
#       preallocated, if missing).  Default cache=none (O_DIRECT), aio=io_uring,
#       iothread=on (a dedicated QEMU iothread per disk).
#   qsd:PATH[,size=1G][,aio=io_uring|native|threads][,queues=N][,sock=SOCKET]
#       [,cpus=LIST][,writethrough=on|off]
#       vhost-user-blk-pci whose backend is qemu-storage-daemon exporting PATH
#       (O_DIRECT) on a Unix socket; started and stopped by this script.
#       cpus=LIST pins the daemon with taskset -c LIST (e.g. cpus=1).
#       writethrough=on: the export shows no volatile cache and makes every
#       write durable before completing it (as Celer's durable mode);
#       default off (the guest sees a write-back cache and sends flushes).
#       locking=off lets two daemons open PATH (a migration's two sides).
#   vhost:SOCKET[,queues=N]
#       vhost-user-blk-pci connected to an ALREADY RUNNING external backend
#       listening on SOCKET (e.g. celer-vhost serve). The chardev reconnects
#       (reconnect=1), so the backend may be restarted while the guest runs.
#   rbd:POOL/IMAGE[,conf=CEPH_CONF][,user=NAME]
#       virtio-blk-pci on QEMU's own librbd driver, as a VM on Ceph RBD runs
#       (needs the host package qemu-block-extra of QEMU's version; the
#       image must exist: scripts/peers/ceph/ceph-up.sh makes rbd/peer).
#       conf defaults to $CEPH_CONF or /etc/ceph/ceph.conf, user to admin.
#   queues defaults to --smp (QEMU's own default for both device types).
#   qsize=N sets the virtqueue size for any kind (default 256 for all, so that
#   virtio-blk and vhost-user-blk are compared alike; QEMU's own default for
#   vhost-user-blk-pci is 128).
#
# What fio runs:
#   --preset NAME   built-in jobs, run one after the other on EVERY disk:
#                     qd1-randread   4k randread  iodepth=1  numjobs=1
#                     qd32-randread  4k randread  iodepth=32 numjobs=1
#                     qd1-randwrite  4k randwrite iodepth=1  numjobs=1
#                     mq-randread    4k randread  iodepth=32 numjobs=<smp>, one
#                                    job pinned per vCPU, group_reporting
#                     std = qd1-randread,qd32-randread,qd1-randwrite
#                     all = std + mq-randread
#                   (comma-separated lists are accepted)
#   --job FILE      your fio job file (use /dev/vda, /dev/vdb, ... as filename)
#   --fio 'ARGS'    extra fio command-line arguments (parsed by the guest's sh),
#                   alone or together with --job / --preset
#   --cmd FILE      run this shell script in the guest instead of fio (cwd is
#                   the result directory: files it writes there come back in
#                   --out); the run fails if it exits non-zero
#   --runtime S     preset runtime per job in seconds (default 10)
#   --ramp S        preset ramp_time (default 1)
#   --engine E      preset ioengine: libaio (default) or io_uring
#   --bs B          preset block size (default 4k)
#
# VM options:
#   --smp N         vCPUs (default 2)
#   --mem MiB       guest RAM (default 1024), always a shared memfd backend
#                   (mandatory for vhost-user)
#   --accel A       auto (default) | kvm | tcg.  auto picks kvm only when a
#                   hardware KVM module (kvm_intel/kvm_amd) is loaded.  On hosts
#                   whose /dev/kvm is PVM (kvm_pvm, e.g. some Firecracker
#                   sandboxes) the stock Debian kernel cannot boot -> TCG.
#   --qemu-cpus L   pin QEMU (all its threads) with taskset -c L, e.g. 0
#   --append 'ARGS' extra guest kernel command line
#   --timeout S     kill QEMU after S seconds (default: derived from the jobs)
#   --qmp PATH      QMP monitor on Unix socket PATH (e.g. to migrate the VM)
#   --incoming URI  start as a live migration's destination (e.g.
#                   unix:/tmp/mig.sock); same disks and --cmd as the source
#   --out DIR       results directory (default $CELER_VM_DIR/runs/<date>-<pid>)
#   --verbose       stream the guest console to stderr
#
# Results in --out DIR: console.log (guest serial console), results.raw (2nd
# serial port), fio.json, guest-info.txt, interrupts.txt, summary.tsv,
# qemu-cmdline.txt, qsd*.log.  Exit status: 0 when the guest ran fio and fio
# succeeded.
#
# Examples:
#   ./run-guest.sh --disk file:/tmp/celer-vm/disk.img --preset std
#   ./run-guest.sh --disk qsd:/tmp/celer-vm/disk2.img,queues=2 --smp 2 --preset all
#   my-backend --socket /tmp/vub.sock & \
#     ./run-guest.sh --disk vhost:/tmp/vub.sock,queues=1 --job my.fio
set -euo pipefail

CELER_VM_DIR=${CELER_VM_DIR:-/tmp/celer-vm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[run-guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

DISKS=() PRESET="" JOB="" FIO_ARGS="" CMD="" RUNTIME=10 RAMP=1 ENGINE=libaio BS=4k
SMP=2 MEM=1024 ACCEL=auto APPEND="" TIMEOUT="" OUTDIR="" VERBOSE=0 QEMU_CPUS=""
QMP="" INCOMING=""
while [ $# -gt 0 ]; do
	case $1 in
	--disk) DISKS+=("$2"); shift 2 ;;
	--preset) PRESET=$2; shift 2 ;;
	--job) JOB=$2; shift 2 ;;
	--fio) FIO_ARGS=$2; shift 2 ;;
	--cmd) CMD=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--ramp) RAMP=$2; shift 2 ;;
	--engine) ENGINE=$2; shift 2 ;;
	--bs) BS=$2; shift 2 ;;
	--smp) SMP=$2; shift 2 ;;
	--mem) MEM=$2; shift 2 ;;
	--accel) ACCEL=$2; shift 2 ;;
	--append) APPEND=$2; shift 2 ;;
	--qemu-cpus) QEMU_CPUS=$2; shift 2 ;;
	--timeout) TIMEOUT=$2; shift 2 ;;
	--qmp) QMP=$2; shift 2 ;;
	--incoming) INCOMING=$2; shift 2 ;;
	--out) OUTDIR=$2; shift 2 ;;
	--verbose) VERBOSE=1; shift ;;
	-h | --help) usage 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done
[ ${#DISKS[@]} -gt 0 ] || die "at least one --disk is required (see --help)"
[ -n "$PRESET$JOB$FIO_ARGS$CMD" ] || die "one of --preset, --job, --fio, --cmd is required"
[ -z "$CMD" ] || [ -f "$CMD" ] || die "guest script $CMD not found"
[ -z "$JOB" ] || [ -f "$JOB" ] || die "job file $JOB not found"
[ "$(id -u)" = 0 ] || die "must run as root"

# ------------------------------------------------------------ prerequisites -
IMG="$CELER_VM_DIR/out"
if [ ! -s "$IMG/initramfs.cpio.gz" ] || ! command -v qemu-system-x86_64 >/dev/null ||
	! command -v qemu-storage-daemon >/dev/null || ! command -v jq >/dev/null; then
	log "guest image or host tools missing, running build-guest.sh"
	CELER_VM_DIR=$CELER_VM_DIR "$HERE/build-guest.sh"
fi
KERNEL="$IMG/vmlinux"
[ -s "$KERNEL" ] || KERNEL="$IMG/vmlinuz"

if [ "$ACCEL" = auto ]; then
	if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
		ACCEL=kvm
	else
		ACCEL=tcg
		if [ -d /sys/module/kvm_pvm ]; then
			log "NOTE: /dev/kvm is kvm_pvm (PVM, no VMX/SVM): it needs a PVM-enabled guest kernel" \
				"(CONFIG_PVM_GUEST); a stock kernel runs in KVM's instruction emulator and dies" \
				"with 'KVM internal error ... emulation failure'. Using TCG."
		else
			log "NOTE: no hardware KVM available, using TCG"
		fi
	fi
fi
case $ACCEL in
kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;;
tcg) ACCEL_ARGS=(-accel tcg,thread=multi -cpu max) ;;
*) die "--accel must be auto, kvm or tcg" ;;
esac

OUTDIR=${OUTDIR:-$CELER_VM_DIR/runs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR"/{console.log,results.raw,fio.json,guest-info.txt,interrupts.txt,summary.tsv,done.txt}

# ------------------------------------------------------------ cleanup -------
QSD_PIDS=() QEMU_PID="" WATCH_PIDS=()
cleanup() {
	local p
	[ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
	for p in "${QSD_PIDS[@]}" "${WATCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${QSD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ disks ---------
opt() { # opt "k=v,k2=v2" key default
	local kv list
	IFS=, read -ra list <<<"$1"
	for kv in "${list[@]}"; do [ "${kv%%=*}" = "$2" ] && { echo "${kv#*=}"; return; }; done
	echo "$3"
}
ensure_image() { # PATH SIZE
	if [ ! -e "$1" ]; then
		log "creating $1 ($2, fully preallocated)"
		mkdir -p "$(dirname "$1")"
		qemu-img create -q -f raw -o preallocation=full "$1" "$2"
	fi
}
wait_socket() { # SOCK PID LOG
	local i
	for i in $(seq 100); do
		[ -S "$1" ] && return 0
		kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "qemu-storage-daemon exited"; }
		sleep 0.1
	done
	die "socket $1 did not appear"
}

DEV_ARGS=() DESCR=()
i=0
for spec in "${DISKS[@]}"; do
	kind=${spec%%:*} rest=${spec#*:}
	path=${rest%%,*} opts=""
	[ "$rest" != "$path" ] && opts=${rest#*,}
	q=$(opt "$opts" queues "$SMP")
	qs=$(opt "$opts" qsize 256) # virtqueue size (QEMU defaults: virtio-blk 256, vhost-user-blk 128)
	slot=$(printf '0x%x' $((0x10 + i)))
	vd=vd$(printf "\\x$(printf %x $((0x61 + i)))")
	case $kind in
	file)
		path=$(realpath -m "$path")
		ensure_image "$path" "$(opt "$opts" size 1G)"
		aio=$(opt "$opts" aio io_uring)
		case $(opt "$opts" cache none) in
		none) cache="cache.direct=on,cache.no-flush=off" ;;
		writeback) cache="cache.direct=off,cache.no-flush=off" ;;
		unsafe) cache="cache.direct=off,cache.no-flush=on" ;;
		*) die "bad cache= in $spec" ;;
		esac
		dev="virtio-blk-pci,drive=file$i,id=vblk$i,num-queues=$q,queue-size=$qs,addr=$slot"
		if [ "$(opt "$opts" iothread on)" = on ]; then
			DEV_ARGS+=(-object "iothread,id=io$i")
			dev+=",iothread=io$i"
		fi
		DEV_ARGS+=(-blockdev "driver=file,node-name=file$i,filename=$path,$cache,aio=$aio"
			-device "$dev")
		DESCR+=("$vd: virtio-blk-pci file=$path aio=$aio cache=$(opt "$opts" cache none) queues=$q qsize=$qs iothread=$(opt "$opts" iothread on)")
		;;
	qsd)
		path=$(realpath -m "$path")
		ensure_image "$path" "$(opt "$opts" size 1G)"
		aio=$(opt "$opts" aio io_uring)
		sock=$(opt "$opts" sock "$OUTDIR/qsd$i.sock")
		rm -f "$sock"
		qsd_cmd=()
		[ -n "$(opt "$opts" cpus "")" ] && qsd_cmd=(taskset -c "$(opt "$opts" cpus "")")
		qsd_cmd+=(qemu-storage-daemon
			--blockdev "driver=file,node-name=file$i,filename=$path,cache.direct=on,aio=$aio,locking=$(opt "$opts" locking auto)"
			--export "type=vhost-user-blk,id=exp$i,node-name=file$i,addr.type=unix,addr.path=$sock,writable=on,writethrough=$(opt "$opts" writethrough off),num-queues=$q")
		echo "${qsd_cmd[*]}" >"$OUTDIR/qsd$i.cmdline"
		"${qsd_cmd[@]}" >"$OUTDIR/qsd$i.log" 2>&1 &
		QSD_PIDS+=($!)
		wait_socket "$sock" $! "$OUTDIR/qsd$i.log"
		DEV_ARGS+=(-chardev "socket,id=vuc$i,path=$sock"
			-device "vhost-user-blk-pci,chardev=vuc$i,id=vub$i,num-queues=$q,queue-size=$qs,addr=$slot")
		DESCR+=("$vd: vhost-user-blk-pci <- qemu-storage-daemon(pid ${QSD_PIDS[-1]}) file=$path aio=$aio writethrough=$(opt "$opts" writethrough off) queues=$q qsize=$qs")
		;;
	vhost)
		[ -S "$path" ] || die "$path is not a listening Unix socket (start the backend first)"
		DEV_ARGS+=(-chardev "socket,id=vuc$i,path=$path,reconnect=1"
			-device "vhost-user-blk-pci,chardev=vuc$i,id=vub$i,num-queues=$q,queue-size=$qs,addr=$slot")
		DESCR+=("$vd: vhost-user-blk-pci <- external backend socket=$path queues=$q qsize=$qs")
		;;
	rbd)
		conf=$(opt "$opts" conf "${CEPH_CONF:-/etc/ceph/ceph.conf}")
		pool=${path%%/*} image=${path#*/}
		[ -n "$pool" ] && [ -n "$image" ] && [ "$pool" != "$path" ] || die "rbd:POOL/IMAGE expected, got $spec"
		[ -r "$conf" ] || die "Ceph configuration $conf not readable (conf=FILE or CEPH_CONF)"
		ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 ||
			die "QEMU's rbd driver is missing: apt-get install qemu-block-extra (of QEMU's version, e.g. from bookworm-backports)"
		DEV_ARGS+=(-blockdev "driver=rbd,node-name=rbd$i,pool=$pool,image=$image,conf=$conf,user=$(opt "$opts" user admin),cache.direct=on"
			-device "virtio-blk-pci,drive=rbd$i,id=vblk$i,num-queues=$q,queue-size=$qs,addr=$slot")
		DESCR+=("$vd: virtio-blk-pci <- QEMU librbd pool=$pool image=$image conf=$conf queues=$q qsize=$qs")
		;;
	*) die "unknown disk kind '$kind' in $spec (file:, qsd:, vhost:, rbd:)" ;;
	esac
	i=$((i + 1))
done
NDISKS=$i

# ------------------------------------------------------------ fio job -------
OV="$OUTDIR/overlay"
rm -rf "$OV" && mkdir -p "$OV/vmh"
JOBFILES=""
if [ -n "$PRESET" ]; then
	PRESETS=${PRESET//std/qd1-randread,qd32-randread,qd1-randwrite}
	PRESETS=${PRESETS//all/qd1-randread,qd32-randread,qd1-randwrite,mq-randread}
	{
		printf '[global]\nioengine=%s\ndirect=1\nbs=%s\ntime_based=1\nruntime=%s\nramp_time=%s\n' \
			"$ENGINE" "$BS" "$RUNTIME" "$RAMP"
		printf 'randrepeat=0\nnorandommap=1\nstonewall=1\n'
		for ((d = 0; d < NDISKS; d++)); do
			vd=vd$(printf "\\x$(printf %x $((0x61 + d)))")
			IFS=, read -ra plist <<<"$PRESETS"
			for p in "${plist[@]}"; do
				printf '\n[%s-%s]\nfilename=/dev/%s\n' "$vd" "$p" "$vd"
				case $p in
				qd1-randread) printf 'rw=randread\niodepth=1\nnumjobs=1\n' ;;
				qd32-randread) printf 'rw=randread\niodepth=32\nnumjobs=1\n' ;;
				qd1-randwrite) printf 'rw=randwrite\niodepth=1\nnumjobs=1\n' ;;
				mq-randread) printf 'rw=randread\niodepth=32\nnumjobs=%s\ncpus_allowed=0-%s\ncpus_allowed_policy=split\ngroup_reporting=1\n' "$SMP" $((SMP - 1)) ;;
				*) die "unknown preset $p" ;;
				esac
			done
		done
	} >"$OV/vmh/preset.fio"
	cp "$OV/vmh/preset.fio" "$OUTDIR/preset.fio"
	JOBFILES+=" /vmh/preset.fio"
	NJOBS=$((NDISKS * $(awk -F, '{print NF}' <<<"$PRESETS")))
	EST=$((NJOBS * (RUNTIME + RAMP + 2)))
fi
if [ -n "$JOB" ]; then
	cp "$JOB" "$OV/vmh/job.fio"
	JOBFILES+=" /vmh/job.fio"
	EST=${EST:-0}
	EST=$((EST + 600))
fi
EST=${EST:-600}
if [ -n "$CMD" ]; then
	cp "$CMD" "$OV/vmh/cmd.sh"
else
cat >"$OV/vmh/cmd.sh" <<EOF
fio --output-format=json --output=fio.json --eta=never $FIO_ARGS $JOBFILES
rc=\$?
grep -i virtio /proc/interrupts > interrupts.txt
exit \$rc
EOF
fi
(cd "$OV" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$OUTDIR/overlay.cpio.gz"
cat "$IMG/initramfs.cpio.gz" "$OUTDIR/overlay.cpio.gz" >"$OUTDIR/initrd.img"

# ------------------------------------------------------------ QEMU ----------
# Kernel args: quiet serial console; the rest trims boot time (matters most
# under TCG: ~2.7 s to /init instead of ~5 s).
CMDLINE="console=ttyS0 quiet panic=-1 vmh.disks=$NDISKS vmh.sched=none mitigations=off"
CMDLINE+=" tsc=reliable no_timer_check nokaslr audit=0 random.trust_cpu=on cryptomgr.notests"
CMDLINE+=" rcupdate.rcu_expedited=1 $APPEND"
BIOS=()
[ -f /usr/share/qemu/qboot.rom ] && BIOS=(-bios /usr/share/qemu/qboot.rom) # faster than SeaBIOS
QEMU_CMD=()
[ -n "$QEMU_CPUS" ] && QEMU_CMD=(taskset -c "$QEMU_CPUS")
QEMU_CMD+=(qemu-system-x86_64 -name vmh-guest -nodefaults -no-user-config -display none -no-reboot
	"${ACCEL_ARGS[@]}" "${BIOS[@]}"
	-machine q35,memory-backend=mem -smp "$SMP" -m "${MEM}M"
	-object "memory-backend-memfd,id=mem,size=${MEM}M,share=on"
	-kernel "$KERNEL" -initrd "$OUTDIR/initrd.img" -append "$CMDLINE"
	-serial "file:$OUTDIR/console.log" -serial "file:$OUTDIR/results.raw"
	"${DEV_ARGS[@]}")
[ -n "$QMP" ] && QEMU_CMD+=(-qmp "unix:$QMP,server=on,wait=off")
[ -n "$INCOMING" ] && QEMU_CMD+=(-incoming "$INCOMING")
printf '%q ' "${QEMU_CMD[@]}" >"$OUTDIR/qemu-cmdline.txt"
echo >>"$OUTDIR/qemu-cmdline.txt"
if [ -z "$TIMEOUT" ]; then
	TIMEOUT=$((EST + 120))
	[ "$ACCEL" = tcg ] && TIMEOUT=$((EST * 2 + 120))
fi

log "accel=$ACCEL smp=$SMP mem=${MEM}M kernel=$(basename "$KERNEL") out=$OUTDIR"
for d in "${DESCR[@]}"; do log "  $d"; done
: >"$OUTDIR/console.log"
T_START=$(date +%s.%N)
timeout -s TERM "$TIMEOUT" "${QEMU_CMD[@]}" >"$OUTDIR/qemu.log" 2>&1 &
QEMU_PID=$! # the timeout(1) wrapper; it forwards TERM to QEMU
( # record when the guest's /init starts (host clock)
	while ! grep -q 'VMH: init started' "$OUTDIR/console.log" 2>/dev/null; do
		kill -0 $QEMU_PID 2>/dev/null || exit 0
		sleep 0.05
	done
	date +%s.%N >"$OUTDIR/.t_init"
) &
WATCH_PIDS+=($!)
if [ $VERBOSE = 1 ]; then
	tail -n +1 -f --pid=$QEMU_PID "$OUTDIR/console.log" >&2 &
	WATCH_PIDS+=($!)
fi
QEMU_RC=0
wait $QEMU_PID || QEMU_RC=$?
[ $QEMU_RC = 124 ] && log "QEMU killed after --timeout ${TIMEOUT}s"
QEMU_PID=""
T_END=$(date +%s.%N)
sleep 0.2
rm -rf "$OUTDIR/initrd.img" "$OV" # reproducible; keep overlay.cpio.gz for reference

# ------------------------------------------------------------ results -------
[ -f "$OUTDIR/results.raw" ] || : >"$OUTDIR/results.raw"
awk -v dir="$OUTDIR" '
	{ sub(/\r$/, "") }
	/^=====VMH-FILE-BEGIN [A-Za-z0-9._-]+=====$/ {
		f = $2; sub(/=====$/, "", f); f = dir "/" f; printf "" > f; next }
	/^=====VMH-FILE-END / { if (f != "") close(f); f = ""; next }
	/^=====VMH-DONE/ { print > (dir "/done.txt"); next }
	f != "" { print >> f }' "$OUTDIR/results.raw"

if [ ! -s "$OUTDIR/done.txt" ]; then
	log "guest did not finish (qemu rc=$QEMU_RC). Last console lines:"
	tail -n 30 "$OUTDIR/console.log" >&2 || true
	cat "$OUTDIR/qemu.log" >&2 || true
	exit 1
fi
FIO_RC=$(sed -n 's/.*rc=\([^ ]*\) .*/\1/p' "$OUTDIR/done.txt")
INIT_UP=$(sed -n 's/.*init_start=\([^ ]*\) .*/\1/p' "$OUTDIR/done.txt")
CMD_END=$(sed -n 's/.*cmd_end=\([^=]*\)=====.*/\1/p' "$OUTDIR/done.txt")
T_INIT=$(cat "$OUTDIR/.t_init" 2>/dev/null || echo "$T_START")
awk -v s="$T_START" -v i="$T_INIT" -v e="$T_END" -v gu="$INIT_UP" -v ce="$CMD_END" 'BEGIN {
	printf "timing: QEMU start -> guest /init %.2fs (guest kernel uptime at /init %.2fs), " \
	       "fio phase %.2fs, total QEMU wall %.2fs\n", i - s, gu, ce - gu, e - s }' | tee "$OUTDIR/timing.txt" >&2
sed 's/^/guest: /' "$OUTDIR/guest-info.txt" >&2 || true

if [ -n "$CMD" ]; then
	[ "$FIO_RC" = 0 ] || { log "guest script exited with $FIO_RC; console tail:"; tail -n 30 "$OUTDIR/console.log" >&2; exit 1; }
	log "guest script succeeded; results in $OUTDIR"
	exit 0
fi
if [ ! -s "$OUTDIR/fio.json" ] || ! jq -e . "$OUTDIR/fio.json" >/dev/null 2>&1; then
	log "no valid fio.json (fio rc=$FIO_RC); guest console tail:"
	tail -n 30 "$OUTDIR/console.log" >&2
	exit 1
fi
{
	printf 'job\tdir\tiops\tMiB/s\tlat_mean_us\tclat_p50_us\tclat_p99_us\tclat_p99.9_us\tlat_max_us\n'
	jq -r '.jobs[] | . as $j | ("read", "write") as $d | $j[$d] | select(.total_ios > 0) |
		[$j.jobname, $d, (.iops | floor), ((.bw_bytes / 1048576 * 10 | floor) / 10),
		 ((.lat_ns.mean / 100 | floor) / 10),
		 ((.clat_ns.percentile["50.000000"] // 0) / 1000 | floor),
		 ((.clat_ns.percentile["99.000000"] // 0) / 1000 | floor),
		 ((.clat_ns.percentile["99.900000"] // 0) / 1000 | floor),
		 (.lat_ns.max / 1000 | floor)] | @tsv' "$OUTDIR/fio.json"
} >"$OUTDIR/summary.tsv"
column -t -s $'\t' "$OUTDIR/summary.tsv" 2>/dev/null || cat "$OUTDIR/summary.tsv"
[ "$FIO_RC" = 0 ] || { log "fio exited with $FIO_RC"; exit 1; }
log "results in $OUTDIR"
