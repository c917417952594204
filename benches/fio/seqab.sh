#!/usr/bin/env bash
# Sequential A/B against `nbdkit file` (issue 16 §1/§3): nbdcopy both ways and fio 1 MiB
# sequential read/write with 1, 2 and 4 connections, cryptvol and nbdkit file interleaved job by
# job, several rounds; prints per job the medians of MiB/s and of server CPU seconds per GiB
# (utime + stime of the server process over that job only, from /proc/PID/stat) and their ratios.
#
#   benches/fio/seqab.sh [--size 2G] [--rounds 3] [--runtime 6] [--cryptvol PATH]
#                        [--jobs copy-in,copy-out,read1,write1,read2,write2,read4,write4]
#                        [--dir /dev/shm] [--out DIR] [--sector-size 4096] [--baseline PATH]
#
# --baseline: a second cryptvol binary (e.g. main's) run beside, as `cryptvol-base`.
# Jobs: copy-in = `nbdcopy SRC.img URI` (a file of random bytes onto the export), copy-out =
# `nbdcopy URI null:`, both with nbdcopy's defaults (4 connections, 256 KiB requests, 64 in
# flight each); readN / writeN = fio nbd engine, 1 MiB, QD8 per connection, N connections
# (numjobs=N, each on its own slice). Every image is prefilled once (by the copy-in of round 0),
# so reads read data and writes overwrite allocated pages. CPU per GiB is the robust figure on a
# loaded machine (other processes steal time, not CPU from the server); MiB/s is what a user sees.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
PY=/usr/bin/python3
size=2G; rounds=3; runtime=6; bin=""; base=""; dir=/dev/shm; out=""; sector=4096
jobsel=copy-in,copy-out,read1,write1,read2,write2,read4,write4
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --runtime) runtime=$2; shift ;;
        --cryptvol) bin=$2; shift ;;
        --jobs) jobsel=$2; shift ;;
        --dir) dir=$2; shift ;;
        --out) out=$2; shift ;;
        --sector-size) sector=$2; shift ;;
        --baseline) base=$2; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "seqab.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
bin=${bin:-$repo/target/release/cryptvol}
[ -x "$bin" ] || { echo "seqab.sh: no $bin (cargo build --release --bin cryptvol)" >&2; exit 2; }
for tool in fio nbdkit nbdcopy nbdinfo; do
    command -v "$tool" >/dev/null || { echo "seqab.sh: $tool is not installed" >&2; exit 2; }
