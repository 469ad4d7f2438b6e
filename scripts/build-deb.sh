#!/usr/bin/env bash
# scripts/build-deb.sh — build the Debian packages from the workspace, in
# target/debian/ (prints their paths on stdout, the server's first):
# - ublk-cache_VERSION-1_ARCH.deb: /usr/bin/ublk-cache, the systemd unit
#   template, the example config, the libvirt snippets, man pages and
#   bash/zsh/fish completions generated from the clap definitions
#   (ublk-cache-gen-docs). Depends on Debian's librbd1.
# - ublk-cache-opennebula_VERSION-1_ARCH.deb: the OpenNebula driver's host
#   parts: the helper /usr/lib/ublk-cache/ublk-cache-one, its sudoers rule,
#   /etc/ublk-cache/one.conf (naming /usr/bin/ublk-cache). Depends on
#   ublk-cache and sudo.
# Installs cargo-deb from crates.io when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo_deb_version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$cargo_deb_version"; then
    echo "build-deb: installing cargo-deb $cargo_deb_version" >&2
    cargo install cargo-deb --locked --version "$cargo_deb_version" >&2
fi
cargo build --release -q -p ublk-cache --bins -p ublk-cache-one >&2

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets"
target/release/ublk-cache-gen-docs "$assets" >/dev/null
gzip -9n "$assets"/man/*.1
# The contrib unit runs a hand-installed /usr/local/bin/ublk-cache; the package
# installs /usr/bin/ublk-cache.
sed 's|/usr/local/bin/ublk-cache|/usr/bin/ublk-cache|g' contrib/systemd/ublk-cache@.service \
    > "$assets/ublk-cache@.service"
grep -q /usr/bin/ublk-cache "$assets/ublk-cache@.service"

# The example host config names the hand-installed server; the package's, its own.
sed 's|^UBLK_CACHE=/usr/local/bin/ublk-cache$|UBLK_CACHE=/usr/bin/ublk-cache|' \
    contrib/opennebula/host/one.conf.example > "$assets/one.conf"
grep -qx 'UBLK_CACHE=/usr/bin/ublk-cache' "$assets/one.conf"

mkdir -p target/debian
cargo deb -p ublk-cache --no-build -o target/debian/ 2>&1 | tail -n 1
cargo deb -p ublk-cache-one --no-build -o target/debian/ 2>&1 | tail -n 1
