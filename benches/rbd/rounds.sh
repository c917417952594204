#!/usr/bin/env bash
# cryptvol on RBD against its ceilings, interleaved: every round runs every job on every peer
# back to back (the ceiling, librbd LUKS2, then each cryptvol binary), so that the load of
# the shared 2-vCPU machine moves all of them alike; medians over the rounds at the end.
# Not a test. One micro cluster (tests/ceph/micro-ceph.sh: one memstore OSD) for all.
#
#   ceiling   fio --ioengine=rbd straight into librbd (async, no NBD, unencrypted)
#   luks2     librbd's own LUKS2 (AES-256) through librbd's async API (luks_peer.c, no NBD)
#   qemu-raw  qemu-nbd over rbd raw (--cache=none: librbd's cache off, as cryptvol), fio's nbd
#             engine; only with --qemu-modules DIR|fetch (qemu's block-rbd.so of the installed
#             qemu's build: `fetch` runs benches/rbd/qemu-modules.sh)
#   NAME      `cryptvol serve` (BIN) with the volume on RBD, fio's nbd engine over its Unix
#             socket; several --cryptvol NAME=BIN for an A/B of two builds
#
#   benches/rbd/rounds.sh [--rounds 3] [--size 1024] [--seconds 6] [--ramp 2]
#       [--jobs "randread randwrite seqread seqwrite"] [--cryptvol NAME=BIN]...
#       [--qemu-modules DIR|fetch]
#       [--hold]   (after setup: print how to reach everything and wait for Enter; profiling)
#       [--nocache] (also the ceiling with rbd_cache = false, as cryptvol runs librbd: shows
#                   what librbd's default cache (writearound) gives the ceiling)
#
# Jobs: seqread/seqwrite = 1 MiB QD8, randread/randwrite = 4 KiB QD32 (as peers.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
rounds=3; mb=1024; secs=6; ramp=2; jobs="randread randwrite seqread seqwrite"; hold=0; nocache=0
variants=(); qmods=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift ;;
        --size) mb=$2; shift ;;
        --seconds) secs=$2; shift ;;
        --ramp) ramp=$2; shift ;;
        --jobs) jobs=$2; shift ;;
        --cryptvol) variants+=("$2"); shift ;;
        --hold) hold=1 ;;
        --nocache) nocache=1 ;;
        --qemu-modules) qmods=$2; shift ;;
        *) sed -n '2,21p' "$0"; exit 2 ;;
    esac
    shift
