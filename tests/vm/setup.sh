#!/usr/bin/env bash
# tests/vm/setup.sh — prepare everything tests/vm/run.sh needs to boot a
# QEMU/TCG guest that has the ublk driver (the host kernel has none).
#
# Idempotent: a warm re-run only checks stamps and file times (< 2 s).
#   1. apt packages (qemu-system-x86, busybox-static, fio, ...) if missing;
#   2. a Debian 6.12 kernel .deb, downloaded and unpacked (never installed)
#      into tests/vm/.cache/kernel/ (6.1 has no ublk; the -cloud flavour no 9p);
#   3. the modules the guest needs (ublk_drv, virtio_blk, ext4, 9p, ... plus
#      their dependencies), decompressed, with a busybox-built modules.dep;
#   4. the base initramfs (static busybox + tests/vm/initramfs/init + modules)
#      written uncompressed to tests/vm/.cache/initramfs.cpio.
#
# Environment knobs:
#   VM_KERNEL_META  apt meta package naming the kernel (default linux-image-6.12-amd64)
#   VM_REFRESH_KERNEL=1  re-resolve and re-download the kernel even if cached
set -euo pipefail

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { printf 'setup.sh: ERROR: %s\n' "$*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="$HERE/.cache"
INIT_SRC="$HERE/initramfs/init"
KERNEL_META=${VM_KERNEL_META:-linux-image-6.12-amd64}

# Modules loaded in the guest, in this order. Dependencies found in each
# module's `depends=` are added automatically; `softdep` aliases such as
# "crypto-crc32c" (wanted by ext4/jbd2) are not resolved, so the crc32c
# implementations are listed explicitly. To add a module, append it here.
MODULES=(crc32c_generic crc32c_intel crc16 mbcache jbd2 ext4 loop virtio_blk
         netfs 9pnet 9pnet_virtio 9p ublk_drv dm_mod)

# Debian packages the test bed uses on the host (and, through the read-only
# /usr share, inside the guest). libclang-dev is for the project's bindgen;
# lvm2 for the OpenNebula suite's LS_MAD=lvm (device-mapper is dm_mod above).
PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio xz-utils fio e2fsprogs libclang-dev lvm2)

[[ -f $INIT_SRC ]] || die "missing $INIT_SRC"
mkdir -p "$CACHE"
# Serialise concurrent setups (e.g. a developer and CI on the same machine).
exec 9>"$CACHE/.setup.lock"
flock 9

