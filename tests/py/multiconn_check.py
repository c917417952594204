"""Many connections streaming large WRITEs at once, with small WRITEs of different bytes of the
same units from every connection among them (tests/nbd_multiconn.rs); then BLOCK_STATUS
before and after a TRIM.

Usage: multiconn_check.py URI SIZE SECTOR CONNS

Each handle has 1 MiB WRITEs in flight on its own slice of the export (so the server counts
it as streaming, and with enough of them stores WRITEs on the connection threads), and
slivers (SECTOR // CONNS bytes, handle i at byte i * sliver) in the units of a shared first
MiB: every unit there is read-modify-written by every connection at once, and a lost update
shows as a sliver that is not what its handle wrote. Everything is read back from another
handle and checked against a model. Then: a written MiB reads as data, TRIM makes it a hole
that reads as zeros (the server must not answer from what it saw before the TRIM), and a
WRITE makes it data again. Prints OK; any mismatch raises.
"""

import os
import sys

import nbd

MIB = 1 << 20


def drain(hs):
    """Runs every handle until none has a command in flight (an error raises)."""
    while any(h.aio_in_flight() > 0 for h in hs):
        for h in hs:
            if h.aio_in_flight() > 0:
                h.poll(1)


def status(h, offset, length):
    """base:allocation as a list of (length, flags) from offset."""
    got = []

    def cb(ctx, off, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb)
    return got


def main():
    uri, size, sector, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    hs = []
    for _ in range(conns):
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri)
        assert h.get_size() == size
        hs.append(h)
    shared = MIB
    slice_mib = (size - shared) // conns // MIB
    rounds = min(4, slice_mib)
    assert rounds >= 2, "export too small for this many connections"
    sliver = sector // conns
    assert sliver >= 1
    model = bytearray(size)
    inflight, keep = [], []
    for r in range(rounds):
        for i, h in enumerate(hs):
            off = shared + (i * slice_mib + r) * MIB
            data = os.urandom(MIB)
            keep.append(data)
            model[off : off + MIB] = data
            inflight.append((h, h.aio_pwrite(data, off)))
            for u in range(r, shared // sector, rounds):
                at = u * sector + i * sliver
                d = os.urandom(sliver)
                keep.append(d)
                model[at : at + sliver] = d
                inflight.append((h, h.aio_pwrite(d, at)))
    drain(hs)
    assert all(h.aio_command_completed(c) for h, c in inflight)
    reads = []
    for i in range(conns):
        h = hs[(i + 1) % conns]
        off = shared + i * slice_mib * MIB
        for r in range(rounds):
            buf = nbd.Buffer(MIB)
            reads.append((off + r * MIB, MIB, buf, h.aio_pread(buf, off + r * MIB)))
    buf = nbd.Buffer(shared)
    reads.append((0, shared, buf, hs[-1].aio_pread(buf, 0)))
    drain(hs)
    for at, n, buf, _ in reads:
        got = buf.to_bytearray()
        if got != model[at : at + n]:
            bad = next(k for k in range(n) if got[k] != model[at + k])
            raise AssertionError(f"read ({at}, {n}) differs first at byte {at + bad}")

    # BLOCK_STATUS: the first written MiB of slice 0 is data; asked once, so the server has
    # seen it as data; after a TRIM it is a hole, then data again once written.
    h = hs[0]
    at = shared
    assert all(f & nbd.STATE_HOLE == 0 for _, f in status(h, at, MIB)), "written: data"
    h.trim(MIB, at)
    st = status(h, at, MIB)
    assert st and st[0][0] >= MIB and st[0][1] & nbd.STATE_HOLE, f"trimmed: hole, got {st}"
    assert h.pread(MIB, at) == bytes(MIB)
    h.pwrite(b"\x01" * MIB, at)
    st = status(h, at, MIB)
    assert st and st[0][0] >= MIB and st[0][1] & nbd.STATE_HOLE == 0, f"rewritten: {st}"
    for h in hs:
        h.shutdown()
    print("OK")


main()
