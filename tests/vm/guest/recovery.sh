#!/usr/bin/env bash
# tests/vm/guest/recovery.sh — crash, restart and cache-loss scenarios on a real
# ublk kernel (disks: backend 256M, cache 48M). Run via tests/vm/run-suite.sh.
#  - kill -9 of the server in the middle of a verifying fio run in back mode,
#    `ublk-cache recover`: fio finishes with 0 errors and /dev/ublkbN never
#    disappears (UBLK_F_USER_RECOVERY + REISSUE, and the crash shadow keeps
#    every acknowledged write);
#  - the same across a planned detach (upgrade path);
#  - clean stop, serve again, verify what was written before;
#  - cache loss in back mode: the server dies mid-workload and the cache is
#    gone for good; the backend alone is an ext4 state from a flush point.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

B=${DISK_backend:?} C=${DISK_cache:?}
CACHE_SIZE=32M
[[ -x $BIN ]] || { echo "no ublk-cache binary at $BIN"; exit 1; }
serve_args=(--backend "dev:$B" --cache "$C" --mode back --queues 2)

# watch_device: record any moment the device node is missing.
watch_start() {
    rm -f watch.stop watch.log
    ( while [[ ! -e watch.stop ]]; do
          [[ -b $DEV ]] || echo "MISSING at $(cut -d' ' -f1 /proc/uptime)" >>watch.log
          sleep 0.05
      done ) &
    WATCH_PID=$!
}
watch_end() {
    touch watch.stop; wait "$WATCH_PID"
    [[ ! -s watch.log ]] || { cat watch.log; bad "$DEV disappeared"; return 1; }
    echo "$DEV was present throughout"
}

# kernel_state: the kernel's state of $DEV per `ublk-cache list`. list must never
# wait on the kernel; one that has not answered in 30 s fails the case, and the
# stacks of all blocked tasks go to the kernel log (sysrq w, saved in dmesg.txt).
# A list stuck in the kernel cannot be killed; it is left behind.
kernel_state() {
    "$BIN" list --json >list.out 2>>list.err &
    local pid=$! i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo w >/proc/sysrq-trigger 2>/dev/null
        bad "ublk-cache list did not answer in 30 s (blocked tasks dumped to the kernel log)"
        echo LIST-HUNG; return 1
    fi
    wait "$pid" || { cat list.err >&2; bad "ublk-cache list failed"; echo LIST-FAILED; return 1; }
    awk -v d="\"$DEV\"," '$0 ~ "\"device\": " d {f=1} f && /kernel_state/ {gsub(/[",]/, "", $2); print $2; exit}' list.out
}

# wait_quiesced SECONDS: the kernel quiesces a device asynchronously once its
# daemon has died; poll until it shows QUIESCED, print the last state seen.
wait_quiesced() {
    local st= i
    for ((i = 0; i < $1 * 10; i++)); do
        st=$(kernel_state) || { echo "$st"; return 1; }
        [[ $st == QUIESCED ]] && break
        sleep 0.1
    done
    echo "$st"
}

fio_bg() {  # fio_bg NAME OFFSET SIZE: verifying random read/write in the background
    fio --name="$1" --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randrw \
        --bsrange=4k-32k --offset="$2" --size="$3" --verify=crc32c --verify_backlog=64 --verify_fatal=1 \
        --randrepeat=0 --output="fio-$1.txt" &
    FIO_PID=$!
}

