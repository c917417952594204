#!/usr/bin/env bash
# cryptvol over an RBD volume against its peers, in ONE run on a throwaway micro cluster
# (tests/ceph/micro-ceph.sh: one memstore OSD), 1 GiB images, each filled first:
#
#   ceiling   fio --ioengine=rbd straight into librbd (async, no NBD, unencrypted)
#   qemu-raw  qemu-nbd over rbd (raw), driven by fio's nbd engine — only if qemu's rbd module
#             loads (QEMU_MODULE_DIR=DIR or a block-rbd.so unpacked from qemu-block-extra with
#             `--qemu-modules DIR`, or `fetch`: benches/rbd/qemu-modules.sh; else "n/a")
#   librbd-luks2  librbd's own LUKS2 (rbd_encryption_format/load, AES-256), librbd's async API
#             (benches/rbd/luks_peer.c; fio cannot load an encryption format)
#   cryptvol  `cryptvol serve` (release build) with the volume on RBD, fio's nbd engine over
#             its Unix socket
#
# Jobs (as benches/fio/peers.sh): 1 MiB seq read/write QD8, 4 KiB rand read/write QD32.
# Also: attach latency (`volume attach` CLI wall time: open + lock + header + DEK unwrap,
# median of 5) against librbd LUKS2's open + encryption_load.
#
#   benches/rbd/peers.sh [--size 1024] [--seconds 8] [--ramp 2] [--cryptvol BIN] [--qemu-modules DIR|fetch]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mb=1024; secs=8; ramp=2; bin=$repo/target/release/cryptvol; qmods=${QEMU_MODULE_DIR:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --size) mb=$2; shift ;;
        --seconds) secs=$2; shift ;;
        --ramp) ramp=$2; shift ;;
        --cryptvol) bin=$2; shift ;;
        --qemu-modules) qmods=$2; shift ;;
        *) sed -n '2,20p' "$0"; exit 2 ;;
    esac
    shift
done
for t in fio rbd ceph-mon ceph-osd cc nbdinfo; do
    command -v "$t" >/dev/null || { echo "peers.sh: $t is not installed" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "peers.sh: no cryptvol binary at $bin (cargo build --release --bin cryptvol)" >&2; exit 2; }
[ "$qmods" != fetch ] || qmods=$("$here/qemu-modules.sh") # same-build block-rbd.so
bytes=$((mb << 20))
log() { echo "[rbd-peers $(date -u +%H:%M:%S)] $*" >&2; }

D=$(mktemp -d /tmp/cv-rbdpeers.XXXXXX)
# shellcheck source=../lib.sh
. "$repo/benches/lib.sh"
cleanup() {
    kill_pids
    "$repo/tests/ceph/micro-ceph.sh" stop "$D/c" >/dev/null 2>&1 || true
    rm -rf "$D"
}
trap cleanup EXIT
cc -O2 -o "$D/luks_peer" "$here/luks_peer.c" -lrbd -lrados
MEMSTORE_BYTES=$((8 << 30)) "$repo/tests/ceph/micro-ceph.sh" start "$D/c" >/dev/null
export CEPH_CONF=$D/c/ceph.conf
unset CEPH_ARGS
client=cryptvol-a
pass=peers-bench-passphrase
luks() { "$D/luks_peer" "$CEPH_CONF" "$client" rbd luks "$pass" "$@"; }
fio_json() { /usr/bin/python3 -c 'import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.1f %.0f" % (d["bw_bytes"]/2**20, d["iops"]))'; }

log "cluster up; images of ${mb} MiB, filling"
rbd --id $client create --size "${mb}M" raw
fio --name=fill --ioengine=rbd --clientname=$client --pool=rbd --rbdname=raw --rw=write \
    --bs=1M --iodepth=8 --size="$bytes" --output-format=terse >/dev/null
rbd --id $client create --size "$((mb + 16))M" luks # + the LUKS2 header area
t=$(date +%s.%N); luks format; tf=$(date +%s.%N)
luks fill $((1 << 20)) 8 0 0 >/dev/null

