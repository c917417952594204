#!/usr/bin/env bash
# The on-disk format is readable with standard tools: a volume made and written by the real
# daemon is decrypted unit by unit outside cryptvol (dd + AES-256-XTS from Python's
# `cryptography`, i.e. OpenSSL's libcrypto), exactly as docs/volume-format.md describes.
# (`openssl enc` itself refuses XTS: "enc XTS ciphers not supported".)
#
# Usage: tests/format_decrypt.sh PATH/TO/cryptvol   (needs qemu-io, curl, python3-cryptography;
# skips without them)
set -euo pipefail
BIN=${1:?usage: $0 PATH/TO/cryptvol}
PY=${CRYPTVOL_PYTHON:-python3}

for t in qemu-io curl "$PY"; do
  if ! command -v "$t" >/dev/null; then
    echo "SKIP: $t not installed"
    exit 0
  fi
done
if ! "$PY" -c 'import cryptography' 2>/dev/null; then
  echo "SKIP: $PY has no cryptography module"
  exit 0
fi

D=$(mktemp -d)
PID=
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$D"
}
trap cleanup EXIT

S=$D/control.sock
cat >"$D/c.toml" <<TOML
state_dir = "$D/state"
[control]
socket = "$S"
[nbd]
unix_socket = "$D/nbd.sock"
TOML
"$BIN" init --state-dir "$D/state" >/dev/null
"$BIN" serve --config "$D/c.toml" 2>"$D/serve.log" &
PID=$!
for _ in $(seq 100); do
  curl -sf --unix-socket "$S" http://x/v1/health >/dev/null 2>&1 && break
  sleep 0.1
done
cv() { "$BIN" --socket "$S" --json "$@"; }
field() { "$PY" -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

cv key create --alias fmt >/dev/null
cv volume create v --size 16M --key fmt >/dev/null
cv volume attach v >/dev/null
URI="nbd+unix:///v?socket=$D/nbd.sock"
qemu-io -f raw -c 'write -P 0x5a 0 4096' -c 'write -P 0xa5 4096 4096' \
  -c 'write -P 0 8192 4096' "$URI" >/dev/null
cv volume detach v >/dev/null

INFO=$(cv volume inspect v)
CT=$(field cipher_text <<<"$INFO")
VID=$(field volume_id <<<"$INFO")
DEK=$(cv datakey decrypt --cipher-text "$CT" --context "volume_id=$VID" | field data_key)
[ ${#DEK} = 128 ] || { echo "FAIL: DEK is not 512 bits"; exit 1; }
IMG=$D/state/volumes/v.cvol

# Header: magic at 0 and at 4096.
for off in 0 4096; do
  m=$(dd if="$IMG" bs=1 skip=$off count=8 status=none)
  [ "$m" = CRYPTVOL ] || { echo "FAIL: no magic at $off"; exit 1; }
done

# unit i = AES-256-XTS(DEK, tweak = i as LE u64 in 16 bytes) at 1 MiB + i*4096.
decrypt_unit() {
  dd if="$IMG" bs=4096 skip=$((256 + $1)) count=1 status=none | "$PY" -c '
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key, i = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
d = Cipher(algorithms.AES(key), modes.XTS(i.to_bytes(16, "little"))).decryptor()
sys.stdout.buffer.write(d.update(sys.stdin.buffer.read()) + d.finalize())' "$DEK" "$1"
}
expect() { # unit byte
  got=$(od -An -v -tx1 | tr -s ' \n' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')
  [ "$got" = "$2 " ] || { echo "FAIL: unit $1 decrypts to [$got], want $2"; exit 1; }
}
decrypt_unit 0 | expect 0 5a
decrypt_unit 1 | expect 1 a5
# Ciphertext is not the plaintext.
# (Captured first: `grep -q` exiting early would SIGPIPE `od`, and pipefail would call that a
# failure.)
CT0=$(dd if="$IMG" bs=4096 skip=256 count=1 status=none | od -An -v -tx1)
grep -v '5a 5a 5a 5a' <<<"$CT0" >/dev/null || { echo "FAIL: unit 0 stored in clear"; exit 1; }
# An all-zero plaintext unit is stored as zeros, and so is a never-written one (holes).
for u in 2 3; do
  dd if="$IMG" bs=4096 skip=$((256 + u)) count=1 status=none | expect "$u" 00
done
echo "ok: units 0 and 1 decrypted with the DEK outside cryptvol; units 2, 3 stored as zeros"
