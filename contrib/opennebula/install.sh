#!/bin/bash
# contrib/opennebula/install.sh: install the ublk_cache OpenNebula driver.
#
#   install.sh --frontend [--one-location DIR] [--helper PATH]
#       On the front-end (as root or oneadmin): the TM driver into
#       REMOTES/tm/ublk_cache, its settings into REMOTES/etc/tm/ublk_cache,
#       the host probe into REMOTES/im/kvm-probes.d/host/system, and the
#       helper binary (the TM scripts' planner) to /usr/lib/ublk-cache.
#       REMOTES is /var/lib/one/remotes, or DIR/var/remotes with
#       --one-location (or $ONE_LOCATION). Prints the oned.conf lines to add.
#   install.sh --host [--root DIR] [--helper PATH] [--ublk-cache PATH]
#       On each KVM host (as root): the helper (root:root 0755), ublk-cache,
#       the systemd unit, sudoers for oneadmin, and /etc/ublk-cache/one.conf
#       from the example if there is none (an existing one is never touched).
#       --root installs under DIR instead of / (packaging, tests).
#
# Binaries default to this checkout's target/release (cargo build --release
# -p ublk-cache -p ublk-cache-one).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*" >&2; }

mode='' one_location=${ONE_LOCATION:-} root='' helper=$REPO/target/release/ublk-cache-one
ublk=$REPO/target/release/ublk-cache
while (($#)); do
    case $1 in
        --frontend) mode=frontend; shift ;;
        --host) mode=host; shift ;;
        --one-location) one_location=${2:?--one-location DIR}; shift 2 ;;
        --root) root=${2:?--root DIR}; shift 2 ;;
        --helper) helper=${2:?--helper PATH}; shift 2 ;;
        --ublk-cache) ublk=${2:?--ublk-cache PATH}; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ -n $mode ]] || die "say --frontend or --host (see --help)"
[[ -x $helper ]] || die "no helper binary at $helper (cargo build --release -p ublk-cache-one, or --helper PATH)"

# install_file SRC DST MODE: copy, replacing DST.
install_file() { install -D -m "$3" "$1" "$2"; }

# A config file is installed only where none exists: an operator's edits stay.
install_conf() {
    if [[ -e $2 ]]; then
        if cmp -s "$1" "$2"; then return 0; fi
        say "kept the existing $2 (the shipped one is $1)"
        return 0
    fi
    install -D -m "$3" "$1" "$2"
}

frontend() {
    local remotes
    if [[ -n $one_location ]]; then remotes=$one_location/var/remotes; else remotes=/var/lib/one/remotes; fi
    [[ -d $remotes ]] || die "$remotes does not exist (is OpenNebula installed? give --one-location)"
    local tm=$remotes/tm/ublk_cache f
    mkdir -p "$tm"
    for f in "$HERE"/remotes/tm/ublk_cache/*; do
        if [[ -L $f ]]; then
            ln -sfn "$(readlink "$f")" "$tm/$(basename "$f")"
        elif [[ $(basename "$f") == *.sh ]]; then
            install_file "$f" "$tm/$(basename "$f")" 0644
        else
            install_file "$f" "$tm/$(basename "$f")" 0755
        fi
    done
    install_conf "$HERE/remotes/etc/tm/ublk_cache/ublk_cache.conf" "$remotes/etc/tm/ublk_cache/ublk_cache.conf" 0644
    install_file "$HERE/remotes/im/kvm-probes.d/host/system/ublk_cache.sh" \
        "$remotes/im/kvm-probes.d/host/system/ublk_cache.sh" 0755
    install_file "$helper" "${root}/usr/lib/ublk-cache/ublk-cache-one" 0755
    if id oneadmin >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
        chown -R oneadmin:oneadmin "$tm" "$remotes/etc/tm/ublk_cache" \
            "$remotes/im/kvm-probes.d/host/system/ublk_cache.sh"
    fi
    say "installed the ublk_cache TM into $tm"
    say "add to oned.conf and restart oned:"
    cat "$HERE/oned.conf.snippet"
    say "then copy the probe to the hosts: onehost sync --force"
}

host() {
    [[ -x $ublk ]] || die "no ublk-cache binary at $ublk (cargo build --release -p ublk-cache, or --ublk-cache PATH)"
    install_file "$helper" "$root/usr/lib/ublk-cache/ublk-cache-one" 0755
    install_file "$ublk" "$root/usr/local/bin/ublk-cache" 0755
    install_file "$REPO/contrib/systemd/ublk-cache@.service" "$root/etc/systemd/system/ublk-cache@.service" 0644
    local sudoers=$HERE/host/sudoers.d/ublk-cache-one
    if command -v visudo >/dev/null; then
        visudo -cqf "$sudoers" || die "$sudoers does not pass visudo -c"
    fi
    install_file "$sudoers" "$root/etc/sudoers.d/ublk-cache-one" 0440
    install_conf "$HERE/host/one.conf.example" "$root/etc/ublk-cache/one.conf" 0644
    mkdir -p "$root/var/lib/ublk-cache/one"
    chmod 0700 "$root/var/lib/ublk-cache/one"
    if [[ -z $root ]] && [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
    fi
    say "installed on this host; review $root/etc/ublk-cache/one.conf (LS_MAD, LS_PATH, LS_MAX)"
}

"$mode"
