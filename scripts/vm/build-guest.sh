#!/bin/bash
# build-guest.sh - prepare everything needed to boot a throw-away QEMU guest
# (KVM or TCG) that runs fio, mkfs.ext4 and e2fsck against virtio-blk /
# vhost-user-blk disks (Celer's system tests and in-guest benchmarks).
#
# On a fresh Debian 12 (bookworm, amd64) host, as root:
#   1. installs host packages with apt: QEMU 10.x (qemu-system-x86 + qemu-utils,
#      which carries qemu-storage-daemon) from bookworm-backports, fio,
#      busybox-static, kmod, cpio, jq, and build tools for fio.  A private apt
#      config under $CELER_VM_DIR/apt is used; /etc/apt is not modified.
#   2. downloads the current Debian bookworm kernel (.deb that linux-image-amd64
#      depends on), extracts vmlinuz and the virtio modules.
#   3. builds a static, stripped fio (~2.8 MB, libaio + io_uring engines) from
#      the Debian fio source package (VMH_FIO=host instead copies the host's
#      /usr/bin/fio and its ~60 shared libraries: ~36 MB initramfs, much slower
#      to boot under TCG).
#   4. builds a minimal initramfs: static busybox, fio, mke2fs/e2fsck (with
#      their shared libraries), virtio_pci/virtio_blk/ext4 modules (+ deps in
#      modprobe order) and an /init that runs /vmh/cmd.sh
#      (supplied per run as an appended cpio by run-guest-fio.sh), dumps the
#      result files to the 2nd serial port and powers off.
#
# Outputs (in $CELER_VM_DIR/out, CELER_VM_DIR defaults to /tmp/celer-vm):
#   vmlinuz              guest kernel (bzImage)
#   vmlinux              same kernel, uncompressed ELF (booted via PVH: faster)
#   initramfs.cpio.gz    base initramfs (per-run jobs are appended as a 2nd cpio)
#   kernel.version       kernel release string
#
# Usage: build-guest.sh [--force] [--host-only] [--with-rbd]
#   --force      rebuild even if outputs exist
#   --host-only  only install host packages (QEMU etc.), do not build
#   --with-rbd   also install QEMU's rbd block driver (qemu-block-extra of the
#                installed QEMU's version), for rbd: disks (Ceph RBD)
set -euo pipefail

CELER_VM_DIR=${CELER_VM_DIR:-/tmp/celer-vm}
OUT="$CELER_VM_DIR/out"
APT_DIR="$CELER_VM_DIR/apt"
FORCE=0 HOST_ONLY=0 WITH_RBD=0
for a in "$@"; do
	case $a in
	--force) FORCE=1 ;;
	--host-only) HOST_ONLY=1 ;;
	--with-rbd) WITH_RBD=1 ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $a" >&2; exit 2 ;;
	esac
done

