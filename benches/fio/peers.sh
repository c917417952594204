#!/usr/bin/env bash
# Peer benchmark: the same fio suite (nbd engine, Unix sockets) against cryptvol and the other
# NBD servers one would use for an encrypted disk, interleaved in one run, on one medium
# (/dev/shm: sparse files of the same size for everyone).
#
#   benches/fio/peers.sh [--quick] [--size 1G] [--out DIR] [--chart docs/peers.png]
#                        [--cryptvol PATH] [--only NAME,NAME] [--no-prefill]
#                        [--dir DIR] [--cache none] [--conns 1,2,4] [--jobs NAME,NAME]
#
# --dir: where the images (and cryptvol's state dir) live, default /dev/shm; a directory on
# a disk file system for the cache=none runs. --cache none: every file-backed server without
# a page cache of its own: cryptvol `--cache none` (O_DIRECT), qemu-nbd `--cache=none
# --aio=native` (O_DIRECT), nbdkit file `cache=none` (not O_DIRECT: posix_fadvise DONTNEED
# after each request, what the plugin offers). --conns: adds the 1 MiB sequential and 4 KiB
# QD32 jobs with N connections at once (fio numjobs=N, each on its own slice of the image)
# for every N > 1. --jobs: run only these jobs (names as in the table: seqread, seqwrite,
# randread, randwrite, randread-qd1, seqwrite-c2, ...).
# The issue-16 case "1 MiB QD8 write on a prefilled 2 GiB image" is `--size 2G` (prefill is
# the default): `benches/fio/peers.sh --size 2G --only cryptvol,nbdkit-file`.
#
# Servers: cryptvol (encrypted volume via the daemon; skipped with a message until `cryptvol
# serve` works), qemu-nbd + LUKS (aes-256-xts-plain64), nbdkit + luks filter (same image),
# qemu-nbd raw, nbdkit file raw, nbdkit memory (protocol reference), and cryptvol's own server
# over its in-memory backend (cryptvol-memory, when examples/memserve is built).
# Jobs: 1 MiB seq read / write QD8, 4 KiB rand read / write QD32, 4 KiB rand read QD1 (p99).
# Each job: ramp then measure (3 s + 12 s; --quick: 1 s + 3 s); for each job every server runs
# in turn, so slow drifts of the machine hit all servers alike.
# Records per server: CPU seconds per GiB moved (utime+stime from /proc/PID/stat, over all
# jobs including ramps) and peak RSS (VmHWM less RssShmem at the end: a server that maps its
# image on tmpfs, as cryptvol does for reads, has the image's own pages in its RSS, which are
# the file's and not the server's memory; mapped pages stay mapped, so the final RssShmem is
# their peak). Prints absolute figures and cryptvol's ratio to
# each peer; renders the ratios (or, without cryptvol, every server relative to nbdkit file raw)
# as a PNG bar chart with gnuplot.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
PY=/usr/bin/python3 # python3 on PATH may be a pyenv shim

quick=0
size=1G
out=""
chart=""
cryptvol_bin="${CRYPTVOL:-}"
only=""
prefill=1
dir=/dev/shm
cache=""
conns=1
jobsel=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --size) size=$2; shift ;;
        --out) out=$2; shift ;;
        --chart) chart=$2; shift ;;
        --cryptvol) cryptvol_bin=$2; shift ;;
        --only) only=$2; shift ;;
        --no-prefill) prefill=0 ;;
        --dir) dir=$2; shift ;;
        --cache) cache=$2; shift ;;
        --conns) conns=$2; shift ;;
        --jobs) jobsel=$2; shift ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "peers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then ramp=1; runtime=3; else ramp=3; runtime=12; fi
out=${out:-/tmp/cryptvol-peers/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
case "$cache" in ""|none) ;; *) echo "peers.sh: --cache takes none" >&2; exit 2 ;; esac
work=$(mktemp -d "$dir/cryptvol-peers.XXXXXX")
log() { echo "[peers $(date -u +%H:%M:%S)] $*" >&2; }

for tool in fio nbdkit qemu-nbd qemu-img nbdinfo; do
    command -v "$tool" >/dev/null || { echo "peers.sh: $tool is not installed" >&2; exit 2; }
done

# shellcheck source=../lib.sh
. "$repo/benches/lib.sh"
cleanup() {
    kill_pids
    rm -rf "$work"
}
trap cleanup EXIT

