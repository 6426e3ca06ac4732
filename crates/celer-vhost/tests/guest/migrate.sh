#!/bin/sh
# Runs inside the test guest (busybox sh) against /dev/vda, a vhost-user-blk
# disk with 2 queues, while the host live-migrates the VM to a second QEMU
# with its own back end of the same disk. fio writes at queue depth 16 per
# queue and verifies what it wrote as it goes (crc32c, verify_backlog),
# before, during and after the migration; then everything written is read
# back and verified once more on the destination.
set -e
cat > mig.fio <<'JOB'
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
runtime=30
size=16m
[q0]
offset=0
cpus_allowed=0
[q1]
offset=64m
cpus_allowed=1
JOB
cat > final.fio <<'JOB'
[global]
filename=/dev/vda
ioengine=libaio
direct=1
bs=64k
iodepth=16
rw=write
verify=crc32c
verify_fatal=1
size=32m
[a]
offset=128m
JOB
echo "CELER-MIGRATE-START"
fio --output=fio-mig.txt mig.fio
echo "CELER-MIGRATE-FIO-DONE"
fio --output=fio-final.txt final.fio
dmesg > dmesg.txt
echo "CELER-MIGRATE-OK"
