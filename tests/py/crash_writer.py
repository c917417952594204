#!/usr/bin/python3
"""Writes rounds over two NBD connections until killed: round r writes block k (4 KiB) as
(r, k) repeated, then FLUSHes on both connections and prints "flushed r". Used by
tests/daemon_crash.rs, which kills the daemon with SIGKILL at a random moment."""
import struct, sys
import nbd

uri, blocks = sys.argv[1], int(sys.argv[2])
hs = []
for _ in range(2):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
r = 0
while True:
    r += 1
    for k in range(blocks):
        h = hs[k % 2]
        h.pwrite(struct.pack("<QQ", r, k) * 256, k * 4096)
    for h in hs:
        h.flush()
    print(f"flushed {r}", flush=True)