done
[ ${#variants[@]} -gt 0 ] || variants=("cryptvol=$repo/target/release/cryptvol")
for t in fio rbd ceph-mon ceph-osd cc; do
    command -v "$t" >/dev/null || { echo "rounds.sh: $t is not installed" >&2; exit 2; }
done
[ "$qmods" != fetch ] || qmods=$("$here/qemu-modules.sh")
bytes=$((mb << 20))
log() { echo "[rbd-rounds $(date -u +%H:%M:%S)] $*" >&2; }

D=$(mktemp -d /tmp/cv-rbdrounds.XXXXXX)
# shellcheck source=../lib.sh
. "$repo/benches/lib.sh"
cleanup() {
    kill_pids
    "$repo/tests/ceph/micro-ceph.sh" stop "$D/c" >/dev/null 2>&1 || true
    rm -rf "$D"
}
trap cleanup EXIT
cc -O2 -o "$D/luks_peer" "$here/luks_peer.c" -lrbd -lrados
MEMSTORE_BYTES=$(( ((3 + ${#variants[@]}) * mb * 5 / 2 << 20) + (2 << 30) )) \
    "$repo/tests/ceph/micro-ceph.sh" start "$D/c" >/dev/null
export CEPH_CONF=$D/c/ceph.conf
unset CEPH_ARGS
client=cryptvol-a
pass=rounds-bench-passphrase
luks() { "$D/luks_peer" "$CEPH_CONF" "$client" rbd luks "$pass" "$@"; }
fio_json() { /usr/bin/python3 -c 'import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.1f %.0f" % (d["bw_bytes"]/2**20, d["iops"]))'; }

log "cluster up; images of ${mb} MiB, filling"
rbd --id $client create --size "${mb}M" raw
fio --name=fill --ioengine=rbd --clientname=$client --pool=rbd --rbdname=raw --rw=write \
    --bs=1M --iodepth=8 --size="$bytes" --output-format=terse >/dev/null
rbd --id $client create --size "$((mb + 16))M" luks # + the LUKS2 header area
luks format
luks fill $((1 << 20)) 8 0 0 >/dev/null
if [ -n "$qmods" ]; then # its own image: no exclusive-lock ping-pong with the ceiling's fio
    rbd --id $client create --size "${mb}M" qraw
    QEMU_MODULE_DIR=$qmods qemu-nbd --persistent --shared=8 -f raw -x qraw -k "$D/qemu.sock" \
        --cache=none --aio=threads "rbd:rbd/qraw:id=$client:conf=$CEPH_CONF" > "$D/qemu.log" 2>&1 &
    pids+=($!)
    quri="nbd+unix:///qraw?socket=$D/qemu.sock"
    for _ in $(seq 1 100); do nbdinfo --size "$quri" >/dev/null 2>&1 && break; sleep 0.1; done
    fio --name=fill --ioengine=nbd --uri="$quri" --rw=write --bs=1M --iodepth=8 --size="$bytes" \
        --output-format=terse >/dev/null || { cat "$D/qemu.log" >&2; exit 1; }
fi

# One daemon per cryptvol binary, each with its own state and its own volume (image v-NAME).
declare -A uri
names=()
for v in "${variants[@]}"; do
    name=${v%%=*} bin=${v#*=}
    [ -x "$bin" ] || { echo "rounds.sh: no binary $bin" >&2; exit 2; }
    st=$D/$name
    mkdir -p "$st"
    cp "$bin" "$st/cryptvol" # the build may change under us while we run
    cryptvol_daemon "$st/cryptvol" "$st" "$st/log" "$(ceph_section "$D/c" "$client")"
    cv() { "$st/cryptvol" --socket "$st/control.sock" "$@"; }
    cv key create --alias bench >/dev/null
    cv volume create "v-$name" --size "${mb}M" --key bench --store rbd >/dev/null
    cv volume attach "v-$name" >/dev/null
    uri[$name]="nbd+unix:///v-$name?socket=$st/nbd.sock"
    fio --name=fill --ioengine=nbd --uri="${uri[$name]}" --rw=write --bs=1M --iodepth=8 \
        --size="$bytes" --output-format=terse >/dev/null
    names+=("$name")
done

if [ $hold = 1 ]; then
    echo "CEPH_CONF=$CEPH_CONF client=$client images: raw luks"
    for n in "${names[@]}"; do echo "$n: pid $(pgrep -f "$D/$n/cryptvol serve") uri ${uri[$n]}"; done
    echo "luks peer: $D/luks_peer $CEPH_CONF $client rbd luks $pass RW BS QD SECS RAMP"
    read -r -p "Enter ends the run " _
    exit 0
fi

res=$D/results # lines: round job peer mibs iops
{ cat "$CEPH_CONF"; printf '\nrbd cache = false\n'; } > "$D/c/nocache.conf" # [client] is the conf's last section
: > "$res"
log "load at start: $(uptime)"
for r in $(seq 1 "$rounds"); do
    for job in $jobs; do
        case $job in
            seqread) rw=read bs=1M qd=8 ;; seqwrite) rw=write bs=1M qd=8 ;;
            randread) rw=randread bs=4k qd=32 ;; randwrite) rw=randwrite bs=4k qd=32 ;;
            *) echo "rounds.sh: unknown job $job" >&2; exit 2 ;;
        esac
        bsb=$(( ${bs%[Mk]} << $([ "${bs: -1}" = M ] && echo 20 || echo 10) ))
        common=(--rw="$rw" --bs="$bs" --iodepth="$qd" --size="$bytes" --time_based
                --ramp_time="$ramp" --runtime="$secs" --randrepeat=0 --norandommap
                --output-format=json)
        echo "$r $job ceiling $(fio --name="$job" --ioengine=rbd --clientname=$client --pool=rbd \
            --rbdname=raw "${common[@]}" | fio_json)" >> "$res"
        if [ $nocache = 1 ]; then
            echo "$r $job ceiling-nocache $(CEPH_CONF=$D/c/nocache.conf fio --name="$job" --ioengine=rbd \
                --clientname=$client --pool=rbd --rbdname=raw "${common[@]}" | fio_json)" >> "$res"
        fi
        [ -z "$qmods" ] || echo "$r $job qemu-raw $(fio --name="$job" --ioengine=nbd --uri="$quri" \
            "${common[@]}" | fio_json)" >> "$res"
        echo "$r $job luks2 $(luks "$rw" "$bsb" "$qd" "$secs" "$ramp")" >> "$res"
        for n in "${names[@]}"; do
            echo "$r $job $n $(fio --name="$job" --ioengine=nbd --uri="${uri[$n]}" "${common[@]}" |
                fio_json)" >> "$res"
        done
        log "round $r $job: $(grep "^$r $job " "$res" | awk '{printf "%s=%s ", $3, ($2 ~ /^seq/ ? $4 : $5)}')"
    done
done
log "load at end: $(uptime)"
/usr/bin/python3 - "$res" "${names[@]}" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
names = sys.argv[2:]
jobs = []
for r in rows:
    if r[1] not in jobs:
        jobs.append(r[1])
def vals(job, peer):
    return [float(r[3] if job.startswith("seq") else r[4]) for r in rows if r[1] == job and r[2] == peer]
def ratios(job, a, b):
    # per round, then the median: the peers of one round ran under the same load
    rs = {}
    for r in rows:
        if r[1] == job and r[2] in (a, b):
            rs.setdefault(r[0], {})[r[2]] = float(r[3] if job.startswith("seq") else r[4])
    return [d[a] / d[b] for d in rs.values() if a in d and b in d and d[b] > 0]
base = [b for b in ("ceiling", "ceiling-nocache", "luks2", "qemu-raw") if any(r[2] == b for r in rows)]
label = {"ceiling": "ceiling", "ceiling-nocache": "ceiling no cache", "luks2": "LUKS2", "qemu-raw": "qemu-nbd raw"}
print("| job | unit | ceiling | librbd LUKS2 | qemu-nbd raw | " + " | ".join(names) + " | " +
      " | ".join(f"{n} ÷ {label[b]}" for n in names for b in base) + " |")
print("|" + "---|" * (5 + len(names) + len(names) * len(base)))
for job in jobs:
    unit = "MiB/s" if job.startswith("seq") else "IOPS"
    def m(p):
        v = vals(job, p)
        return "%.0f (%s)" % (st.median(v), "/".join("%.0f" % x for x in v)) if v else "n/a"
    cells = [job, unit, m("ceiling"), m("luks2"), m("qemu-raw")] + [m(n) for n in names]
    if vals(job, "ceiling-nocache"):
        cells[2] += " / no cache " + m("ceiling-nocache")
    for n in names:
        for b in base:
            rr = ratios(job, n, b)
            cells.append("%.2f" % st.median(rr) if rr else "n/a")
    print("| " + " | ".join(cells) + " |")
PY
