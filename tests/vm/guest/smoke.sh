#!/usr/bin/env bash
# tests/vm/guest/smoke.sh — guest-side smoke test of the VM test bed itself.
#   tests/vm/run.sh --disk a:256M --disk b:128M tests/vm/guest/smoke.sh
# Uses the first two disks given to run.sh (whatever their names): fio with
# io_uring + O_DIRECT + verification on the first, ext4 on the second.
# Proves: ublk_drv is loaded, host binaries run (fio links ~60 shared libs),
# io_uring works in the guest kernel, ext4 + e2fsprogs work.
set -euo pipefail

step() { printf '\n== smoke: %s\n' "$*"; }
fail() { printf 'smoke: FAIL: %s\n' "$*" >&2; exit 1; }

read -r -a names <<<"${VM_DISKS:-}"
(( ${#names[@]} >= 2 )) || fail "needs two disks (run.sh --disk a:256M --disk b:128M ...), got '${VM_DISKS:-}'"
d1_var="DISK_${names[0]}" d2_var="DISK_${names[1]}"
D1=${!d1_var} D2=${!d2_var}

step "kernel $(uname -r); ublk"
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control missing"
[[ -d /sys/module/ublk_drv ]] || fail "ublk_drv not loaded"
echo "ublk_drv loaded, ublks_max=$(cat /sys/module/ublk_drv/parameters/ublks_max)," \
     "io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo n/a)"

step "fio io_uring O_DIRECT randwrite+verify on $D1"
# fio exits non-zero on I/O or verify errors; --verify reads back and checks.
fio --name=t --filename="$D1" --direct=1 --ioengine=io_uring --rw=randwrite \
    --bs=4k --size=32M --verify=crc32c --output-format=terse --terse-version=3 \
    > fio.terse || fail "fio failed (io_uring or verify)"
# terse v3 fields: 7 = read (verify) KiB/s, 48 = write KiB/s, 49 = write IOPS.
awk -F';' '{printf "fio ok: write %s KiB/s, %s IOPS; verify read %s KiB/s\n", $48, $49, $7}' fio.terse

step "mkfs.ext4 + mount on $D2"
mkfs.ext4 -q -F "$D2"
mount "$D2" /mnt
echo hi > /mnt/f
sync
umount /mnt
e2fsck -fn "$D2" >/dev/null 2>&1 || fail "e2fsck found errors on $D2"
mount -o ro "$D2" /mnt
[[ $(cat /mnt/f) == hi ]] || fail "file content wrong after remount"
umount /mnt
echo "ext4 ok"

step "PASS"
