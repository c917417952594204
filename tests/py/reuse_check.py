"""Large WRITEs in flight whose buffers are reused at once: what each stores is its own data.

Usage:
  reuse_check.py write URI ROUNDS SEED   every round overwrites the whole export with 1 MiB
      writes (plus a 256 KiB and a 4 KiB one per round), 8 in flight, in a shuffled order;
      each 4 KiB block of a write carries (round, block, seed) and a random fill, so a block
      holding bytes of any other request (an earlier round's, a neighbour's, a recycled
      buffer's) is told apart. Then FLUSH and every block checked.
  check URI ROUNDS SEED   every block read back (a fresh connection) and checked.
Prints OK at the end; any mismatch raises (non-zero exit).
"""

import random
import struct
import sys

import nbd

QD = 8
BLK = 4096
MIB = 1 << 20


def block(rnd_seed, rnd, blk):
    r = random.Random((rnd_seed << 40) ^ (rnd << 24) ^ blk)
    head = struct.pack("<QQQ", rnd, blk, rnd_seed)
    return head + r.randbytes(BLK - len(head))


def data(seed, rnd, off, length):
    return b"".join(block(seed, rnd, b) for b in range(off // BLK, (off + length) // BLK))


def pieces(size, rnd, seed):
    """The round's writes: whole MiBs, except one MiB split into 256 KiB + 4 KiB + rest."""
    r = random.Random(seed * 1000 + rnd)
    out = []
    split = r.randrange(size // MIB) * MIB
    for off in range(0, size, MIB):
        if off == split:
            out += [(off, 256 << 10), (off + (256 << 10), BLK),
                    (off + (256 << 10) + BLK, MIB - (256 << 10) - BLK)]
        else:
            out.append((off, MIB))
    r.shuffle(out)
    return out


def write(uri, rounds, seed):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    assert size % MIB == 0
    pending = []
    n = 0
    for rnd in range(rounds):
        for off, length in pieces(size, rnd, seed):
            while len(pending) >= QD:
                h.poll(-1)
                pending = [c for c in pending if not h.aio_command_completed(c)]
            # A fresh buffer per request: the server's own buffers are what gets reused.
            pending.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data(seed, rnd, off, length)), off))
            n += 1
        # Rounds do not overlap: a block written twice in flight could land either way.
        while pending:
            h.poll(-1)
            pending = [c for c in pending if not h.aio_command_completed(c)]
    h.flush()
    check_all(h, size, rounds, seed)
    h.shutdown()
    print(f"OK writes={n}")


def check_all(h, size, rounds, seed):
    last = rounds - 1
    for off in range(0, size, MIB):
        got = h.pread(MIB, off)
        want = data(seed, last, off, MIB)
        if got != want:
            for b in range(MIB // BLK):
                g = got[b * BLK:(b + 1) * BLK]
                if g != want[b * BLK:(b + 1) * BLK]:
                    rnd, blk, s = struct.unpack("<QQQ", g[:24])
                    raise SystemExit(
                        f"block {off // BLK + b}: holds round {rnd} block {blk} seed {s}, "
                        f"want round {last} block {off // BLK + b} seed {seed}")


def check(uri, rounds, seed):
    h = nbd.NBD()
    h.connect_uri(uri)
    check_all(h, h.get_size(), rounds, seed)
    h.shutdown()
    print("OK")


if __name__ == "__main__":
    cmd, uri, rounds, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    {"write": write, "check": check}[cmd](uri, rounds, seed)
