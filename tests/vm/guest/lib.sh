# tests/vm/guest/lib.sh — helpers shared by the guest scenario scripts.
# Sourced, not run. Expects run.sh's environment (VM_REPO, DISK_<name>).

BIN=${UBLK_CACHE_BIN:-$VM_REPO/target/release/ublk-cache}
RUN_DIR=/run/ublk-cache
PASSED=0 FAILED=0 FAILED_NAMES=()
SERVER_PID= DEV=

note() { printf '\n== %s\n' "$*"; }
bad() { printf 'FAIL-DETAIL: %s\n' "$*" >&2; return 1; }

# run_case NAME FUNCTION: counts a pass or a failure; a failing case stops its
# server so the next case starts clean.
run_case() {
    local name=$1; shift
    note "case $name"
    if ( set -e; "$@" ); then
        echo "PASS: $name"; PASSED=$((PASSED + 1))
    else
        echo "FAIL: $name"; FAILED=$((FAILED + 1)); FAILED_NAMES+=("$name")
        stop_server_hard
    fi
}

# start_server LOG ARGS...: serve in the background; sets SERVER_PID and DEV
# (the device path the server prints on stdout once the device is live).
start_server() {
    local log=$1; shift
    rm -f dev.out
    "$BIN" serve "$@" >dev.out 2>>"$log" &
    SERVER_PID=$!
    local i
    for i in $(seq 1 600); do
        if [[ -s dev.out ]]; then
            DEV=$(head -n1 dev.out)
            [[ -b $DEV ]] || bad "server printed '$DEV', which is not a block device" || return 1
            echo "server pid $SERVER_PID serves $DEV"
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID"; local rc=$?
            tail -n 20 "$log" >&2
            bad "server exited with $rc before the device was live"; return 1
        fi
        sleep 0.1
    done
    bad "server did not print a device within 60 s"; return 1
}

# stop_server: clean stop through the CLI; the server must exit 0 and the
# device must be gone.
stop_server() {
    local id=${DEV#/dev/ublkb}
    "$BIN" stop "$id" --timeout 300 || { bad "ublk-cache stop $id failed"; return 1; }
    wait "$SERVER_PID"; local rc=$?
    SERVER_PID=
    [[ $rc == 0 ]] || { bad "server exited with $rc after stop"; return 1; }
    [[ ! -e $DEV ]] || { bad "$DEV still exists after a clean stop"; return 1; }
}

# Cases run in subshells, so the parent cannot see their SERVER_PID: find any
# server by its binary instead. TERM first (a clean stop), KILL if it hangs.
stop_server_hard() {
    umount /mnt 2>/dev/null || true
    local pids
    pids=$(pgrep -f "^$BIN (serve|recover)" || true)
    [[ -n $pids ]] || return 0
    kill -TERM $pids 2>/dev/null
    for _ in $(seq 1 300); do
        pgrep -f "^$BIN (serve|recover)" >/dev/null || return 0
        sleep 0.1
    done
    kill -KILL $pids 2>/dev/null
    sleep 0.5
}

# wipe_cache DEV: zero the superblock area so the next serve formats afresh.
wipe_cache() {
    dd if=/dev/zero of="$1" bs=1M count=2 oflag=direct status=none
}

summary() {
    local label=$1
    ((FAILED == 0)) || printf 'failed cases: %s\n' "${FAILED_NAMES[*]}"
    printf '%s: %d passed, %d failed\n' "$label" "$PASSED" "$FAILED"
    ((FAILED == 0))
}
