#!/bin/sh
# Per-volume QoS, two figures (docs/benchmarks.md#qos):
#  1. the cost of the hook when unlimited: 4k randread QD32 on a /dev/shm volume, daemon
#     BEFORE (a build without QoS) vs AFTER, plus AFTER with a limit far above what the
#     machine does (the limited path: mutex, clock, no wait), runs interleaved, medians;
#  2. a QD1 volume's p99 alone vs beside a volume hammered at full speed and limited.
# usage: [LIMIT=20000] [ONLY_QD1=1] benches/qos.sh BEFORE_BIN AFTER_BIN [ROUNDS] [SECONDS]
set -eu
BEFORE=$1 AFTER=$2 ROUNDS=${3:-5} SECS=${4:-5} LIMIT=${LIMIT:-20000} ONLY_QD1=${ONLY_QD1:-}
D=$(mktemp -d /dev/shm/cvqos.XXXXXX)
trap 'kill $(cat "$D"/*.pid 2>/dev/null) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT

start() { # NAME BIN
  mkdir -p "$D/$1"
  "$2" init --state-dir "$D/$1/s" >/dev/null
  cat >"$D/$1/c.toml" <<EOF
state_dir = "$D/$1/s"
[control]
socket = "$D/$1/c.sock"
[nbd]
unix_socket = "$D/$1/n.sock"
EOF
  "$2" serve --config "$D/$1/c.toml" 2>"$D/$1/log" &
  echo $! >"$D/$1.pid"
  for _ in $(seq 100); do [ -S "$D/$1/c.sock" ] && break; sleep 0.1; done
  "$2" --config "$D/$1/c.toml" key create --alias k >/dev/null
}
vol() { # NAME BIN VOL [QOS...]
  n=$1 b=$2 v=$3; shift 3
  "$b" --config "$D/$n/c.toml" volume create "$v" --size 1G --key k "$@" >/dev/null
  "$b" --config "$D/$n/c.toml" volume attach "$v" >/dev/null
  # Prefilled: reads decrypt real data, not holes.
  "$AFTER" bench "nbd+unix:///$v?socket=$D/$n/n.sock" --rw write --bs 1M --iodepth 4 >/dev/null
}
bench() { # NAME VOL ARGS... -> JSON
  n=$1 v=$2; shift 2
  "$AFTER" bench --json "nbd+unix:///$v?socket=$D/$n/n.sock" "$@"
}
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['total']$1)"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

start after "$AFTER"; vol after "$AFTER" v
if [ -z "$ONLY_QD1" ]; then
start before "$BEFORE"; vol before "$BEFORE" v
vol after "$AFTER" high --iops 100000000
for r in $(seq "$ROUNDS"); do
  for c in "before v" "after v" "after high"; do
    set -- $c
    iops=$(bench "$1" "$2" --rw randread --bs 4K --iodepth 32 --ramp 1s --time "${SECS}s" | field "['iops']")
    echo "$r $1/$2 $iops" | tee -a "$D/iops"
  done
done
echo "median 4k randread QD32 IOPS:"
for c in before/v after/v after/high; do
  printf '  %-12s %s\n' "$c" "$(grep " $c " "$D/iops" | cut -d' ' -f3 | median)"
done
fi

# 2. QD1 neighbour: volume "busy" limited to $LIMIT IOPS (or "free", unlimited, for contrast),
#    hammered with 2 connections x QD32 random writes.
vol after "$AFTER" busy --iops "$LIMIT"
vol after "$AFTER" free
qd1() { bench after v --rw randread --bs 4K --iodepth 1 --ramp 1s --time "${SECS}s" | field "['lat_us']['p99']"; }
beside() { # VOL -> "p99 neighbour_iops"
  bench after "$1" --rw randwrite --bs 4K --iodepth 32 --connections 2 --time "$((SECS + 3))s" >"$D/n.json" &
  sleep 1
  p=$(qd1)
  wait $!
  echo "$p $(field "['iops']" <"$D/n.json")"
}
for r in $(seq "$ROUNDS"); do
  echo "$r alone $(qd1) limited $(beside busy) unlimited $(beside free)" | tee -a "$D/qd1"
done
echo "median QD1 p99 (us): alone $(awk '{print $3}' "$D/qd1" | median)," \
  "beside the limited neighbour $(awk '{print $5}' "$D/qd1" | median)" \
  "(it did $(awk '{print $6}' "$D/qd1" | median) IOPS)," \
  "beside the unlimited one $(awk '{print $8}' "$D/qd1" | median)" \
  "(it did $(awk '{print $9}' "$D/qd1" | median) IOPS)"
