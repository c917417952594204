#!/usr/bin/python3
"""Reads every block of a snapshot written by snap_writer.py and checks it is a point in time:
each block a whole (r, k) pattern, rounds non-increasing with k, differing by at most one,
the oldest >= the round flushed before the snapshot was taken. Prints "ok LO HI"."""
import struct, sys
import nbd

uri, blocks, flushed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
rounds = []
for k in range(blocks):
    b = h.pread(4096, k * 4096)
    r, kk = struct.unpack("<QQ", b[:16])
    if b != struct.pack("<QQ", r, kk) * 256 or kk != k:
        sys.exit(f"block {k}: torn or foreign content (round {r}, block {kk})")
    rounds.append(r)
for k in range(1, blocks):
    if rounds[k] > rounds[k - 1]:
        sys.exit(f"not a point in time: block {k - 1} round {rounds[k - 1]}, block {k} round {rounds[k]}")
lo, hi = min(rounds), max(rounds)
if hi - lo > 1:
    sys.exit(f"rounds {lo}..{hi} in one snapshot")
if lo < flushed:
    sys.exit(f"round {lo} in the snapshot, but round {flushed} was flushed before it")
print(f"ok {lo} {hi}")
