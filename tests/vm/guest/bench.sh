#!/usr/bin/env bash
# tests/vm/guest/bench.sh — the ublk benchmark, guest side. Started by
# tests/vm/bench.sh (host side; it prints the table), never by CI.
#
# Four peers, each on its own identical virtio disk, measured in turn in every
# round (raw, loop, rublk, ublk-cache; raw, loop, ...), one job at a time:
#   raw    fio io_uring, direct=1, on the virtio disk itself
#   loop   the kernel loop driver over a raw disk (losetup --direct-io=on)
#   rublk  rublk's loop target (libublk) over a raw disk
#   ucache ublk-cache serve --mode back: cache on one virtio disk, backend on
#          another; warm (the working set is read once before measuring)
# rublk and ublk-cache get the same queue count and depth.
#
# Settings come from bench.conf in the work dir (written by the host side):
# BENCH_ROUNDS, BENCH_RUNTIME, BENCH_RAMP, BENCH_SIZE, BENCH_QUEUES,
# BENCH_DEPTH, BENCH_JOBS, BENCH_RUBLK.
#
# Output in the work dir: results/R-JOB-PEER.json (fio), R-JOB-PEER.cpu
# (per-thread CPU ticks of the peer's server before and after the run, and the
# guest's /proc/stat cpu line), R-JOB-ucache.stats-{before,after}.json
# (ublk-cache counters), setup.log.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# shellcheck source=/dev/null
[[ -f bench.conf ]] && source bench.conf
ROUNDS=${BENCH_ROUNDS:-3}
RUNTIME=${BENCH_RUNTIME:-15}
RAMP=${BENCH_RAMP:-3}
SIZE=${BENCH_SIZE:-256M}
QUEUES=${BENCH_QUEUES:-2}
DEPTH=${BENCH_DEPTH:-128}
JOBS=${BENCH_JOBS:-randread-4k-qd32 randread-4k-qd1 randwrite-4k-qd32 read-1m-qd8 randrw-70-30-zipf}
RUBLK=${BENCH_RUBLK:?BENCH_RUBLK (the rublk binary) not set}
PEERS=(raw loop rublk ucache)
LOSETUP=/usr/sbin/losetup   # by path: the guest's busybox applets shadow util-linux

die() { echo "BENCH-ERROR: $*" >&2; exit 1; }
[[ -x $BIN ]] || die "no ublk-cache binary at $BIN (build it first)"
[[ -x $RUBLK ]] || die "no rublk binary at $RUBLK"
[[ -x $LOSETUP ]] || die "no util-linux losetup at $LOSETUP"
# Disks by virtio serial (tests/vm/bench.sh attaches them, all the same size).
RAW=${DISK_raw:?disk raw missing} LOOPB=${DISK_loopb:?disk loopb missing}
RUBLKB=${DISK_rublkb:?disk rublkb missing} UCBACK=${DISK_ucback:?disk ucback missing}
UCCACHE=${DISK_uccache:?disk uccache missing}
mkdir -p results
getconf CLK_TCK >results/clk_tck

# fio_job JOB: the job's workload options.
fio_job() {
    case $1 in
        randread-4k-qd32) echo --rw=randread --bs=4k --iodepth=32 ;;
        randread-4k-qd1) echo --rw=randread --bs=4k --iodepth=1 ;;
        randwrite-4k-qd32) echo --rw=randwrite --bs=4k --iodepth=32 ;;
        read-1m-qd8) echo --rw=read --bs=1M --iodepth=8 ;;
        # As benches/fio/randrw-70-30-zipf.fio.
        randrw-70-30-zipf) echo --rw=randrw --rwmixread=70 --random_distribution=zipf:1.2 --bs=4k --iodepth=16 ;;
        *) return 1 ;;
    esac
}
for j in $JOBS; do fio_job "$j" >/dev/null || die "unknown job $j"; done

# fio_run DEV NAME OUT [OPTIONS...]: one fio process, JSON to OUT.
fio_run() {
    local dev=$1 name=$2 out=$3; shift 3
    fio --name="$name" --filename="$dev" --ioengine=io_uring --direct=1 --size="$SIZE" \
        --numjobs=1 --group_reporting=1 --output-format=json --output="$out" "$@"
}

