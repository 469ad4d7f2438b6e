#!/usr/bin/env bash
# scripts/ceph-cluster.sh — a throw-away single-node Ceph cluster for the RBD tests.
#
#   scripts/ceph-cluster.sh start DIR   # start (or find running) 1 mon + 1 memstore OSD
#   scripts/ceph-cluster.sh env DIR     # print `export CEPH_CONF=...` lines for tests
#   scripts/ceph-cluster.sh stop DIR    # stop the OSD, then the mon; delete DIR
#   scripts/ceph-cluster.sh status DIR  # exit 0 if the cluster in DIR answers
#   scripts/ceph-cluster.sh mgr DIR     # also start a ceph-mgr (for `ceph df`); waits for pool stats
#
# Everything (conf, keyring, mon store, OSD data, pid files, sockets, logs) lives
# under DIR; nothing is registered with systemd. The daemons listen on 127.0.0.1
# only, on a free port range picked at start (or CEPH_CLUSTER_PORT). Data sits in
# RAM (memstore), sized by CEPH_MEMSTORE_BYTES (default 2 GiB: memstore keeps
# accepting writes past it, so tests must stay well below). No mgr is run unless
# asked (`mgr`), so `ceph df` shows no pools: every CLI call here is under `timeout`.
#
# `start` installs the Debian packages it needs (ceph-mon ceph-osd ceph-common
# librbd-dev librados-dev) when they are missing and we are root. It is
# idempotent: a running cluster in DIR is reused; a dead or half-made one is
# stopped and made anew. `stop` deletes DIR only if this script made it
# (CEPH_CLUSTER_KEEP=1 keeps it, e.g. to read the logs).
set -euo pipefail

PKGS=(ceph-mon ceph-osd ceph-common librbd-dev librados-dev)
MARK=.ublk-cache-ceph-cluster
T=20 # seconds for one CLI call

