#!/bin/bash
# tests/vm/guest/opennebula.sh: the ublk_cache OpenNebula host helper
# (ublk-cache-one) on a real ublk kernel with real LVM: LS_MAD=lvm on a volume
# group made on the test disk, EXPORT=ublk. The guest reaches no Ceph, so the
# RBD image is a file behind two named test doubles (guest/one/rbd for the rbd
# CLI, guest/one/ublk-cache serving that file); the helper, lvcreate/lvremove
# on device-mapper, /dev/ublkbN and the link chain are real. Runs under
# tests/vm/run.sh with --disk pv:SIZE.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

HELPER=$VM_REPO/target/release/ublk-cache-one
W=/tmp/one
VG=vg_ublk
export UBLKC_CONF=$W/one.conf ONE_RBD_DIR=$W/rbd ONE_REAL_UBLK_CACHE=$BIN
# No udev in the guest: LVM makes the device nodes itself; /etc is read-only.
export LVM_SYSTEM_DIR=$W/lvm
DSDIR=$W/datastores/100
BUNDLE=$W/bundle.xml

bundle() { # VMID CACHE_SIZE: a VM with one non-persistent disk of one/one-1
    cat >"$BUNDLE" <<XML
<ONE><VM><ID>$1</ID><STATE>3</STATE><LCM_STATE>1</LCM_STATE><TEMPLATE>
<DISK><DISK_ID>0</DISK_ID><SOURCE><![CDATA[one/one-1]]></SOURCE><CLONE>YES</CLONE><TYPE>BLOCK</TYPE>
<SIZE>64</SIZE><ORIGINAL_SIZE>64</ORIGINAL_SIZE><DATASTORE_ID>101</DATASTORE_ID><TM_MAD>ublk_cache</TM_MAD>
<CACHE_MODE>BACK</CACHE_MODE><CACHE_SIZE>$2</CACHE_SIZE></DISK></TEMPLATE>
<HISTORY_RECORDS><HISTORY><SEQ>0</SEQ><HOSTNAME>guest</HOSTNAME><DS_ID>100</DS_ID></HISTORY></HISTORY_RECORDS></VM></ONE>
XML
}

setup() {
    mkdir -p "$W/rbd/one" "$LVM_SYSTEM_DIR" "$DSDIR/7" /run/lock
    cat >"$LVM_SYSTEM_DIR/lvm.conf" <<'EOF2'
activation { udev_sync = 0 udev_rules = 0 }
devices { obtain_device_list_from_udev = 0 }
EOF2
    local pv=${DISK_pv:?run with --disk pv:SIZE}
    if ! { pvcreate -q -y "$pv" && vgcreate -q "$VG" "$pv"; }; then
        bad "pvcreate/vgcreate on $pv failed"
        return 1
    fi
    dd if=/dev/urandom of="$W/rbd/one/one-1.img" bs=1M count=64 status=none
    cat >"$UBLKC_CONF" <<EOF2
LS_MAD=lvm
LS_PATH=$VG
LS_MAX=64
LAUNCHER=exec
EXPORT=ublk
DATASTORE_LOCATION=$W/datastores
STATE_DIR=$W/state
CONF_DIR=$W/etc
RUN_DIR=$RUN_DIR
UBLK_CACHE=$HERE/one/ublk-cache
RBD=$HERE/one/rbd
WAIT_LIVE_S=120
EOF2
}