# cpu_snapshot PID: per-thread "tid comm utime stime ctxt-switches" (CPU in clock ticks), then the
# guest's aggregate cpu line from /proc/stat.
cpu_snapshot() {
    local pid=$1 t s rest
    if [[ -n $pid ]]; then
        for t in /proc/"$pid"/task/*; do
            s=$(<"$t/stat") 2>/dev/null || continue
            rest=${s##*) }
            # shellcheck disable=SC2086
            set -- $rest
            local ut=${12} st=${13} cs
            # Context switches (voluntary + involuntary): how often it slept.
            cs=$(awk '/ctxt_switches/ {n += $2} END {print n + 0}' "$t/status" 2>/dev/null)
            printf 'thread %s %s %s %s %s\n' "${t##*/}" "$(tr ' ' _ <"$t/comm")" "$ut" "$st" "${cs:-0}"
        done
    fi
    grep '^cpu ' /proc/stat
}

# ------------------------------------------------------------------ setup
exec 3>>setup.log
log() { local m; m="$(date +%T) $*"; echo "$m"; echo "$m" >&3; }
log "guest: $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), kernel $(uname -r)"
log "settings: rounds=$ROUNDS runtime=${RUNTIME}s ramp=${RAMP}s size=$SIZE queues=$QUEUES depth=$DEPTH"
log "jobs: $JOBS"
log "ublk-cache: $("$BIN" --version 2>&1 | head -n1); rublk: $("$RUBLK" --version 2>&1 | head -n1); fio: $(fio --version)"

# Write the working set of every raw disk once, so that no peer reads holes.
for d in "$RAW" "$LOOPB" "$RUBLKB" "$UCBACK"; do
    log "prefill $SIZE of $d"
    fio_run "$d" prefill "results/prefill-${d#/dev/}.json" --rw=write --bs=1M --iodepth=8 \
        || die "prefill of $d failed"
done

declare -A DEVOF PIDOF
DEVOF[raw]=$RAW
PIDOF[raw]=