die() { echo "ceph-cluster: $*" >&2; exit 1; }
say() { echo "ceph-cluster: $*" >&2; }

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $# -eq 2 ]] || usage
cmd=$1
dir=$2
[[ $dir == /* ]] || dir=$PWD/$dir

conf=$dir/ceph.conf
keyring=$dir/keyring

cephq() { timeout "$T" ceph -c "$conf" "$@"; }

install_pkgs() {
    local need=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    ((${#need[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing Debian packages: ${need[*]} (run as root, or install them)"
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null 2>&1 || {
        apt-get update -qq -o DPkg::Lock::Timeout=600
        apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
    }
}

pid_of() { # name -> pid of a live daemon, or nothing
    local f=$dir/run/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ -d /proc/$pid ]] || return 1
    echo "$pid"
}

alive() {
    [[ -f $dir/$MARK && -f $conf ]] || return 1
    pid_of mon.a >/dev/null && pid_of osd.0 >/dev/null || return 1
    local up
    up=$(cephq osd stat -f json 2>/dev/null | grep -o '"num_up_osds":[0-9]*' | cut -d: -f2) || return 1
    [[ $up == 1 ]]
}

port_free() { # port -> 0 if nothing listens on any of port..port+19
    local p
    for ((p = $1; p < $1 + 20; p++)); do
        if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then return 1; fi
    done
}

pick_port() {
    if [[ -n ${CEPH_CLUSTER_PORT:-} ]]; then echo "$CEPH_CLUSTER_PORT"; return; fi
    local base=$((46000 + (RANDOM % 100) * 20)) i p
    for ((i = 0; i < 100; i++)); do
        p=$((46000 + (base - 46000 + i * 20) % 2000))
        if port_free "$p"; then echo "$p"; return; fi
    done
    die "no free port range of 20 found in 46000-47999"
}

stop_daemon() { # name: SIGTERM, wait up to 10 s, then SIGKILL
    local pid i
    pid=$(pid_of "$1") || return 0
    kill -CONT "$pid" 2>/dev/null || true # a test may have left it stopped
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.1
    done
    say "$1 (pid $pid) ignored SIGTERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    [[ -d $dir ]] || return 0
    if [[ ! -f $dir/$MARK ]]; then
        [[ -z $(ls -A "$dir" 2>/dev/null) ]] && return 0
        die "$dir was not made by this script; not touching it"
    fi
    stop_daemon mgr.x
    stop_daemon osd.0
    stop_daemon mon.a
    if [[ ${CEPH_CLUSTER_KEEP:-0} == 1 ]]; then
        say "stopped; kept $dir"
    else
        rm -rf "$dir"
    fi
}

write_conf() { # port fsid
    local p=$1 fsid=$2
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$p,v1:127.0.0.1:$((p + 1))]
public network = 127.0.0.1/32
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind port min = $((p + 2))
ms bind port max = $((p + 19))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $keyring
run dir = $dir/run
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.1
paxos min wait = 0.01
# We are the cache; tests open images without librbd's own.
rbd cache = false

[mon]
mon data = $dir/mon/\$cluster-\$id

[osd]
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-2147483648}
memstore page set = true
osd max object name len = 256
osd max object namespace len = 64
# A killed client's lock is taken over once its watch expires (default 30 s).
osd client watch timeout = 10
EOF
}

start() {
    install_pkgs
    if alive; then
        say "already running in $dir"
        return 0
    fi
    local t0=$SECONDS
    [[ -e $dir ]] && stop
    mkdir -p "$dir"/{run,log,mon,osd/ceph-0,crash}
    : >"$dir/$MARK"
    local port fsid uuid
    port=$(pick_port)
    fsid=$(cat /proc/sys/kernel/random/uuid)
    uuid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$port" "$fsid"

    ceph-authtool --create-keyring "$keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
    chmod 600 "$keyring"
    monmaptool --create --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$keyring" \
        >>"$dir/log/setup.log" 2>&1 || die "ceph-mon --mkfs failed; see $dir/log/setup.log"
    ceph-mon -c "$conf" -i a >>"$dir/log/setup.log" 2>&1 || die "ceph-mon did not start; see $dir/log"

    cephq osd new "$uuid" 0 >>"$dir/log/setup.log" 2>&1 || die "ceph osd new failed (is the mon up? see $dir/log)"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >>"$dir/log/setup.log" 2>&1 \
        || die "ceph-osd --mkfs failed; see $dir/log/setup.log"
    ceph-osd -c "$conf" -i 0 >>"$dir/log/setup.log" 2>&1 || die "ceph-osd did not start; see $dir/log"

    local i up=0
    for ((i = 0; i < 300; i++)); do
        up=$(cephq osd stat -f json 2>/dev/null | grep -o '"num_up_osds":[0-9]*' | cut -d: -f2 || true)
        [[ $up == 1 ]] && break
        sleep 0.1
    done
    [[ $up == 1 ]] || die "the OSD did not come up within 30 s; see $dir/log"
    cephq osd pool create rbd 8 8 >>"$dir/log/setup.log" 2>&1 || die "pool create failed; see $dir/log"
    timeout "$T" rbd -c "$conf" pool init rbd >>"$dir/log/setup.log" 2>&1 || die "rbd pool init failed; see $dir/log"
    say "ready in $((SECONDS - t0)) s: mon 127.0.0.1:$port, dir $dir"
}

# A mgr on the running cluster, for the pool statistics of `ceph df` (the
# OpenNebula driver's monitor action); idempotent. Debian's ceph-mgr is
# installed when missing.
mgr() {
    alive || die "no running cluster in $dir (run: $0 start $dir)"
    if ! pid_of mgr.x >/dev/null; then
        PKGS=(ceph-mgr)
        install_pkgs
        mkdir -p "$dir/mgr/ceph-x"
        cephq auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
            >"$dir/mgr/ceph-x/keyring" 2>>"$dir/log/setup.log" || die "creating the mgr key failed; see $dir/log"
        ceph-mgr -c "$conf" -i x --mgr-data "$dir/mgr/ceph-x" --keyring "$dir/mgr/ceph-x/keyring" \
            >>"$dir/log/setup.log" 2>&1 || die "ceph-mgr did not start; see $dir/log"
    fi
    local i
    for ((i = 0; i < 600; i++)); do
        if cephq df --format json 2>/dev/null | grep -q '"name":"rbd"'; then
            say "mgr ready: ceph df reports the pools"
            return 0
        fi
        sleep 0.1
    done
    die "the mgr did not report pool statistics within 60 s; see $dir/log"
}

case $cmd in
start) start ;;
mgr) mgr ;;
stop) stop ;;
status) alive ;;
env)
    [[ -f $dir/$MARK && -f $conf ]] || die "no cluster in $dir (run: $0 start $dir)"
    echo "export CEPH_CONF=$conf"
    echo "export UBLK_CACHE_CEPH_CONF=$conf"
    echo "export UBLK_CACHE_CEPH_KEYRING=$keyring"
    echo "export UBLK_CACHE_CEPH_DIR=$dir"
    ;;
*) usage ;;
esac