attach_lvm() {
    bundle 7 32
    "$HELPER" attach --vm 7 --disk 0 --path "$DSDIR/7/disk.0" --action clone <"$BUNDLE" ||
        { bad "attach failed"; return 1; }
    local dev
    dev=$(readlink -f "$DSDIR/7/disk.0")
    [[ $(readlink "$DSDIR/7/disk.0") == "$W/state/dev/7-0" ]] || { bad "disk.0 does not lead to the stable link"; return 1; }
    [[ $dev == /dev/ublkb* && -b $dev ]] || { bad "disk.0 resolves to '$dev', not a ublk block device"; return 1; }
    echo "disk.0 -> $(readlink "$DSDIR/7/disk.0") -> $dev"
    [[ $(blockdev --getsize64 "$DSDIR/7/disk.0") == $((64 << 20)) ]] || { bad "wrong device size"; return 1; }
    lvs --noheadings -o lv_name,lv_size --units m "$VG" | tee lvs.txt
    grep -q "one-7-0 *32.00m" lvs.txt || { bad "no 32 MB LV one-7-0 in $VG"; return 1; }
    "$BIN" list | grep -q "dev/mapper\|/dev/$VG/one-7-0" || { "$BIN" list; bad "the server's cache is not the LV"; return 1; }
    dd if=/dev/urandom of=$W/data bs=1M count=4 status=none
    dd if=$W/data of="$DSDIR/7/disk.0" bs=1M seek=8 oflag=direct conv=fsync status=none
    dd if="$DSDIR/7/disk.0" of=$W/back bs=1M skip=8 count=4 iflag=direct status=none
    cmp $W/back $W/data || { bad "read back through disk.0 differs"; return 1; }
    dd if="$DSDIR/7/disk.0" of=$W/head bs=1M count=8 iflag=direct status=none
    dd if="$W/rbd/one/one-1.img" of=$W/base bs=1M count=8 status=none
    cmp $W/head $W/base || { bad "the clone's data differs"; return 1; }
    "$HELPER" probe | tee probe.txt
    if ! { grep -qx 'LS_MAD="lvm"' probe.txt && grep -qx 'LS_USED_MB=32' probe.txt && grep -qx 'LC_UBLK="YES"' probe.txt; }; then
        bad "probe: $(cat probe.txt)"
        return 1
    fi
}

refused_leaves_nothing() {
    sed -i 's/^LS_MAX=.*/LS_MAX=500/' "$UBLKC_CONF"
    bundle 8 60
    local out rc=0
    mkdir -p "$DSDIR/8"
    lvcreate -q -y -n filler -L 40m "$VG" >/dev/null || { bad "lvcreate filler"; return 1; }
    out=$("$HELPER" attach --vm 8 --disk 0 --path "$DSDIR/8/disk.0" --action clone <"$BUNDLE" 2>&1) || rc=$?
    lvremove -q -f "$VG/filler" >/dev/null
    sed -i 's/^LS_MAX=.*/LS_MAX=64/' "$UBLKC_CONF"
    echo "$out"
    ((rc != 0)) || { bad "an attach larger than the VG's free space succeeded"; return 1; }
    grep -q "not enough local cache space" <<<"$out" || { bad "the error does not say why"; return 1; }
    lvs --noheadings -o lv_name "$VG" | grep -q one-8-0 && { bad "an LV was left behind"; return 1; }
    [[ -e $W/rbd/one/one-1-8-0.img ]] && { bad "a clone was left behind"; return 1; }
    [[ -L $DSDIR/8/disk.0 ]] && { bad "a link was left behind"; return 1; }
    return 0
}

migrate_handover() {
    "$HELPER" migrate-out --vm 7 --disk 0 || { bad "migrate-out"; return 1; }
    local id
    id=$(readlink -f "$DSDIR/7/disk.0"); id=${id#/dev/ublkb}
    "$BIN" ctl "$id" stats --json | grep -q '"migrated_out":true' || { bad "not migrated out"; return 1; }
    "$HELPER" migrate-abort --vm 7 --disk 0 || { bad "migrate-abort"; return 1; }
    "$BIN" ctl "$id" stats --json | grep -q '"migrated_out":false' || { bad "still migrated out"; return 1; }
    "$BIN" ctl "$id" stats --json | grep -q '"mode":"back"' || { bad "not back in BACK"; return 1; }
}

detach_removes_all() {
    local dev
    dev=$(readlink -f "$DSDIR/7/disk.0")
    "$HELPER" detach --vm 7 --disk 0 || { bad "detach failed"; return 1; }
    [[ -e $dev ]] && { bad "$dev still exists"; return 1; }
    [[ -L $DSDIR/7/disk.0 || -L $W/state/dev/7-0 ]] && { bad "links left"; return 1; }
    lvs --noheadings -o lv_name "$VG" | grep -q one-7-0 && { bad "the LV was not removed"; return 1; }
    dd if="$W/rbd/one/one-1-7-0.img" of=$W/back bs=1M skip=8 count=4 status=none
    cmp $W/back $W/data || { bad "the image lacks what was written (write-back at stop)"; return 1; }
    echo "detached: device, links and LV gone; the image holds the writes"
}

run_case setup setup
run_case attach-lvm-ublk attach_lvm
run_case refused-leaves-nothing refused_leaves_nothing
run_case migrate-out-abort migrate_handover
run_case detach-removes-all detach_removes_all
summary vm-opennebula
