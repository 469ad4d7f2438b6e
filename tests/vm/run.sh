#!/usr/bin/env bash
# tests/vm/run.sh — boot a QEMU (TCG) guest with a ublk-capable kernel and run
# one guest script in it. The host kernel has no ublk driver; the guest does.
#
# Usage:
#   tests/vm/run.sh [options] GUEST_SCRIPT [ARGS...]
# Options:
#   --disk NAME:SIZE  create a fresh sparse raw image WORKDIR/NAME.img of SIZE
#                     (truncate syntax: 512M, 2G) and attach it as the next
#                     virtio disk: /dev/vda, /dev/vdb, ... in option order.
#   --disk NAME       attach an existing WORKDIR/NAME.img unchanged (to test
#                     persistence across boots; needs --workdir).
#                     NAME: [A-Za-z0-9_], at most 20 chars (it is the disk's
#                     virtio serial). The guest script gets DISK_NAME=/dev/vdX
#                     and VM_DISKS="NAME ...".
#   --throttle NAME:IOPS:BPS  QEMU block throttling on disk NAME (given with
#                     --disk): at most IOPS requests and BPS bytes per second
#                     in all (a slow backend, as a busy Ceph is)
#   --timeout SECONDS whole-run limit enforced on the host (default 900)
#   --mem MB          guest memory (default 1024)
#   --smp N           guest CPUs (default 2)
#   --workdir DIR     per-run directory (default: a new
#                     tests/vm/.cache/runs/<time>-<pid>; its disk images are
#                     deleted afterwards, logs kept, last 10 runs kept)
#   --share DIR       also make host DIR visible read-only at the same path
#                     (repeatable). /usr, /etc and this repository always are.
# Environment: VM_KERNEL_ARGS is appended to the kernel command line (e.g.
#   "ublk_drv.ublks_max=128"; module parameters work for the modules /init
#   loads).
#
# GUEST_SCRIPT runs as root under the host's bash in the guest, chrooted into
# a root made of the host's /usr and /etc (read-only 9p), this repository
# (read-only, same path: target/release/ublk-cache is where cargo put it),
# and WORKDIR (read-write, same path; the script's cwd, for logs/results).
# /tmp, /run, /dev/shm are guest tmpfs. /dev/ublk-control exists (run fails
# before the script if ublk_drv did not load). Also exported: VM_WORKDIR,
# VM_REPO, VM_KVER.
#
# Output: the guest serial console on stdout, also saved to
# WORKDIR/console.log; the guest's full kernel log in WORKDIR/dmesg.txt.
# Exit status: the guest script's exit code, read from the exit marker that
# the guest /init prints; otherwise
#   124  timeout (qemu killed on the host)
#   125  no exit marker: test-bed failure, kernel panic/oops, guest crash
#   126  the script passed but the kernel logged an oops/BUG/WARNING
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="$HERE/.cache"

log() { printf 'run.sh: %s\n' "$*" >&2; }
die() { printf 'run.sh: ERROR: %s\n' "$*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit "${1:-125}"; }

DISKS=() SHARES=() TIMEOUT=900 MEM=1024 SMP=2 WORKDIR=
declare -A THROTTLE=()
while (( $# )); do
    case $1 in
        --throttle|--throttle=*)
            if [[ $1 == --throttle ]]; then t=${2:?--throttle needs NAME:IOPS:BPS}; shift 2
            else t=${1#*=}; shift; fi
            [[ $t =~ ^([A-Za-z0-9_]{1,20}):([1-9][0-9]*):([1-9][0-9]*)$ ]] \
                || die "--throttle $t: expected NAME:IOPS:BPS (positive integers)"
            THROTTLE[${BASH_REMATCH[1]}]="throttling.iops-total=${BASH_REMATCH[2]},throttling.bps-total=${BASH_REMATCH[3]}"
            ;;
        --disk) DISKS+=("${2:?--disk needs NAME:SIZE}"); shift 2 ;;
        --disk=*) DISKS+=("${1#*=}"); shift ;;
        --timeout) TIMEOUT=${2:?}; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --mem) MEM=${2:?}; shift 2 ;;
        --mem=*) MEM=${1#*=}; shift ;;
        --smp) SMP=${2:?}; shift 2 ;;
        --smp=*) SMP=${1#*=}; shift ;;
        --workdir) WORKDIR=${2:?}; shift 2 ;;
        --workdir=*) WORKDIR=${1#*=}; shift ;;
        --share) SHARES+=("${2:?}"); shift 2 ;;
        --share=*) SHARES+=("${1#*=}"); shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        -*) log "unknown option $1"; usage ;;
        *) break ;;
    esac
