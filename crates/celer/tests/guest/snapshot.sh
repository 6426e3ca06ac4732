#!/bin/sh
# Runs inside the test guest (busybox sh) against /dev/vda. The host puts
# PHASE=make or PHASE=clone before this script (crates/celer/tests/
# snapshot_guest.rs).
#
# make (the volume, served by `celer up`): makes an ext4 file system with a
# journal, writes files of random content and syncs their md5 list
# (/mnt/sums), then starts a writer that keeps writing /mnt/w/N (64 KiB),
# syncs, and appends its md5 to /mnt/wlist. Once the writer has written a
# few, syncs, prints CELER-SNAP-READY M (M: wlist lines synced) and lets the
# writer run 10 s more: the host takes the snapshot meanwhile. The guest
# then powers off with the file system still mounted (no umount).
#
# clone (a clone of that snapshot, served by `celer vhost serve`): e2fsck
# -f -y must replay the journal (the snapshot was taken mounted), then
# e2fsck -f -n must find the file system clean; mounted, every file in
# /mnt/sums and every complete /mnt/wlist line must check; then it writes a
# file, remounts, reads it back and fscks again. Prints CELER-CLONE-OK, or
# CELER-CLONE-FAIL <why> and exits 1.
set -e
mkdir -p /mnt

fail() {
    echo "CELER-CLONE-FAIL $*"
    exit 1
}

case "$PHASE" in
make)
    # Explicit features: the guest's mke2fs.conf defines no ext4 type, and
    # without them mkfs.ext4 makes a file system without a journal.
    mkfs.ext4 -q -F -O has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize /dev/vda
    mount -t ext4 /dev/vda /mnt
    # A journal is in use (jbd2 runs one per journaled file system).
    ls -d /proc/fs/jbd2/vda* > jbd2.txt
    mkdir /mnt/data /mnt/small /mnt/w
    i=0
    while [ $i -lt 8 ]; do
        dd if=/dev/urandom of=/mnt/data/f$i bs=64k count=$((4 + i * 4)) 2>/dev/null
        i=$((i + 1))
    done
    i=0
    while [ $i -lt 200 ]; do
        echo "small file $i $RANDOM $RANDOM" > /mnt/small/s$i
        i=$((i + 1))
    done
    sync
    (cd /mnt && md5sum data/* small/* > sums.tmp && mv sums.tmp sums)
    sync
    wc -l < /mnt/sums > sums-count.txt
    echo "CELER-SNAP-FILES $(cat sums-count.txt) files, $(du -sk /mnt/data | cut -f1) KiB in data/"
    # The writer: each file is synced before its md5 line is appended, so a
    # line in the snapshot names a file whose data is in it too.
    (
        n=0
        while [ ! -e /tmp/stop ] && [ $n -lt 1000 ]; do
            dd if=/dev/urandom of=/mnt/w/$n bs=64k count=1 2>/dev/null
            sync
            md5sum /mnt/w/$n >> /mnt/wlist
            n=$((n + 1))
        done
    ) &
    writer=$!
    i=0
    while [ "$(cat /mnt/wlist 2>/dev/null | wc -l)" -lt 5 ]; do
        kill -0 $writer 2>/dev/null || { echo "CELER-SNAP-FAIL the writer stopped"; exit 1; }
        i=$((i + 1))
        [ $i -lt 1200 ] || { echo "CELER-SNAP-FAIL the writer wrote no 5 files in 120 s"; exit 1; }
        usleep 100000
    done
    m=$(wc -l < /mnt/wlist)
    sync
    echo "$m" > wlist-at-marker.txt
    echo "CELER-SNAP-READY $m"
    # The host takes the snapshot now, while the writer writes.
    sleep 10
    touch /tmp/stop
    wait $writer
    wc -l < /mnt/wlist > wlist-at-end.txt
    echo "CELER-SNAP-WRITER-DONE $(cat wlist-at-end.txt)"
    dmesg > dmesg.txt
    # Power off with the file system mounted (init syncs, then poweroff -f).
    ;;
clone)
    rc=0
    e2fsck -f -y /dev/vda > fsck-repair.txt 2>&1 || rc=$?
    echo "$rc" > fsck-repair-rc.txt
    echo "CELER-CLONE-FSCK-REPAIR rc=$rc"
    [ $rc -le 1 ] || fail "e2fsck -f -y exited with $rc"
    grep -q "recovering journal" fsck-repair.txt || fail "e2fsck did not replay a journal"
    rc=0
    e2fsck -f -n /dev/vda > fsck-check.txt 2>&1 || rc=$?
    echo "CELER-CLONE-FSCK-CHECK rc=$rc"
    [ $rc -eq 0 ] || fail "e2fsck -f -n exited with $rc after the repair run"
    mount -t ext4 /dev/vda /mnt || fail "mount"
    [ -f /mnt/sums ] || fail "no /mnt/sums"
    wc -l < /mnt/sums > sums-count.txt
    (cd /mnt && md5sum -c sums) > sums-check.txt 2>&1 || fail "md5sum -c sums"
    echo "CELER-CLONE-SUMS-OK $(cat sums-count.txt) files"
    # Complete lines only (the last may be cut by the snapshot).
    grep -E '^[0-9a-f]{32}  /mnt/w/[0-9]+$' /mnt/wlist > /tmp/wl || true
    wc -l < /tmp/wl > wlist-count.txt
    ls /mnt/w | wc -l > w-files.txt
    md5sum -c /tmp/wl > wlist-check.txt 2>&1 || fail "md5sum -c wlist"
    echo "CELER-CLONE-WLIST-OK $(cat wlist-count.txt) lines, $(cat w-files.txt) files in w/"
    # The clone is writable: a file written, remounted, read back.
    dd if=/dev/urandom of=/mnt/clone-was-here bs=64k count=16 2>/dev/null
    md5sum /mnt/clone-was-here > /tmp/clone-sum
    sync
    umount /mnt
    mount -t ext4 /dev/vda /mnt || fail "remount"
    md5sum -c /tmp/clone-sum > /dev/null 2>&1 || fail "the clone's own file"
    umount /mnt
    rc=0
    e2fsck -f -n /dev/vda > fsck-final.txt 2>&1 || rc=$?
    [ $rc -eq 0 ] || fail "e2fsck -f -n after the clone's write exited with $rc"
    dmesg > dmesg.txt
    echo "CELER-CLONE-OK"
    ;;
*)
    echo "PHASE must be make or clone, not '$PHASE'"
    exit 2
    ;;
esac
