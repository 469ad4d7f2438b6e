#!/usr/bin/env bash
# tests/vm/bench-commit.sh — database commits on ext4 in the VM test bed (host
# side): SQLite (WAL, synchronous=FULL, one row per transaction) on ext4 on an
# unthrottled disk, on a throttled one (a busy Ceph: 300 IOPS, 80 MB/s), and
# on /dev/ublkbN served by ublk-cache over a throttled disk in `none` and in
# `back` (relaxed and ordered), in one guest, in turn, for a few rounds. Prints
# the medians and the ratios of issue 17 (markdown), also to WORKDIR/results.md.
#
# Not part of CI and not called by scripts/test.sh: numbers, not a verdict.
# TCG inflates CPU cost: only the ratios of one run mean anything.
#
# Usage: tests/vm/bench-commit.sh
# Environment (defaults in brackets):
#   COMMIT_ROUNDS [2]   rounds (every peer once per round)
#   COMMIT_N [600]      transactions per run
#   COMMIT_IOPS [300] COMMIT_BPS [80000000]  the throttled disks' limits
#   COMMIT_QUEUES [1]   ublk queues
#   COMMIT_PEERS [direct slow none relaxed ordered]  which peers run, in
#                       this order; `held` adds `back` with write-back held
#                       to one write a second (a diagnostic: the request
#                       path's cost without write-back competing)
#   BENCH_BUILD [1]     0: use target/release/ublk-cache as it is
#   COMMIT_WORKDIR      [tests/vm/.cache/bench-commit/<time>-<pid>]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="$HERE/.cache"
cd "$REPO"

log() { printf 'bench-commit.sh: %s\n' "$*" >&2; }
die() { printf 'bench-commit.sh: ERROR: %s\n' "$*" >&2; exit 1; }

ROUNDS=${COMMIT_ROUNDS:-2} N=${COMMIT_N:-600} QUEUES=${COMMIT_QUEUES:-1}
IOPS=${COMMIT_IOPS:-300} BPS=${COMMIT_BPS:-80000000}
for v in ROUNDS N QUEUES IOPS BPS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "COMMIT_$v must be a positive integer, not '${!v}'"
done
PEERS=${COMMIT_PEERS:-direct slow none relaxed ordered}
for p in $PEERS; do
    case $p in
        direct | slow | none | relaxed | ordered | held) ;;
        *) die "COMMIT_PEERS: unknown peer '$p' (direct, slow, none, relaxed, ordered, held)" ;;
    esac
done
[[ -n ${PEERS// /} ]] || die "COMMIT_PEERS is empty"

"$HERE/setup.sh"
if ! command -v sqlite3 >/dev/null; then
    log "installing sqlite3 (the guest runs the host's /usr)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends sqlite3 >&2 \
        || die "apt-get install sqlite3 failed"
fi
# shellcheck source=tests/vm/bench-lib.sh
source "$HERE/bench-lib.sh"
bench_build
bench_workdir "$CACHE/bench-commit" "${COMMIT_WORKDIR:-}"
cat >"$WORKDIR/bench-commit.conf" <<EOF
COMMIT_ROUNDS=$ROUNDS
COMMIT_N=$N
COMMIT_QUEUES=$QUEUES
COMMIT_PEERS="$PEERS"
EOF

npeers=$(wc -w <<<"$PEERS")
timeout=$(( ROUNDS * npeers * (N / 5 + 120) + 600 ))
log "workdir $WORKDIR; $ROUNDS rounds x $npeers peers ($PEERS) x $N commits; throttled disks $IOPS IOPS, $BPS B/s (guest timeout ${timeout}s)"
start=$SECONDS
rc=0
"$HERE/run.sh" --workdir "$WORKDIR" --timeout "$timeout" --mem 1536 \
    --disk direct:1G --disk slow:1G --disk ucback:1G --disk uccache:1G \
    --throttle "slow:$IOPS:$BPS" --throttle "ucback:$IOPS:$BPS" \
    "$HERE/guest/bench-commit.sh" >"$WORKDIR/run.log" 2>&1 || rc=$?
if (( rc != 0 )); then
    tail -n 40 "$WORKDIR/run.log" >&2
    die "the guest run failed (exit $rc); see $WORKDIR/run.log and $WORKDIR/setup.log"
fi
log "guest run took $(( SECONDS - start )) s"

python3 - "$WORKDIR" "$ROUNDS" "$N" "$IOPS" "$BPS" "$PEERS" <<'EOF' | tee "$WORKDIR/results.md"
import json, pathlib, statistics, sys, datetime
wd, rounds, n, iops, bps = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
peers = sys.argv[6].split()
label = {
    "held": "ublk-cache `back`, relaxed, write-back held to 1 write/s (diagnostic)",
    "direct": "ext4 directly on the unthrottled (cache) disk",
    "slow": "ext4 directly on the throttled (backend) disk",
    "none": "ublk-cache `none`",
    "relaxed": "ublk-cache `back`, relaxed",
    "ordered": "ublk-cache `back`, ordered",
}
rate = {}
for p in peers:
    runs = []
    for r in range(1, rounds + 1):
        c, ns = (wd / "results" / f"{r}-{p}.txt").read_text().split()
        runs.append(int(c) / (int(ns) / 1e9))
    rate[p] = (statistics.median(runs), runs)
print(f"SQLite commits on ext4, {n} per run, median of {rounds} rounds; throttled disks "
      f"{iops} IOPS, {bps} B/s ({datetime.date.today()}, tests/vm/bench-commit.sh)\n")
print("| how the database reaches its disk | commits/s | runs |")
print("|---|---|---|")
for p in peers:
    m, runs = rate[p]
    print(f"| {label[p]} | {m:.0f} | {', '.join(f'{x:.0f}' for x in runs)} |")
def ratio(a, b):
    return rate[a][0] / rate[b][0]
print("\n| ratio | measured | goal (issue 17) |")
print("|---|---|---|")
for a, b, goal in [("relaxed", "direct", "≥ 0.5"), ("relaxed", "slow", "≥ 2"),
                   ("ordered", "slow", "≥ 1.0"), ("none", "slow", "(data-path issue)"),
                   ("held", "relaxed", "(diagnostic)")]:
    if a in rate and b in rate:
        print(f"| {a} / {b} | {ratio(a, b):.2f}x | {goal} |")
# What a guest FLUSH cost the cache device (medians over the rounds).
rows = []
for p in [p for p in peers if p in ("relaxed", "ordered", "held")]:
    per = {"flush": [], "meta": [], "shared": [], "own": []}
    for r in range(1, rounds + 1):
        s = json.loads((wd / "results" / f"{r}-{p}.stats.json").read_text())
        f = s.get("flushes") or 0
        if f:
            per["flush"].append(s.get("cache_flushes", 0) / f)
            per["meta"].append(s.get("meta_write_bytes", 0) / f)
            per["shared"].append(s.get("watermark_shared_rounds", 0))
            per["own"].append(s.get("watermark_own_rounds", 0))
    if per["flush"]:
        rows.append((p, *(statistics.median(per[k]) for k in ("flush", "meta", "shared", "own"))))
if rows:
    print("\n| peer | cache-device flushes per guest FLUSH/FUA | metadata bytes per guest FLUSH/FUA | write-back watermarks in guest rounds | in rounds of their own |")
    print("|---|---|---|---|---|")
    for p, fl, meta, shared, own in rows:
        print(f"| {p} | {fl:.2f} | {meta:.0f} | {shared:.0f} | {own:.0f} |")
EOF
log "results: $WORKDIR/results.md"
