#!/usr/bin/env bash
# The peer comparison with a lighter client: `cryptvol bench` (about 2.5 µs of client CPU per
# 4 KiB request, against fio+libnbd's 8.8 µs) drives cryptvol (encrypted volume) and
# `nbdkit file` (raw) on files in /dev/shm, job by job, alternating, two runs each. On a
# 2-core machine fio's own CPU caps what fio can show; this shows more of the servers.
#
#   benches/fio/bench-peers.sh [PATH/TO/cryptvol]     (T=seconds per run, default 4)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
B=${1:-$here/../../target/release/cryptvol}
W=$(mktemp -d /dev/shm/bp.XXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill $p 2>/dev/null||true; done; wait 2>/dev/null; rm -rf $W' EXIT
$B init --state-dir $W/st >/dev/null
printf 'state_dir = "%s/st"\n[control]\nsocket = "%s/ctl"\n[nbd]\nunix_socket = "%s/nbd"\n' $W $W $W > $W/c.toml
$B serve --config $W/c.toml > $W/log 2>&1 & pids+=($!)
for i in $(seq 100); do $B --socket $W/ctl volume list >/dev/null 2>&1 && break; sleep 0.05; done
$B --socket $W/ctl key create --alias k >/dev/null
$B --socket $W/ctl volume create b --size 1G --key k --sector-size 4096 >/dev/null
$B --socket $W/ctl volume attach b >/dev/null
truncate -s 1G $W/raw.img
nbdkit -f -U $W/nk file $W/raw.img & pids+=($!)
sleep 0.5
declare -A U=([cryptvol]="nbd+unix:///b?socket=$W/nbd" [nbdkit-file]="nbd+unix:///?socket=$W/nk")
for n in cryptvol nbdkit-file; do fio --name=p --ioengine=nbd --uri="${U[$n]}" --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null; done
for j in read:1M:8 write:1M:8 randread:4k:32 randwrite:4k:32 randread:4k:1; do
  IFS=: read -r rw bs qd <<<"$j"
  for r in 1 2; do for n in cryptvol nbdkit-file; do
    $B bench "${U[$n]}" --json --rw $rw --bs $bs --iodepth $qd --time ${T:-4} --ramp 1 > $W/b.json
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["total"]; print(sys.argv[2], sys.argv[3], "%.0f MiB/s"%d["mib_s"], "%.0f IOPS"%d["iops"], "p99 %.0f us"%d["lat_us"]["p99"])' $W/b.json "$rw/$bs/QD$qd" $n
  done; done
done