# wait_written MIB SECONDS: until $DEV has had MIB written since it appeared
# (sectors written, /sys/block/*/stat field 7); fails if the background fio
# ends first. Gives up waiting after SECONDS, saying so (the case then tests
# less than it means to, but still tests).
wait_written() {
    local stat=/sys/block/${DEV#/dev/}/stat i sectors
    [[ -r $stat ]] || { echo "no $stat" >&2; return 1; }
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$FIO_PID" 2>/dev/null || return 1
        sectors=$(awk '{print $7}' "$stat")
        (( sectors * 512 >= $1 * 1048576 )) && return 0
        sleep 0.1
    done
    echo "NOTE: $DEV had only $((sectors / 2048)) MiB written after $2 s; going on" >&2
}

fio_ok() {  # fio_ok NAME: the background fio finished cleanly
    wait "$FIO_PID" || { cat "fio-$1.txt"; bad "fio $1 failed"; return 1; }
    grep -q "err= 0" "fio-$1.txt" || { cat "fio-$1.txt"; bad "fio $1 reported errors"; return 1; }
    grep -E "READ:|WRITE:" "fio-$1.txt"
}

crash_recover() {
    wipe_cache "$C"
    start_server server-crash.log "${serve_args[@]}" --cache-size "$CACHE_SIZE"
    local id=${DEV#/dev/ublkb}
    watch_start
    # Killed once fio has written more than the cache holds (write-back and
    # eviction are under way), not after a fixed time: how fast fio gets there
    # varies from host to host.
    fio_bg crash 0 128M
    wait_written 40 60 || { bad "fio finished before it wrote 40 MiB; make it longer"; return 1; }
    kill -0 "$FIO_PID" || { bad "fio finished before the crash; make it longer"; return 1; }
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
    local st; st=$(wait_quiesced 60)
    echo "after kill -9: kernel state $st"
    [[ $st == QUIESCED ]] || { bad "device is $st, not QUIESCED, after the daemon died"; return 1; }
    start_server server-crash.log --recover "$id" "${serve_args[@]}"
    grep -o 'recovering from a daemon crash.*' server-crash.log | tail -n1
    fio_ok crash
    watch_end
    stop_server
}

detach_recover() {
    start_server server-detach.log "${serve_args[@]}"
    local id=${DEV#/dev/ublkb}
    watch_start
    fio_bg detach 128M 64M
    wait_written 16 60 || { bad "fio finished before it wrote 16 MiB; make it longer"; return 1; }
    "$BIN" stop "$id" --detach --timeout 120 || { bad "stop --detach failed"; return 1; }
    # stop --detach returns once the kernel has quiesced the device, with no pause
    # here (and before this shell has even reaped the server).
    local st; st=$(kernel_state)
    [[ $st == QUIESCED ]] || { bad "device is $st, not QUIESCED, when stop --detach returned"; return 1; }
    wait "$SERVER_PID"; local rc=$?
    [[ $rc == 0 ]] || { bad "detaching server exited with $rc"; return 1; }
    start_server server-detach.log --recover "$id" "${serve_args[@]}"
    fio_ok detach
    watch_end
    stop_server
}

stop_serve_verify() {
    start_server server-sv.log "${serve_args[@]}"
    local job=(--name=sv --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite
               --bsrange=4k-64k --size=100% --io_size=48M --randseed=1234 --verify=crc32c)
    fio "${job[@]}" --do_verify=0 --output=fio-sv-write.txt || { cat fio-sv-write.txt; bad "write phase"; return 1; }
    stop_server
    start_server server-sv.log "${serve_args[@]}"
    fio "${job[@]}" --verify_only --output=fio-sv-verify.txt || { cat fio-sv-verify.txt; bad "verify after restart"; return 1; }
    grep -q "err= 0" fio-sv-verify.txt || { cat fio-sv-verify.txt; bad "verify errors"; return 1; }
    echo "48 MiB written before a clean stop verified after serving again"
    stop_server
}

cache_loss() {
    wipe_cache "$C"
    start_server server-loss.log "${serve_args[@]}" --cache-size "$CACHE_SIZE"
    local id=${DEV#/dev/ublkb}
    mkfs.ext4 -q -F "$DEV"
    mount "$DEV" /mnt
    # A writer with regular flush points (sync), killed mid-run with the server.
    ( i=0; while :; do
          i=$((i + 1))
          head -c $(( (i % 7 + 1) * 64 * 1024 )) /dev/urandom >"/mnt/f$((i % 40))"
          mkdir -p "/mnt/d$((i % 9))"; echo "$i" >"/mnt/d$((i % 9))/n"
          (( i % 5 )) || sync
      done ) 2>/dev/null &
    local writer=$!
    sleep 15
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
    kill -9 "$writer" 2>/dev/null
    # The cache device is lost for good: only the backend remains.
    dd if="$B" of=/tmp/backend-copy.img bs=1M status=none
    wipe_cache "$C"
    # Unblock the mounted filesystem with a server on a fresh cache, then clean up.
    start_server server-loss.log --recover "$id" --backend "dev:$B" --cache /tmp/fresh-cache.img \
        --cache-size 16M --mode through --queues 2
    umount /mnt 2>/dev/null || umount -l /mnt
    stop_server
    # The backend alone must be an ext4 state from a flush point: the journal
    # replays at mount, and fsck finds nothing to fix afterwards.
    mount -o loop /tmp/backend-copy.img /mnt || { bad "the backend alone does not mount"; return 1; }
    ls /mnt | head -n 5
    umount /mnt
    e2fsck -fn /tmp/backend-copy.img || { bad "the backend alone is not a consistent ext4"; return 1; }
    rm -f /tmp/backend-copy.img /tmp/fresh-cache.img
}

run_case crash-kill9-recover crash_recover
run_case detach-recover detach_recover
run_case stop-serve-verify stop_serve_verify
run_case cache-loss-backend-consistent cache_loss
summary vm-recovery
