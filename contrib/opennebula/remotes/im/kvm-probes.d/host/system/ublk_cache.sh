#!/bin/sh
# host/system probe of the ublk_cache driver: this host's local cache space
# for the scheduler (LC_MAD, LS_MAD, LS_PATH, LS_MAX, LS_TOTAL_MB, LS_USED_MB,
# LS_PARKED_MB, LS_FREE_MB, LC_DISKS land in HOST/TEMPLATE). It must never
# exit non-zero: one failing probe puts the whole host in error. Its stdin
# (monitord's config) is not read.
H=${UBLKC_HELPER:-/usr/lib/ublk-cache/ublk-cache-one}
SUDO=${UBLKC_SUDO-sudo -n}
if [ -x "$H" ]; then
    # shellcheck disable=SC2086 # $SUDO is a command with options
    $SUDO "$H" probe </dev/null 2>/dev/null || echo 'LC_ERROR="ublk-cache-one probe failed"'
else
    echo 'LC_MAD="none"'
fi
exit 0
