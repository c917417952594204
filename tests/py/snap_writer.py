#!/usr/bin/python3
"""Writes rounds over one NBD connection until killed or stdin closes: round r writes block
k (4 KiB) as (r, k) repeated, in order k = 0..N-1, one request at a time, then FLUSHes and
prints "flushed r". Because at most one write is in flight, a point-in-time image of the
volume is a cut: blocks before some k hold round r+1, the others round r (tests/snapshots.rs)."""
import struct, sys
import nbd

uri, blocks = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
r = 0
while True:
    r += 1
    for k in range(blocks):
        h.pwrite(struct.pack("<QQ", r, k) * 256, k * 4096)
    h.flush()
    print(f"flushed {r}", flush=True)
