#!/usr/bin/env bash
# tests/vm/bench.sh — the ublk benchmark in the VM test bed (host side).
#
# Boots one QEMU/TCG guest (tests/vm/run.sh) with five identical virtio disks
# and runs tests/vm/guest/bench.sh in it: fio io_uring on a raw disk, the
# kernel loop driver (direct I/O) over one, rublk's loop target over one, and
# ublk-cache (back mode, warm; cache and backend each on their own disk), in
# turn, job by job, for several rounds. Then prints the medians and ratios
# (markdown) and writes them to WORKDIR/results.md and results.json; the fio
# JSON of every run stays in WORKDIR/results/.
#
# Not part of CI and not called by scripts/test.sh: numbers, not a verdict.
#
# Usage: tests/vm/bench.sh
# Environment (defaults in brackets):
#   BENCH_ROUNDS [3]     rounds (every job on every peer once per round)
#   BENCH_RUNTIME [15]   seconds measured per fio run, after BENCH_RAMP [3] s
#   BENCH_SIZE [256M]    working set (fio --size) on every disk
#   BENCH_DISK_SIZE [1G] size of each virtio disk
#   BENCH_QUEUES [2] BENCH_DEPTH [128]  ublk queues and depth, for rublk and ublk-cache alike
#   BENCH_JOBS [all]     space-separated subset of: randread-4k-qd32 randread-4k-qd1
#                        randwrite-4k-qd32 read-1m-qd8 randrw-70-30-zipf
#   BENCH_SMP [2] BENCH_MEM [1536]  guest CPUs and memory (MiB)
#   BENCH_BUILD [1]      0: use target/release/ublk-cache as it is
#   BENCH_WORKDIR        [tests/vm/.cache/bench/<time>-<pid>]
# The defaults take about 30 minutes on 2 host cores.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="$HERE/.cache"
cd "$REPO"

log() { printf 'bench.sh: %s\n' "$*" >&2; }
die() { printf 'bench.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# The peer: rublk's loop target, pinned (its own Cargo.lock, --locked).
RUBLK_VERSION=0.2.15
RUBLK_ROOT="$CACHE/rublk"
RUBLK="$RUBLK_ROOT/bin/rublk"

ROUNDS=${BENCH_ROUNDS:-3} RUNTIME=${BENCH_RUNTIME:-15} RAMP=${BENCH_RAMP:-3}
SIZE=${BENCH_SIZE:-256M} DISK_SIZE=${BENCH_DISK_SIZE:-1G}
QUEUES=${BENCH_QUEUES:-2} DEPTH=${BENCH_DEPTH:-128}
JOBS=${BENCH_JOBS:-randread-4k-qd32 randread-4k-qd1 randwrite-4k-qd32 read-1m-qd8 randrw-70-30-zipf}
SMP=${BENCH_SMP:-2} MEM=${BENCH_MEM:-1536}
for v in ROUNDS RUNTIME RAMP QUEUES DEPTH SMP MEM; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "BENCH_$v must be a positive integer, not '${!v}'"
done
[[ $SIZE =~ ^[0-9]+[KMG]?$ && $DISK_SIZE =~ ^[0-9]+[KMG]?$ ]] \
    || die "BENCH_SIZE and BENCH_DISK_SIZE take a size like 256M or 1G"
(( $(numfmt --from=iec "$SIZE") <= $(numfmt --from=iec "$DISK_SIZE") )) \
    || die "BENCH_SIZE ($SIZE) is larger than BENCH_DISK_SIZE ($DISK_SIZE)"
command -v python3 >/dev/null || die "python3 is needed for the report"

# Builds take the machine-wide build lock (never two cargo builds at once).
cargo_locked() { flock /tmp/ublk-cargo.lock cargo "$@"; }

"$HERE/setup.sh"

if [[ ! -x $RUBLK || $("$RUBLK" --version 2>/dev/null) != "rublk $RUBLK_VERSION" ]]; then
    log "installing rublk $RUBLK_VERSION into $RUBLK_ROOT (a few minutes)"
    cargo_locked install rublk --no-default-features --version "$RUBLK_VERSION" --locked \
        --force --root "$RUBLK_ROOT" >&2 || die "cargo install rublk $RUBLK_VERSION failed"
fi
# shellcheck source=tests/vm/bench-lib.sh
source "$HERE/bench-lib.sh"
bench_build
bench_workdir "$CACHE/bench" "${BENCH_WORKDIR:-}"

# The guest reads its settings from here (run.sh passes no environment).
cat >"$WORKDIR/bench.conf" <<EOF
BENCH_ROUNDS=$ROUNDS
BENCH_RUNTIME=$RUNTIME
BENCH_RAMP=$RAMP
BENCH_SIZE=$SIZE
BENCH_QUEUES=$QUEUES
BENCH_DEPTH=$DEPTH
BENCH_JOBS="$JOBS"
BENCH_RUBLK=$RUBLK
EOF

njobs=$(wc -w <<<"$JOBS")
# Per fio run: runtime + ramp + fio start-up and stats under TCG; per round a
# write-back of what the write jobs left dirty; plus boot, prefill and warm-up.
timeout=$(( ROUNDS * njobs * 4 * (RUNTIME + RAMP + 10) + ROUNDS * 120 + 900 ))
log "workdir $WORKDIR; $ROUNDS rounds x $njobs jobs x 4 peers, ${RUNTIME}s + ${RAMP}s ramp each (guest timeout ${timeout}s)"
disks=()
for d in raw loopb rublkb ucback uccache; do disks+=(--disk "$d:$DISK_SIZE"); done
start=$SECONDS
rc=0
"$HERE/run.sh" --workdir "$WORKDIR" --timeout "$timeout" --smp "$SMP" --mem "$MEM" \
    "${disks[@]}" "$HERE/guest/bench.sh" >"$WORKDIR/run.log" 2>&1 || rc=$?
if (( rc != 0 )); then
    tail -n 40 "$WORKDIR/run.log" >&2
    die "the guest run failed (exit $rc); see $WORKDIR/run.log and $WORKDIR/setup.log"
fi
log "guest run took $(( SECONDS - start )) s"

python3 "$HERE/bench_report.py" "$WORKDIR" \
    --host-cpus "$(nproc)" --elapsed "$(( SECONDS - start ))" \
    --command "$(printf '%q ' env BENCH_ROUNDS="$ROUNDS" BENCH_RUNTIME="$RUNTIME" BENCH_RAMP="$RAMP" \
        BENCH_SIZE="$SIZE" BENCH_QUEUES="$QUEUES" BENCH_DEPTH="$DEPTH" tests/vm/bench.sh)" \
    | tee "$WORKDIR/results.md"
log "results: $WORKDIR/results.md, results.json; fio JSON in $WORKDIR/results/"
