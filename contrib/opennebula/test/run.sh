#!/bin/bash
# contrib/opennebula/test/run.sh: the ublk_cache OpenNebula driver, driven
# exactly as oned drives it, against the real helper, real ublk-cache servers
# (NBD exports), the Ceph test cluster and real file caches (onesim.py says
# what is simulated and what is a test double). Also shellcheck of every
# script of the driver.
#
#   contrib/opennebula/test/run.sh [SCENARIO...]
#
# Needs root (mount namespaces, loop-mounted cache stores), the Ceph test
# cluster of scripts/ceph-cluster.sh (UBLK_CACHE_CEPH_CONF/_DIR in the
# environment; a ceph-mgr is started on it for `ceph df`), shellcheck,
# qemu-io, and the binaries (UBLK_CACHE_BIN, UBLKC_HELPER_BIN; default
# target/debug). Without a cluster it prints SKIP, unless
# UBLK_CACHE_REQUIRE_CEPH=1 (scripts/test.sh): then that is a failure.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONTRIB=$(cd "$HERE/.." && pwd)
REPO=$(cd "$HERE/../../.." && pwd)

die() { echo "opennebula harness: $*" >&2; exit 1; }

if [[ -z ${UBLKC_IN_NS:-} ]]; then
echo "== shellcheck of the driver's scripts"
command -v shellcheck >/dev/null || die "shellcheck is not installed (scripts/install-deps.sh installs it)"
# Every shell script (by its #! line or a `shellcheck shell=` directive).
mapfile -t scripts < <(cd "$CONTRIB" && { find remotes test -type f; echo install.sh; } |
    xargs grep -lE '^#!/bin/(ba)?sh|^# shellcheck shell=' | sort)
(cd "$CONTRIB" && shellcheck -x -P SCRIPTDIR "${scripts[@]}")
echo "shellcheck: ${#scripts[@]} scripts clean"
fi

if [[ -z ${UBLK_CACHE_CEPH_CONF:-} ]]; then
    [[ ${UBLK_CACHE_REQUIRE_CEPH:-0} == 1 ]] && die "UBLK_CACHE_REQUIRE_CEPH=1 but no Ceph test cluster (UBLK_CACHE_CEPH_CONF)"
    echo "SKIP: opennebula harness: no Ceph test cluster (scripts/ceph-cluster.sh start DIR; eval \"\$(scripts/ceph-cluster.sh env DIR)\"): the OpenNebula driver was NOT tested"
    exit 0
fi
[[ $(id -u) == 0 ]] || die "needs root (mount namespaces and loop mounts)"
for t in qemu-io unshare mkfs.ext4 rbd ceph; do
    command -v "$t" >/dev/null || die "$t is not installed"
done
export UBLKC_REAL_UBLK_CACHE=${UBLK_CACHE_BIN:-$REPO/target/debug/ublk-cache}
export UBLKC_HELPER_BIN=${UBLKC_HELPER_BIN:-$REPO/target/debug/ublk-cache-one}
[[ -x $UBLKC_REAL_UBLK_CACHE && -x $UBLKC_HELPER_BIN ]] ||
    die "build the binaries first (cargo build -p ublk-cache -p ublk-cache-one): $UBLKC_REAL_UBLK_CACHE, $UBLKC_HELPER_BIN"
export CEPH_CONF=$UBLK_CACHE_CEPH_CONF

if [[ -z ${UBLKC_IN_NS:-} ]]; then
    # Every mount of the harness (loop stores, the hosts' namespaces) lives in
    # a mount namespace of its own and goes with it.
    export UBLKC_IN_NS=1
    exec unshare -m --propagation private "$0" "$@"
fi

"$REPO/scripts/ceph-cluster.sh" mgr "${UBLK_CACHE_CEPH_DIR:?}"

T=$(mktemp -d /tmp/ublkc-harness.XXXXXX)
export UBLKC_T=$T
cleanup() {
    local f pid
    # The servers the harness started (their pids from ublk-cache's registries).
    for f in "$T"/hosts/*/root/run/*.json; do
        [[ -f $f ]] || continue
        pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$f")
        if [[ -n $pid ]]; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    for f in "$T"/hosts/*/root/ls; do
        if mountpoint -q "$f"; then umount "$f" || true; fi
    done
    if [[ ${UBLKC_KEEP:-0} == 1 ]]; then
        echo "opennebula harness: kept $T"
    else
        rm -rf "$T"
    fi
}
trap cleanup EXIT
/usr/bin/python3 "$HERE/onesim.py" "$@"
