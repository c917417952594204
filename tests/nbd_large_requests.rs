//! READ/WRITE larger than the advertised 32 MiB from clients that negotiated no block sizes
//! (NBD_OPT_EXPORT_NAME, as the kernel client and old tools use, or GO without
//! NBD_INFO_BLOCK_SIZE): served up to the connection's buffer budget (`max_buffer_bytes`,
//! 64 MiB by default), refused past it with the connection still in sync. Raw sockets; both
//! transmission paths (`.ci/run` runs this file again with CRYPTVOL_TEST_TRANSMISSION=async).

mod support;

use cryptvol::server::ServerConfig;
use support::*;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Handshake ending with NBD_OPT_EXPORT_NAME; returns the export size.
fn export_name(c: &mut Conn, name: &str) -> u64 {
    c.send_flags(); // FIXED_NEWSTYLE | NO_ZEROES: 10 bytes of reply
    c.send_opt(OPT_EXPORT_NAME, name.as_bytes());
    let r = c.read_n(10);
    be64(&r[0..8])
}

/// A WRITE whose payload is sent from another thread while the reply is awaited (the server
/// may refuse before reading it all); returns the error.
fn write_big(c: &mut Conn, cookie: u64, offset: u64, data: Vec<u8>) -> u32 {
    c.send_req(0, CMD_WRITE, cookie, offset, data.len() as u32);
    let mut s = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut s, &data));
    let (e, ck) = c.simple();
    assert_eq!(ck, cookie);
    sender.join().unwrap().expect("payload sent");
    e
}

#[test]
fn export_name_client_reads_and_writes_48_mib() {
    let srv = TestServer::start_with(ServerConfig::default(), 128 * MIB);
    let mut c = srv.connect();
    assert_eq!(export_name(&mut c, "mem"), 128 * MIB);
    let n = 48 << 20;
    let data = pattern(n, 0x5a);
    assert_eq!(write_big(&mut c, 1, 4096, data.clone()), 0, "48 MiB WRITE");
    let got = c.read_simple(2, 4096, n as u32).expect("48 MiB READ");
    assert!(got == data, "read back what was written");
    // the whole budget in one request
    assert_eq!(c.read_simple(3, 0, 64 << 20).unwrap().len(), 64 << 20);
    // past it: EINVAL (simple replies), and the connection stays in sync
    let over = (64 << 20) + 4096;
    assert_eq!(c.read_simple(4, 0, over), Err(EINVAL));
    assert_eq!(write_big(&mut c, 5, 0, vec![0xff; over as usize]), EINVAL);
    let got = c.read_simple(6, 4096, 8192).unwrap();
    assert_eq!(got, data[..8192], "the refused WRITE wrote nothing");
}

#[test]
fn go_without_block_size_is_served_too() {
    let srv = TestServer::start_with(ServerConfig::default(), 128 * MIB);
    let mut c = srv.connect();
    c.go("mem", false, false); // GO with no information requests
    let n = 40 << 20;
    let data = pattern(n, 3);
    assert_eq!(write_big(&mut c, 1, 0, data.clone()), 0);
    assert!(c.read_simple(2, 0, n as u32).unwrap() == data);
}

#[test]
fn structured_large_read_without_block_size() {
    let srv = TestServer::start_with(ServerConfig::default(), 128 * MIB);
    let mut c = srv.connect();
    c.go("mem", true, false);
    // data, a 16 MiB hole, data: 48 MiB in one READ, answered in chunks
    let n = 48usize << 20;
    let mut want = pattern(n, 9);
    want[8 << 20..24 << 20].fill(0);
    let (a, b) = (&want[..8 << 20], &want[24 << 20..]);
    assert_eq!(write_big_structured(&mut c, 1, 0, a.to_vec()), 0);
    assert_eq!(write_big_structured(&mut c, 2, 24 << 20, b.to_vec()), 0);
    c.send_req(0, CMD_READ, 3, 0, n as u32);
    let mut got = vec![0xeeu8; n];
    let mut covered = 0usize;
    let mut hole = 0usize;
    loop {
        let h = c.read_n(20);
        assert_eq!(be32(&h[0..4]), STRUCTURED_MAGIC);
        assert_eq!(be64(&h[8..16]), 3);
        let (flags, ty, len) = (be16(&h[4..6]), be16(&h[6..8]), be32(&h[16..20]) as usize);
        let p = c.read_n(len);
        match ty {
            REPLY_OFFSET_DATA => {
                let o = be64(&p) as usize;
                got[o..o + len - 8].copy_from_slice(&p[8..]);
                covered += len - 8;
            }
            REPLY_OFFSET_HOLE => {
                let (o, l) = (be64(&p) as usize, be32(&p[8..]) as usize);
                got[o..o + l].fill(0);
                covered += l;
                hole += l;
            }
            t => panic!("chunk type {t:#x}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, n);
    assert_eq!(hole, 16 << 20, "the hole was not sent as data");
    assert!(got == want);
}

fn write_big_structured(c: &mut Conn, cookie: u64, offset: u64, data: Vec<u8>) -> u32 {
    c.send_req(0, CMD_WRITE, cookie, offset, data.len() as u32);
    let mut s = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut s, &data));
    let r = c.chunks();
    sender.join().unwrap().expect("payload sent");
    match &r[..] {
        [Reply::Chunk { ty: REPLY_NONE, .. }] => 0,
        [Reply::Chunk { payload, .. }] => be32(payload),
        r => panic!("{r:?}"),
    }
}

#[test]
fn cap_follows_the_configured_budget() {
    let cfg = ServerConfig {
        max_buffer_bytes: 40 << 20,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, 128 * MIB);
    let mut c = srv.connect();
    export_name(&mut c, "mem");
    assert_eq!(c.read_simple(1, 0, 40 << 20).unwrap().len(), 40 << 20);
    assert_eq!(c.read_simple(2, 0, 48 << 20), Err(EINVAL));
    // a budget below 32 MiB still serves the advertised maximum
    let cfg = ServerConfig {
        max_buffer_bytes: 1 << 20,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, 64 * MIB);
    let mut c = srv.connect();
    export_name(&mut c, "mem");
    assert_eq!(c.read_simple(1, 0, 32 << 20).unwrap().len(), 32 << 20);
    assert_eq!(c.read_simple(2, 0, (32 << 20) + 4096), Err(EINVAL));
}
