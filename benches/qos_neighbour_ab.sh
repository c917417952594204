#!/bin/bash
# QD1 p99 alone and beside a limited, hammered neighbour, for several daemon builds (or
# environments) side by side, rounds interleaved; plus the neighbour's IOPS and the daemon's CPU
# during the neighbour run (docs/benchmarks.md#qos). Each config gets a daemon of its own with
# 1 GiB prefilled volumes "v" (QD1 4k randread) and "busy" (limited to LIMIT IOPS, hammered with
# 2 connections x QD32 4k randwrite); only one daemon is busy at a time.
# usage: [LIMIT=20000] benches/qos_neighbour_ab.sh ROUNDS SECS NAME=BIN[:ENV=VAL[:ENV=VAL]] ...
# e.g.   benches/qos_neighbour_ab.sh 6 4 base=/tmp/base-cryptvol new=target/release/cryptvol
set -eu
ROUNDS=$1 SECS=$2; shift 2
LIMIT=${LIMIT:-20000}
D=$(mktemp -d /dev/shm/cvab.XXXXXX)
trap 'kill $(cat "$D"/*.pid 2>/dev/null) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
NAMES=()
for spec in "$@"; do
  n=${spec%%=*}; rest=${spec#*=}; bin=${rest%%:*}; envs=""; [ "$rest" != "$bin" ] && envs=${rest#*:}; envs=${envs//:/ }
  NAMES+=("$n"); echo "$bin" > "$D/$n.bin"
  mkdir -p "$D/$n"; "$bin" init --state-dir "$D/$n/s" >/dev/null
  printf 'state_dir = "%s"\n[control]\nsocket = "%s"\n[nbd]\nunix_socket = "%s"\n' "$D/$n/s" "$D/$n/c.sock" "$D/$n/n.sock" > "$D/$n/c.toml"
  env $envs "$bin" serve --config "$D/$n/c.toml" 2>"$D/$n/log" & echo $! > "$D/$n.pid"
  for _ in $(seq 100); do [ -S "$D/$n/c.sock" ] && break; sleep 0.1; done
  "$bin" --config "$D/$n/c.toml" key create --alias k >/dev/null
  for v in v busy; do
    "$bin" --config "$D/$n/c.toml" volume create $v --size 1G --key k >/dev/null
    "$bin" --config "$D/$n/c.toml" volume attach $v >/dev/null
    "$bin" bench "nbd+unix:///$v?socket=$D/$n/n.sock" --rw write --bs 1M --iodepth 4 >/dev/null
  done
  "$bin" --config "$D/$n/c.toml" volume set busy --iops $LIMIT >/dev/null
done
B=${NAMES[0]}; BB=$(cat $D/$B.bin)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
qd1() { "$BB" bench --json "nbd+unix:///v?socket=$D/$1/n.sock" --rw randread --bs 4K --iodepth 1 --ramp 1s --time ${SECS}s | python3 -c "import json,sys; d=json.load(sys.stdin)['total']; print(d['lat_us']['p99'], d['lat_us']['p50'])"; }
for r in $(seq $ROUNDS); do
  for n in "${NAMES[@]}"; do
    a=$(qd1 $n)
    "$BB" bench --json "nbd+unix:///busy?socket=$D/$n/n.sock" --rw randwrite --bs 4K --iodepth 32 --connections 2 --time $((SECS+3))s > $D/nb.json &
    np=$!
    sleep 1
    pid=$(cat $D/$n.pid); c0=$(cpu $pid); t0=$(date +%s.%N)
    b=$(qd1 $n)
    c1=$(cpu $pid); t1=$(date +%s.%N)
    wait $np
    nb=$(python3 -c "import json; print(round(json.load(open('$D/nb.json'))['total']['iops']))")
    dc=$(python3 -c "print(round(($c1-$c0)*10/($t1-$t0)))")
    set -- $a; ap=$1 a50=$2; set -- $b; bp=$1 b50=$2
    echo "$r $n alone_p99 $ap beside_p99 $bp ratio $(python3 -c "print(round($bp/$ap,2))") p50 $a50/$b50 nb_iops $nb daemon_cpu_ms/s $dc load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
