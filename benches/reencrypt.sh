#!/bin/bash
# Online re-encryption throughput (docs/benchmarks.md#online-re-encryption):
#  1. MiB/s of `volume reencrypt --wait` on a fully written volume, alone;
#  2. the same while `cryptvol bench` (randrw 4k QD16, 2 connections) runs on the volume,
#     with the client's IOPS during the run vs before it;
#  3. `cryptsetup reencrypt` (LUKS2, aes-xts-plain64, 512-bit key) on a loop device over a
#     file of the same size in the same directory, if dm-crypt works here (root, loop,
#     dm_crypt); says so when it does not.
# usage: benches/reencrypt.sh PATH/TO/cryptvol [SIZE_MiB] [DIR]   (DIR: where the files live)
set -eu
BIN=$1 MIB=${2:-1024} DIR=${3:-/var/tmp}
D=$(mktemp -d "$DIR/cvre.XXXXXX")
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
trap 'kill_pids; rm -rf "$D"' EXIT
cryptvol_daemon "$BIN" "$D" "$D/log"
cv() { "$BIN" --socket "$D/control.sock" "$@"; }
cv key create --alias k >/dev/null
URI="nbd+unix:///v?socket=$D/nbd.sock"
now() { date +%s.%N; }
rate() { python3 -c "import sys; print(f'{$MIB/($2-$1):.0f}')" -- "$1" "$2"; }

cv volume create v --size "${MIB}M" --key k >/dev/null
cv volume attach v >/dev/null
"$BIN" bench "$URI" --rw write --bs 1M --iodepth 4 >/dev/null
sync
t0=$(now); cv volume reencrypt v --wait >/dev/null; t1=$(now)
echo "cryptvol reencrypt alone:            $(rate "$t0" "$t1") MiB/s (${MIB} MiB, fully written, $(df --output=fstype "$D" | tail -1))"

iops() { python3 -c "import json,sys; d=json.load(sys.stdin); print(int(d['total']['iops']))"; }
CL="--rw mixed --bs 4K --iodepth 16 --connections 2"
# A second run needs a fresh attachment (the first one keeps the old key schedule).
cv volume detach v >/dev/null; cv volume attach v >/dev/null
base=$("$BIN" bench --json "$URI" $CL --time 5s | iops)
"$BIN" bench --json "$URI" $CL --time 20s >"$D/b.json" &
B=$!
sleep 1
t0=$(now); cv volume reencrypt v --wait >/dev/null; t1=$(now)
wait $B
during=$(iops <"$D/b.json")
echo "cryptvol reencrypt with a client:    $(rate "$t0" "$t1") MiB/s; client 4k randrw QD16x2: $base IOPS alone, $during IOPS over 20 s overlapping the re-encryption ($(python3 -c "print(f'{$t1-$t0:.1f}')") s)"
cv volume detach v >/dev/null

# cryptsetup: LUKS2 (aes-xts-plain64, 512-bit key) over a file of the same size beside the
# volume. Online (open, on a loop device) when dm-crypt works here; otherwise offline on the
# file (userspace reencryption through the kernel crypto API, no dm), and the script says so.
F=$D/luks.img
truncate -s "$((MIB + 32))M" "$F"
KEY=$D/keyfile; head -c 64 /dev/urandom >"$KEY"
# PBKDF2 with few iterations: the figure is the data pass, not the key-slot unlock.
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
cryptsetup luksFormat -q --type luks2 --cipher aes-xts-plain64 --key-size 512 $FAST \
  --key-file "$KEY" "$F" 2>"$D/cs.err" || { echo "cryptsetup luksFormat failed: $(tail -1 "$D/cs.err")"; exit 0; }
MODE=offline OFF=--force-offline-reencrypt
if cryptsetup open --key-file "$KEY" "$F" cvre 2>>"$D/cs.err"; then
  MODE=online OFF=
  dd if=/dev/urandom of=/dev/mapper/cvre bs=1M count="$MIB" oflag=direct status=none || true
else
  echo "(dm-crypt unavailable here: $(tail -1 "$D/cs.err"); cryptsetup reencrypt runs offline)"
fi
for res in checksum journal; do
  t0=$(now)
  if cryptsetup reencrypt -q $OFF $FAST --key-file "$KEY" --resilience "$res" "$F" 2>>"$D/cs.err"; then
    t1=$(now)
    echo "cryptsetup reencrypt $MODE ($res):  $(rate "$t0" "$t1") MiB/s"
  else
    echo "cryptsetup reencrypt $MODE ($res) failed: $(tail -1 "$D/cs.err")"
  fi
done
[ "$MODE" = online ] && cryptsetup close cvre
exit 0