done
out=${out:-/tmp/cryptvol-seqab/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
work=$(mktemp -d "$dir/cryptvol-seqab.XXXXXX")
log() { echo "[seqab $(date -u +%H:%M:%S)] $*" >&2; }
# shellcheck source=../lib.sh
. "$repo/benches/lib.sh"
cleanup() {
    kill_pids
    rm -rf "$work"
}
trap cleanup EXIT
bytes=$(to_bytes "$size")

# --- servers ---------------------------------------------------------------------------------
declare -A uri pid
start_cryptvol() { # name binary
    local n=$1 b=$2 st=$work/$1
    cryptvol_daemon "$b" "$st" "$out/$n.log"
    pid[$n]=${pids[-1]}
    local cv=("$b" --socket "$st/control.sock")
    "${cv[@]}" key create --alias ab >/dev/null
    "${cv[@]}" volume create bench --size "$bytes" --key ab --sector-size "$sector" >/dev/null
    "${cv[@]}" volume attach bench >/dev/null
    uri[$n]="nbd+unix:///bench?socket=$st/nbd.sock"
    wait_nbd "${uri[$n]}"
}
names=(cryptvol)
start_cryptvol cryptvol "$bin"
if [ -n "$base" ]; then start_cryptvol cryptvol-base "$base"; names+=(cryptvol-base); fi
truncate -s "$bytes" "$work/raw.img"
nbdkit -f -U "$work/nbdkit.sock" file "$work/raw.img" >"$out/nbdkit.log" 2>&1 &
pid[nbdkit-file]=$!; pids+=("$!")
uri[nbdkit-file]="nbd+unix:///?socket=$work/nbdkit.sock"
wait_nbd "${uri[nbdkit-file]}"
names+=(nbdkit-file)
log "servers: ${names[*]}; load: $(cut -d' ' -f1-3 /proc/loadavg)"

head -c "$bytes" /dev/urandom > "$work/src.img"
for n in "${names[@]}"; do nbdcopy "$work/src.img" "${uri[$n]}"; done

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
now() { date +%s.%N; }
hz=$(getconf CLK_TCK)
# One measurement: job server round -> "job server round seconds bytes ticks load1".
run() {
    local job=$1 n=$2 r=$3 u=${uri[$2]} t0 t1 c0 c1 moved secs=
    c0=$(ticks "${pid[$n]}"); t0=$(now)
    case $job in
        copy-in) nbdcopy "$work/src.img" "$u"; moved=$bytes ;;
        copy-out) nbdcopy "$u" null:; moved=$bytes ;;
        read*|write*)
            local nc=${job#read}; nc=${nc#write}; local rw=${job%%[0-9]*}
            fio --name="$job" --ioengine=nbd --uri="$u" --rw="$rw" --bs=1M --iodepth=8 \
                --size=$(( bytes / nc )) --offset_increment=$(( bytes / nc )) --numjobs="$nc" \
                --group_reporting --time_based --runtime="$runtime" \
                --output-format=json --output="$out/$job.$n.$r.json" >/dev/null
            # fio's own clock for MiB/s (its start-up is not I/O); CPU over the whole run.
            read -r moved secs < <($PY -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; print(j['read']['io_bytes']+j['write']['io_bytes'], max(j['read']['runtime'], j['write']['runtime'])/1000)" "$out/$job.$n.$r.json") ;;
    esac
    t1=$(now); c1=$(ticks "${pid[$n]}")
    echo "$job $n $r ${secs:-$(echo "$t1 - $t0" | bc)} $moved $(( c1 - c0 )) $(cut -d' ' -f1 /proc/loadavg)"
}
: > "$out/raw.tsv"
for r in $(seq 1 "$rounds"); do
    for job in ${jobsel//,/ }; do
        # Alternate who goes first, so a drift within a round hits both alike.
        order=("${names[@]}")
        if [ $(( r % 2 )) = 0 ]; then
            order=(); for (( i=${#names[@]}-1; i>=0; i-- )); do order+=("${names[$i]}"); done
        fi
        for n in "${order[@]}"; do
            line=$(run "$job" "$n" "$r"); echo "$line" >> "$out/raw.tsv"; log "$line"
        done
    done
done

$PY - "$out/raw.tsv" "$hz" <<'EOF'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
hz = int(sys.argv[2])
res = {}
for job, n, r, secs, moved, ticks, load in rows:
    secs, moved, ticks = float(secs), int(moved), int(ticks)
    gib = moved / (1 << 30)
    res.setdefault(job, {}).setdefault(n, []).append((moved / (1 << 20) / secs, ticks / hz / gib, float(load)))
med = st.median
for cv in ("cryptvol", "cryptvol-base"):
    if not any(cv in d for d in res.values()):
        continue
    print(f"\n{cv} against nbdkit file (per-round ratios in the same round; MiB/s > 1 and CPU < 1: {cv} better)\n")
    print(f"| job | {cv} MiB/s | nbdkit file MiB/s | MiB/s ratio, median (rounds) | {cv} CPU s/GiB | nbdkit CPU s/GiB | CPU ratio, median (rounds) | load1 |")
    print("|---|---|---|---|---|---|---|---|")
    for job, d in res.items():
        c, k = d.get(cv, []), d.get("nbdkit-file", [])
        if not c or not k:
            continue
        ratios = [a[0] / b[0] for a, b in zip(c, k)]
        cratios = [a[1] / b[1] for a, b in zip(c, k)]
        loads = [x[2] for x in c + k]
        print(f"| {job} | {med([x[0] for x in c]):.0f} | {med([x[0] for x in k]):.0f} | "
              f"**{med(ratios):.2f}×** ({' / '.join(f'{x:.2f}' for x in ratios)}) | "
              f"{med([x[1] for x in c]):.3f} | {med([x[1] for x in k]):.3f} | "
              f"**{med(cratios):.2f}×** ({' / '.join(f'{x:.2f}' for x in cratios)}) | "
              f"{min(loads):.1f}–{max(loads):.1f} |")
EOF
