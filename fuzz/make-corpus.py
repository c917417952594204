#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: a few small valid inputs per target,
built from the formats in docs/ with the fixed keys the targets use (wrapped_dek: CMK
material 0x07 * 32, context {"volume_id": "fuzz"}; envelope: DEK 0x09 * 32), so that the
fuzzer starts past the magic, checksum and tag checks. Needs python3-cryptography."""
import hashlib
import os
import struct
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- nbd_option: option header (IHAVEOPT, option, length) + payload ---
IHAVEOPT = 0x49484156454F5054


def opt(option, data):
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def info(name, reqs):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs)


def meta(export, queries):
    e = export.encode()
    out = struct.pack(">I", len(e)) + e + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


put("nbd_option", "go-vol1", opt(7, info("vol1", [3, 1])))
put("nbd_option", "info-empty-name", opt(6, info("", [])))
put("nbd_option", "set-meta-base-allocation", opt(10, meta("vol1", ["base:allocation"])))
put("nbd_option", "list-meta-all", opt(9, meta("vol1", [])))
put("nbd_option", "list", opt(3, b""))

# --- nbd_request: 8-byte LE export size, 1 flag byte, then a 28-byte request ---
MAGIC_REQ = 0x25609513


def req(flags, cmd, cookie, offset, length, payload=b""):
    return struct.pack(">IHHQQI", MAGIC_REQ, flags, cmd, cookie, offset, length) + payload


SIZE = struct.pack("<Q", 1 << 30)
put("nbd_request", "read", SIZE + b"\x06" + req(0, 0, 1, 0, 4096))
put("nbd_request", "write-fua", SIZE + b"\x02" + req(1, 1, 2, 4096, 512, b"\x5a" * 512))
put("nbd_request", "write-readonly", SIZE + b"\x01" + req(0, 1, 3, 0, 512))
put("nbd_request", "flush", SIZE + b"\x00" + req(0, 3, 4, 0, 0))
put("nbd_request", "trim-past-end", SIZE + b"\x00" + req(0, 4, 5, (1 << 30) - 512, 4096))
put("nbd_request", "write-zeroes-no-hole", SIZE + b"\x02" + req(2, 6, 6, 0, 65536))
put("nbd_request", "block-status", SIZE + b"\x06" + req(8, 7, 7, 0, 1 << 20))
put("nbd_request", "disconnect", SIZE + b"\x00" + req(0, 2, 8, 0, 0))

# --- volume_header: two 4 KiB copies (docs/volume-format.md) ---


def header(gen, size, sector, key_id, ver, wrapped):
    b = bytearray(4096)
    b[0:8] = b"CRYPTVOL"
    struct.pack_into("<IIQ", b, 8, 1, 4096, gen)
    b[24:40] = uuid.UUID("24726162-ce5c-447e-a381-1146b362a126").bytes
    struct.pack_into("<QII", b, 40, size, sector, 512)
    b[56:56 + 15] = b"aes-xts-plain64"
    struct.pack_into("<Q", b, 88, 1 << 20)
    k = key_id.encode()
    b[96:96 + len(k)] = k
    struct.pack_into("<IH", b, 160, ver, len(wrapped))
    b[166:166 + len(wrapped)] = wrapped
    b[4064:] = hashlib.sha256(bytes(b[:4064])).digest()
    return bytes(b)


KID = "8f3edde3-1935-4719-a631-aa7f57bc8ddf"
h1 = header(1, 1 << 30, 4096, KID, 1, b"\x01" * 150)
h2 = header(2, 1 << 31, 4096, KID, 2, b"\x02" * 150)
put("volume_header", "same-generation", h1 + h1)
put("volume_header", "b-newer", h1 + h2)
put("volume_header", "a-torn", h1[:2000] + bytes(2096) + h2)
put("volume_header", "sector-512", header(7, 1 << 20, 512, "alias-key", 3, b"\x03" * 64) * 2)

# --- wrapped_dek: blob under material 0x07*32, context {"volume_id": "fuzz"} ---
MATERIAL = b"\x07" * 32


def canonical(ctx):
    out = struct.pack(">I", len(ctx))
    for k in sorted(ctx):
        for s in (k, ctx[k]):
            out += struct.pack(">I", len(s.encode())) + s.encode()
    return out


def wrap(plain, ctx, version=1, seed=0):
    salt = hashlib.sha256(b"salt%d" % seed).digest()
    nonce = hashlib.sha256(b"nonce%d" % seed).digest()[:12]
    head = b"CVWK" + bytes([1, 1]) + uuid.UUID(KID).bytes + struct.pack(">I", version) + salt + nonce
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"cryptvol wrap v1").derive(MATERIAL)
    return head + AESGCM(kek).encrypt(nonce, plain, head + canonical(ctx))


CTX = {"volume_id": "fuzz"}
put("wrapped_dek", "xts-512bit", wrap(bytes(range(64)), CTX, 1, 1))
put("wrapped_dek", "aes-256", wrap(b"\x11" * 32, CTX, 2, 2))
put("wrapped_dek", "one-byte", wrap(b"\x42", CTX, 1, 3))
put("wrapped_dek", "wrong-context", wrap(b"\x11" * 32, {"volume_id": "other"}, 1, 4))

# --- envelope: header + 64 KiB chunks under DEK 0x09*32 ---
DEK = b"\x09" * 32
CHUNK = 64 * 1024


def envelope(content, wrapped=b"W" * 100):
    head = b"CVENV001" + struct.pack(">IH", CHUNK, len(wrapped)) + wrapped
    hh = hashlib.sha256(head).digest()
    # The last chunk is the one not followed by another (a full one included); only empty
    # content gives an empty chunk.
    chunks = [content[i:i + CHUNK] for i in range(0, len(content), CHUNK)] or [b""]
    out = head
    for i, c in enumerate(chunks):
        last = i == len(chunks) - 1
        nonce = bytes(4) + struct.pack(">Q", i)
        aad = hh + struct.pack(">Q", i) + bytes([last])
        out += AESGCM(DEK).encrypt(nonce, c, aad)
    return out


put("envelope", "empty", envelope(b""))
put("envelope", "hello", envelope(b"hello, envelope\n"))
put("envelope", "two-chunks", envelope(b"\xab" * (CHUNK + 10)))
put("envelope", "truncated", envelope(b"hello, envelope\n")[:-3])