bytes=$(to_bytes "$size")
secret=cryptvol-peers-secret
printf %s "$secret" > "$work/passphrase"

# --- backing files -----------------------------------------------------------------------
truncate -s "$bytes" "$work/raw.img"
qemu-img create -q -f luks --object "secret,id=sec0,data=$secret" -o key-secret=sec0 \
    -o cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256 \
    -o iter-time=10 "$work/luks.img" "$bytes"

# --- servers: name, URI, PID -------------------------------------------------------------
names=()
declare -A uri pid
want() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

start_bg() { # name uri cmd...
    local name=$1 u=$2; shift 2
    "$@" >"$out/$name.log" 2>&1 &
    local p=$!
    pids+=("$p")
    wait_nbd "$u"
    names+=("$name"); uri[$name]=$u; pid[$name]=$p
    log "started $name (pid $p)"
}

start_cryptvol() {
    local bin=$cryptvol_bin
    [ -n "$bin" ] || for c in "$repo/target/release/cryptvol" "$(command -v cryptvol || true)"; do
        [ -n "$c" ] && [ -x "$c" ] && { bin=$c; break; }
    done
    if [ -z "$bin" ] || ! "$bin" serve --help >/dev/null 2>&1; then
        log "skipping cryptvol: no cryptvol binary with a working 'serve' (build with cargo build --release)"
        return 0
    fi
    local st=$work/cryptvol
    local ctl=$st/control.sock nbd=$st/nbd.sock
    cryptvol_daemon "$bin" "$st" "$out/cryptvol.log"
    local p=${pids[-1]}
    "$bin" --socket "$ctl" key create --alias peers >/dev/null
    "$bin" --socket "$ctl" volume create bench --size "$bytes" --key peers --sector-size 4096 \
        ${cache:+--cache "$cache"} >/dev/null
    "$bin" --socket "$ctl" volume attach bench >/dev/null
    local u="nbd+unix:///bench?socket=$nbd"
    wait_nbd "$u"
    names+=(cryptvol); uri[cryptvol]=$u; pid[cryptvol]=$p
    log "started cryptvol (pid $p)"
}

# cache=none: O_DIRECT for qemu-nbd (with Linux AIO, as one runs it on a disk), the
# plugin's own cache=none for nbdkit file.
qemu_cache=(); nbdkit_cache=()
if [ "$cache" = none ]; then
    qemu_cache=(--cache=none --aio=native); nbdkit_cache=(cache=none)
fi
want cryptvol && start_cryptvol
want qemu-nbd-luks && start_bg qemu-nbd-luks "nbd+unix:///?socket=$work/qemu-luks.sock" \
    qemu-nbd -k "$work/qemu-luks.sock" -t -e 4 "${qemu_cache[@]}" \
    --object "secret,id=sec0,file=$work/passphrase" \
    --image-opts "driver=luks,key-secret=sec0,file.driver=file,file.filename=$work/luks.img"
# nbdkit forks by default: -f keeps it in the foreground so that $! is the server.
want nbdkit-luks && start_bg nbdkit-luks "nbd+unix:///?socket=$work/nbdkit-luks.sock" \
    nbdkit -f -U "$work/nbdkit-luks.sock" --filter=luks file "$work/luks.img" \
    "${nbdkit_cache[@]}" "passphrase=+$work/passphrase"
want qemu-nbd-raw && start_bg qemu-nbd-raw "nbd+unix:///?socket=$work/qemu-raw.sock" \
    qemu-nbd -k "$work/qemu-raw.sock" -t -e 4 "${qemu_cache[@]}" -f raw "$work/raw.img"
want nbdkit-file && start_bg nbdkit-file "nbd+unix:///?socket=$work/nbdkit-file.sock" \
    nbdkit -f -U "$work/nbdkit-file.sock" file "$work/raw.img" "${nbdkit_cache[@]}"
# cryptvol's NBD server over its in-memory backend (no encryption, no file): the protocol
# path against nbdkit memory. Needs `cargo build --release --example memserve`.
memserve=$repo/target/release/examples/memserve
if want cryptvol-memory && [ -x "$memserve" ]; then
    start_bg cryptvol-memory "nbd+unix:///mem?socket=$work/memserve.sock" \
        "$memserve" "$work/memserve.sock" $(( bytes >> 20 ))
elif [ -n "$only" ] && want cryptvol-memory; then
    log "skipping cryptvol-memory: build it with cargo build --release --example memserve"
