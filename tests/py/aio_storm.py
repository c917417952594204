"""Many NBD requests in flight at once (python3-libnbd's aio), every byte checked.

Usage:
  aio_storm.py load URI SIZE SEED
      Writes in flight up to 64 at once (4 KiB aligned, 64 KiB, 1 MiB, and unaligned writes
      inside one 4 KiB unit: those take the volume's read-modify-write path), no two in flight
      touching the same 4 KiB unit (nor a read); reads of those units checked as they come
      back; then FLUSH and every byte read back (up to 64 reads in flight) against the model.
  storm URI SIZE SEED STOPFILE
      Whole 4 KiB blocks only, each written with a tag (block, version); 64 requests in flight
      (half reads, half writes) until STOPFILE exists, errors allowed (the test freezes the
      cluster meanwhile). A failed write leaves its block "any version it had" (and it is
      not written again: the write may still land later); a read must return
      a tag its block may hold (a reply with another block's or a stale buffer's data fails).
      Then (the cluster back) FLUSH, retried, and every block checked. Prints "RUNNING" once
      the first pass is written and FLUSHed, and "STATS ok=N failed=M" at the end.
Prints OK at the end; any mismatch raises (non-zero exit).
"""

import random
import struct
import sys
import time
import os

import nbd

QD = 64
BLK = 4096


def drain_some(h, pending, on_done, want_below):
    while len(pending) >= want_below:
        h.poll(-1)
        for c in list(pending):
            try:
                done = h.aio_command_completed(c)
            except nbd.Error as e:
                on_done(c, pending.pop(c), e)
                continue
            if done:
                on_done(c, pending.pop(c), None)


def load(uri, size, seed):
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == size
    model = bytearray(size)
    busy = set()  # 4 KiB units with a request in flight
    pending = {}
    checked = 0

    def done(c, info, err):
        nonlocal checked
        if err is not None:
            raise err
        kind, units, off, buf = info
        busy.difference_update(units)
        if kind == "r":
            got = bytes(buf.to_bytearray())
            want = bytes(model[off : off + len(got)])
            assert got == want, "read at %d (%d bytes) differs" % (off, len(got))
            checked += 1

    nunits = size // BLK
    for i in range(3000):
        drain_some(h, pending, done, QD)
        r = rnd.random()
        if r < 0.55:
            n = 1
        elif r < 0.75:
            n = 16
        elif r < 0.8:
            n = 256
        else:
            n = 0  # unaligned, inside one unit
        u = rnd.randrange(nunits - max(n, 1) + 1)
        units = set(range(u, u + max(n, 1)))
        if units & busy:
            continue
        if n == 0:
            start = rnd.randrange(BLK - 1)
            ln = rnd.randrange(1, BLK - start)
            off = u * BLK + start
        else:
            off, ln = u * BLK, n * BLK
        if rnd.random() < 0.3 and n != 0:
            # a read of units nobody writes now: checked against the model
            buf = nbd.Buffer(ln)
            busy |= units
            c = h.aio_pread(buf, off)
            pending[c] = ("r", units, off, buf)
            continue
        data = rnd.randbytes(ln)
        if rnd.random() < 0.1:
            data = bytes(ln)  # zeros: the volume's thin rule
        model[off : off + ln] = data
        busy |= units
        c = h.aio_pwrite(data, off)
        pending[c] = ("w", units, off, None)
    drain_some(h, pending, done, 1)
    h.flush()
    # Everything back, 64 reads in flight, mixed sizes.
    off = 0
    while off < size:
        ln = min(rnd.choice([BLK, 16 * BLK, 256 * BLK]), size - off)
        drain_some(h, pending, done, QD)
        buf = nbd.Buffer(ln)
        c = h.aio_pread(buf, off)
        pending[c] = ("r", set(), off, buf)
        off += ln
    drain_some(h, pending, done, 1)
    assert checked > 0
    h.shutdown()
    print("OK checked=%d" % checked)


def tag(block, version):
    return struct.pack("<QQ", block, version) * (BLK // 16)


def storm(uri, size, seed, stopfile):
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    nblocks = size // BLK
    # may[b]: the versions block b may hold now.
    may = [{0} for _ in range(nblocks)]
    version = [0] * nblocks
    for b in range(nblocks):
        h.pwrite(tag(b, 0), b * BLK)
    h.flush()
    print("RUNNING", flush=True)
    busy = set()
    # Blocks a failed write went to: that write may still land later (it may sit in the
    # frozen OSD's socket), so they are not written again, and read as any version they had.
    tainted = set()
    pending = {}
    stats = {"ok": 0, "failed": 0}

    def done(c, info, err):
        kind, b, v, buf = info
        # A block has one request in flight at most: a READ racing a WRITE of the same block
        # may see either version, which the model below could not tell from a stale read.
        busy.discard(b)
        if kind == "w":
            if err is None and b not in tainted:
                may[b] = {v}
            elif err is not None:
                tainted.add(b)
        if err is not None:
            stats["failed"] += 1
            return
        stats["ok"] += 1
        if kind == "r":
            got = bytes(buf.to_bytearray())
            vb, vv = struct.unpack("<QQ", got[:16])
            assert got == tag(vb, vv), "torn block %d" % b
            assert vb == b and vv in may[b], "block %d read (%d, %d), may be %s" % (
                b,
                vb,
                vv,
                may[b],
            )

    while not os.path.exists(stopfile):
        drain_some(h, pending, done, QD)
        b = rnd.randrange(nblocks)
        if b in busy:
            continue
        if rnd.random() < 0.5 or b in tainted:
            buf = nbd.Buffer(BLK)
            busy.add(b)
            c = h.aio_pread(buf, b * BLK)
            pending[c] = ("r", b, None, buf)
        else:
            version[b] += 1
            v = version[b]
            may[b].add(v)  # either, until it is acknowledged
            busy.add(b)
            c = h.aio_pwrite(tag(b, v), b * BLK)
            pending[c] = ("w", b, v, None)
    drain_some(h, pending, done, 1)
    deadline = time.time() + 120
    while True:
        try:
            h.flush()
            break
        except nbd.Error:
            assert time.time() < deadline, "FLUSH still failing after the thaw"
            time.sleep(0.5)
    for b in range(nblocks):
        got = h.pread(BLK, b * BLK)
        vb, vv = struct.unpack("<QQ", got[:16])
        assert got == tag(vb, vv) and vb == b and vv in may[b], (b, vb, vv, may[b])
    h.shutdown()
    print("STATS ok=%d failed=%d" % (stats["ok"], stats["failed"]))
    print("OK")


def main():
    mode, uri, size, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "load":
        load(uri, size, seed)
    else:
        storm(uri, size, seed, sys.argv[5])


if __name__ == "__main__":
    main()
