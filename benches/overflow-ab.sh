#!/bin/bash
# A/B: release daemon with overflow-checks on vs off (same commit), cryptvol bench, /dev/shm.
# Usage: build the same commit twice, (ON=, OFF= name the binaries; default /work/rel-{on,off}/release/cryptvol; the second with
# CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=false), then run this; prints IOPS, MiB/s and the
# daemon CPU time per request, round by round.
set -e
B=${B:-/dev/shm/ovf}
run_daemon() { # $1 = binary, $2 = tag
  local d=$B/$2; rm -rf $d; mkdir -p $d
  $1 init --state-dir $d/s >/dev/null
  printf 'state_dir = "%s/s"\n[control]\nsocket = "%s/c.sock"\n[nbd]\nunix_socket = "%s/n.sock"\n' $d $d $d > $d/c.toml
  $1 serve --config $d/c.toml 2>$d/log & echo $! > $d/pid
  for i in $(seq 50); do [ -S $d/c.sock ] && break; sleep 0.1; done
  $1 --config $d/c.toml key create --alias k >/dev/null
  $1 --config $d/c.toml volume create v --size 1G --key k >/dev/null
  $1 --config $d/c.toml volume attach v >/dev/null
}
run_daemon "${ON:-/work/rel-on/release/cryptvol}" on
run_daemon "${OFF:-/work/rel-off/release/cryptvol}" off
C="${ON:-/work/rel-on/release/cryptvol}"
for tag in on off; do $C bench "nbd+unix:///v?socket=$B/$tag/n.sock" --rw write --bs 1M --iodepth 8 --size 1G --json > /dev/null; done
for round in 1 2 3 4 5; do
  for tag in on off; do
    for job in "randread 4k 32" "write 1M 8"; do
      set -- $job
      pid=$(cat $B/$tag/pid); t0=$(awk '{print $14+$15}' /proc/$pid/stat)
      r=$($C bench "nbd+unix:///v?socket=$B/$tag/n.sock" --rw $1 --bs $2 --iodepth $3 --time 4 --json)
      t1=$(awk '{print $14+$15}' /proc/$pid/stat)
      echo "$round $tag $1 $2 $(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); x=d["read"] or d["write"]; t=('$t1'-'$t0')/100; print(round(x["iops"]), round(x["mib_s"]), "cpu_us_per_op=%.2f" % (t*1e6/x["ops"]))')"
    done
  done
done
kill $(cat $B/on/pid) $(cat $B/off/pid)