log() { printf '[build-guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
export PATH=$PATH:/usr/sbin:/sbin
mkdir -p "$CELER_VM_DIR" "$OUT"
# Several tests may start at once on a fresh machine: one builds, the others
# wait for it and then find everything cached.
exec 9>"$CELER_VM_DIR/.build.lock"
flock 9

# ---------------------------------------------------------------- apt -------
APT_OPTS=(
	-o "Dir::Etc::SourceList=$APT_DIR/sources.list"
	-o "Dir::Etc::SourceParts=/nonexistent"
	-o "Dir::State::Lists=$APT_DIR/lists"
	-o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
	-o "DPkg::Lock::Timeout=1200" # wait if someone else is running apt/dpkg
	-o "APT::Sandbox::User=root"
)
apt_mirror() { # $1: debian | debian-security -> the URI /etc/apt already uses for it
	grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
		grep -oE 'https?://[^ ]+' | grep -E "/$1/?\$" | head -1 || true
}
apt_updated=0
apt_update() {
	[ $apt_updated = 1 ] && return 0
	mkdir -p "$APT_DIR/lists/partial"
	local kr=/usr/share/keyrings/debian-archive-keyring.gpg
	# Mirrors: the ones this machine's own apt configuration already uses.
	local deb sec
	deb=$(apt_mirror debian) sec=$(apt_mirror debian-security)
	[ -n "$deb" ] || die "no Debian mirror found in /etc/apt"
	[ -n "$sec" ] || sec="${deb%/debian}/debian-security"
	cat >"$APT_DIR/sources.list" <<-EOF
		deb [signed-by=$kr] $deb bookworm main
		deb [signed-by=$kr] $deb bookworm-updates main
		deb [signed-by=$kr] $sec bookworm-security main
		deb [signed-by=$kr] $deb bookworm-backports main
		deb-src [signed-by=$kr] $deb bookworm main
		deb-src [signed-by=$kr] $sec bookworm-security main
	EOF
	if [ -z "$(find "$APT_DIR/lists" -maxdepth 1 -name '*backports*Packages*' -mmin -1440 2>/dev/null)" ] ||
		[ -z "$(find "$APT_DIR/lists" -maxdepth 1 -name '*Sources*' 2>/dev/null)" ]; then
		log "apt-get update (private lists in $APT_DIR)"
		apt-get "${APT_OPTS[@]}" update -qq || die "apt-get update failed"
	fi
	apt_updated=1
}
apt_install() {
	apt_update
	log "apt-get install $*"
	DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q \
		--no-install-recommends "$@" >"$CELER_VM_DIR/apt-install.log" 2>&1 ||
		{ tail -20 "$CELER_VM_DIR/apt-install.log" >&2; die "apt-get install failed"; }
}
pkg_version() { { dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null || true; } | awk '$1=="installed"{print $2}'; }

install_host_packages() {
	local need=() p
	# QEMU >= 8 from bookworm-backports (bookworm has 7.2; some images already
	# carry qemu-utils 10.x from backports, which conflicts with 7.2's
	# qemu-system-common, so we always go for backports).
	local qv; qv=$(pkg_version qemu-system-x86)
	local uv; uv=$(pkg_version qemu-utils)
	if [ -z "$qv" ] || dpkg --compare-versions "$qv" lt 1:8.0 ||
		[ -z "$uv" ] || dpkg --compare-versions "$uv" lt 1:8.0; then
		apt_update
		for p in qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios libbrlapi0.8; do
			# (captured first: grep -q closing the pipe early would fail it under pipefail)
			local pol; pol=$(apt-cache "${APT_OPTS[@]}" policy "$p" 2>/dev/null || true)
			if grep -q bookworm-backports <<<"$pol"; then
				need+=("$p/bookworm-backports")
			else
				need+=("$p")
			fi
		done
	fi
	# QEMU's rbd driver must be of QEMU's own version (its modules are
	# refused otherwise): from backports when QEMU is.
	if [ $WITH_RBD = 1 ] && [ -z "$(pkg_version qemu-block-extra)" ]; then
		apt_update
		local pol; pol=$(apt-cache "${APT_OPTS[@]}" policy qemu-block-extra 2>/dev/null || true)
		if grep -q bookworm-backports <<<"$pol"; then
			need+=("qemu-block-extra/bookworm-backports")
		else
			need+=("qemu-block-extra")
		fi
	fi
	for p in fio busybox-static kmod cpio jq gzip xz-utils build-essential libaio-dev zlib1g-dev e2fsprogs; do
		[ -n "$(pkg_version $p)" ] || need+=("$p")
	done
	if [ ${#need[@]} -gt 0 ]; then apt_install "${need[@]}"; fi
	[ -e /dev/kvm ] || log "WARNING: /dev/kvm missing, guests will run with TCG (slow)"
}

install_host_packages
[ $HOST_ONLY = 1 ] && exit 0

if [ $FORCE = 0 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
	log "already built: $OUT/vmlinuz $OUT/initramfs.cpio.gz (use --force to rebuild)"
	exit 0
fi

# ------------------------------------------------------------- kernel -------
apt_update
KPKG=$(apt-cache "${APT_OPTS[@]}" depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 dependency"
KREL=${KPKG#linux-image-}
log "guest kernel package: $KPKG"
mkdir -p "$CELER_VM_DIR/debs"
if ! ls "$CELER_VM_DIR/debs/${KPKG}_"*.deb >/dev/null 2>&1; then
	(cd "$CELER_VM_DIR/debs" && apt-get "${APT_OPTS[@]}" download -q "$KPKG" >/dev/null) ||
		die "apt-get download $KPKG failed"
fi
KDIR="$CELER_VM_DIR/kernel"
rm -rf "$KDIR"
dpkg-deb -x "$(ls "$CELER_VM_DIR/debs/${KPKG}_"*.deb | tail -1)" "$KDIR"
depmod -b "$KDIR" "$KREL" # .deb ships no modules.dep (generated by postinst)
cp "$KDIR/boot/vmlinuz-$KREL" "$OUT/vmlinuz"
# Also extract the uncompressed ELF vmlinux: QEMU boots it through the PVH entry
# point (CONFIG_PVH=y), which skips the in-guest XZ decompression (~8 s under
# TCG).  Same approach as the kernel's scripts/extract-vmlinux.
xzpos=$(LC_ALL=C grep -aboP '\xFD7zXZ\x00' "$OUT/vmlinuz" | head -1 | cut -d: -f1)
rm -f "$OUT/vmlinux"
if [ -n "$xzpos" ]; then
	tail -c +$((xzpos + 1)) "$OUT/vmlinuz" | xz -dc >"$OUT/vmlinux" 2>/dev/null || true
fi
if ! head -c 4 "$OUT/vmlinux" 2>/dev/null | grep -q ELF; then
	log "WARNING: could not extract vmlinux, run-guest-fio.sh will boot vmlinuz"
	rm -f "$OUT/vmlinux"
fi
echo "$KREL" >"$OUT/kernel.version"
KCONF="$KDIR/boot/config-$KREL"
for c in CONFIG_VIRTIO_PCI CONFIG_VIRTIO_BLK CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP CONFIG_DEVTMPFS CONFIG_IO_URING; do
	log "  $(grep -E "^$c=" "$KCONF" || echo "$c not set")"
done

# ----------------------------------------------------------- initramfs ------
ROOT="$CELER_VM_DIR/initramfs-root"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,modules,vmh,lib64}

# busybox (must be the static one from busybox-static) + applet symlinks
ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamically linked; install busybox-static"
cp /bin/busybox "$ROOT/bin/busybox"
for app in $(/bin/busybox --list); do
	[ -e "$ROOT/bin/$app" ] || ln -s busybox "$ROOT/bin/$app"
done

# fio
if [ "${VMH_FIO:-static}" = host ]; then
	# host fio + all its shared libraries (Debian's fio links librbd, gfapi, ...)
	cp /usr/bin/fio "$ROOT/usr/bin/fio"
	ldd /usr/bin/fio | awk '/=> \//{print $3}' | sort -u |
		while read -r lib; do cp -L --parents "$lib" "$ROOT"; done
	cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/" # ELF interpreter
else
	FIO_BIN="$CELER_VM_DIR/fio-static/fio"
	if [ ! -x "$FIO_BIN" ]; then
		log "building static fio from the Debian source package"
		rm -rf "$CELER_VM_DIR/fio-static" && mkdir -p "$CELER_VM_DIR/fio-static/src"
		(cd "$CELER_VM_DIR/fio-static/src" && apt-get "${APT_OPTS[@]}" source --download-only -q fio >/dev/null) ||
			die "apt-get source fio failed"
		tar -C "$CELER_VM_DIR/fio-static/src" -xzf "$(ls "$CELER_VM_DIR"/fio-static/src/fio_*.orig.tar.gz | tail -1)"
		FSRC=$(find "$CELER_VM_DIR/fio-static/src" -maxdepth 1 -type d -name 'fio-*' | head -1)
		(
			cd "$FSRC" &&
				./configure --build-static --disable-native --disable-numa --disable-rdma \
					--disable-rados --disable-rbd --disable-http --disable-gfapi --disable-pmem \
					--disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs &&
				make -j"$(nproc)" fio
		) >"$CELER_VM_DIR/fio-static/build.log" 2>&1 || { tail -20 "$CELER_VM_DIR/fio-static/build.log" >&2; die "fio build failed"; }
		strip -o "$FIO_BIN" "$FSRC/fio"
	fi
	cp "$FIO_BIN" "$ROOT/usr/bin/fio"
fi
log "fio: $("$ROOT/usr/bin/fio" --version 2>/dev/null || echo '?') engines: $("$ROOT/usr/bin/fio" --enghelp 2>/dev/null | grep -owE 'libaio|io_uring' | tr '\n' ' ')"
# e2fsprogs for the file-system test: dynamically linked, copy their libraries.
for b in /sbin/mke2fs /sbin/e2fsck; do
	cp -L "$b" "$ROOT/sbin/"
	ldd "$b" | awk '/=> \//{print $3}' | while read -r lib; do cp -L --parents "$lib" "$ROOT"; done
done
ln -sf mke2fs "$ROOT/sbin/mkfs.ext4"
ln -sf e2fsck "$ROOT/sbin/fsck.ext4"
cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"
printf '[defaults]\n' >"$ROOT/etc/mke2fs.conf"
echo "root:x:0:0:root:/:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"

# kernel modules needed for virtio-pci + virtio-blk, in dependency order.
: >"$ROOT/modules/load.order"
for m in virtio_pci virtio_blk crc32c_generic ext4; do
	# prints "builtin X" for =y modules, "insmod /path.ko" for =m ones
	modprobe -d "$KDIR" -S "$KREL" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
	cp "$ko" "$ROOT/modules/"
	basename "$ko" >>"$ROOT/modules/load.order"
done
log "modules: $(tr '\n' ' ' <"$ROOT/modules/load.order")"

cat >"$ROOT/init" <<'INIT'
#!/bin/sh
# Minimal init for fio guests.  Contract with the host (run-guest-fio.sh):
#   /vmh/cmd.sh      (appended cpio) is executed with /vmh/out as cwd;
#                    every file it leaves in /vmh/out is dumped to the result
#                    channel between  =====VMH-FILE-BEGIN <name>=====  and
#                    =====VMH-FILE-END <name>=====  lines.
#   result channel:  /dev/ttyS1 if present (clean, no kernel messages), else
#                    the console.
#   kernel cmdline:  vmh.disks=N  wait for N virtio disks
#                    vmh.sched=S  set I/O scheduler of vd* (default none)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
T0=$(cut -d' ' -f1 /proc/uptime)
echo "VMH: init started at uptime ${T0}s"

DISKS=0 SCHED=none
for arg in $(cat /proc/cmdline); do
	case $arg in
	vmh.disks=*) DISKS=${arg#vmh.disks=} ;;
	vmh.sched=*) SCHED=${arg#vmh.sched=} ;;
	esac
done

while read -r ko; do
	insmod "/modules/$ko" || echo "VMH: insmod $ko failed"
done </modules/load.order

# wait (max 10s) for the expected number of virtio disks
i=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt "$DISKS" ] && [ $i -lt 100 ]; do
	sleep 0.1; i=$((i + 1))
done

RES=/dev/console
[ -c /dev/ttyS1 ] && stty -F /dev/ttyS1 raw -echo 2>/dev/null && RES=/dev/ttyS1

mkdir -p /vmh/out
{
	echo "=====VMH-FILE-BEGIN guest-info.txt====="
	echo "kernel=$(uname -r) cpus=$(nproc) boot_to_init_s=${T0}"
	grep MemTotal /proc/meminfo
	for d in /sys/block/vd*; do
		[ -e "$d" ] || continue
		n=${d##*/}
		[ -w "$d/queue/scheduler" ] && echo "$SCHED" >"$d/queue/scheduler" 2>/dev/null
		echo "$n size_bytes=$(($(cat "$d/size") * 512)) hw_queues=$(ls "$d/mq" | wc -l)" \
			"sched=$(cat "$d/queue/scheduler")" \
			"lbs=$(cat "$d/queue/logical_block_size")" \
			"max_sectors_kb=$(cat "$d/queue/max_sectors_kb")" \
			"nr_requests=$(cat "$d/queue/nr_requests")" \
			"ro=$(cat "$d/ro")" "wce=$(cat "$d/queue/write_cache")"
	done
	echo "=====VMH-FILE-END guest-info.txt====="
} >"$RES"

RC=none
if [ -f /vmh/cmd.sh ]; then
	echo "VMH: running /vmh/cmd.sh"
	(cd /vmh/out && sh /vmh/cmd.sh)
	RC=$?
	echo "VMH: /vmh/cmd.sh exited with $RC"
else
	echo "VMH: no /vmh/cmd.sh, nothing to run"
fi

T1=$(cut -d' ' -f1 /proc/uptime)
for f in /vmh/out/*; do
	[ -f "$f" ] || continue
	n=${f##*/}
	echo "=====VMH-FILE-BEGIN $n====="
	cat "$f"
	echo
	echo "=====VMH-FILE-END $n====="
done >"$RES"
echo "=====VMH-DONE rc=$RC init_start=$T0 cmd_end=$T1=====" >"$RES"
sync
poweroff -f
INIT
chmod 755 "$ROOT/init"

rm -rf "$KDIR" # 400 MB of modules; re-extracted from the cached .deb on rebuild

log "packing initramfs"
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
log "done: $OUT/vmlinuz ($KREL), $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1), root $(du -sh "$ROOT" | cut -f1))"
