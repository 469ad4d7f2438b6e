#!/usr/bin/env bash
# tests/vm/guest/core.sh — the core end-to-end scenarios on a real ublk kernel.
# Run through tests/vm/run-suite.sh (disks: backend 256M, cache 48M).
#  - every mode: fio random write + crc32c verify over a device 8x the cache
#    size, so eviction and (in back) write-back and backpressure run;
#  - ext4: mkfs, files, checksums; clean stop; warm serve; checksums again;
#  - back: after a clean stop the backend disk alone holds what the guest saw;
#  - the control socket: a live back -> through switch under fio, flush,
#    invalidate, preload;
#  - the CLI refuses a missing backend, a busy or foreign cache, a changed
#    cache size and a device holding other data, naming the problem.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

B=${DISK_backend:?backend disk missing} C=${DISK_cache:?cache disk missing}
CACHE_SIZE=${CORE_CACHE_SIZE:-32M}
FIO_IO=${CORE_FIO_IO:-64M}
[[ -x $BIN ]] || { echo "no ublk-cache binary at $BIN (build it first)"; exit 1; }

fio_verify() {
    local mode=$1
    wipe_cache "$C"
    start_server "server-$mode.log" --backend "dev:$B" --cache "$C" --cache-size "$CACHE_SIZE" --mode "$mode" --queues 2
    # Random writes of 4-64 KiB over the whole device (8x the cache), then a
    # full verify of everything written.
    fio --name="verify-$mode" --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 \
        --rw=randwrite --bsrange=4k-64k --size=100% --io_size="$FIO_IO" --randrepeat=0 \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --output="fio-$mode.txt" \
        || { cat "fio-$mode.txt"; bad "fio failed in mode $mode"; return 1; }
    grep -q "err= 0" "fio-$mode.txt" || { cat "fio-$mode.txt"; bad "fio reported errors"; return 1; }
    grep -E "WRITE:|READ:" "fio-$mode.txt"
    stop_server
}

ext4_warm_restart() {
    wipe_cache "$C"
    start_server server-ext4.log --backend "dev:$B" --cache "$C" --cache-size "$CACHE_SIZE" --mode back
    mkfs.ext4 -q -F "$DEV"
    mount "$DEV" /mnt
    mkdir /mnt/data
    local i
    for i in $(seq 1 12); do head -c $((i * 300 * 1024)) /dev/urandom >"/mnt/data/f$i"; done
    cp -r /usr/share/doc/e2fsprogs /mnt/data/doc 2>/dev/null || true
    (cd /mnt && find data -type f -print0 | sort -z | xargs -0 sha256sum) >sums.txt
    umount /mnt
    stop_server
    start_server server-ext4.log --backend "dev:$B" --cache "$C" --mode back
    grep -q 'cache attached.*cached=[1-9]' server-ext4.log || { bad "the second attach was not warm"; return 1; }
    mount "$DEV" /mnt
    local sums=$PWD/sums.txt
    (cd /mnt && sha256sum -c --quiet "$sums") || { bad "checksums differ after warm restart"; return 1; }
    echo "$(wc -l <"$sums") file checksums match after the warm restart"
    grep -o 'cache attached.*' server-ext4.log | tail -n1
    umount /mnt
    stop_server
    e2fsck -fn "$B" >/dev/null || { bad "the backend alone does not fsck clean"; return 1; }
}

backend_exact_after_stop() {
    wipe_cache "$C"
    start_server server-exact.log --backend "dev:$B" --cache "$C" --cache-size "$CACHE_SIZE" --mode back
    fio --name=fill --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
        --bsrange=4k-128k --size=100% --io_size=48M --randrepeat=0 --output=fio-exact.txt \
        || { cat fio-exact.txt; bad "fio failed"; return 1; }
    local seen
    seen=$(sha256sum <"$DEV" | cut -d' ' -f1)
    stop_server
    local after
    after=$(sha256sum <"$B" | cut -d' ' -f1)
    echo "device before stop: $seen; backend after stop: $after"
    [[ $seen == "$after" ]] || { bad "the backend differs from what the guest saw"; return 1; }
}