done
(( $# )) || { log "missing GUEST_SCRIPT"; usage; }
SCRIPT=$1; shift
[[ $TIMEOUT =~ ^[0-9]+$ && $MEM =~ ^[0-9]+$ && $SMP =~ ^[0-9]+$ ]] || die "--timeout/--mem/--smp need integers"

# ------------------------------------------------------------ preconditions
[[ -f $CACHE/vm.env ]] || die "test bed not prepared: run tests/vm/setup.sh first"
# shellcheck source=/dev/null
. "$CACHE/vm.env"
[[ -f $VM_KERNEL && -f $VM_INITRD ]] || die "kernel/initramfs missing in $CACHE: run tests/vm/setup.sh"
[[ $VM_INITRD -nt $HERE/initramfs/init ]] || die "$HERE/initramfs/init changed since the initramfs was built: run tests/vm/setup.sh"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not installed: run tests/vm/setup.sh"
# The guest root is rebuilt from /usr alone (bin, sbin, lib, lib64 -> usr/*).
for d in bin sbin lib lib64; do
    [[ $(readlink "/$d") == "usr/$d" ]] || die "host /$d is not a symlink to usr/$d (not usr-merged); the guest root layout assumes it"
done
[[ -f $SCRIPT ]] || die "guest script $SCRIPT not found"
SCRIPT=$(realpath "$SCRIPT")

# Paths go into the 9p options and the guest's ash config: keep them plain.
safe_path() { [[ $1 =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "path '$1' has characters the test bed does not quote (allowed: A-Za-z0-9._/+-)"; }

AUTO_WORKDIR=0
if [[ -z $WORKDIR ]]; then
    AUTO_WORKDIR=1
    mkdir -p "$CACHE/runs"
    # Keep only the most recent auto-created run dirs.
    find "$CACHE/runs" -mindepth 1 -maxdepth 1 -type d | sort | head -n -9 | xargs -r rm -rf --
    WORKDIR="$CACHE/runs/$(date +%Y%m%d-%H%M%S)-$$"
fi
mkdir -p "$WORKDIR"
WORKDIR=$(realpath "$WORKDIR")
safe_path "$WORKDIR"
mkdir -p "$WORKDIR/.vm"
rm -f "$WORKDIR/console.log" "$WORKDIR/dmesg.txt" "$WORKDIR"/.vm/*.sh

# ------------------------------------------------------------------- shares
QEMU_9P=()
virtfs() {  # virtfs TAG HOSTPATH ro|rw
    local ro=; [[ $3 == ro ]] && ro=,readonly=on
    # security_model=none: files are accessed as the qemu user, no xattrs.
    # multidevs=remap: a share may span filesystems; avoid inode clashes.
    QEMU_9P+=(-virtfs "local,path=$2,mount_tag=$1,security_model=none,multidevs=remap$ro")
}
virtfs usr /usr ro
virtfs etc /etc ro
virtfs work "$WORKDIR" rw
SHARED_DIRS=("$REPO")
for s in "${SHARES[@]}"; do
    [[ -d $s ]] || die "--share $s: not a directory"
    SHARED_DIRS+=("$(realpath "$s")")
done
: > "$WORKDIR/.vm/shares"
i=0
while IFS= read -r s; do
    [[ -n $s ]] || continue
    safe_path "$s"
    # /tmp and /run are guest tmpfs; a directory below them (a CI clone in
    # /tmp/xyz) is mounted on a mount point made inside that tmpfs.
    case $s in /|/usr|/usr/*|/etc|/etc/*|/proc*|/sys*|/dev*|/tmp|/run|/dev/shm*)
        die "--share $s: overlaps a directory the guest provides itself" ;;
    esac
    virtfs "s$i" "$s" ro
    echo "s$i $s" >> "$WORKDIR/.vm/shares"
    i=$((i + 1))
done < <(printf '%s\n' "${SHARED_DIRS[@]}" | sort -u)

# The script must be visible in the guest; if it lives elsewhere (e.g. /tmp,
# which is a guest tmpfs), run a copy from the work dir.
GUEST_SCRIPT=$SCRIPT
visible=0
for s in /usr /etc "${SHARED_DIRS[@]}" "$WORKDIR"; do
    [[ $SCRIPT == "$s"/* ]] && visible=1
done
if (( ! visible )); then
    mkdir -p "$WORKDIR/.vm/script"
    cp "$SCRIPT" "$WORKDIR/.vm/script/"
    GUEST_SCRIPT="$WORKDIR/.vm/script/${SCRIPT##*/}"
    log "note: $SCRIPT is not under a shared directory; running a copy"
fi

# -------------------------------------------------------------------- disks
QEMU_DISKS=() DISK_NAMES=()
declare -A seen_disk=()
letters=abcdefghijklmnopqrstuvwxyz
for spec in "${DISKS[@]}"; do
    name=${spec%%:*}; size=
    [[ $spec == *:* ]] && size=${spec#*:}
    [[ $name =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "--disk $spec: NAME must be 1-20 of [A-Za-z0-9_]"
    [[ -z ${seen_disk[$name]:-} ]] || die "--disk $name given twice"
    seen_disk[$name]=1
    img="$WORKDIR/$name.img"
    if [[ -n $size ]]; then
        rm -f "$img"
        truncate -s "$size" "$img" || die "--disk $spec: bad size '$size'"
    else
        [[ -f $img ]] || die "--disk $name: $img does not exist (give NAME:SIZE to create it)"
    fi
    idx=${#DISK_NAMES[@]}
    (( idx < 26 )) || die "too many disks"
    DISK_NAMES+=("$name")
    # cache=unsafe: host flushes are skipped; the image is scratch data.
    drive="file=$img,if=none,id=d$idx,format=raw,cache=unsafe"
    [[ -n ${THROTTLE[$name]:-} ]] && drive+=",${THROTTLE[$name]}"
    QEMU_DISKS+=(-drive "$drive"
                 -device "virtio-blk-pci,drive=d$idx,serial=$name")
    log "disk $name: $img ($(du -h --apparent-size "$img" | cut -f1)) -> /dev/vd${letters:idx:1}${THROTTLE[$name]:+ (${THROTTLE[$name]})}"
done
for t in "${!THROTTLE[@]}"; do
    [[ -n ${seen_disk[$t]:-} ]] || die "--throttle $t: no --disk of that name"
done

# --------------------------------------------------------- guest-side files
NONCE=$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')
cat > "$WORKDIR/.vm/config" <<EOF
VM_WORKDIR=$WORKDIR
VM_NONCE=$NONCE
EOF
{
    echo '#!/bin/bash'
    echo '# Generated by tests/vm/run.sh; runs chrooted in the guest (see init).'
    echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin HOME=/root LANG=C.UTF-8 TERM=dumb'
    printf 'export VM_WORKDIR=%q VM_REPO=%q VM_KVER=%q VM_DISKS=%q\n' \
        "$WORKDIR" "$REPO" "$VM_KVER" "${DISK_NAMES[*]}"
    # Map names by virtio serial rather than trusting probe order.
    cat <<'EOF'
for name in $VM_DISKS; do
    dev=
    for s in /sys/block/vd*/serial; do
        [[ -r $s && $(<"$s") == "$name" ]] && { d=${s%/serial}; dev=/dev/${d##*/}; }
    done
    [[ -b $dev ]] || { echo "UBLKVM-INIT-ERROR: disk '$name' not found in the guest" >&2; exit 125; }
    export "DISK_$name=$dev"
done
cd "$VM_WORKDIR"
EOF
    printf 'exec bash %q' "$GUEST_SCRIPT"
    (( $# )) && printf ' %q' "$@"
    echo
} > "$WORKDIR/.vm/guest-run.sh"

# --------------------------------------------------------------------- boot
# panic=-1 + -no-reboot: a panic ends qemu at once; oops=panic makes any
# oops a panic, so it cannot be missed. quiet keeps the console to warnings
# and worse; the whole kernel log is saved to dmesg.txt by /init.
APPEND="console=ttyS0 panic=-1 oops=panic quiet${VM_KERNEL_ARGS:+ $VM_KERNEL_ARGS}"
QEMU=(qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp "$SMP" -m "$MEM"
      -nodefaults -display none -monitor none -serial stdio -no-reboot
      -kernel "$VM_KERNEL" -initrd "$VM_INITRD" -append "$APPEND"
      "${QEMU_9P[@]}" "${QEMU_DISKS[@]}")
printf '%q ' "${QEMU[@]}" > "$WORKDIR/.vm/qemu-cmdline"
log "workdir $WORKDIR; booting kernel $VM_KVER (timeout ${TIMEOUT}s): ${SCRIPT} $*"
start=$SECONDS
set +e
# stdin from /dev/null: qemu must not grab the terminal (serial is output only).
timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$WORKDIR/console.log"
qrc=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))

if (( AUTO_WORKDIR )); then
    rm -f "$WORKDIR"/*.img
fi

# --------------------------------------------------------------- verdict
clean=$(tr -d '\r' < "$WORKDIR/console.log")
marker=$(grep -ao "UBLKVM-EXIT $NONCE [0-9]*" <<<"$clean" | tail -1 || true)
KERNEL_BAD='Kernel panic|Oops|BUG:|WARNING:|general protection fault|Call Trace:|UBSAN:|blocked for more than'
kernel_hits=$( { grep -aE "$KERNEL_BAD" <<<"$clean"; [[ -f $WORKDIR/dmesg.txt ]] && grep -aE "$KERNEL_BAD" "$WORKDIR/dmesg.txt"; } | head -20 || true)

if [[ -z $marker ]]; then
    if (( qrc == 124 || qrc == 137 )); then
        log "FAIL: timeout after ${TIMEOUT}s; guest killed (console: $WORKDIR/console.log)"
        rc=124
    else
        log "FAIL: the guest ended without an exit marker (qemu exit $qrc) after ${elapsed}s"
        grep -a 'UBLKVM-INIT-ERROR' <<<"$clean" | sed 's/^/run.sh:   /' >&2 || true
        [[ -n $kernel_hits ]] && { log "kernel trouble in the console log:"; sed 's/^/run.sh:   /' <<<"$kernel_hits" >&2; }
        rc=125
    fi
    exit "$rc"
fi
rc=${marker##* }
if [[ -n $kernel_hits ]]; then
    log "the guest kernel logged problems (see $WORKDIR/dmesg.txt):"
    sed 's/^/run.sh:   /' <<<"$kernel_hits" >&2
    (( rc != 0 )) || rc=126
fi
if (( rc == 0 )); then
    log "PASS in ${elapsed}s (workdir $WORKDIR)"
else
    log "FAIL: exit code $rc after ${elapsed}s (workdir $WORKDIR)"
fi
exit "$rc"