LOOPDEV=$("$LOSETUP" --direct-io=on --show -f "$LOOPB") || die "losetup failed"
[[ $(<"/sys/block/${LOOPDEV#/dev/}/loop/dio") == 1 ]] || die "$LOOPDEV is not in direct-I/O mode"
DEVOF[loop]=$LOOPDEV
PIDOF[loop]=
log "loop: $LOOPDEV over $LOOPB, dio=1, nr_requests=$(<"/sys/block/${LOOPDEV#/dev/}/queue/nr_requests")"

# rublk: direct I/O is its loop target's default (--buffered_io turns it off).
ublk_devs() { local b; for b in /sys/block/ublkb*; do [[ -e $b ]] && echo "${b##*/}"; done; }
before_ublk=$(ublk_devs)
"$RUBLK" add loop -f "$RUBLKB" -q "$QUEUES" -d "$DEPTH" >rublk-add.out 2>rublk.log \
    || { cat rublk-add.out rublk.log; die "rublk add loop failed"; }
cat rublk-add.out >&3
RUBLKDEV=
for _ in $(seq 1 100); do
    for b in $(ublk_devs); do
        grep -qx "$b" <<<"$before_ublk" || RUBLKDEV=/dev/$b
    done
    [[ -b $RUBLKDEV ]] && break
    sleep 0.1
done
[[ -b $RUBLKDEV ]] || die "rublk added no /dev/ublkbN"
RUBLKID=${RUBLKDEV#/dev/ublkb}
# The daemon rublk left behind (add forks it and returns once the device is live).
RUBLKPID=$(pgrep -o -f -- "add loop -f $RUBLKB" || true)
[[ -n $RUBLKPID ]] || die "no rublk daemon process found"
DEVOF[rublk]=$RUBLKDEV
PIDOF[rublk]=$RUBLKPID
log "rublk: $RUBLKDEV, daemon pid $RUBLKPID"
"$RUBLK" list -n "$RUBLKID" >&3 2>&1 || true

wipe_cache "$UCCACHE"
start_server ucache.log --backend "dev:$UCBACK" --cache "$UCCACHE" --mode back \
    --queues "$QUEUES" --depth "$DEPTH" || die "ublk-cache did not start (ucache.log)"
UCID=${DEV#/dev/ublkb}
DEVOF[ucache]=$DEV
PIDOF[ucache]=$SERVER_PID
log "ublk-cache: $DEV, pid $SERVER_PID"
nr_hw_queues() { local n=0 q; for q in /sys/block/"$1"/mq/*; do [[ -d $q ]] && n=$((n + 1)); done; echo "$n"; }
for p in rublk ucache; do
    b=${DEVOF[$p]#/dev/}
    log "$p queue: nr_hw_queues=$(nr_hw_queues "$b") nr_requests=$(<"/sys/block/$b/queue/nr_requests") max_sectors_kb=$(<"/sys/block/$b/queue/max_sectors_kb")"
done
log "raw/loop queue: virtio nr_hw_queues=$(nr_hw_queues "${RAW#/dev/}") nr_requests=$(<"/sys/block/${RAW#/dev/}/queue/nr_requests") max_sectors_kb=$(<"/sys/block/${RAW#/dev/}/queue/max_sectors_kb"); loop max_sectors_kb=$(<"/sys/block/${LOOPDEV#/dev/}/queue/max_sectors_kb")"

# Warm: read the working set once; repeat (at most twice more) only if the cache
# did not take it all (promotion is best effort), and say so.
want=$(numfmt --from=iec "$SIZE")
for pass in 1 2 3; do
    fio_run "$DEV" warm "results/warm-$pass.json" --rw=read --bs=1M --iodepth=8 || die "warm read failed"
    "$BIN" ctl "$UCID" stats --json >"results/warm-$pass.stats.json"
    valid=$(sed -n 's/.*"valid_bytes":\([0-9]*\).*/\1/p' "results/warm-$pass.stats.json")
    log "warm pass $pass: valid_bytes=$valid of $want"
    (( valid >= want )) && break
done

# ------------------------------------------------------------------ rounds
for r in $(seq 1 "$ROUNDS"); do
    for j in $JOBS; do
        for p in "${PEERS[@]}"; do
            base=results/$r-$j-$p
            read -ra opts <<<"$(fio_job "$j")"
            [[ $p == ucache ]] && "$BIN" ctl "$UCID" stats --json >"$base.stats-before.json"
            cpu_snapshot "${PIDOF[$p]}" >"$base.cpu"
            echo "--" >>"$base.cpu"
            fio_run "${DEVOF[$p]}" "$j" "$base.json" "${opts[@]}" --time_based=1 \
                --runtime="$RUNTIME" --ramp_time="$RAMP" \
                || { log "fio failed: round $r $j $p"; cat "$base.json"; exit 1; }
            cpu_snapshot "${PIDOF[$p]}" >>"$base.cpu"
            if [[ $p == ucache ]]; then
                "$BIN" ctl "$UCID" stats --json >"$base.stats-after.json"
                if [[ $j == *write* || $j == *rw* ]]; then
                    # Write back what the job left dirty before the next peer runs,
                    # so that our flusher does not run during their measurement.
                    t0=$SECONDS
                    "$BIN" ctl "$UCID" flush --json >"$base.flush.json" 2>/dev/null \
                        || die "ctl flush failed after $j"
                    log "round $r $j: ublk-cache write-back after the job took $((SECONDS - t0)) s"
                fi
            fi
            log "round $r $j $p: done"
        done
    done
done

# ---------------------------------------------------------------- teardown
"$BIN" ctl "$UCID" stats >ucache-stats.txt 2>&1
stop_server || die "ublk-cache did not stop cleanly"
"$RUBLK" del -n "$RUBLKID" >>rublk.log 2>&1 || log "rublk del failed (see rublk.log)"
"$LOSETUP" -d "$LOOPDEV" || log "losetup -d failed"
log "done"
echo "BENCH-DONE"
