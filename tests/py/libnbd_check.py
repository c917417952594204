"""libnbd (python3-libnbd) against a cryptvol NBD export.

Usage: libnbd_check.py URI SIZE [--no-structured]

Exercises pread/pwrite/flush/trim/zero/block_status/cache, then out-of-range requests sent
to the server (strict mode off): each raises nbd.Error and the handle keeps working.
Prints OK at the end; any failure is an exception (non-zero exit).
"""

import errno
import sys

import nbd


def main():
    uri, size = sys.argv[1], int(sys.argv[2])
    structured = "--no-structured" not in sys.argv[3:]

    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)

    assert h.get_size() == size, (h.get_size(), size)
    assert h.get_structured_replies_negotiated() == structured
    assert h.can_multi_conn()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_cache() and h.can_fast_zero()
    assert not h.is_read_only()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == structured
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

    # pwrite/pread, unaligned, with and without FUA.
    data = bytes((i * 7 + 3) & 0xFF for i in range(300_000))
    h.pwrite(data, 12_345)
    assert h.pread(len(data), 12_345) == data
    h.pwrite(b"\xab" * 4096, 1 << 20, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 1 << 20) == b"\xab" * 4096
    h.flush()

    # Reads of never-written space are zeros.
    assert h.pread(65536, size - 65536) == bytes(65536)

    # trim and zero read back as zeros.
    h.trim(100_000, 100_000)
    got = h.pread(300_000, 12_345)
    assert got[: 100_000 - 12_345] == data[: 100_000 - 12_345]
    assert got[100_000 - 12_345 : 200_000 - 12_345] == bytes(100_000)
    h.zero(4096, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(4096, 1 << 20) == bytes(4096)
    h.pwrite(b"\x01" * 8192, 2 << 20)
    h.zero(8192, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(8192, 2 << 20) == bytes(8192)

    # cache is accepted.
    h.cache(1 << 20, 0)

    # block_status (base:allocation) when structured replies are on.
    if structured:
        h.pwrite(b"\x02" * 65536, 4 << 20)
        seen = []

        def cb(metacontext, offset, entries, err):
            assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
            seen.append((offset, list(entries)))
            return 0

        h.block_status(3 * 65536, (4 << 20) - 65536, cb)
        (off, ent), = seen
        assert off == (4 << 20) - 65536
        pairs = list(zip(ent[0::2], ent[1::2]))
        hz = nbd.STATE_HOLE | nbd.STATE_ZERO
        assert pairs[0] == (65536, hz), pairs
        assert pairs[1] == (65536, 0), pairs
        assert sum(p[0] for p in pairs) <= 3 * 65536
        seen.clear()
        h.block_status(3 * 65536, (4 << 20) - 65536, cb, nbd.CMD_FLAG_REQ_ONE)
        assert len(seen[0][1]) == 2, seen  # one extent

    # Out-of-range requests go to the server (strict mode off) and fail cleanly.
    h.set_strict_mode(0)
    for fn, expect in (
        (lambda: h.pread(10, size - 5), errno.EINVAL),
        (lambda: h.pread(1, 1 << 63), errno.EINVAL),
        (lambda: h.pwrite(b"x" * 10, size - 5), errno.ENOSPC),
        (lambda: h.pwrite(b"x", size), errno.ENOSPC),
        (lambda: h.trim(10, size - 5), errno.EINVAL),
    ):
        try:
            fn()
        except nbd.Error as e:
            # libnbd gives the errno by name; "command failed" means the server answered.
            names = (errno.errorcode[expect], errno.errorcode[errno.EINVAL])
            assert e.errno in names, (e.errno, e.string)
            assert "command failed" in e.string, e.string
        else:
            raise AssertionError("out-of-range request succeeded")
        # Still usable after each error.
        assert h.pread(4096, 1 << 20) == bytes(4096)
    # Nothing was written past the end (the last bytes are still zeros).
    assert h.pread(5, size - 5) == bytes(5)

    h.shutdown()
    print("OK", "structured" if structured else "simple")


if __name__ == "__main__":
    main()
