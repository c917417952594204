"""Large, unaligned requests from several connections at once (tests/nbd_pieces.rs).

Usage: pieces_check.py URI SIZE SECTOR

Four handles, each on its own quarter of the export, each with many large WRITEs in flight
that start and end inside units and straddle the server's 128 KiB pieces; then every quarter
is read back from another handle in large unaligned READs (also many in flight, and one READ
across two quarters), all checked against a model. Prints OK; any mismatch raises.
"""

import os
import sys

import nbd


def drain(hs):
    """Runs every handle until none has a command in flight (an error raises)."""
    while any(h.aio_in_flight() > 0 for h in hs):
        for h in hs:
            if h.aio_in_flight() > 0:
                h.poll(1)


def main():
    uri, size, sector = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    conns = 4
    hs = []
    for _ in range(conns):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.get_size() == size
        hs.append(h)
    quarter = size // conns
    model = bytearray(size)
    # (offset within the quarter, length): not multiples of the unit nor of 128 KiB.
    shapes = [
        (7, (1 << 20) + 777),
        ((1 << 20) + 784, (128 << 10) + sector + 1),
        ((1 << 20) + 784 + (128 << 10) + sector + 1, 3 * (128 << 10) - sector // 2),
        ((2 << 20) + sector, (2 << 20) - 2 * sector + 3),
    ]
    inflight, keep = [], []
    for i, h in enumerate(hs):
        base = i * quarter
        for j, (off, n) in enumerate(shapes):
            assert off + n <= quarter
            data = os.urandom(n)
            keep.append(data)  # alive until the WRITE is done
            model[base + off : base + off + n] = data
            inflight.append((h, h.aio_pwrite(data, base + off)))
    drain(hs)
    assert all(h.aio_command_completed(c) for h, c in inflight)
    # Read back each quarter from another connection, in unaligned pieces, all in flight.
    reads = []
    for i in range(conns):
        h = hs[(i + 1) % conns]
        base = i * quarter
        at = base + 3
        while at < base + quarter:
            n = min((1 << 20) + 4093, base + quarter - at)
            buf = nbd.Buffer(n)
            reads.append((h, at, n, buf, h.aio_pread(buf, at)))
            at += n
    drain(hs)
    for _, at, n, buf, _ in reads:
        assert buf.to_bytearray() == model[at : at + n], f"read ({at}, {n}) differs"
    # One READ across the first two quarters.
    at, n = quarter - (1 << 20) - 5, (2 << 20) + 11
    assert hs[3].pread(n, at) == model[at : at + n]
    for h in hs:
        h.shutdown()
    print("OK")


main()
