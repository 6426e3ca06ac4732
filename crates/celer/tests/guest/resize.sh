#!/bin/sh
# Runs inside the test guest (busybox sh) against /dev/vda, a Celer volume
# served by `celer up` over vhost-user-blk. It reports the disk's size, waits
# (up to 60 s) for the host to grow the volume, then checks that the kernel
# saw the new capacity and that the new space holds data: fio writes and
# verifies (crc32c) 4 MiB past the old end.
set -e
old=$(cat /sys/block/vda/size)
echo "$old" > size-before.txt
echo "CELER-RESIZE-READY $old"
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
    i=$((i + 1))
    if [ $i -gt 600 ]; then
        echo "CELER-RESIZE-TIMEOUT"
        exit 1
    fi
    usleep 100000
done
new=$(cat /sys/block/vda/size)
echo "$new" > size-after.txt
echo "CELER-RESIZE-SEEN $new after $i polls"
dmesg | grep -i "vda" > dmesg.txt || true
fio --name=tail --filename=/dev/vda --ioengine=libaio --direct=1 --bs=64k \
    --iodepth=4 --rw=write --offset=$((old * 512)) --size=4m \
    --verify=crc32c --verify_fatal=1 --output=fio-tail.txt
echo "CELER-RESIZE-OK"
