#!/usr/bin/env bash
# cryptvol on RBD against its ceilings, interleaved: every round runs every job on every peer
# back to back (the ceiling, the qemu-nbd peers, librbd LUKS2, then each cryptvol binary), so
# that the load of the shared 2-vCPU machine moves all of them alike; medians over the rounds.
# Not a test. One micro cluster (tests/ceph/micro-ceph.sh: one memstore OSD) for all.
#
#   ceiling   fio --ioengine=rbd straight into librbd (async, no NBD, unencrypted)
#   luks2     librbd's own LUKS2 (AES-256) through librbd's async API (luks_peer.c, no NBD)
#   qemu-raw  qemu-nbd over rbd raw (--cache=none: librbd's cache off, as cryptvol), fio's nbd
#             engine; only with --qemu-modules DIR|fetch (qemu's block-rbd.so of the installed
#             qemu's build: `fetch` runs benches/rbd/qemu-modules.sh); and with it, the same way:
#   qemu-luks2  qemu-nbd over rbd with librbd's LUKS2 (`rbd encryption format` AES-256, qemu's
#             rbd driver encrypt.format=luks2): issue 12's LUKS2 peer
#   qemu-luks qemu-nbd with qemu's own LUKS (driver=luks over driver=rbd, `qemu-img create -f
#             luks`, aes-256-xts, iter-time 10 ms)
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
# Before the rounds: the open cost of each encrypted peer, wall time (median of 3, ms) of
# `luks_peer open` (connect + rbd_open + encryption_load) and of a read-only `qemu-io` reading
# 4 KiB from each qemu peer's image (qemu-raw: the baseline without a key to unlock; not
# `qemu-img info`: it opens qemu's LUKS without unlocking a keyslot).
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
        *) sed -n '2,31p' "$0"; exit 2 ;;
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
nq=0; [ -z "$qmods" ] || nq=2 # qemu-luks2, qemu-luks (qemu-raw is in the 3)
MEMSTORE_BYTES=$(( ((3 + nq + ${#variants[@]}) * mb * 5 / 2 << 20) + (2 << 30) )) \
    "$repo/tests/ceph/micro-ceph.sh" start "$D/c" >/dev/null
export CEPH_CONF=$D/c/ceph.conf
unset CEPH_ARGS
client=cryptvol-a
pass="rounds-bench-passphrase"
luks() { "$D/luks_peer" "$CEPH_CONF" "$client" rbd luks "$pass" "$@"; }
printf %s "$pass" > "$D/pass" # for `rbd encryption format` and qemu's secret object
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
# qemu-nbd peers, each on its own image (no exclusive-lock ping-pong with the other peers).
declare -A qopts quri
qnames=()
if [ -n "$qmods" ]; then
    export QEMU_MODULE_DIR=$qmods # (not a wrapper function: $! must be qemu-nbd's own pid)
    secret=(--object "secret,id=sec0,file=$D/pass")
    frbd="file.driver=rbd,file.pool=rbd,file.user=$client,file.conf=$CEPH_CONF" # --image-opts
    rbd --id $client create --size "${mb}M" qraw
    qopts[qemu-raw]="driver=raw,$frbd,file.image=qraw"
    rbd --id $client create --size "$((mb + 16))M" qluks2 # + librbd's LUKS2 header area
    rbd --id $client encryption format qluks2 luks2 "$D/pass"
    qopts[qemu-luks2]="driver=raw,$frbd,file.image=qluks2"
    qopts[qemu-luks2]+=",file.encrypt.format=luks2,file.encrypt.key-secret=sec0"
    qemu-img create -q -f luks "${secret[@]}" -o key-secret=sec0,iter-time=10 \
        "rbd:rbd/qluks:id=$client:conf=$CEPH_CONF" "${mb}M" # qemu creates the image (+ header)
    qopts[qemu-luks]="driver=luks,key-secret=sec0,$frbd,file.image=qluks"
    qnames=(qemu-raw qemu-luks2 qemu-luks)
fi
ms_median() { # CMD...: median wall time of 3 runs, ms
    local a b t=()
    for _ in 1 2 3; do
        a=$(date +%s%N)
        "$@" >/dev/null || { echo "rounds.sh: failed: $*" >&2; return 1; }
        b=$(date +%s%N)
        t+=("$(( (b - a) / 1000000 ))")
    done
    printf '%s\n' "${t[@]}" | sort -n | sed -n 2p
}
opens="luks2 (luks_peer open) $(ms_median luks open)"
for q in "${qnames[@]}"; do
    opens+="; $q $(ms_median qemu-io -r "${secret[@]}" --image-opts "${qopts[$q]}" \
        -c "read 0 4096")"
done
log "open cost, median of 3 (ms): $opens"
for q in "${qnames[@]}"; do
    qemu-nbd --persistent --shared=8 -x "$q" -k "$D/$q.sock" --cache=none --aio=threads \
        "${secret[@]}" --image-opts "${qopts[$q]}" > "$D/$q.log" 2>&1 &
    pids+=($!)
    quri[$q]="nbd+unix:///$q?socket=$D/$q.sock"
    wait_nbd "${quri[$q]}" 60 || { cat "$D/$q.log" >&2; exit 1; }
    fio --name=fill --ioengine=nbd --uri="${quri[$q]}" --rw=write --bs=1M --iodepth=8 \
        --size="$bytes" --output-format=terse >/dev/null || { cat "$D/$q.log" >&2; exit 1; }
done

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
    echo "CEPH_CONF=$CEPH_CONF client=$client images: raw luks${qmods:+ qraw qluks2 qluks}"
    for q in "${qnames[@]}"; do echo "$q: uri ${quri[$q]}"; done
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
        for q in "${qnames[@]}"; do
            echo "$r $job $q $(fio --name="$job" --ioengine=nbd --uri="${quri[$q]}" "${common[@]}" |
                fio_json)" >> "$res"
        done
        echo "$r $job luks2 $(luks "$rw" "$bsb" "$qd" "$secs" "$ramp")" >> "$res"
        for n in "${names[@]}"; do
            echo "$r $job $n $(fio --name="$job" --ioengine=nbd --uri="${uri[$n]}" "${common[@]}" |
                fio_json)" >> "$res"
        done
        log "round $r $job: $(grep "^$r $job " "$res" | awk '{printf "%s=%s ", $3, ($2 ~ /^seq/ ? $4 : $5)}')"
    done
done
log "load at end: $(uptime)"
echo "open cost, median of 3 (ms): $opens"
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
label = {"ceiling": "ceiling", "ceiling-nocache": "ceiling no cache", "luks2": "librbd LUKS2",
         "qemu-raw": "qemu-nbd raw", "qemu-luks2": "qemu-nbd librbd LUKS2",
         "qemu-luks": "qemu-nbd qemu LUKS"}
present = [b for b in label if any(r[2] == b for r in rows)]
base = present # ratio columns
cols = [b for b in present if b != "ceiling-nocache"] # folded into the ceiling's cell
print("| job | unit | " + " | ".join(label[b] for b in cols) + " | " + " | ".join(names) + " | " +
      " | ".join(f"{n} ÷ {label[b]}" for n in names for b in base) + " |")
print("|" + "---|" * (2 + len(cols) + len(names) + len(names) * len(base)))
for job in jobs:
    unit = "MiB/s" if job.startswith("seq") else "IOPS"
    def m(p):
        v = vals(job, p)
        return "%.0f (%s)" % (st.median(v), "/".join("%.0f" % x for x in v)) if v else "n/a"
    cells = [job, unit] + [m(b) for b in cols] + [m(n) for n in names]
    if "ceiling-nocache" in present:
        cells[2] += " / no cache " + m("ceiling-nocache")
    for n in names:
        for b in base:
            rr = ratios(job, n, b)
            cells.append("%.2f" % st.median(rr) if rr else "n/a")
    print("| " + " | ".join(cells) + " |")
PY
