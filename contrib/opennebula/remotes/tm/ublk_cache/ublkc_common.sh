# shellcheck shell=bash
# ublkc_common.sh: sourced by every action of the ublk_cache TM driver.
#
# oned's one_tm runs an action on the front-end as oneadmin, with the
# arguments of its transfer line, stdin empty (the migrate actions get the VM
# XML in base64, monitor the datastore's), and reads: exit 0 = success;
# stderr lines "INFO:/WARN:/ERROR: ..." go to the VM log; every other stderr
# line becomes the error shown in `onevm show`. So this file prints progress
# with a prefix and at most one plain line, the error.
#
# The scripts decide nothing: `ublk-cache-one plan` (the helper binary, run
# here unprivileged) reads the arguments and the VM/datastore XML and prints
# the steps; this file runs them. The host steps run the same binary as root
# on the host through sudo. No OpenNebula shell library is sourced, so every
# ssh goes through $SSH (OpenNebula's scripts_common.sh would prepend /bin to
# PATH) and nothing here depends on OpenNebula's Ruby tools.

set -o pipefail

UBLKC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UBLKC_ACTION=$(basename "$0")
UBLKC_TM=ublk_cache
UBLKC_CONF_FILE=${UBLKC_CONF_FILE:-$UBLKC_DIR/../../etc/tm/ublk_cache/ublk_cache.conf}
if [ -f "$UBLKC_CONF_FILE" ]; then
    # shellcheck source=../../etc/tm/ublk_cache/ublk_cache.conf
    . "$UBLKC_CONF_FILE"
fi
SSH=${SSH:-ssh}
UBLKC_SSH_FWD=${UBLKC_SSH_FWD:-$SSH -o ForwardAgent=yes}
UBLKC_SUDO=${UBLKC_SUDO-sudo -n}
UBLKC_HELPER=${UBLKC_HELPER:-/usr/lib/ublk-cache/ublk-cache-one}
UBLKC_PLANNER=${UBLKC_PLANNER:-/usr/lib/ublk-cache/ublk-cache-one}
TAR=${TAR:-tar}
ONEVM=${ONEVM:-onevm}
ONEDATASTORE=${ONEDATASTORE:-onedatastore}

ublkc_log() { echo "INFO: $UBLKC_ACTION: $*" >&2; }
ublkc_error_log() { echo "ERROR: $UBLKC_ACTION: $*" >&2; }
# The one plain line: the action's error.
ublkc_fail() {
    echo "ublk_cache $UBLKC_ACTION: $*" >&2
    exit 1
}

UBLKC_WORK=$(mktemp -d "${TMPDIR:-/tmp}/ublkc.XXXXXX") || ublkc_fail "cannot create a temporary directory"
trap 'rm -rf "$UBLKC_WORK"' EXIT
UBLKC_BUNDLE=$UBLKC_WORK/bundle.xml

# The XML of a `show -x` without its declaration, to embed it.
ublkc_strip_decl() { sed -e 's/<?xml[^>]*?>//'; }

# ublkc_bundle VMXML_FILE [DSID...]: <ONE> with the VM and every datastore
# it needs (the helper names them) into $UBLKC_BUNDLE.
ublkc_bundle() {
    local vmxml=$1 id ids
    shift
    ids=$("$UBLKC_PLANNER" plan-datastores <"$vmxml") || exit 1
    {
        echo "<ONE>"
        ublkc_strip_decl <"$vmxml"
        for id in $(printf '%s\n' "$ids" "$@" | sort -un); do
            "$ONEDATASTORE" show -x "$id" | ublkc_strip_decl ||
                ublkc_fail "onedatastore show -x $id failed"
        done
        echo "</ONE>"
    } >"$UBLKC_BUNDLE" || exit 1
}

# ublkc_vm_bundle VMID DSID: the bundle from `onevm show -x`.
ublkc_vm_bundle() {
    "$ONEVM" show -x "$1" >"$UBLKC_WORK/vm.xml" || ublkc_fail "onevm show -x $1 failed"
    ublkc_bundle "$UBLKC_WORK/vm.xml" "$2"
}

