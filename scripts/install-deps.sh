#!/usr/bin/env bash
# scripts/install-deps.sh — install what building and testing ublk-cache needs
# on Debian 12. Idempotent; quick when everything is present. The VM test bed
# installs its own packages (tests/vm/setup.sh).
set -euo pipefail

need_apt=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# libclang-dev: bindgen, which libublk's build runs against the ublk uapi header.
# pkg-config, gcc: -sys crates. fio: benchmarks, the VM scenarios and the NBD
# conformance tests (its nbd engine). qemu-utils (qemu-io, qemu-img) and
# libnbd-bin (nbdinfo, nbdcopy): the NBD conformance tests. A qemu-utils that is
# already installed (e.g. from backports) is left alone: only missing packages
# are installed. librbd-dev, librados-dev: the RBD backend (the default `rbd`
# feature links them); the Ceph daemons for the RBD tests come with
# scripts/ceph-cluster.sh. nbdkit (its file plugin), python3: the benchmark
# runner benches/run.py, which compares our NBD export with qemu-nbd and nbdkit.
# openssl: certificates for the NBD TLS tests. dpkg-dev (dpkg-shlibdeps) and
# mmdebstrap: scripts/build-deb.sh and scripts/test-deb.sh. shellcheck: the
# OpenNebula driver's scripts are checked in the harness
# (contrib/opennebula/test/run.sh).
for p in libclang-dev pkg-config gcc fio e2fsprogs qemu-utils libnbd-bin librbd-dev librados-dev nbdkit python3 openssl dpkg-dev mmdebstrap shellcheck; do
    have_pkg "$p" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "install-deps: missing Debian packages: ${need_apt[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "install-deps: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq -o DPkg::Lock::Timeout=600
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo is not installed. ublk-cache needs Rust 1.88 or newer (https://rustup.rs);" \
         "Debian 12's packaged rustc is too old." >&2
    exit 1
fi
ver=$(rustc --version | awk '{print $2}')
if [[ $(printf '%s\n1.88.0\n' "$ver" | sort -V | head -n1) != 1.88.0 ]]; then
    echo "install-deps: rustc $ver is older than the 1.88 this workspace needs" >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
echo "install-deps: ok (rustc $ver)" >&2
