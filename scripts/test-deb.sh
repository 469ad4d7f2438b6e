#!/usr/bin/env bash
# scripts/test-deb.sh DEB [ONE_DEB] — install the package into a clean Debian 12
# root and run it from there: `ublk-cache --version`, the man page and
# completions are in place, and `ublk-cache demo` serves its disk over NBD (no
# /dev/ublk-control in the root), checked with nbdinfo inside the root. With
# ONE_DEB (ublk-cache-opennebula) too: it installs next to it, its sudoers rule
# passes visudo, its one.conf names the packaged server, and the helper's probe
# runs as root there.
#
# The root is a minimal bookworm made by mmdebstrap (with librbd1, nbdinfo and
# sudo, from Debian's archive), cached as a tarball in /var/cache/ublk-cache-test/
# ($UBLK_CACHE_DEB_ROOT_CACHE), outside the work tree so that fresh clones (CI)
# share it: the first run takes about a minute, later ones seconds. Delete the
# tarball to rebuild it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deb=$(realpath "${1:?usage: scripts/test-deb.sh target/debian/ublk-cache_*.deb [target/debian/ublk-cache-opennebula_*.deb]}")
one_deb=${2:+$(realpath "$2")}

if ! command -v mmdebstrap >/dev/null; then
    echo "test-deb: installing mmdebstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 mmdebstrap >/dev/null
fi
cache=${UBLK_CACHE_DEB_ROOT_CACHE:-/var/cache/ublk-cache-test}
# The name says what the root holds: a new package list makes a new root.
tarball=$cache/bookworm-librbd1-nbd-sudo.tar
if [[ ! -s $tarball ]]; then
    mkdir -p "$cache"
    echo "test-deb: building a minimal Debian 12 root (once; cached in $tarball)" >&2
    mmdebstrap --quiet --variant=apt --format=tar --include=librbd1,libnbd-bin,sudo \
        bookworm "$tarball.tmp" http://deb.debian.org/debian >&2
    mv "$tarball.tmp" "$tarball"
fi

root=$(mktemp -d /tmp/ublk-cache-deb-root.XXXXXX)
demo_pid=
cleanup() {
    [[ -n $demo_pid ]] && kill -INT "$demo_pid" 2>/dev/null && wait "$demo_pid" 2>/dev/null || true
    for m in dev/shm dev proc; do umount "$root/$m" 2>/dev/null || true; done
    rm -rf "$root"
}
trap cleanup EXIT
tar -C "$root" -xf "$tarball"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/dev/shm"
cp "$deb" "$root/tmp/ublk-cache.deb"
[[ -z $one_deb ]] || cp "$one_deb" "$root/tmp/ublk-cache-opennebula.deb"

echo "== dpkg -i (Depends must already be met: librbd1 is in the root)"
chroot "$root" dpkg -i /tmp/ublk-cache.deb
chroot "$root" dpkg -s ublk-cache | grep -E '^(Version|Depends):'
chroot "$root" dpkg -s ublk-cache | grep -E '^Depends:.*librbd1' >/dev/null
echo "== ublk-cache --version"
ver=$(chroot "$root" /usr/bin/ublk-cache --version)
echo "$ver"
[[ $ver == "ublk-cache "* ]]
for f in /lib/systemd/system/ublk-cache@.service /usr/share/man/man1/ublk-cache.1.gz \
    /usr/share/man/man1/ublk-cache-serve.1.gz /usr/share/bash-completion/completions/ublk-cache \
    /usr/share/zsh/vendor-completions/_ublk-cache /usr/share/fish/vendor_completions.d/ublk-cache.fish \
    /usr/share/doc/ublk-cache/examples/ublk-cache.toml.example \
    /usr/share/doc/ublk-cache/examples/libvirt/disk-nbd.xml; do
    [[ -s $root$f ]] || { echo "test-deb: $f missing from the package" >&2; exit 1; }
done
grep -q 'exec /usr/bin/ublk-cache' "$root/lib/systemd/system/ublk-cache@.service"
zcat "$root/usr/share/man/man1/ublk-cache-serve.1.gz" | grep -q -- 'tls\\-cert'

if [[ -n $one_deb ]]; then
    echo "== dpkg -i ublk-cache-opennebula (the OpenNebula host parts)"
    chroot "$root" dpkg -i /tmp/ublk-cache-opennebula.deb
    chroot "$root" dpkg -s ublk-cache-opennebula | grep -E '^Depends:.*ublk-cache.*sudo|^Depends:.*sudo.*ublk-cache' >/dev/null
    [[ -x $root/usr/lib/ublk-cache/ublk-cache-one ]] || { echo "test-deb: the helper is missing" >&2; exit 1; }
    [[ $(stat -c %a "$root/etc/sudoers.d/ublk-cache-one") == 440 ]]
    chroot "$root" visudo -cf /etc/sudoers.d/ublk-cache-one
    grep -qx 'UBLK_CACHE=/usr/bin/ublk-cache' "$root/etc/ublk-cache/one.conf"
    chroot "$root" dpkg -s ublk-cache-opennebula | grep -q '^Conffiles:' ||
        grep -qx /etc/ublk-cache/one.conf "$root/var/lib/dpkg/info/ublk-cache-opennebula.conffiles"
    [[ $(stat -c %a "$root/var/lib/ublk-cache/one") == 700 ]]
    probe=$(chroot "$root" /usr/lib/ublk-cache/ublk-cache-one probe)
    echo "$probe"
    grep -qx 'LS_MAD="file"' <<<"$probe"
    if grep -q '^LC_ERROR=' <<<"$probe"; then echo "test-deb: the probe reports an error" >&2; exit 1; fi
fi

echo "== ublk-cache demo (over NBD: no /dev/ublk-control in the root)"
out=$root/tmp/demo.out
chroot "$root" /usr/bin/ublk-cache demo --dir /tmp/demo --size 64M --cache-size 16M \
    >"$out" 2>"$root/tmp/demo.err" &
demo_pid=$!
for _ in $(seq 100); do [[ -s $out ]] && break; sleep 0.1; done
uri=$(head -n 1 "$out")
echo "$uri"
[[ $uri == nbd+unix://* ]] || { cat "$root/tmp/demo.err" >&2; exit 1; }
chroot "$root" nbdinfo "$uri" | grep -E 'export-size: 67108864'
chroot "$root" nbdinfo --map "$uri"
kill -INT "$demo_pid"
wait "$demo_pid"
demo_pid=
echo "test-deb: installed into a clean Debian 12 root: ublk-cache${one_deb:+ and ublk-cache-opennebula}; the demo serves: ok"