fi
want nbdkit-memory && start_bg nbdkit-memory "nbd+unix:///?socket=$work/nbdkit-mem.sock" \
    nbdkit -f -U "$work/nbdkit-mem.sock" memory "$bytes"
[ "${#names[@]}" -gt 0 ] || { echo "peers.sh: no server to measure" >&2; exit 2; }

# Server CPU ticks (utime + stime; threads included) and peak RSS.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM/ { h = $2 } /^RssShmem/ { s = $2 } END { print h - s }' "/proc/$1/status"; }

# The LUKS images would otherwise read never-written (zero) ciphertext: fill every image once.
# The LUKS peers share luks.img and the raw peers raw.img, so one fill per image suffices;
# cryptvol and nbdkit memory have their own.
if [ "$prefill" = 1 ]; then
    declare -A filled
    for n in "${names[@]}"; do
        case $n in *luks) img=luks ;; qemu-nbd-raw|nbdkit-file) img=raw ;; *) img=$n ;; esac
        [ -n "${filled[$img]:-}" ] && continue
        filled[$img]=1
        log "prefill $img through $n"
        fio --name=prefill --ioengine=nbd --uri="${uri[$n]}" --rw=write --bs=1M --iodepth=8 \
            --size="$bytes" --output-format=json --output="$out/prefill-$n.json" >/dev/null
    done
fi

declare -A cpu0
for n in "${names[@]}"; do cpu0[$n]=$(cpu_ticks "${pid[$n]}"); done

# --- the suite ---------------------------------------------------------------------------
# name:rw:bs:iodepth:connections
alljobs=(seqread:read:1M:8:1 seqwrite:write:1M:8:1 randread:randread:4k:32:1
         randwrite:randwrite:4k:32:1 randread-qd1:randread:4k:1:1)
