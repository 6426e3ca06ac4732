#!/bin/sh
# Runs inside the test guest (busybox sh) against /dev/vda, a Celer
# vhost-user-blk disk with 2 queues. Phase 1 writes and verifies data with
# fio (crc32c), one job per vCPU so both virtqueues carry I/O; the host then
# restarts the back end; phase 2 re-verifies the same data through the new
# back end; phase 3 makes, fills, remounts and checks an ext4 file system.
set -e
ls /sys/block/vda/mq | wc -l > hw-queues.txt
cat /sys/block/vda/queue/write_cache > write-cache.txt
cat > verify.fio <<'JOB'
[global]
filename=/dev/vda
ioengine=libaio
direct=1
bs=4k
iodepth=16
rw=randwrite
verify=crc32c
verify_fatal=1
randrepeat=1
size=16m
[q0]
offset=0
cpus_allowed=0
[q1]
offset=32m
cpus_allowed=1
JOB
fio --output=fio-write.txt verify.fio
echo "CELER-PHASE1-DONE"
# The host kills and restarts the back end now; QEMU reconnects.
sleep 12
fio --output=fio-reverify.txt --verify_only=1 verify.fio
echo "CELER-PHASE2-DONE"
# Explicit features: the guest's mke2fs.conf defines no ext4 type (without
# them mkfs.ext4 makes a file system with no journal).
mkfs.ext4 -q -F -O has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize /dev/vda
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt
dd if=/dev/urandom of=/mnt/a bs=1M count=8 2>/dev/null
cp /mnt/a /mnt/b
mkdir /mnt/dir
i=0
while [ $i -lt 200 ]; do echo "file $i" > /mnt/dir/f$i; i=$((i + 1)); done
sync
md5sum /mnt/a /mnt/b /mnt/dir/f7 /mnt/dir/f199 > /tmp/sums
umount /mnt
mount -t ext4 /dev/vda /mnt
md5sum -c /tmp/sums > md5.txt
[ "$(ls /mnt/dir | wc -l)" = 200 ]
umount /mnt
e2fsck -fn /dev/vda > fsck.txt 2>&1
grep -i virtio /proc/interrupts > interrupts.txt
echo "CELER-SYSTEM-OK"