# cryptvol: a daemon with [ceph], volume v on RBD.
st=$D/cv
cryptvol_daemon "$bin" "$st" "$D/cryptvol.log" "$(ceph_section "$D/c" "$client")"
cv() { "$bin" --socket "$st/control.sock" "$@"; }
cv key create --alias bench >/dev/null
cv volume create v --size "${mb}M" --key bench --store rbd >/dev/null
ms() { /usr/bin/python3 -c 'import sys; print("%.1f" % ((float(sys.argv[2]) - float(sys.argv[1])) * 1000))' "$@"; }
att=()
for _ in 1 2 3 4 5; do
    a=$(date +%s.%N); cv volume attach v >/dev/null; b=$(date +%s.%N)
    att+=("$(ms "$a" "$b")")
    cv volume detach v >/dev/null
done
cv volume attach v >/dev/null
uri="nbd+unix:///v?socket=$st/nbd.sock"
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size="$bytes" \
    --output-format=terse >/dev/null
lopen=()
for _ in 1 2 3; do lopen+=("$(luks open)"); done

# qemu-nbd over rbd raw, if qemu's rbd driver loads.
qemu_uri="" qemu_why=""
if [ -n "$qmods" ] && command -v qemu-nbd >/dev/null; then
    if why=$(QEMU_MODULE_DIR=$qmods timeout 20 qemu-img info "rbd:rbd/raw:id=$client:conf=$CEPH_CONF" 2>&1); then
        QEMU_MODULE_DIR=$qmods qemu-nbd --persistent --shared=8 -f raw -x raw -k "$D/qemu.sock" \
            --cache=none --aio=threads "rbd:rbd/raw:id=$client:conf=$CEPH_CONF" > "$D/qemu.log" 2>&1 &
        pids+=($!)
        qemu_uri="nbd+unix:///raw?socket=$D/qemu.sock"
        for _ in $(seq 1 100); do nbdinfo --size "$qemu_uri" >/dev/null 2>&1 && break; sleep 0.1; done
    else
        qemu_why=$(echo "$why" | tr '\n' ' ')
    fi
else
    qemu_why="no qemu rbd module given (--qemu-modules DIR)"
fi
[ -z "$qemu_why" ] || log "qemu-nbd over rbd: n/a: $qemu_why"

printf "%-10s %12s %12s %12s %12s %8s %8s %8s\n" job fio-librbd qemu-raw librbd-luks2 cryptvol /ceiling /qemu /luks2
for j in seqread:read:1M:8 seqwrite:write:1M:8 randread:randread:4k:32 randwrite:randwrite:4k:32; do
    IFS=: read -r job rw bs qd <<<"$j"
    bsb=$(( ${bs%[Mk]} << $([ "${bs: -1}" = M ] && echo 20 || echo 10) ))
    common=(--rw="$rw" --bs="$bs" --iodepth="$qd" --size="$bytes" --time_based --ramp_time="$ramp"
            --runtime="$secs" --randrepeat=0 --norandommap --output-format=json)
    f=$(fio --name="$job" --ioengine=rbd --clientname=$client --pool=rbd --rbdname=raw "${common[@]}" | fio_json)
    q="n/a n/a"
    [ -z "$qemu_uri" ] || q=$(fio --name="$job" --ioengine=nbd --uri="$qemu_uri" "${common[@]}" | fio_json)
    l=$(luks "$rw" "$bsb" "$qd" "$secs" "$ramp")
    c=$(fio --name="$job" --ioengine=nbd --uri="$uri" "${common[@]}" | fio_json)
    col=1; unit=MiB/s
    [ "$bs" = 1M ] || { col=2; unit=IOPS; }
    pick() { awk -v c=$col '{print $c}' <<<"$1"; }
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a/b }'; }
    F=$(pick "$f") Q=$(pick "$q") L=$(pick "$l") C=$(pick "$c")
    printf "%-10s %12s %12s %12s %12s %8s %8s %8s  (%s)\n" "$job" "$F" "$Q" "$L" "$C" \
        "$(ratio "$C" "$F")" "$(ratio "$C" "$Q")" "$(ratio "$C" "$L")" "$unit"
done
echo "attach (cryptvol volume attach, ms): ${att[*]}"
echo "librbd LUKS2 open+encryption_load (ms): ${lopen[*]}; encryption_format: $(ms "$t" "$tf") ms"