APT_UPDATED=0
apt_update_once() {
    if (( ! APT_UPDATED )); then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# ---------------------------------------------------------------- packages
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    (( ${#missing[@]} )) || return 0
    [[ $EUID -eq 0 ]] || die "packages missing (${missing[*]}); run setup.sh as root"
    log "installing: ${missing[*]}"

    local args=() qver
    qver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    for p in "${missing[@]}"; do
        [[ $p == qemu-system-x86 ]] || args+=("$p")
    done
    # qemu-utils is always named so apt never removes a preinstalled one.
    args+=(qemu-utils)
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
        if [[ $qver == *bpo12* ]]; then
            # The machine image ships qemu-utils from bookworm-backports
            # (10.x), which Breaks bookworm's qemu-system-common 7.2. Install
            # qemu-system-x86 at exactly the same backports version instead
            # of letting apt downgrade/remove qemu-utils.
            if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
                log "adding bookworm-backports apt source (pin priority 100: nothing is pulled from it unless asked)"
                cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
# Added by tests/vm/setup.sh: qemu-system-x86 must match the preinstalled
# backports qemu-utils (qemu-utils 10.x Breaks qemu-system-common 7.2).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
            fi
            args+=("qemu-system-x86=$qver" "qemu-system-common=$qver" "qemu-system-data=$qver"
                   seabios/bookworm-backports)
        else
            args+=(qemu-system-x86)
        fi
    fi
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${args[@]}" >&2 \
        || die "apt-get install ${args[*]} failed (see above)"
    for p in qemu-img qemu-nbd qemu-system-x86_64; do
        "$p" --version >/dev/null 2>&1 || die "$p no longer works after the install"
    done
    log "qemu: $(qemu-system-x86_64 --version | sed -n 1p); qemu-img: $(qemu-img --version | sed -n 1p)"
}

# ------------------------------------------------------------------ kernel
# Result: $CACHE/kernel/{kver,vmlinuz,config,modules/} — "modules" is the
# unpacked /lib/modules/KVER of the .deb (xz-compressed .ko files).
fetch_kernel() {
    if [[ -s $CACHE/kernel/kver && -f $CACHE/kernel/vmlinuz && ${VM_REFRESH_KERNEL:-0} != 1 ]]; then
        return 0
    fi
    local pkg
    pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
    if [[ -z $pkg ]]; then
        apt_update_once
        pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
    fi
    [[ -n $pkg ]] || die "apt-cache depends $KERNEL_META names no linux-image package"
    local kver=${pkg#linux-image-}
    log "downloading kernel package $pkg (not installed, only unpacked into $CACHE/kernel)"
    local tmp="$CACHE/kernel.tmp"
    rm -rf "$tmp"; mkdir -p "$tmp/deb"
    # APT::Sandbox::User=root: the _apt user may not be able to write here.
    (cd "$tmp/deb" && apt-get download -o APT::Sandbox::User=root "$pkg" >&2) \
        || { apt_update_once; (cd "$tmp/deb" && apt-get download -o APT::Sandbox::User=root "$pkg" >&2); } \
        || die "apt-get download $pkg failed"
    dpkg-deb -x "$tmp"/deb/*.deb "$tmp/root" || die "dpkg-deb -x failed"
    [[ -f $tmp/root/boot/vmlinuz-$kver ]] || die "no /boot/vmlinuz-$kver in $pkg"
    grep -q '^CONFIG_BLK_DEV_UBLK=[ym]' "$tmp/root/boot/config-$kver" \
        || die "$pkg has no CONFIG_BLK_DEV_UBLK; pick another kernel via VM_KERNEL_META"
    mkdir -p "$tmp/out"
    mv "$tmp/root/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
    mv "$tmp/root/boot/config-$kver" "$tmp/out/config"
    mv "$tmp/root/lib/modules/$kver" "$tmp/out/modules"
    echo "$kver" > "$tmp/out/kver"
    # Swap in atomically so an interrupted download never looks complete.
    rm -rf "$CACHE/kernel"; mv "$tmp/out" "$CACHE/kernel"; rm -rf "$tmp"
    rm -f "$CACHE/initramfs.cpio"   # modules changed: force a rebuild
    log "kernel $kver ready"
}

# --------------------------------------------------------------- initramfs
modinfo_field() {  # modinfo_field FILE.ko.xz FIELD  (host has no kmod modinfo)
    # No early exit (head/sed q) in this pipeline: SIGPIPE would trip pipefail.
    xz -dc "$1" | tr '\0' '\n' | sed -n "s/^$2=//p"
}

build_initramfs() {
    local out="$CACHE/initramfs.cpio" kver
    kver=$(<"$CACHE/kernel/kver")
    # Rebuild only when an input is newer than the image (make-style).
    if [[ -f $out && $out -nt $INIT_SRC && $out -nt ${BASH_SOURCE[0]} \
          && $out -nt $CACHE/kernel/kver && $out -nt /bin/busybox ]]; then
        return 0
    fi
    log "building $out"
    local kmods="$CACHE/kernel/modules"
    declare -A path_of=()
    local f n
    while IFS= read -r f; do
        n=${f##*/}; n=${n%.ko.xz}; n=${n//-/_}
        path_of[$n]=$f
    done < <(cd "$kmods" && find kernel -name '*.ko.xz')

    # Depth-first dependency closure, dependencies before dependents.
    local order=() 
    declare -A seen=()
    visit() {
        local m=${1//-/_} d deps
        [[ -n ${seen[$m]:-} ]] && return 0
        seen[$m]=1
        if [[ -z ${path_of[$m]:-} ]]; then
            grep -q "/$m.ko\$" "$kmods/modules.builtin" 2>/dev/null && return 0
            die "module $m not found in $kmods (and not built in)"
        fi
        deps=$(modinfo_field "$kmods/${path_of[$m]}" depends)
        for d in ${deps//,/ }; do visit "$d"; done
        order+=("$m")
    }
    for n in "${MODULES[@]}"; do visit "$n"; done

    local st="$CACHE/initramfs.tmp"
    rm -rf "$st"
    mkdir -p "$st"/{bin,dev,proc,sys,tmp,mnt,newroot,etc} "$st/lib/modules/$kver"
    ln -s bin "$st/sbin"
    cp /bin/busybox "$st/bin/busybox"
    local a
    for a in $(busybox --list); do
        [[ $a == busybox ]] || ln -sf busybox "$st/bin/$a"
    done
    # The kernel opens /dev/console for init's stdio before /init runs.
    mknod -m 600 "$st/dev/console" c 5 1 2>/dev/null || log "warning: mknod /dev/console failed (not root?)"
    for n in "${order[@]}"; do
        f=${path_of[$n]}
        mkdir -p "$st/lib/modules/$kver/${f%/*}"
        xz -dc "$kmods/$f" > "$st/lib/modules/$kver/${f%.xz}"
    done
    cp "$kmods"/modules.builtin "$kmods"/modules.order "$st/lib/modules/$kver/" 2>/dev/null || true
    busybox depmod -b "$st" "$kver" || die "busybox depmod failed"
    printf '%s\n' "${order[@]}" > "$st/etc/ublkvm-modules"
    echo "$kver" > "$st/etc/ublkvm-kver"
    install -m 755 "$INIT_SRC" "$st/init"
    # Uncompressed newc: no decompression cost under TCG, and a later
    # per-run cpio could be appended without the "invalid magic" pitfall.
    (cd "$st" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) > "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$st"
    log "initramfs: $(du -h "$out" | cut -f1), modules: ${order[*]}"
}

install_packages
fetch_kernel
build_initramfs
kver=$(<"$CACHE/kernel/kver")
cat > "$CACHE/vm.env.tmp" <<EOF
VM_KVER=$kver
VM_KERNEL=$CACHE/kernel/vmlinuz
VM_INITRD=$CACHE/initramfs.cpio
EOF
# Rewrite only on change, so its mtime means "kernel/initramfs paths changed".
if cmp -s "$CACHE/vm.env.tmp" "$CACHE/vm.env"; then rm -f "$CACHE/vm.env.tmp"; else mv "$CACHE/vm.env.tmp" "$CACHE/vm.env"; fi
log "ready: kernel $kver, $(basename "$CACHE")/initramfs.cpio"
