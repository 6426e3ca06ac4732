#!/bin/sh
# Runs inside the test guest (busybox sh) against /dev/vda, a Celer
# vhost-user-blk disk with 2 queues. fio writes at queue depth 16 per queue
# and verifies what it wrote as it goes (crc32c, verify_backlog) for a fixed
# time while the host kills the back end with SIGKILL and restarts it, over
# and over; QEMU reconnects each time and the back end resubmits what was
# in flight. Any lost, repeated or corrupted request fails fio or hangs it.
# fio runs 75 s, or celer.fio_runtime=S from the kernel command line.
set -e
runtime=$(sed -n 's/.*celer\.fio_runtime=\([0-9]*\).*/\1/p' /proc/cmdline)
runtime=${runtime:-75}
ls /sys/block/vda/mq | wc -l > hw-queues.txt
cat > kills.fio <<JOB
[global]
filename=/dev/vda
ioengine=libaio
direct=1
bs=4k
iodepth=16
rw=randwrite
verify=crc32c
verify_fatal=1
verify_backlog=512
randrepeat=1
time_based=1
runtime=$runtime
size=32m
[q0]
offset=0
cpus_allowed=0
[q1]
offset=64m
cpus_allowed=1
JOB
echo "CELER-KILLS-START"
fio --output=fio-kills.txt kills.fio
echo "CELER-FIO-DONE"
cat /sys/block/vda/inflight > inflight.txt
dmesg > dmesg.txt
grep -i virtio /proc/interrupts > interrupts.txt
echo "CELER-KILLS-OK"
