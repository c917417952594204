#!/usr/bin/env bash
# Prints a directory holding qemu's block modules (block-rbd.so) from the SAME build as the
# installed qemu-utils, fetching them once; for QEMU_MODULE_DIR (benches only, never tests).
#
# qemu refuses modules of another build ("Only modules from the same build can be loaded"):
# here qemu-utils comes from bookworm-backports, which is not in the apt sources, so Debian
# 12's qemu-block-extra (7.2) cannot serve. This downloads qemu-block-extra of exactly the
# installed version from bookworm-backports with apt's ordinary client, under private apt
# state in the cache dir (the system's sources, lists and package cache are not touched),
# and unpacks it with `dpkg -x` (nothing installed).
#
#   benches/rbd/qemu-modules.sh [CACHE_DIR]   (default /tmp/cv-qemu-modules)
#   QEMU_SUITE=bookworm-backports QEMU_MIRROR=http://deb.debian.org/debian
set -euo pipefail
cache=${1:-/tmp/cv-qemu-modules}
suite=${QEMU_SUITE:-bookworm-backports}
mirror=${QEMU_MIRROR:-http://deb.debian.org/debian}
ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) ||
    { echo "qemu-modules.sh: qemu-utils is not installed" >&2; exit 2; }
dir=$cache/${ver//[:~]/_}
mods=$dir/x/usr/lib/x86_64-linux-gnu/qemu
if [ -f "$mods/block-rbd.so" ]; then echo "$mods"; exit 0; fi
mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$dir/sources.list"
apt_o=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o APT::Sandbox::User=root)
apt-get "${apt_o[@]}" -q update >&2
(cd "$dir" && apt-get "${apt_o[@]}" -q download "qemu-block-extra=$ver" >&2) ||
    { echo "qemu-modules.sh: qemu-block-extra $ver is not in $suite at $mirror" >&2; exit 1; }
dpkg -x "$dir"/qemu-block-extra_*.deb "$dir/x"
[ -f "$mods/block-rbd.so" ] || { echo "qemu-modules.sh: no block-rbd.so in the package" >&2; exit 1; }
echo "$mods"
