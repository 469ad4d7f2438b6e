#!/usr/bin/env bash
# tests/vm/run-suite.sh — build ublk-cache and run the guest scenarios on a
# real ublk kernel (QEMU/TCG). Installs what it needs (tests/vm/setup.sh).
#   tests/vm/run-suite.sh            # all suites
#   tests/vm/run-suite.sh core       # one suite (a script in tests/vm/guest/)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"

"$HERE/setup.sh"
cargo build --release -p ublk-cache -p ublk-cache-one
suites=("$@")
((${#suites[@]})) || suites=(core recovery opennebula)

rc=0
for s in "${suites[@]}"; do
    case $s in
        core) disks=(--disk backend:256M --disk cache:48M) ;;
        # An LVM physical volume for LS_MAD=lvm.
        opennebula) disks=(--disk pv:96M) ;;
        *) disks=(--disk backend:256M --disk cache:48M) ;;
    esac
    script="$HERE/guest/$s.sh"
    [[ -f $script ]] || { echo "run-suite: no guest suite $script" >&2; exit 2; }
    echo "run-suite: suite $s"
    if ! "$HERE/run.sh" --timeout "${VM_SUITE_TIMEOUT:-1500}" "${disks[@]}" "$script"; then
        echo "run-suite: suite $s FAILED" >&2
        rc=1
    fi
done
exit $rc