for c in ${conns//,/ }; do
    [ "$c" -gt 1 ] || continue
    alljobs+=("seqread-c$c:read:1M:8:$c" "seqwrite-c$c:write:1M:8:$c"
              "randread-c$c:randread:4k:32:$c" "randwrite-c$c:randwrite:4k:32:$c")
done
jobs=(); jobnames=()
for j in "${alljobs[@]}"; do
    IFS=: read -r job _ <<<"$j"
    # A name selects its multi-connection variants too (seqwrite: seqwrite-c2, -c4, ...).
    [ -z "$jobsel" ] || [[ ",$jobsel," == *",$job,"* || ",$jobsel," == *",${job%-c*},"* ]] \
        || continue
    jobs+=("$j"); jobnames+=("$job")
done
[ "${#jobs[@]}" -gt 0 ] || { echo "peers.sh: no job selected" >&2; exit 2; }
for j in "${jobs[@]}"; do
    IFS=: read -r job rw bs qd nc <<<"$j"
    for n in "${names[@]}"; do
        log "$job on $n"
        # N connections: N fio jobs, each on its own slice of the image, reported as one.
        fio --name="$job" --ioengine=nbd --uri="${uri[$n]}" --rw="$rw" --bs="$bs" \
            --iodepth="$qd" --size=$(( bytes / nc )) --offset_increment=$(( bytes / nc )) \
            --numjobs="$nc" --group_reporting --time_based --ramp_time="$ramp" \
            --runtime="$runtime" --randrepeat=0 --norandommap \
            --output-format=json --output="$out/$job.$n.json" >/dev/null
    done
done

: > "$out/servers.tsv"
hz=$(getconf CLK_TCK)
for n in "${names[@]}"; do
    t=$(cpu_ticks "${pid[$n]}")
    printf '%s\t%s\t%s\n' "$n" "$(( t - cpu0[$n] ))" "$(hwm_kib "${pid[$n]}")" >> "$out/servers.tsv"
done

# --- report --------------------------------------------------------------------------------
$PY - "$out" "$hz" "${names[*]}" "${jobnames[*]}" <<'EOF'
import json, sys, os
out, hz, names, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
res, io_bytes = {}, {}
for n in names:
    io_bytes[n] = 0
    for j in jobs:
        d = json.load(open(f"{out}/{j}.{n}.json"))["jobs"][0]
        rd = d["read"] if d["read"]["io_bytes"] else d["write"]
        ramp_and_run = rd["io_bytes"]  # fio excludes the ramp from io_bytes
        io_bytes[n] += ramp_and_run
        p99 = rd["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3
        res[(n, j)] = {"mib_s": rd["bw_bytes"] / 1048576, "iops": rd["iops"], "p99_us": p99}
srv = {}
for line in open(f"{out}/servers.tsv"):
    n, ticks, hwm = line.split("\t")
    srv[n] = {"cpu_s": int(ticks) / hz, "rss_mib": int(hwm) / 1024}
# CPU per GiB: over the measured bytes (ramps burn CPU too, for every server alike).
for n in names:
    srv[n]["cpu_s_per_gib"] = srv[n]["cpu_s"] / max(io_bytes[n] / 2**30, 1e-9)

def fig(n, j):
    r = res[(n, j)]
    return r["mib_s"] if j.startswith("seq") else r["iops"]

label = {"seqread": "seq read MiB/s", "seqwrite": "seq write MiB/s",
         "randread": "4k rr QD32 IOPS", "randwrite": "4k rw QD32 IOPS",
         "randread-qd1": "4k rr QD1 IOPS"}
def col(j):
    if j in label:
        return label[j]
    base, c = j.rsplit("-c", 1)
    return label[base].replace(" MiB/s", f" x{c} MiB/s").replace(" IOPS", f" x{c} IOPS")
qd1 = "randread-qd1" in jobs
cols = [col(j) for j in jobs] + (["QD1 p99 us"] if qd1 else []) + ["CPU s/GiB", "peak RSS MiB"]
def row(n):
    return [fig(n, j) for j in jobs] + \
        ([res[(n, "randread-qd1")]["p99_us"]] if qd1 else []) + \
        [srv[n]["cpu_s_per_gib"], srv[n]["rss_mib"]]
def cell(j, x):
    return f"{x:.0f}" if j.startswith("seq") else f"{x/1000:.1f}k"
lines = ["| server | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
for n in names:
    v = row(n)
    cells = [cell(j, x) for j, x in zip(jobs, v)] + \
        ([f"{v[len(jobs)]:.0f}"] if qd1 else []) + [f"{v[-2]:.2f}", f"{v[-1]:.1f}"]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
ref = "cryptvol" if "cryptvol" in names else ("nbdkit-file" if "nbdkit-file" in names else names[0])
lines += ["", f"Ratios {ref} / peer (throughput: > 1 = {ref} faster; p99, CPU and RSS: < 1 = {ref} better):", "",
          "| peer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
ratios = {}
for n in names:
    if n == ref:
        continue
    a, b = row(ref), row(n)
    r = [x / y if y else float("nan") for x, y in zip(a, b)]
    ratios[n] = r[:len(jobs)]
    lines.append(f"| {n} | " + " | ".join(f"{x:.2f}x" for x in r) + " |")
text = "\n".join(lines)
print(text)
open(f"{out}/table.md", "w").write(text + "\n")
json.dump({"results": {f"{n}/{j}": res[(n, j)] for (n, j) in res}, "servers": srv,
           "reference": ref}, open(f"{out}/results.json", "w"), indent=1)
with open(f"{out}/ratios.dat", "w") as f:
    f.write("job " + " ".join(f'"{n}"' for n in ratios) + "\n")
    for i, j in enumerate(jobs):
        f.write(j + " " + " ".join(f"{ratios[n][i]:.3f}" for n in ratios) + "\n")
open(f"{out}/reference", "w").write(ref)
EOF

ref=$(cat "$out/reference")
npeers=$(( ${#names[@]} - 1 ))
if [ "$npeers" -ge 1 ] && ! command -v gnuplot >/dev/null; then
    log "no chart: gnuplot is not installed"
elif [ "$npeers" -ge 1 ]; then
    png=${chart:-$out/peers.png}
    # The default suite's chart is the one in the docs; other suites keep theirs in $out.
    if [ -z "$chart" ] && [ "$ref" = cryptvol ] && [ -z "$cache$jobsel" ] && [ "$conns" = 1 ] \
        && [ "$dir" = /dev/shm ]; then png=$repo/docs/peers.png; fi
    mkdir -p "$(dirname "$png")"
    gnuplot <<EOF
set terminal pngcairo size 1000,500 font "sans,10"
set output "$png"
set title "$ref throughput relative to each peer (same run, same machine; > 1 = $ref faster)"
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key outside right top
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 2 lc rgb "black"
plot for [i=2:$(( npeers + 1 ))] "$out/ratios.dat" using i:xtic(1) title columnheader(i)
EOF
    log "chart: $png"
fi
log "results in $out"
