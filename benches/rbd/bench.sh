#!/usr/bin/env bash
# Volume over RbdStore (librbd's synchronous calls, one thread per request in flight, AES-XTS)
# against the ceiling, `fio --ioengine=rbd` straight into librbd (async, unencrypted), on a
# throwaway micro cluster (tests/ceph/micro-ceph.sh: one memstore OSD, so the OSD is in RAM).
#
#   benches/rbd/bench.sh [--size 512M] [--seconds 8] [--ramp 2]
#
# Jobs (as benches/fio/peers.sh): 1 MiB seq read/write QD8, 4 KiB rand read/write QD32; both
# images are filled first. cryptvol's side is built with `cargo build --bench rbd_volume` and
# the crate at opt-level 3 (dependencies already are in the dev profile). Not a test.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
size=512M; secs=8; ramp=2
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift ;;
        --seconds) secs=$2; shift ;;
        --ramp) ramp=$2; shift ;;
        *) sed -n '2,12p' "$0"; exit 2 ;;
    esac
    shift
done
for t in fio rbd ceph-mon ceph-osd; do
    command -v "$t" >/dev/null || { echo "bench.sh: $t is not installed" >&2; exit 2; }
done
mb=${size%M}
bytes=$((mb << 20))
log() { echo "[rbd-bench $(date -u +%H:%M:%S)] $*" >&2; }

log "building rbd_volume"
bin=$(cd "$repo" && cargo build --bench rbd_volume --config 'profile.dev.package.cryptvol.opt-level=3' \
    --message-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="rbd_volume" and m.get("executable"): print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "bench.sh: rbd_volume did not build" >&2; exit 1; }

D=$(mktemp -d /tmp/cv-rbdbench.XXXXXX)
trap '"$repo/tests/ceph/micro-ceph.sh" stop "$D" >/dev/null 2>&1 || true' EXIT
MEMSTORE_BYTES=$((8 << 30)) "$repo/tests/ceph/micro-ceph.sh" start "$D" >/dev/null
export CEPH_CONF=$D/ceph.conf
unset CEPH_ARGS
client=cryptvol-a
rbd --id $client create --size "${mb}M" raw
rbd --id $client create --size "$((mb + 1))M" vol # + the 1 MiB header area
log "cluster up; filling both images (${size})"
fio --name=fill --ioengine=rbd --clientname=$client --pool=rbd --rbdname=raw --rw=write \
    --bs=1M --iodepth=8 --size="$bytes" --output-format=terse >/dev/null
cv() { "$bin" --conf "$CEPH_CONF" --client $client --pool rbd --image vol "$@"; }
cv --create "$bytes" --rw fill --bs 1048576 --qd 8 --seconds 0 >&2

printf "%-10s %18s %18s %7s\n" job "fio->librbd" "Volume/RbdStore" ratio
for j in seqread:read:1M:8 seqwrite:write:1M:8 randread:randread:4k:32 randwrite:randwrite:4k:32; do
    IFS=: read -r job rw bs qd <<<"$j"
    bsb=$(( ${bs%[Mk]} << $([ "${bs: -1}" = M ] && echo 20 || echo 10) ))
    f=$(fio --name="$job" --ioengine=rbd --clientname=$client --pool=rbd --rbdname=raw \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$bytes" --time_based \
        --ramp_time="$ramp" --runtime="$secs" --randrepeat=0 --norandommap \
        --output-format=json | /usr/bin/python3 -c 'import json,sys
j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]
print(d["bw_bytes"]/2**20, d["iops"])')
    c=$(cv --rw "$rw" --bs "$bsb" --qd "$qd" --seconds "$secs" --ramp "$ramp")
    read -r fmib fiops <<<"$f"
    cmib=$(awk '{print $2}' <<<"$c"); ciops=$(awk '{print $4}' <<<"$c")
    if [ "$bs" = 1M ]; then
        printf "%-10s %13.0f MiB/s %13.0f MiB/s %7.2f\n" "$job" "$fmib" "$cmib" "$(awk -v a="$cmib" -v b="$fmib" 'BEGIN{print a/b}')"
    else
        printf "%-10s %14.0f IOPS %14.0f IOPS %7.2f\n" "$job" "$fiops" "$ciops" "$(awk -v a="$ciops" -v b="$fiops" 'BEGIN{print a/b}')"
    fi
done
