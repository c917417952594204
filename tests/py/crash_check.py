#!/usr/bin/python3
"""Reads every block back after the crash: each must hold a whole round >= the last flushed
one (and at most one later). Prints "ok MIN MAX" or fails."""
import struct, sys
import nbd

uri, blocks, flushed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
lo, hi = None, None
for k in range(blocks):
    b = h.pread(4096, k * 4096)
    r, kk = struct.unpack("<QQ", b[:16])
    if b != struct.pack("<QQ", r, kk) * 256 or kk != k:
        sys.exit(f"block {k}: torn or foreign content (round {r}, block {kk})")
    if not (flushed <= r <= flushed + 1):
        sys.exit(f"block {k}: round {r}, but round {flushed} was flushed")
    lo = r if lo is None else min(lo, r)
    hi = r if hi is None else max(hi, r)
print(f"ok {lo} {hi}")
