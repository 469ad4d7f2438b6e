#!/usr/bin/env bash
# scripts/test.sh — the whole test suite: formatting, lints, unit and property
# tests, the NBD export against real clients (qemu-io, qemu-img, nbdinfo,
# nbdcopy, fio), and the end-to-end scenarios on a real ublk kernel in a QEMU guest.
#   scripts/test.sh                 # everything (what CI runs)
#   UBLK_CACHE_SKIP_VM=1 scripts/test.sh   # host tests only (says SKIP loudly)
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
echo "== cargo test"
cargo test --workspace
echo "== crash-state harness (fixed seeds, at least 100000 states; CRASH_SOAK=1 for a long soak)"
cargo run --release -q -p ublk-cache-tests --bin crash-harness
if [[ ${UBLK_CACHE_SKIP_VM:-0} == 1 ]]; then
    echo "SKIP: VM scenarios (UBLK_CACHE_SKIP_VM=1): the ublk path was NOT tested"
else
    echo "== VM scenarios (real ublk kernel under QEMU/TCG)"
    tests/vm/run-suite.sh
fi
