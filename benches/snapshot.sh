#!/usr/bin/env bash
# Snapshot benchmark: the write pause of `volume snapshot create` (pause_us, measured in the
# daemon from the first stripe lock taken to the last released) on the reflink path (a
# loop-mounted XFS with reflink=1; needs root) and the copy path (the test dir's file system,
# ext4/tmpfs), with a random-write load running (`cryptvol bench`), and the copy path's
# background copy speed (MiB of data per second, unthrottled, with and without the load).
#
#   benches/snapshot.sh [--size 1G] [--snapshots 10] [--cryptvol PATH]
#
# SKIP_COPY=1: the reflink path only.
# Default binary: target/release/cryptvol, else target/debug/cryptvol (said in the output).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
size=1G
count=10
bin=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift ;;
        --snapshots) count=$2; shift ;;
        --cryptvol) bin=$2; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$bin" ]; then
    bin=$repo/target/release/cryptvol
    [ -x "$bin" ] || bin=$repo/target/debug/cryptvol
fi
echo "binary: $bin"

dir=$(mktemp -d /tmp/cvsnap.XXXXXX)
daemon=""
load=""
mnt=""
cleanup() {
    [ -n "$load" ] && kill "$load" 2>/dev/null || true
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    [ -n "$mnt" ] && umount "$mnt" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cv() { "$bin" --config "$dir/c.toml" "$@"; }

# start FS: a daemon whose volumes/ is on FS ("xfs": a fresh loop-mounted XFS).
start() {
    local fs=$1
    rm -rf "$dir/s"
    "$bin" init --state-dir "$dir/s" >/dev/null
    mkdir -p "$dir/s/volumes"
    if [ "$fs" = xfs ]; then
        truncate -s 4G "$dir/xfs.img"
        mkfs.xfs -q -f -m reflink=1 "$dir/xfs.img"
        mount -o loop "$dir/xfs.img" "$dir/s/volumes"
        mnt=$dir/s/volumes
    fi
    cat >"$dir/c.toml" <<EOF
state_dir = "$dir/s"
[control]
socket = "$dir/c.sock"
[nbd]
unix_socket = "$dir/n.sock"
EOF
    "$bin" serve --config "$dir/c.toml" 2>>"$dir/daemon.log" &
    daemon=$!
    for _ in $(seq 200); do cv volume list >/dev/null 2>&1 && break; sleep 0.05; done
    cv key create --alias k >/dev/null
    cv volume create v --size "$size" --key k >/dev/null
    cv volume attach v >/dev/null
    # Fill the volume with data (sequential 1 MiB writes).
    "$bin" bench "nbd+unix:///v?socket=$dir/n.sock" --rw write --bs 1M --iodepth 8 >/dev/null
}

stop() {
    [ -n "$load" ] && kill "$load" 2>/dev/null && wait "$load" 2>/dev/null || true
    load=""
    cv volume detach v --force >/dev/null 2>&1 || true
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
    daemon=""
    [ -n "$mnt" ] && umount "$mnt"
    mnt=""
}

# pauses LABEL: COUNT snapshots under a random-write load; min/median/max pause_us.
pauses() {
    local label=$1
    "$bin" bench "nbd+unix:///v?socket=$dir/n.sock" --rw randwrite --bs 4K --iodepth 16 \
        --time 600s >/dev/null 2>&1 &
    load=$!
    sleep 1
    local p=()
    for i in $(seq "$count"); do
        out=$(cv --json volume snapshot create v "p$i")
        p+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pause_us"])')")
        cv volume snapshot delete "v@p$i" >/dev/null
    done
    kill "$load"; wait "$load" 2>/dev/null || true
    load=""
    printf '%s\n' "${p[@]}" | sort -n | awk -v l="$label" \
        '{a[NR]=$1} END {printf "%-28s pause_us min %d  median %d  max %d  (n=%d, under 4K randwrite QD16)\n", l, a[1], a[int((NR+1)/2)], a[NR], NR}'
}

# copyspeed LABEL [load]: one unthrottled copy-path snapshot; MiB of volume per second.
copyspeed() {
    local label=$1 withload=${2:-}
    if [ -n "$withload" ]; then
        "$bin" bench "nbd+unix:///v?socket=$dir/n.sock" --rw randwrite --bs 4K --iodepth 16 \
            --time 600s >/dev/null 2>&1 &
        load=$!
        sleep 1
    fi
    local t0 t1
    t0=$(date +%s.%N)
    cv volume snapshot create v c >/dev/null
    t1=$(date +%s.%N)
    if [ -n "$withload" ]; then kill "$load"; wait "$load" 2>/dev/null || true; load=""; fi
    cv volume snapshot delete v@c >/dev/null
    local bytes
    bytes=$(cv --json volume inspect v | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
    python3 -c "print(f'%-28s %.0f MiB/s (%d MiB in %.2f s)' % ('$label', $bytes/2**20/($t1-$t0), $bytes/2**20, $t1-$t0))"
}

if [ "${SKIP_COPY:-}" != 1 ]; then
    start local
    fs=$(stat -f -c %T "$dir/s/volumes")
    pauses "copy path ($fs)"
    copyspeed "copy speed ($fs), idle"
    copyspeed "copy speed ($fs), loaded" load
    stop
fi
if [ "$(id -u)" = 0 ] && command -v mkfs.xfs >/dev/null; then
    start xfs
    pauses "reflink path (xfs)"
    stop
else
    echo "reflink path: skipped (needs root and mkfs.xfs)"
fi
