#!/usr/bin/env bash
# rados_vs_file.sh [BIN] - KMS call latency with key records in a file vs in RADOS (a micro
# cluster from tests/ceph/micro-ceph.sh): N `datakey create` and N `key create` calls through
# the CLI against one daemon of each kind. Not a test: prints the numbers.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$HERE/target/debug/cryptvol}
N=${N:-50}
T=$(mktemp -d /tmp/cvkb.XXXX)
CEPH=$T/ceph
cleanup() { for p in "$T"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  bash "$HERE/tests/ceph/micro-ceph.sh" stop "$CEPH" >/dev/null 2>&1 || true; rm -rf "$T"; }
trap cleanup EXIT
bash "$HERE/tests/ceph/micro-ceph.sh" start "$CEPH" >/dev/null
for kind in file rados; do
  d=$T/$kind; "$BIN" init --state-dir "$d/s" >/dev/null
  cat >"$d/c.toml" <<TOML
state_dir = "$d/s"
[control]
socket = "$d/c.sock"
[nbd]
unix_socket = "$d/n.sock"
[ceph]
conf = "$CEPH/ceph.conf"
client = "cryptvol-a"
keyring = "$CEPH/client.cryptvol-a.keyring"
op_timeout_secs = 5
[kms]
store = "$kind"
TOML
  "$BIN" --config "$d/c.toml" serve 2>"$d/log" & echo $! >"$T/$kind.pid"
  for _ in $(seq 100); do "$BIN" --config "$d/c.toml" key list >/dev/null 2>&1 && break; sleep 0.1; done
  "$BIN" --config "$d/c.toml" key create --alias k >/dev/null
  t0=$(date +%s.%N)
  for i in $(seq "$N"); do "$BIN" --config "$d/c.toml" datakey create --key k >/dev/null; done
  t1=$(date +%s.%N)
  for i in $(seq "$N"); do "$BIN" --config "$d/c.toml" key create --alias "k$i" >/dev/null; done
  t2=$(date +%s.%N)
  printf '%-6s datakey create %6.1f ms/call   key create %6.1f ms/call  (N=%d, CLI process included)\n' \
    "$kind" "$(echo "($t1-$t0)*1000/$N" | bc -l)" "$(echo "($t2-$t1)*1000/$N" | bc -l)" "$N"
done
