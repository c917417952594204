//! NBD extended headers (`NBD_OPT_EXTENDED_HEADERS`) and holes in READ replies, on the wire
//! (raw sockets) and through real clients: qemu-io / qemu-img 10 (which ask for extended
//! headers first), libnbd (nbdsh, nbdcopy: libnbd 1.14 here, compact headers only) and the
//! `qemu-img map` view of what was written and trimmed.
//!
//! Both transmission paths: `.ci/run` runs this file a second time with
//! `CRYPTVOL_TEST_TRANSMISSION=async`.

mod support;

use std::collections::BTreeMap;
use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cryptvol::server::{Backend, Extent, MemBackend, ServerConfig, StaticRegistry};
use support::*;

const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) | 10;
const REPLY_BLOCK_STATUS_EXT: u16 = 6;
const FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const GIB: u64 = 1 << 30;

/// A sparse in-memory export of any size (4 KiB pages, absent = zeros), counting the largest
/// WRITE_ZEROES and TRIM it was asked for in one call: what shows that a client sent a large
/// request whole.
#[derive(Default)]
struct Sparse {
    size: u64,
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
    largest_zero: AtomicU64,
    largest_trim: AtomicU64,
}

const PAGE: u64 = 4096;

impl Sparse {
    fn new(size: u64) -> Sparse {
        Sparse {
            size,
            ..Sparse::default()
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        let mut p = self.pages.lock().unwrap();
        let (end, mut pos) = (offset + len, offset);
        while pos < end {
            let (page, within) = (pos / PAGE, pos % PAGE);
            let n = (PAGE - within).min(end - pos);
            if n == PAGE {
                p.remove(&page);
            } else if let Some(b) = p.get_mut(&page) {
                b[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
    }
}

impl Backend for Sparse {
    fn size(&self) -> u64 {
        self.size
    }
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let p = self.pages.lock().unwrap();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (page, within) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - within).min(buf.len() - done);
            match p.get(&page) {
                Some(b) => buf[done..done + n].copy_from_slice(&b[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> io::Result<()> {
        let mut p = self.pages.lock().unwrap();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let (page, within) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - done);
            let b = p
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            b[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.largest_trim.fetch_max(len, Ordering::SeqCst);
        self.zero(offset, len);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        self.largest_zero.fetch_max(len, Ordering::SeqCst);
        self.zero(offset, len);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let p = self.pages.lock().unwrap();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |length: u64, hole: bool| match out.last_mut() {
            Some(e) if e.hole == hole => e.length += length,
            _ if length > 0 => out.push(Extent { length, hole }),
            _ => {}
        };
        let mut pos = offset;
        for (&page, _) in p.range(offset / PAGE..end.div_ceil(PAGE)) {
            let (s, e) = ((page * PAGE).max(pos), ((page + 1) * PAGE).min(end));
            push(s - pos, true);
            push(e - s, false);
            pos = e;
        }
        push(end - pos, true);
        Ok(out)
    }
}

fn start_sparse(size: u64) -> (TestServer, Arc<Sparse>) {
    let b = Arc::new(Sparse::new(size));
    let reg = StaticRegistry::new().with("big", b.clone(), false);
    (TestServer::start_registry(ServerConfig::default(), reg), b)
}

/// One reply chunk under extended headers.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

fn ext_req(c: &mut Conn, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64) {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    c.write(&b);
}

/// Reads one reply message; under extended headers every one (success, error, data) MUST be
/// an extended reply: a simple or compact structured one fails here.
fn ext_chunk(c: &mut Conn) -> Chunk {
    let h = c.read_n(32);
    assert_eq!(be32(&h[0..4]), EXTENDED_REPLY_MAGIC, "extended reply magic");
    let len = be64(&h[24..32]);
    assert!(len <= 65 << 20, "absurd payload length {len}");
    Chunk {
        flags: be16(&h[4..6]),
        ty: be16(&h[6..8]),
        cookie: be64(&h[8..16]),
        offset: be64(&h[16..24]),
        payload: c.read_n(len as usize),
    }
}

/// Every chunk of one reply, up to DONE; checks cookie and the echoed request offset.
fn ext_reply(c: &mut Conn, cookie: u64, offset: u64) -> Vec<Chunk> {
    let mut v = Vec::new();
    loop {
        let ch = ext_chunk(c);
        assert_eq!(ch.cookie, cookie);
        assert_eq!(ch.offset, offset, "the request's offset, echoed");
        let done = ch.flags & REPLY_FLAG_DONE != 0;
        v.push(ch);
        if done {
            return v;
        }
    }
}

/// The errno of a reply (0 for success).
fn ext_errno(chunks: &[Chunk]) -> u32 {
    chunks
        .iter()
        .find(|c| c.ty & 0x8000 != 0)
        .map_or(0, |c| be32(&c.payload))
}

/// Handshake with extended headers (no STRUCTURED_REPLY first: it is implied), optionally
/// base:allocation, then GO with NBD_INFO_BLOCK_SIZE.
fn go_extended(c: &mut Conn, export: &str, meta: bool) {
    c.send_flags();
    let r = c.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r[0].reply, REP_ACK, "extended headers acked");
    if meta {
        let r = c.opt(
            OPT_SET_META_CONTEXT,
            &meta_payload(export, &["base:allocation"]),
        );
        assert_eq!(r[0].reply, REP_META_CONTEXT, "meta contexts need no more");
    }
    let r = c.opt(OPT_GO, &info_payload(export, &[INFO_BLOCK_SIZE]));
    assert_eq!(r.last().unwrap().reply, REP_ACK, "GO: {r:?}");
}

/// Reassembles a READ reply (data and hole chunks), checking they cover it exactly once;
/// returns the data and the chunk types in order.
fn assemble(chunks: &[Chunk], offset: u64, len: usize) -> (Vec<u8>, Vec<u16>) {
    let mut buf = vec![0xeeu8; len];
    let mut seen = vec![false; len];
    let mut types = Vec::new();
    for c in chunks {
        let (o, n, data) = match c.ty {
            REPLY_OFFSET_DATA => (be64(&c.payload), c.payload.len() - 8, Some(&c.payload[8..])),
            REPLY_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12, "hole chunk length");
                (be64(&c.payload), be32(&c.payload[8..]) as usize, None)
            }
            REPLY_NONE => continue,
            t => panic!("unexpected chunk type {t:#x}: {c:?}"),
        };
        types.push(c.ty);
        assert!(n > 0 && o >= offset && o + n as u64 <= offset + len as u64);
        let s = (o - offset) as usize;
        for x in &mut seen[s..s + n] {
            assert!(!*x, "chunks overlap");
            *x = true;
        }
        match data {
            Some(d) => buf[s..s + n].copy_from_slice(d),
            None => buf[s..s + n].fill(0),
        }
    }
    assert!(seen.iter().all(|x| *x), "chunks cover the read");
    (buf, types)
}

#[test]
fn option_rules_extended_and_structured() {
    let srv = TestServer::start();
    // A second STRUCTURED_REPLY is refused with ERR_INVALID (qemu-nbd, nbdkit do the same),
    // and the first one stays in force.
    let mut c = srv.connect();
    c.send_flags();
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    let r = c.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r[0].reply, REP_ERR_INVALID, "duplicate structured reply");
    // Extended headers after structured replies: allowed, they supersede them.
    assert_eq!(c.opt(OPT_EXTENDED_HEADERS, &[])[0].reply, REP_ACK);
    assert_eq!(c.opt(OPT_EXTENDED_HEADERS, &[])[0].reply, REP_ERR_INVALID);
    assert_eq!(
        c.opt(OPT_STRUCTURED_REPLY, &[])[0].reply,
        REP_ERR_EXT_HEADER_REQD
    );
    // Data on either option: ERR_INVALID, nothing negotiated.
    let mut d = srv.connect();
    d.send_flags();
    assert_eq!(d.opt(OPT_EXTENDED_HEADERS, b"x")[0].reply, REP_ERR_INVALID);
    assert_eq!(d.opt(OPT_STRUCTURED_REPLY, b"x")[0].reply, REP_ERR_INVALID);
    // ... so a READ still gets a simple reply.
    let r = d.opt(OPT_GO, &info_payload("mem", &[]));
    assert_eq!(r.last().unwrap().reply, REP_ACK);
    assert_eq!(d.read_simple(1, 0, 512).unwrap(), vec![0; 512]);
    // After the first of them, the duplicate is refused but the session works structured.
    let mut e = srv.connect();
    e.send_flags();
    assert_eq!(e.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    assert_eq!(e.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ERR_INVALID);
    let r = e.opt(OPT_GO, &info_payload("mem", &[]));
    assert_eq!(r.last().unwrap().reply, REP_ACK);
    assert_eq!(e.read_structured(1, 0, 512).unwrap(), vec![0; 512]);
}

#[test]
fn extended_transmission_round_trip() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    go_extended(&mut c, "mem", true);
    // WRITE with a 64-bit length field (and the redundant PAYLOAD_LEN flag)
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
    ext_req(&mut c, FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 4096, 8192);
    c.write(&data);
    let r = ext_reply(&mut c, 1, 4096);
    assert_eq!((r.len(), r[0].ty, ext_errno(&r)), (1, REPLY_NONE, 0));
    // READ across hole, data, hole
    ext_req(&mut c, 0, CMD_READ, 2, 0, 5 * 4096);
    let r = ext_reply(&mut c, 2, 0);
    let (got, types) = assemble(&r, 0, 5 * 4096);
    assert_eq!(&got[4096..12288], &data[..]);
    assert!(got[..4096].iter().chain(&got[12288..]).all(|x| *x == 0));
    assert_eq!(
        types,
        [REPLY_OFFSET_HOLE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE]
    );
    // errors are extended ERROR chunks too, never simple replies
    ext_req(&mut c, 0, CMD_READ, 3, 64 << 20, 512);
    assert_eq!(ext_errno(&ext_reply(&mut c, 3, 64 << 20)), EINVAL);
    ext_req(&mut c, 0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(ext_errno(&ext_reply(&mut c, 4, 0)), 0);
    // BLOCK_STATUS is answered with 64-bit descriptors
    ext_req(&mut c, 0, CMD_BLOCK_STATUS, 5, 0, 64 << 20);
    let r = ext_reply(&mut c, 5, 0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ty, REPLY_BLOCK_STATUS_EXT);
    let p = &r[0].payload;
    let n = be32(&p[4..8]) as usize;
    assert_eq!(p.len(), 8 + 16 * n);
    let descs: Vec<(u64, u64)> = (0..n)
        .map(|i| (be64(&p[8 + 16 * i..]), be64(&p[16 + 16 * i..])))
        .collect();
    assert_eq!(
        descs,
        [(4096, 3), (8192, 0), ((64 << 20) - 12288, 3)],
        "hole / data / hole"
    );
    // PAYLOAD_LEN on a command that takes no payload: EINVAL, payload skipped, in sync
    ext_req(&mut c, FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 6, 0, 16);
    c.write(&[0xff; 16]);
    assert_eq!(ext_errno(&ext_reply(&mut c, 6, 0)), EINVAL);
    // an unknown command announcing its payload: the same
    ext_req(&mut c, FLAG_PAYLOAD_LEN, 42, 7, 0, 100);
    c.write(&[0xff; 100]);
    assert_eq!(ext_errno(&ext_reply(&mut c, 7, 0)), EINVAL);
    // a WRITE over the advertised maximum: refused, payload skipped, nothing written
    let big = (32 << 20) + 4096;
    ext_req(&mut c, 0, CMD_WRITE, 8, 0, big);
    c.write(&vec![0xab; big as usize]);
    assert_eq!(ext_errno(&ext_reply(&mut c, 8, 0)), EOVERFLOW);
    ext_req(&mut c, 0, CMD_READ, 9, 4096, 8192);
    let (got, _) = assemble(&ext_reply(&mut c, 9, 4096), 4096, 8192);
    assert_eq!(got, data, "still in sync, nothing written");
    // a compact header once extended headers are in force: out of sync, closed
    // (32 bytes of it: the compact header and what would start the next one)
    c.send_req(0, CMD_READ, 10, 0, 512);
    c.write(&REQUEST_MAGIC.to_be_bytes());
    c.expect_closed();
}

#[test]
fn extended_write_past_skip_limit_closes() {
    let (srv, _b) = start_sparse(16 * GIB);
    let mut c = srv.connect();
    go_extended(&mut c, "big", false);
    // a 5 GiB payload is refused; rather than read and drop 5 GiB, the server hangs up
    ext_req(&mut c, 0, CMD_WRITE, 1, 0, 5 * GIB);
    c.write_may_close(&[0u8; 4096]);
    c.expect_closed();
}

#[test]
fn large_trim_zero_block_status_in_one_request() {
    let (srv, b) = start_sparse(16 * GIB);
    let mut c = srv.connect();
    go_extended(&mut c, "big", true);
    let data = vec![0x5au8; 4096];
    for (i, off) in [0u64, 5 * GIB, 12 * GIB].into_iter().enumerate() {
        ext_req(&mut c, 0, CMD_WRITE, i as u64, off, 4096);
        c.write(&data);
        assert_eq!(ext_errno(&ext_reply(&mut c, i as u64, off)), 0);
    }
    // one BLOCK_STATUS over all 16 GiB: a single 5 GiB - 4 KiB hole descriptor, and more
    ext_req(&mut c, 0, CMD_BLOCK_STATUS, 10, 0, 16 * GIB);
    let r = ext_reply(&mut c, 10, 0);
    let p = &r[0].payload;
    let n = be32(&p[4..8]) as usize;
    let descs: Vec<(u64, u64)> = (0..n)
        .map(|i| (be64(&p[8 + 16 * i..]), be64(&p[16 + 16 * i..])))
        .collect();
    assert_eq!(
        descs,
        [
            (4096, 0),
            (5 * GIB - 4096, 3),
            (4096, 0),
            (7 * GIB - 4096, 3),
            (4096, 0),
            (4 * GIB - 4096, 3),
        ]
    );
    // REQ_ONE: one descriptor, no longer than asked
    ext_req(&mut c, FLAG_REQ_ONE, CMD_BLOCK_STATUS, 11, 4096, 6 * GIB);
    let r = ext_reply(&mut c, 11, 4096);
    let p = &r[0].payload;
    assert_eq!(be32(&p[4..8]), 1);
    assert_eq!((be64(&p[8..]), be64(&p[16..])), (5 * GIB - 4096, 3));
    // one 6 GiB TRIM and one 10 GiB WRITE_ZEROES reach the backend whole
    ext_req(&mut c, 0, CMD_TRIM, 12, 0, 6 * GIB);
    assert_eq!(ext_errno(&ext_reply(&mut c, 12, 0)), 0);
    ext_req(&mut c, 0, CMD_WRITE_ZEROES, 13, 6 * GIB, 10 * GIB);
    assert_eq!(ext_errno(&ext_reply(&mut c, 13, 6 * GIB)), 0);
    assert_eq!(b.largest_trim.load(Ordering::SeqCst), 6 * GIB);
    assert_eq!(b.largest_zero.load(Ordering::SeqCst), 10 * GIB);
    ext_req(&mut c, 0, CMD_BLOCK_STATUS, 14, 0, 16 * GIB);
    let r = ext_reply(&mut c, 14, 0);
    let p = &r[0].payload;
    assert_eq!(be32(&p[4..8]), 1, "all hole now");
    assert_eq!((be64(&p[8..]), be64(&p[16..])), (16 * GIB, 3));
    // out of range, even by one byte of a 64-bit length
    ext_req(&mut c, 0, CMD_TRIM, 15, 1, 16 * GIB);
    assert_eq!(ext_errno(&ext_reply(&mut c, 15, 1)), EINVAL);
    ext_req(&mut c, 0, CMD_WRITE_ZEROES, 16, u64::MAX, 2);
    assert_eq!(ext_errno(&ext_reply(&mut c, 16, u64::MAX)), ENOSPC);
}

#[test]
fn compact_structured_read_reports_holes() {
    let (srv, b) = TestServer::start_mem(4 * MIB);
    b.write(8192, &mut [7u8; 4096], false).unwrap();
    b.write(65536, &mut [9u8; 100], false).unwrap();
    let mut c = srv.connect();
    c.go("mem", true, false);
    c.send_req(0, CMD_READ, 1, 0, 128 << 10);
    let chunks = c.chunks();
    let types: Vec<u16> = chunks
        .iter()
        .map(|r| match r {
            Reply::Chunk { ty, .. } => *ty,
            _ => unreachable!(),
        })
        .collect();
    // hole 0..8K, data 8K..12K, hole 12K..64K, data 64K..68K (a partly written page), hole
    assert_eq!(
        types,
        [
            REPLY_OFFSET_HOLE,
            REPLY_OFFSET_DATA,
            REPLY_OFFSET_HOLE,
            REPLY_OFFSET_DATA,
            REPLY_OFFSET_HOLE
        ]
    );
    let got = c.read_structured(2, 0, 128 << 10).unwrap();
    let mut want = vec![0u8; 128 << 10];
    want[8192..12288].fill(7);
    want[65536..65636].fill(9);
    assert_eq!(got, want);
    // all hole: one chunk; unaligned start: the partial granules go as data
    c.send_req(0, CMD_READ, 3, 1 << 20, 1 << 20);
    let r = c.chunks();
    assert!(matches!(
        &r[..],
        [Reply::Chunk {
            ty: REPLY_OFFSET_HOLE,
            flags: REPLY_FLAG_DONE,
            ..
        }]
    ));
    assert_eq!(c.read_structured(4, 12289, 20000).unwrap(), vec![0; 20000]);
    // DF: one content chunk; a mixed range comes as data with its zeros
    c.send_req(FLAG_DF, CMD_READ, 5, 0, 16384);
    let r = c.chunks();
    assert!(
        matches!(
            &r[..],
            [Reply::Chunk {
                ty: REPLY_OFFSET_DATA,
                ..
            }]
        ),
        "{r:?}"
    );
}

#[test]
fn qemu_io_negotiates_extended_headers() {
    if !have("qemu-io") {
        return;
    }
    let (srv, b) = start_sparse(8 * GIB);
    let out = run_ok(
        120,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 5G 64k",
            "-c",
            "write -z 1G 256M",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0xa5 5G 64k",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "discard 0 512k",
            "-c",
            "read -P 0 0 512k",
            "-c",
            "read -P 0x5a 512k 512k",
            &srv.uri("big"),
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("read ").count(), 5, "{out}");
    // With compact headers qemu splits WRITE_ZEROES at the advertised 32 MiB maximum; under
    // extended headers it sends it whole (it assumes unlimited zero and trim).
    assert_eq!(
        b.largest_zero.load(Ordering::SeqCst),
        256 << 20,
        "one 256 MiB WRITE_ZEROES: extended headers in use"
    );
    let mut v = vec![0u8; 4096];
    b.read(5 * GIB, &mut v).unwrap();
    assert!(v.iter().all(|x| *x == 0xa5));
}

/// `qemu-img map --output=json` entries as (start, length, zero, data).
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let json = run_ok(60, &["qemu-img", "map", "--output=json", "-f", "raw", uri]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("qemu-img map json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn qemu_img_map_matches_writes_and_trims() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let k = 1024u64;
    for (name, size) in [("small", 4 * MIB), ("large", 6 * GIB)] {
        let (srv, _b) = start_sparse(size);
        let uri = srv.uri("big");
        run_ok(
            60,
            &[
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 128k",
                "-c",
                "discard 32k 32k",
                "-c",
                "write -P 0x22 512k 4k",
                "-c",
                "write -z 516k 4k",
                "-c",
                "write -P 0x33 3M 1M",
                "-c",
                "discard 3M 512k",
                &uri,
            ],
        );
        let mut want = vec![
            (0, 32 * k, false, true),
            (32 * k, 32 * k, true, false),
            (64 * k, 64 * k, false, true),
            (128 * k, 384 * k, true, false),
            (512 * k, 4 * k, false, true),
            (516 * k, 3 * MIB - 516 * k + 512 * k, true, false),
            (3 * MIB + 512 * k, 512 * k, false, true),
        ];
        if size > 4 * MIB {
            want.push((4 * MIB, size - 4 * MIB, true, false));
        }
        assert_eq!(qemu_img_map(&uri), want, "{name}");
        // qemu-img convert skips the holes: the copy is sparse and equal
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("copy.raw");
        run_ok(
            120,
            &[
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &uri,
                out.to_str().unwrap(),
            ],
        );
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(meta.len(), size);
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(allocated <= 2 * MIB, "{name}: {allocated} bytes allocated");
        let f = std::fs::File::open(&out).unwrap();
        let mut head = vec![0u8; 4 * MIB as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
        let mut expect = vec![0u8; 4 * MIB as usize];
        expect[..32 << 10].fill(0x11);
        expect[64 << 10..128 << 10].fill(0x11);
        expect[512 << 10..516 << 10].fill(0x22);
        expect[(3 << 20) + (512 << 10)..4 << 20].fill(0x33);
        assert!(head == expect, "{name}: converted image differs");
    }
}

#[test]
fn libnbd_pread_structured_sees_holes() {
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let probe = Command::new(&py).args(["-c", "import nbd"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-libnbd is not importable by {py}"
        );
        eprintln!("SKIP: {py} cannot import nbd");
        return;
    }
    let (srv, b) = TestServer::start_mem(4 * MIB);
    b.write(MIB, &mut [3u8; 8192], false).unwrap();
    // Each chunk as (type, offset, length); libnbd validates them against the request.
    // libnbd >= 1.18 negotiates extended headers unless told not to; this one (1.14) cannot.
    let script = r#"
import nbd, sys
h = nbd.NBD()
if hasattr(h, "set_request_extended_headers"):
    h.set_request_extended_headers(sys.argv[2] == "ext")
h.connect_uri(sys.argv[1])
chunks = []
def cb(buf, offset, status, err):
    chunks.append((status, offset, len(buf)))
    return 0
data = h.pread_structured(2 << 20, 0, cb)
assert data[(1 << 20):(1 << 20) + 8192] == b"\x03" * 8192
assert data.count(0) == len(data) - 8192
holes = [c for c in chunks if c[0] == nbd.READ_HOLE]
datas = [c for c in chunks if c[0] == nbd.READ_DATA]
print("holes", len(holes), "data", len(datas), "hole bytes", sum(c[2] for c in holes))
"#;
    for mode in ["ext", "compact"] {
        let out = run_ok(60, &[&py, "-c", script, &srv.uri("mem"), mode]);
        assert!(
            out.contains(&format!("holes 2 data 1 hole bytes {}", 2 * MIB - 8192)),
            "{mode}: {out}"
        );
    }
}

#[test]
fn nbdcopy_sparse_round_trip() {
    if !have("nbdcopy") {
        return;
    }
    let (srv, _b) = start_sparse(64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.raw");
    let mut data = vec![0u8; 64 * MIB as usize];
    for (i, x) in data[8 << 20..9 << 20].iter_mut().enumerate() {
        *x = (i % 253) as u8 + 1;
    }
    data[40 << 20..(40 << 20) + 4096].fill(0x77);
    std::fs::write(&input, &data).unwrap();
    let uri = srv.uri("big");
    run_ok(60, &["nbdcopy", input.to_str().unwrap(), &uri]);
    let output = dir.path().join("out.raw");
    run_ok(60, &["nbdcopy", &uri, output.to_str().unwrap()]);
    assert!(std::fs::read(&output).unwrap() == data, "round trip");
    // The holes were not written: the copy is sparse.
    let meta = std::fs::metadata(&output).unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert!(allocated <= 4 * MIB, "{allocated} bytes allocated");
}

#[test]
fn mem_backend_stays_usable_after_extended_session() {
    // A session with extended headers ends cleanly and leaves the export to the next client
    // in compact mode.
    let b = Arc::new(MemBackend::new(MIB, 512));
    let reg = StaticRegistry::new().with("m", b.clone(), false);
    let srv = TestServer::start_registry(ServerConfig::default(), reg);
    let mut c = srv.connect();
    go_extended(&mut c, "m", false);
    ext_req(&mut c, 0, CMD_WRITE, 1, 512, 512);
    c.write(&[4u8; 512]);
    assert_eq!(ext_errno(&ext_reply(&mut c, 1, 512)), 0);
    ext_req(&mut c, 0, CMD_DISC, 2, 0, 0);
    c.expect_closed();
    let mut d = srv.connect();
    d.go("m", false, false);
    assert_eq!(d.read_simple(1, 512, 512).unwrap(), vec![4u8; 512]);
}