# A command line for a remote shell: the words quoted.
ublkc_words() { printf '%q ' "$@"; }

# ublkc_host KIND HOST VERB ARGS...: the helper on HOST as root, the bundle
# on its stdin, its stderr (INFO lines and its error) passed through.
ublkc_host() {
    local kind=$1 host=$2 rc
    shift 2
    local cmd
    cmd="$UBLKC_SUDO $UBLKC_HELPER $(ublkc_words "$@")"
    if [ "$kind" = print ]; then
        # shellcheck disable=SC2086 # $SSH may carry options
        $SSH "$host" "$cmd" <"$UBLKC_BUNDLE"
    else
        # shellcheck disable=SC2086
        $SSH "$host" "$cmd" <"$UBLKC_BUNDLE" >/dev/null
    fi
    rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 255 ]; then
            ublkc_error_log "$host is unreachable ($1 ${3:-} ${4:-} ${5:-} ${6:-})"
        fi
        if [ "$kind" = try ]; then
            ublkc_error_log "$1 on $host failed (exit $rc); continuing"
            return 0
        fi
        exit "$rc"
    fi
}

# ublkc_ssh HOST COMMAND MESSAGE: COMMAND on HOST as oneadmin; on failure
# one error line, MESSAGE and what ssh or the command said (as OpenNebula's
# ssh_exec_and_log: the captured stderr goes into the one line).
ublkc_ssh() {
    local out rc=0
    # shellcheck disable=SC2086 # $SSH may carry options
    out=$($SSH "$1" "$2" 2>&1 </dev/null) || rc=$?
    if [ "$rc" -ne 0 ]; then
        ublkc_fail "$3: $(echo "$out" | tr '\n' ' ')"
    fi
    printf '%s' "$out"
}

# ublkc_mkdir HOST DIR, as oneadmin (ssh_make_path).
ublkc_mkdir() {
    ublkc_ssh "$1" "mkdir -p '$2'" "cannot create $2 on $1" >/dev/null
}

# ublkc_same_path HOST_A DIR HOST_B: 0 if DIR on HOST_A is the same directory
# as on HOST_B (a shared system datastore), 1 if not, 2 if it cannot tell.
ublkc_same_path() {
    local a=$1 dir=$2 b=$3 parent f rc
    parent=$(dirname "$dir")
    # shellcheck disable=SC2086
    f=$($SSH "$a" "mkdir -p '$parent' && mktemp -p '$parent' .ublkc-same.XXXXXX" </dev/null) || return 2
    # shellcheck disable=SC2086
    if $SSH "$b" "test -f '$f'" </dev/null; then rc=0; else rc=$?; [ "$rc" -eq 255 ] && rc=2 || rc=1; fi
    # shellcheck disable=SC2086
    $SSH "$a" "rm -f '$f'" </dev/null || true
    return "$rc"
}

# ublkc_copy_dir SRC SDIR DST DDIR: the VM directory (disk.N links, context,
# deployment) from SRC to DST, as tm/ceph does, unless it is one shared path.
ublkc_copy_dir() {
    local src=$1 sdir=$2 dst=$3 ddir=$4 rc=0
    ublkc_same_path "$dst" "$ddir" "$src" || rc=$?
    case $rc in
        0) ublkc_log "Not moving $src:$sdir to $dst:$ddir, they are the same path"; return 0 ;;
        2) ublkc_fail "cannot tell whether $ddir on $dst is shared with $src (is $dst or $src unreachable?)" ;;
    esac
    ublkc_ssh "$dst" "rm -rf '$ddir' && mkdir -p '$(dirname "$ddir")'" "cannot prepare $ddir on $dst" >/dev/null
    local pipe out
    pipe="set -e -o pipefail; $TAR -C '$(dirname "$sdir")' --sparse -cf - '$(basename "$sdir")' | $SSH $dst '$TAR -C $(dirname "$ddir") --sparse -xf -'"
    # shellcheck disable=SC2086
    out=$($UBLKC_SSH_FWD "$src" "$pipe" 2>&1 </dev/null) ||
        ublkc_fail "copying $sdir from $src to $dst failed: $(echo "$out" | tr '\n' ' ')"
}

