#!/usr/bin/env bash
# tests/vm/guest/bench-commit.sh — database commits on ext4, guest side.
# Started by tests/vm/bench-commit.sh (host side; it prints the table), never
# by CI.
#
# One fsync-heavy application, SQLite (WAL, synchronous=FULL, one INSERT per
# transaction), on a fresh ext4 on each peer in turn, every round:
#   direct     ext4 on an unthrottled virtio disk (what the cache disk gives)
#   slow       ext4 on a throttled virtio disk (what the backend gives)
#   none       ublk-cache --mode none over a throttled disk
#   relaxed    ublk-cache --mode back --writeback-order relaxed (cache on an
#              unthrottled disk, backend on a throttled one)
#   ordered    the same with --writeback-order ordered
#   held       (diagnostic, only when asked for) `back`, relaxed, with
#              write-back held to one backend write a second: what the
#              request path costs without write-back competing
# The throttled disks are alike (the host side sets QEMU's throttling on them).
#
# Settings from bench-commit.conf in the work dir: COMMIT_ROUNDS, COMMIT_N
# (transactions per run), COMMIT_QUEUES, COMMIT_PEERS.
# Output: results/R-PEER.txt ("commits nanoseconds"), R-PEER.stats.json
# (ublk-cache's counters after the run), setup.log.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# shellcheck source=/dev/null
[[ -f bench-commit.conf ]] && source bench-commit.conf
ROUNDS=${COMMIT_ROUNDS:-2}
N=${COMMIT_N:-600}
QUEUES=${COMMIT_QUEUES:-1}
read -ra PEERS <<<"${COMMIT_PEERS:-direct slow none relaxed ordered}"
MNT=/mnt

die() { echo "BENCH-ERROR: $*" >&2; exit 1; }
[[ -x $BIN ]] || die "no ublk-cache binary at $BIN (build it first)"
command -v sqlite3 >/dev/null || die "no sqlite3 (the host side installs it)"
command -v mkfs.ext4 >/dev/null || die "no mkfs.ext4"
DIRECT=${DISK_direct:?disk direct missing} SLOW=${DISK_slow:?disk slow missing}
UCBACK=${DISK_ucback:?disk ucback missing} UCCACHE=${DISK_uccache:?disk uccache missing}
mkdir -p results "$MNT"

exec 3>>setup.log
log() { local m; m="$(date +%T) $*"; echo "$m"; echo "$m" >&3; }
log "guest: $(nproc) CPUs, kernel $(uname -r); $("$BIN" --version 2>&1 | head -n1); sqlite $(sqlite3 --version | cut -d' ' -f1)"
log "settings: rounds=$ROUNDS commits=$N queues=$QUEUES"

# The workload: N transactions of one small row each, each made durable.
{
    echo "PRAGMA journal_mode=WAL;"
    echo "PRAGMA synchronous=FULL;"
    echo "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);"
    for _ in $(seq 1 "$N"); do echo "INSERT INTO t(v) VALUES (randomblob(200));"; done
} >/tmp/commits.sql

# commits DEV OUT: a fresh ext4 on DEV, the workload timed, unmounted.
commits() {
    local dev=$1 out=$2 t0 t1
    mkfs.ext4 -q -F -E nodiscard "$dev" || return 1
    mount -o noatime "$dev" "$MNT" || return 1
    sync
    t0=$(date +%s%N)
    sqlite3 "$MNT/db" </tmp/commits.sql >/dev/null || { umount "$MNT"; return 1; }
    t1=$(date +%s%N)
    [[ $(sqlite3 "$MNT/db" 'SELECT count(*) FROM t;') == "$N" ]] || { umount "$MNT"; return 1; }
    umount "$MNT" || return 1
    echo "$N $((t1 - t0))" >"$out"
}

# serve MODE [OPTIONS...]: ublk-cache over the throttled disk (a fresh cache).
serve() {
    local mode=$1; shift
    wipe_cache "$UCCACHE"
    if [[ $mode == none ]]; then
        start_server ucache.log --backend "dev:$UCBACK" --mode none --queues "$QUEUES" "$@"
    else
        start_server ucache.log --backend "dev:$UCBACK" --cache "$UCCACHE" --mode "$mode" \
            --queues "$QUEUES" "$@"
    fi
}

for r in $(seq 1 "$ROUNDS"); do
    for p in "${PEERS[@]}"; do
        out=results/$r-$p.txt
        case $p in
            direct) commits "$DIRECT" "$out" || die "round $r $p failed" ;;
            slow) commits "$SLOW" "$out" || die "round $r $p failed" ;;
            none | relaxed | ordered | held)
                case $p in
                    none) serve none || die "ublk-cache (none) did not start" ;;
                    relaxed) serve back --writeback-order relaxed || die "ublk-cache (relaxed) did not start" ;;
                    ordered) serve back --writeback-order ordered || die "ublk-cache (ordered) did not start" ;;
                    held) serve back --writeback-order relaxed --writeback-iops 1 || die "ublk-cache (held) did not start" ;;
                esac
                commits "$DEV" "$out" || { stop_server_hard; die "round $r $p failed"; }
                "$BIN" ctl "${DEV#/dev/ublkb}" stats --json >"results/$r-$p.stats.json"
                # The stop writes back what is dirty; not part of the measurement.
                stop_server || die "ublk-cache did not stop cleanly after $p"
                ;;
        esac
        log "round $r $p: $(<"$out")"
    done
done
log "done"
echo "BENCH-DONE"
