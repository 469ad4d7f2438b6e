#!/usr/bin/env bash
# scripts/test.sh — the whole test suite: formatting, lints, unit and property
# tests, the NBD export against real clients (qemu-io, qemu-img, nbdinfo,
# nbdcopy, fio), the OpenNebula driver harness, and the end-to-end scenarios on
# a real ublk kernel in a QEMU guest.
#   scripts/test.sh                 # everything (what CI runs)
#   UBLK_CACHE_SKIP_VM=1 scripts/test.sh   # host tests only (says SKIP loudly)
# The RBD tests run against a throw-away single-node Ceph cluster that this
# script starts (scripts/ceph-cluster.sh) and stops again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
export CARGO_TERM_COLOR=never
# The NBD conformance tests fail (instead of printing SKIP) when a client tool
# (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) is missing: install-deps put them there.
export UBLK_CACHE_REQUIRE_NBD_CLIENTS=1

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo clippy, without the rbd feature (builds with no librbd)"
cargo clippy --workspace --all-targets --no-default-features -- -D warnings
echo "== cargo clippy, the packaged binaries (without the test kit's \`testing\` hooks)"
cargo clippy -p ublk-cache --lib --bins -p ublk-cache-one -- -D warnings

echo "== Ceph test cluster"
ceph_dir=$(mktemp -d /tmp/ublk-cache-ceph.XXXXXX)
trap 'scripts/ceph-cluster.sh stop "$ceph_dir" || true' EXIT
if scripts/ceph-cluster.sh start "$ceph_dir"; then
    eval "$(scripts/ceph-cluster.sh env "$ceph_dir")"
    # Every RBD test must run: none may skip for want of a cluster.
    export UBLK_CACHE_REQUIRE_CEPH=1
else
    echo "SKIP: the Ceph test cluster did not start (logs in $ceph_dir/log): the RBD backend was NOT tested"
    CEPH_CLUSTER_KEEP=1 scripts/ceph-cluster.sh stop "$ceph_dir" || true
    trap - EXIT
fi
echo "== cargo test"
cargo test --workspace
echo "== OpenNebula driver: transfer actions replayed as oned runs them (contrib/opennebula/test/run.sh)"
cargo build -q -p ublk-cache -p ublk-cache-one
contrib/opennebula/test/run.sh
scripts/ceph-cluster.sh stop "$ceph_dir" || true
trap - EXIT
echo "== crash-state harness (fixed seeds, at least 100000 states; CRASH_SOAK=1 for a long soak)"
cargo run --release -q -p ublk-cache-tests --bin crash-harness
echo "== benchmark runner smoke (BENCH_SMOKE=1: tiny, checks the machinery only; its numbers mean nothing)"
cargo build --release -q -p ublk-cache -p ublk-cache-benches
bench_json=$(mktemp -d /tmp/ublk-cache-bench-smoke.XXXXXX)
BENCH_SMOKE=1 BENCH_JSON="$bench_json/smoke.json" /usr/bin/python3 benches/run.py
echo "== boot-prefetch benchmark smoke (BOOT_SMOKE=1: tiny, checks the machinery only)"
BOOT_SMOKE=1 BOOT_JSON="$bench_json/boot.json" /usr/bin/python3 benches/boot-prefetch.py
rm -rf "$bench_json"
echo "== Debian package: build, install into a clean Debian 12 root, run --version and demo there"
mapfile -t debs < <(scripts/build-deb.sh)
((${#debs[@]} == 2)) || { echo "build-deb.sh made ${#debs[@]} packages, expected 2: ${debs[*]}" >&2; exit 1; }
scripts/test-deb.sh "${debs[@]}"
if [[ ${UBLK_CACHE_SKIP_VM:-0} == 1 ]]; then
    echo "SKIP: VM scenarios (UBLK_CACHE_SKIP_VM=1): the ublk path was NOT tested"
else
    echo "== VM scenarios (real ublk kernel under QEMU/TCG)"
    tests/vm/run-suite.sh
fi