# expect_refusal TEXT CMD...: CMD must fail and its stderr must contain TEXT.
expect_refusal() {
    local want=$1; shift
    local out
    if out=$("$@" 2>&1 >/dev/null); then bad "accepted: $*"; return 1; fi
    grep -qF -- "$want" <<<"$out" || { bad "'$*' did not say '$want': $out"; return 1; }
    echo "refused as expected: $(grep -F -- "$want" <<<"$out" | head -n1)"
}

cli_errors() {
    wipe_cache "$C"
    expect_refusal "cannot stat" "$BIN" serve --backend file:/nonexistent.img --cache "$C"
    expect_refusal "needs --cache" "$BIN" serve --backend "dev:$B" --mode back
    start_server server-cli.log --backend "dev:$B" --cache "$C" --cache-size "$CACHE_SIZE" --mode back
    "$BIN" list --json | grep -qF "\"device\": \"$DEV\"" || { bad "list --json does not show $DEV"; return 1; }
    "$BIN" list
    expect_refusal "in use by another ublk-cache server" "$BIN" serve --backend "dev:$B" --cache "$C"
    stop_server
    truncate -s 64M /tmp/other.img
    expect_refusal "belongs to another backend" "$BIN" serve --backend file:/tmp/other.img --cache "$C"
    expect_refusal "was formatted with a size of" "$BIN" serve --backend "dev:$B" --cache "$C" --cache-size 16M
    mkfs.ext4 -q -F "$C"
    expect_refusal "--format" "$BIN" serve --backend "dev:$B" --cache "$C" --cache-size "$CACHE_SIZE"
    wipe_cache "$C"
}

# The control socket on the ublk path: stats, a live switch from back to
# through with fio writes in flight (nothing may fail, nothing stays dirty),
# flush, preload, invalidate; the device then equals the backend.
live_ops() {
    wipe_cache "$C"
    start_server server-live.log --backend "dev:$B" --cache "$C" --cache-size "$CACHE_SIZE" --mode back --queues 2
    local id=${DEV#/dev/ublkb}
    [[ -S $RUN_DIR/$id.ctl ]] || { bad "no control socket $RUN_DIR/$id.ctl"; return 1; }
    fio --name=live --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
        --bsrange=4k-64k --size=100% --io_size=48M --randrepeat=0 --verify=crc32c --do_verify=0 \
        --output=fio-live.txt &
    local fio_pid=$!
    sleep 2
    "$BIN" ctl "$id" mode through --json >mode.json || { bad "ctl mode through failed"; cat mode.json; return 1; }
    grep -q '"previous":"back"' mode.json || { bad "unexpected switch result: $(cat mode.json)"; return 1; }
    wait "$fio_pid" || { cat fio-live.txt; bad "fio failed during the live switch"; return 1; }
    grep -q "err= 0" fio-live.txt || { cat fio-live.txt; bad "fio saw errors during the switch"; return 1; }
    "$BIN" ctl "$id" stats --json >stats.json
    grep -q '"mode":"through"' stats.json && grep -q '"dirty_bytes":0' stats.json \
        || { bad "after the switch: $(cat stats.json)"; return 1; }
    "$BIN" ctl "$id" stats
    "$BIN" ctl "$id" mode back >/dev/null
    "$BIN" ctl "$id" flush --json | grep -q '"dirty_bytes":0' || { bad "ctl flush left dirty data"; return 1; }
    "$BIN" ctl "$id" invalidate --json | grep -q dropped_bytes || { bad "ctl invalidate failed"; return 1; }
    "$BIN" ctl "$id" preload 16M --json | grep -q '"fetched":16777216' || { bad "ctl preload did not fetch 16M"; return 1; }
    local seen after
    seen=$(sha256sum <"$DEV" | cut -d' ' -f1)
    stop_server
    [[ -e $RUN_DIR/$id.ctl ]] && { bad "the control socket outlived the server"; return 1; }
    after=$(sha256sum <"$B" | cut -d' ' -f1)
    [[ $seen == "$after" ]] || { bad "the backend differs from what the guest saw ($seen vs $after)"; return 1; }
    echo "live switch under fio, flush, invalidate, preload: device and backend agree ($after)"
}

for mode in none around through back; do
    run_case "fio-verify-$mode" fio_verify "$mode"
done
run_case ext4-warm-restart ext4_warm_restart
run_case backend-exact-after-stop backend_exact_after_stop
run_case cli-errors cli_errors
run_case live-ops live_ops
summary vm-core