# ublkc_rm_dir KIND HOST DIR [OTHER]: rm -rf DIR on HOST, unless it is the
# same (shared) directory as on OTHER, or that cannot be told.
ublkc_rm_dir() {
    local kind=$1 host=$2 dir=$3 other=${4:-} rc=1
    if [ -n "$other" ]; then
        ublkc_same_path "$host" "$dir" "$other" && rc=0 || rc=$?
        case $rc in
            0) ublkc_log "$dir on $host is shared with $other: not removed"; return 0 ;;
            2) ublkc_error_log "cannot tell whether $dir on $host is shared with $other: not removed"; return 0 ;;
        esac
    fi
    if [ "$kind" = try ]; then
        ( ublkc_ssh "$host" "rm -rf '$dir'" "removing $dir on $host failed" >/dev/null 2>&1 ) ||
            ublkc_error_log "removing $dir on $host failed"
        return 0
    fi
    ublkc_ssh "$host" "rm -rf '$dir'" "removing $dir on $host failed" >/dev/null
}

# ublkc_delegate KIND TM: the same action of another TM used by the VM's
# disks, as tm_common.sh's migrate_other does ($6 = our name, same stdin).
ublkc_delegate() {
    local kind=$1 tm=$2 rc=0
    ublkc_log "Call $tm/$UBLKC_ACTION"
    echo "$UBLKC_TEMPLATE_64" | "$UBLKC_DIR/../$tm/$UBLKC_ACTION" "${UBLKC_ARGS[@]}" "$UBLKC_TM" || rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$kind" = try ] && { ublkc_error_log "$tm/$UBLKC_ACTION failed (exit $rc)"; return 0; }
        exit "$rc"
    fi
}

# ublkc_run ARGS...: plan the action (bundle in $UBLKC_BUNDLE), run the steps.
ublkc_run() {
    local steps line
    UBLKC_ARGS=("$@")
    steps=$("$UBLKC_PLANNER" plan "$UBLKC_ACTION" "$@" <"$UBLKC_BUNDLE") || exit 1
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        # Words without spaces (the planner checks them); `info` keeps the rest.
        local -a w
        read -r -a w <<<"$line"
        case ${w[0]} in
            info) ublkc_log "${line#info }" ;;
            mkdir) ublkc_mkdir "${w[1]}" "${w[2]}" ;;
            host) ublkc_host must "${w[@]:1}" ;;
            host-try) ublkc_host try "${w[@]:1}" ;;
            host-print) ublkc_host print "${w[@]:1}" ;;
            copy-dir) ublkc_copy_dir "${w[1]}" "${w[2]}" "${w[3]}" "${w[4]}" ;;
            rm-dir) ublkc_rm_dir must "${w[1]}" "${w[2]}" "${w[3]:-}" ;;
            rm-dir-try) ublkc_rm_dir try "${w[1]}" "${w[2]}" "${w[3]:-}" ;;
            delegate) ublkc_delegate must "${w[1]}" ;;
            delegate-try) ublkc_delegate try "${w[1]}" ;;
            *) ublkc_fail "the planner printed an unknown step '${w[0]}'" ;;
        esac
    done <<<"$steps"
}

# A transfer action (stdin is empty): VMID and the datastore id of its line.
ublkc_transfer() {
    local vmid=$1 dsid=$2
    shift 2
    ublkc_vm_bundle "$vmid" "$dsid"
    ublkc_run "$@"
}

# pre/post/failmigrate: the VM XML comes in base64 on stdin.
ublkc_migrate() {
    UBLKC_TEMPLATE_64=$(cat)
    [ -n "$UBLKC_TEMPLATE_64" ] || ublkc_fail "no VM template on stdin"
    echo "$UBLKC_TEMPLATE_64" | base64 -d >"$UBLKC_WORK/vm.xml" 2>/dev/null ||
        ublkc_fail "the VM template on stdin is not base64"
    ublkc_bundle "$UBLKC_WORK/vm.xml" "$5"
    ublkc_run "$@"
}

# Actions this version does not do: refused, never half done.
ublkc_not_supported() {
    ublkc_fail "$* is not supported by the ublk_cache driver in this version"
}
