#!/usr/bin/env bash
# benches/rbd-bench.sh [ROUNDS] [SECS] — our NBD export over RBD against fio's
# rbd engine, on a throw-away single-node cluster (scripts/ceph-cluster.sh),
# started here and stopped again. Prints a Markdown table of IOPS and ratios.
# Default: 3 rounds of 8 s per job and side, a few minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/ublk-cache-bench-ceph.XXXXXX)
trap 'scripts/ceph-cluster.sh stop "$dir" >/dev/null 2>&1 || true' EXIT
# The image (256 MiB by default) is held in RAM by memstore at about 1.75x.
CEPH_MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-2147483648} scripts/ceph-cluster.sh start "$dir"
eval "$(scripts/ceph-cluster.sh env "$dir")"
cargo build --release -q -p ublk-cache -p ublk-cache-benches
target/release/rbd-vs-fio "$@"
