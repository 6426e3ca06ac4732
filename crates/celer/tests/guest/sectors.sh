#!/bin/sh
# Runs inside the test guest (busybox sh) against /dev/vda: a Celer volume
# with 512-byte logical sectors into which the host imported a GPT image
# with two partitions (vda1 aligned to 1 MiB, vda2 starting at an odd
# sector, so each of its 4 KiB writes covers parts of two physical blocks).
# Checks the sector sizes the kernel sees and both partitions, then an ext4
# file system the host made on vda2 (its file read back, more written,
# remounted, fsck), then fio with block sizes from 512 B to 128 KiB and
# crc32c verification on vda1.
set -e
cat /sys/block/vda/queue/logical_block_size > logical.txt
cat /sys/block/vda/queue/physical_block_size > physical.txt
cat /sys/block/vda/queue/minimum_io_size > min-io.txt
ls /sys/block/vda | grep -c '^vda[0-9]' > partitions.txt || true
cat /sys/block/vda/vda2/start > vda2-start.txt
echo "CELER-SECTORS-PARTITIONS $(cat partitions.txt)"
mkdir -p /mnt
mount -t ext4 /dev/vda2 /mnt
md5sum /mnt/hello.bin > host-file.md5
dd if=/dev/urandom of=/mnt/a bs=1M count=4 2>/dev/null
mkdir /mnt/dir
i=0
while [ $i -lt 100 ]; do echo "file $i" > /mnt/dir/f$i; i=$((i + 1)); done
sync
md5sum /mnt/a /mnt/dir/f7 /mnt/dir/f99 > /tmp/sums
umount /mnt
mount -t ext4 /dev/vda2 /mnt
md5sum -c /tmp/sums > md5.txt
[ "$(ls /mnt/dir | wc -l)" = 100 ]
umount /mnt
e2fsck -fn /dev/vda2 > fsck.txt 2>&1
echo "CELER-SECTORS-EXT4-OK"
cat > verify.fio <<'JOB'
[global]
filename=/dev/vda1
ioengine=libaio
direct=1
iodepth=8
rw=randwrite
verify=crc32c
verify_fatal=1
randrepeat=1
[mixed]
bsrange=512-128k
size=12m
[sectors]
stonewall
bs=512
offset=12m
size=1m
[odd]
stonewall
bs=1536
offset=13m
size=1536k
JOB
fio --output=fio.txt verify.fio
echo "CELER-SECTORS-OK"
