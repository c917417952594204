//! Raw-socket conformance tests of the NBD server (doc/proto.md of NetworkBlockDevice/nbd):
//! one test per MUST item of the handshake and transmission phases, plus hostile clients.
//! The server runs in-process on a temp Unix socket with in-memory exports.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cryptvol::server::ServerConfig;
use support::*;

// ---------------------------------------------------------------- handshake

#[test]
fn greeting_bytes() {
    let srv = TestServer::start();
    let mut s = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    let mut g = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut g).unwrap();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..18], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
}

#[test]
fn unknown_client_flags_close() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.write(&(1u32 << 5 | 3).to_be_bytes());
    c.expect_closed();
}

#[test]
fn export_name_unknown_closes_without_size() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    c.send_opt(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
}

#[test]
fn export_name_known_gives_size_and_flags_no_zeroes() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags(); // NO_ZEROES
    c.send_opt(OPT_EXPORT_NAME, b"mem");
    let r = c.read_n(10);
    assert_eq!(be64(&r[0..8]), 64 * MIB);
    assert_ne!(be16(&r[8..10]) & TF_HAS_FLAGS, 0);
    // Next bytes are a transmission reply, not 124 zeros.
    let (e, ck) = {
        c.send_req(0, CMD_FLUSH, 9, 0, 0);
        c.simple()
    };
    assert_eq!((e, ck), (0, 9));
}

#[test]
fn go_and_info_report_export_then_ack_with_requested_infos() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let asked = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    let info = c.opt(OPT_INFO, &info_payload("mem", &asked));
    let go = c.opt(OPT_GO, &info_payload("mem", &asked));
    for r in [&info, &go] {
        assert_eq!(r.last().unwrap().reply, REP_ACK);
        assert!(r[..r.len() - 1].iter().all(|x| x.reply == REP_INFO));
        let by_type: HashMap<u16, &Vec<u8>> = r[..r.len() - 1]
            .iter()
            .map(|x| (be16(&x.data), &x.data))
            .collect();
        let e = by_type[&INFO_EXPORT];
        assert_eq!(e.len(), 12);
        assert_eq!(be64(&e[2..10]), 64 * MIB);
        let flags = be16(&e[10..12]);
        assert_ne!(flags & TF_HAS_FLAGS, 0);
        assert_ne!(flags & TF_CAN_MULTI_CONN, 0);
        assert_eq!(flags & TF_READ_ONLY, 0);
        assert_eq!(&by_type[&INFO_NAME][2..], b"mem");
        assert!(by_type.contains_key(&INFO_DESCRIPTION));
        let b = by_type[&INFO_BLOCK_SIZE];
        assert_eq!(b.len(), 14);
        assert_eq!(
            (be32(&b[2..6]), be32(&b[6..10]), be32(&b[10..14])),
            (1, 4096, 32 << 20),
            "min 1, preferred = sector, max 32 MiB"
        );
    }
    // INFO and GO give the same data.
    let strip = |v: &Vec<OptReply>| -> Vec<(u32, Vec<u8>)> {
        v.iter().map(|r| (r.reply, r.data.clone())).collect()
    };
    assert_eq!(strip(&info), strip(&go));
    // No padding after GO's ACK: the next bytes are the reply to our first request.
    c.send_req(0, CMD_FLUSH, 0x1234, 0, 0);
    assert_eq!(c.simple(), (0, 0x1234));
}

#[test]
fn go_unknown_export_err_unknown_and_continue() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(OPT_GO, &info_payload("nope", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply, REP_ERR_UNKNOWN);
    let (size, _) = {
        let r = c.opt(OPT_GO, &info_payload("mem", &[]));
        assert_eq!(r.last().unwrap().reply, REP_ACK);
        (be64(&r[0].data[2..10]), ())
    };
    assert_eq!(size, 64 * MIB);
}

#[test]
fn go_malformed_length_err_invalid_and_continue() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    // Name length says 100 but the option holds 3 bytes of name.
    let mut bad = 100u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"mem\0\0");
    let r = c.opt(OPT_GO, &bad);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply, REP_ERR_INVALID);
    // Trailing garbage after the info list.
    let mut trailing = info_payload("mem", &[]);
    trailing.push(7);
    assert_eq!(c.opt(OPT_INFO, &trailing)[0].reply, REP_ERR_INVALID);
    // Info count claims 5 requests but carries one.
    let mut short = 3u32.to_be_bytes().to_vec();
    short.extend_from_slice(b"mem");
    short.extend_from_slice(&5u16.to_be_bytes());
    short.extend_from_slice(&INFO_NAME.to_be_bytes());
    assert_eq!(c.opt(OPT_GO, &short)[0].reply, REP_ERR_INVALID);
    // Negotiation continues.
    let r = c.opt(OPT_GO, &info_payload("mem", &[]));
    assert_eq!(r.last().unwrap().reply, REP_ACK);
}

#[test]
fn list_gives_server_per_export_then_ack() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().reply, REP_ACK);
    let mut names: Vec<String> = r[..r.len() - 1]
        .iter()
        .map(|x| {
            assert_eq!(x.reply, REP_SERVER);
            let n = be32(&x.data) as usize;
            String::from_utf8(x.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["mem", "ro"]);
    // LIST with data: ERR_INVALID, negotiation continues.
    let r = c.opt(OPT_LIST, b"x");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply, REP_ERR_INVALID);
    assert_eq!(c.opt(OPT_LIST, &[]).len(), 3);
}

#[test]
fn abort_acks_then_closes() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(OPT_ABORT, &[]);
    assert_eq!(r[0].reply, REP_ACK);
    c.expect_closed();
}

#[test]
fn unknown_option_payload_consumed_extended_headers_acked() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(0x7777, b"some payload that must be skipped, IHAVEOPT");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply, REP_ERR_UNSUP);
    assert_eq!(r[0].option, 0x7777);
    let r = c.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(
        r[0].reply, REP_ACK,
        "extended headers, structured replies implied"
    );
    // Stream in sync: the next option is answered (structured replies are in force already).
    let r = c.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r[0].reply, (1 << 31) | 10, "NBD_REP_ERR_EXT_HEADER_REQD");
}

#[test]
fn meta_context_needs_structured_replies() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let q = meta_payload("mem", &["base:allocation"]);
    assert_eq!(c.opt(OPT_SET_META_CONTEXT, &q)[0].reply, REP_ERR_INVALID);
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    let r = c.opt(OPT_SET_META_CONTEXT, &q);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].reply, REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    assert_eq!(r[1].reply, REP_ACK);
    // Unknown namespaces are ignored (no context, just ACK).
    let r = c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_payload("mem", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply, REP_ACK);
    let r = c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_payload("mem", &["base:allocation"]),
    );
    assert_eq!(r[0].reply, REP_META_CONTEXT);
}

#[test]
fn option_length_2_31_closes_at_once() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let mut b = IHAVEOPT.to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 31).to_be_bytes());
    c.write(&b);
    let t = Instant::now();
    c.expect_closed();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed without waiting"
    );
}

#[test]
fn starttls_without_tls_err_policy() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(OPT_STARTTLS, &[]);
    assert_eq!(r[0].reply, REP_ERR_POLICY);
    assert_eq!(c.opt(OPT_LIST, &[]).last().unwrap().reply, REP_ACK);
}

#[test]
fn handshake_deadline_closes_silent_clients() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, MIB);
    // Silent before the client flags.
    let mut a = srv.connect();
    // Silent in the middle of option haggling.
    let mut b = srv.connect();
    b.send_flags();
    assert_eq!(b.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    let t = Instant::now();
    a.expect_closed();
    b.expect_closed();
    assert!(t.elapsed() < Duration::from_secs(5));
    // The server still serves.
    let mut c = srv.connect();
    c.go("mem", false, false);
}

// ---------------------------------------------------------------- transmission

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn simple_read_write_round_trip() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    let (size, flags) = c.go("mem", false, false);
    assert_eq!(size, 64 * MIB);
    assert_eq!(flags & TF_READ_ONLY, 0);
    let d = pattern(1, 10_000);
    assert_eq!(c.write_simple(1, 12_345, &d), 0); // unaligned
    assert_eq!(c.read_simple(2, 12_345, 10_000).unwrap(), d);
    // FUA write, flush, cache.
    c.send_req(FLAG_FUA, CMD_WRITE, 3, 0, 512);
    c.write(&[9u8; 512]);
    assert_eq!(c.simple(), (0, 3));
    c.send_req(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(c.simple(), (0, 4));
    c.send_req(0, CMD_CACHE, 5, 0, 4096);
    assert_eq!(c.simple(), (0, 5));
    assert_eq!(c.read_simple(6, 0, 512).unwrap(), vec![9u8; 512]);
}

#[test]
fn structured_read_write_round_trip() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", true, false);
    let d = pattern(2, 100_000);
    c.send_req(0, CMD_WRITE, 1, 4096 * 3 + 7, d.len() as u32);
    c.write(&d);
    let ch = c.chunks();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].error(), 0);
    assert_eq!(c.read_structured(2, 4096 * 3 + 7, 100_000).unwrap(), d);
    // Unwritten space reads as zeros (maybe as hole chunks).
    assert_eq!(
        c.read_structured(3, 32 * MIB, 8192).unwrap(),
        vec![0u8; 8192]
    );
    // DF is allowed with structured replies.
    c.send_req(FLAG_DF, CMD_READ, 4, 4096 * 3 + 7, 10);
    let ch = c.chunks();
    assert_eq!(ch.last().unwrap().error(), 0);
}

#[test]
fn pipelined_requests_all_cookies_return() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    let mut batch = Vec::new();
    let mut read_lens = HashMap::new();
    // 16 writes to distinct blocks, then 16 reads of other blocks, all sent before reading.
    for i in 0..16u64 {
        let ck = 0xdead_0000_0000_0000 | i;
        batch.extend(Conn::request_bytes(0, CMD_WRITE, ck, i * 65536, 65536));
        batch.extend(vec![i as u8 + 1; 65536]);
    }
    for i in 0..16u64 {
        let ck = 0xbeef_0000_0000_0000 | i;
        read_lens.insert(ck, 4096usize);
        batch.extend(Conn::request_bytes(0, CMD_READ, ck, (32 + i) * 65536, 4096));
    }
    c.write(&batch);
    let mut seen = HashSet::new();
    for _ in 0..32 {
        let r = c.read_reply(|ck| read_lens.get(&ck).copied().unwrap_or(0));
        assert_eq!(r.error(), 0);
        assert!(seen.insert(r.cookie()), "cookie answered twice");
    }
    assert_eq!(seen.len(), 32);
    for i in 0..16u64 {
        assert_eq!(
            c.read_simple(100 + i, i * 65536, 65536).unwrap(),
            vec![i as u8 + 1; 65536]
        );
    }
}

#[test]
fn zero_length_read() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    assert_eq!(c.read_simple(1, 0, 0).unwrap(), Vec::<u8>::new());
    let mut d = srv.connect();
    d.go("mem", true, false);
    assert_eq!(d.read_structured(1, 4096, 0).unwrap(), Vec::<u8>::new());
}

#[test]
fn out_of_range_einval_read_enospc_write_stream_in_sync() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    assert_eq!(c.read_simple(1, 1 << 63, 1), Err(EINVAL));
    assert_eq!(c.read_simple(2, u64::MAX - 10, 100), Err(EINVAL)); // offset+len overflows
    assert_eq!(c.read_simple(3, 64 * MIB - 1, 2), Err(EINVAL));
    // WRITE past the end: ENOSPC; the payload is skipped, not parsed as requests.
    let junk = Conn::request_bytes(0, CMD_DISC, 0, 0, 0).repeat(20);
    c.send_req(0, CMD_WRITE, 4, 1 << 63, junk.len() as u32);
    c.write(&junk);
    assert_eq!(c.simple(), (ENOSPC, 4));
    c.send_req(0, CMD_WRITE, 5, u64::MAX - 3, 8);
    c.write(&[1; 8]);
    assert_eq!(c.simple(), (ENOSPC, 5));
    c.send_req(0, CMD_WRITE_ZEROES, 6, 64 * MIB, 1);
    assert_eq!(c.simple(), (ENOSPC, 6));
    c.send_req(0, CMD_TRIM, 7, 64 * MIB - 1, 2);
    assert_eq!(c.simple(), (EINVAL, 7));
    // Still in sync; nothing was written at the end.
    assert_eq!(c.read_simple(8, 64 * MIB - 8, 8).unwrap(), vec![0; 8]);
}

#[test]
fn read_only_export_write_eperm() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    let (size, flags) = c.go("ro", false, false);
    assert_eq!(size, MIB);
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(c.write_simple(1, 0, &[5; 1000]), EPERM);
    c.send_req(0, CMD_TRIM, 2, 0, 512);
    assert_eq!(c.simple(), (EPERM, 2));
    c.send_req(0, CMD_WRITE_ZEROES, 3, 0, 512);
    assert_eq!(c.simple(), (EPERM, 3));
    assert_eq!(c.read_simple(4, 0, 1000).unwrap(), vec![0; 1000]);
}

#[test]
fn unknown_command_and_flags_einval_stream_in_sync() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    c.send_req(0, 42, 1, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 1));
    c.send_req(0, 0xffff, 2, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 2));
    // Unknown flag bit; known flag on the wrong command; DF without structured replies.
    c.send_req(1 << 12, CMD_FLUSH, 3, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 3));
    c.send_req(FLAG_NO_HOLE, CMD_TRIM, 4, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 4));
    c.send_req(FLAG_DF, CMD_READ, 5, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 5));
    c.send_req(FLAG_REQ_ONE, CMD_READ, 6, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 6));
    assert_eq!(c.read_simple(7, 0, 16).unwrap(), vec![0; 16]);
}

#[test]
fn block_status_needs_meta_context() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", true, false);
    c.send_req(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    let ch = c.chunks();
    assert_eq!(ch.last().unwrap().error(), EINVAL);
    assert_eq!(c.read_structured(2, 0, 16).unwrap(), vec![0; 16]);
}

fn extents(c: &mut Conn, cookie: u64, flags: u16, offset: u64, len: u32) -> Vec<(u32, u32)> {
    c.send_req(flags, CMD_BLOCK_STATUS, cookie, offset, len);
    let ch = c.chunks();
    assert_eq!(ch.len(), 1, "{ch:?}");
    let Reply::Chunk { ty, payload, .. } = &ch[0] else {
        unreachable!()
    };
    assert_eq!(*ty, REPLY_BLOCK_STATUS, "{ch:?}");
    assert_eq!(be32(payload), 1, "context id from SET_META_CONTEXT");
    payload[4..]
        .chunks(8)
        .map(|d| (be32(&d[0..4]), be32(&d[4..8])))
        .collect()
}

#[test]
fn block_status_holes_and_data_req_one() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", true, true);
    const HZ: u32 = 3; // HOLE | ZERO
    assert_eq!(extents(&mut c, 1, 0, 0, 65536), vec![(65536, HZ)]);
    c.send_req(0, CMD_WRITE, 2, 16384, 8192);
    c.write(&[1; 8192]);
    assert_eq!(c.chunks()[0].error(), 0);
    assert_eq!(
        extents(&mut c, 3, 0, 0, 65536),
        vec![(16384, HZ), (8192, 0), (40960, HZ)]
    );
    // REQ_ONE: exactly one extent, starting at the offset.
    let one = extents(&mut c, 4, FLAG_REQ_ONE, 0, 65536);
    assert_eq!(one, vec![(16384, HZ)]);
    let one = extents(&mut c, 5, FLAG_REQ_ONE, 16384, 65536);
    assert_eq!(one, vec![(8192, 0)]);
    // TRIM makes a hole again and reads zeros.
    c.send_req(0, CMD_TRIM, 6, 16384, 8192);
    assert_eq!(c.chunks()[0].error(), 0);
    assert_eq!(extents(&mut c, 7, 0, 0, 65536), vec![(65536, HZ)]);
    assert_eq!(c.read_structured(8, 16384, 8192).unwrap(), vec![0; 8192]);
}

#[test]
fn trim_then_read_zeros_simple() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    assert_eq!(c.write_simple(1, 1000, &[7; 20_000]), 0);
    c.send_req(0, CMD_TRIM, 2, 1000, 20_000);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_simple(3, 1000, 20_000).unwrap(), vec![0; 20_000]);
    // WRITE_ZEROES (with NO_HOLE) too.
    assert_eq!(c.write_simple(4, 0, &[7; 4096]), 0);
    c.send_req(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 100, 200);
    assert_eq!(c.simple(), (0, 5));
    let r = c.read_simple(6, 0, 4096).unwrap();
    assert!(r[100..300].iter().all(|b| *b == 0));
    assert!(r[..100].iter().chain(&r[300..]).all(|b| *b == 7));
}

#[test]
fn write_zeroes_fast_zero_no_hole_enotsup() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    assert_eq!(c.write_simple(1, 0, &[7; 4096]), 0);
    c.send_req(FLAG_FAST_ZERO | FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2, 0, 4096);
    assert_eq!(c.simple(), (ENOTSUP, 2));
    // Nothing changed; FAST_ZERO alone works.
    assert_eq!(c.read_simple(3, 0, 4096).unwrap(), vec![7; 4096]);
    c.send_req(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 4, 0, 4096);
    assert_eq!(c.simple(), (0, 4));
    assert_eq!(c.read_simple(5, 0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn oversized_read_errors_connection_usable() {
    // Clients that asked for block sizes are held to the advertised maximum (the ones that
    // did not are served more: tests/nbd_large_requests.rs).
    let srv = TestServer::start();
    let mut c = srv.connect();
    assert_eq!(c.go_block_size("mem", false).2, 32 << 20);
    let big = (32 << 20) + 1;
    assert_eq!(c.read_simple(1, 0, big), Err(EINVAL));
    assert_eq!(c.read_simple(2, 0, 8).unwrap(), vec![0; 8]);
    let mut d = srv.connect();
    d.go_block_size("mem", true);
    let e = d.read_structured(1, 0, big).unwrap_err();
    assert!(e == EOVERFLOW || e == EINVAL, "got {e}");
    assert_eq!(d.read_structured(2, 0, 8).unwrap(), vec![0; 8]);
    // A max-size read works.
    assert_eq!(d.read_structured(3, 0, 32 << 20).unwrap().len(), 32 << 20);
}

#[test]
fn oversized_write_payload_skipped_or_closed() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go_block_size("mem", false);
    // 33 MiB claimed: the server must refuse without allocating it first; either skip and
    // answer, or close. We send the payload so a skipping server can answer.
    let big = (33u32) << 20;
    c.send_req(0, CMD_WRITE, 1, 0, big);
    let sender = {
        let mut s = c.s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![0xaau8; 1 << 20];
            for _ in 0..33 {
                if std::io::Write::write_all(&mut s, &chunk).is_err() {
                    return;
                }
            }
        })
    };
    let mut b = [0u8; 16];
    match std::io::Read::read_exact(&mut c.s, &mut b) {
        Ok(()) => {
            assert_eq!(be32(&b[0..4]), SIMPLE_MAGIC);
            assert_ne!(be32(&b[4..8]), 0, "oversized write refused");
            sender.join().unwrap();
            assert_eq!(
                c.read_simple(2, 0, 8).unwrap(),
                vec![0; 8],
                "nothing written"
            );
        }
        Err(_) => { /* closed: allowed */ }
    }
}

#[test]
fn bad_request_magic_closes() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    let mut r = Conn::request_bytes(0, CMD_READ, 1, 0, 8);
    r[0] ^= 0xff;
    c.write(&r);
    c.expect_closed();
}

#[test]
fn disc_delivers_outstanding_replies_then_closes() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", false, false);
    let mut batch = Vec::new();
    for i in 0..8u64 {
        batch.extend(Conn::request_bytes(0, CMD_WRITE, i, i * 4096, 4096));
        batch.extend(vec![1u8; 4096]);
    }
    for i in 8..16u64 {
        batch.extend(Conn::request_bytes(0, CMD_READ, i, 0, 4096));
    }
    batch.extend(Conn::request_bytes(0, CMD_DISC, 99, 0, 0));
    c.write(&batch);
    let mut seen = HashSet::new();
    for _ in 0..16 {
        let r = c.read_reply(|ck| if ck >= 8 { 4096 } else { 0 });
        assert_eq!(r.error(), 0);
        seen.insert(r.cookie());
    }
    assert_eq!(seen, (0..16).collect());
    c.expect_closed(); // and no reply to DISC
}

#[test]
fn hostile_client_does_not_affect_another_connection() {
    let srv = TestServer::start();
    let mut good = srv.connect();
    good.go("mem", true, true);
    let d = pattern(3, 65536);
    good.send_req(0, CMD_WRITE, 1, 0, 65536);
    good.write(&d);
    assert_eq!(good.chunks()[0].error(), 0);

    // A series of hostile connections, each failing in its own way.
    let mut h1 = srv.connect();
    h1.go("mem", false, false);
    h1.write(&[0xff; 100]); // garbage mid-stream
    h1.expect_closed();
    let mut h2 = srv.connect();
    h2.go("mem", false, false);
    h2.write(&Conn::request_bytes(0, CMD_WRITE, 1, 0, 1 << 20)[..20]); // truncated header
    drop(h2);
    let mut h3 = srv.connect();
    h3.send_flags();
    h3.send_opt(OPT_GO, &[1, 2, 3]);
    drop(h3); // vanished mid-handshake
    let mut h4 = srv.connect();
    h4.go("mem", false, false);
    h4.send_req(0, CMD_WRITE, 1, 0, 4096);
    h4.write(&[0xee; 100]); // short payload, then gone
    drop(h4);
    let mut h5 = srv.connect();
    h5.go("mem", false, false);
    for i in 0..64 {
        h5.send_req(0, CMD_READ, i, 0, 1 << 20); // never reads the replies
    }

    // The good connection still works and its data is intact.
    assert_eq!(good.read_structured(2, 0, 65536).unwrap(), d);
    assert_eq!(extents(&mut good, 3, 0, 0, 65536), vec![(65536, 0)]);
    // New clients are served too.
    let mut fresh = srv.connect();
    fresh.go("mem", false, false);
    assert_eq!(fresh.read_simple(1, 0, 65536).unwrap(), d);
    drop(h5);
}

#[test]
fn fua_accepted_on_every_command() {
    // SEND_FUA is advertised, so the server MUST accept FUA on any command (even ignoring it);
    // clients are known to set it on FLUSH.
    let srv = TestServer::start();
    let mut c = srv.connect();
    let (_, flags) = c.go("mem", false, false);
    assert_ne!(flags & (1 << 3), 0, "SEND_FUA");
    c.send_req(FLAG_FUA, CMD_FLUSH, 1, 0, 0);
    assert_eq!(c.simple(), (0, 1));
    c.send_req(FLAG_FUA, CMD_CACHE, 2, 0, 4096);
    assert_eq!(c.simple(), (0, 2));
    c.send_req(FLAG_FUA, CMD_READ, 3, 0, 16);
    assert_eq!(c.read_reply(|_| 16).error(), 0);
    c.send_req(FLAG_FUA, CMD_TRIM, 4, 0, 4096);
    assert_eq!(c.simple(), (0, 4));
    c.send_req(FLAG_FUA | FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 0, 4096);
    assert_eq!(c.simple(), (0, 5));
    let mut d = srv.connect();
    d.go("mem", true, true);
    let e = extents(&mut d, 1, FLAG_FUA | FLAG_REQ_ONE, 0, 4096);
    assert_eq!(e.len(), 1);
}

#[test]
fn block_status_zero_length_never_sends_empty_extent() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", true, true);
    c.send_req(0, CMD_BLOCK_STATUS, 1, 4096, 0);
    for ch in c.chunks() {
        if let Reply::Chunk {
            ty: REPLY_BLOCK_STATUS,
            payload,
            ..
        } = &ch
        {
            for d in payload[4..].chunks(8) {
                assert_ne!(be32(d), 0, "extent length MUST be nonzero");
            }
        }
    }
    assert_eq!(extents(&mut c, 2, 0, 0, 4096), vec![(4096, 3)]);
}

#[test]
fn export_name_keeps_negotiated_structured_replies() {
    // Once STRUCTURED_REPLY is acked the server MUST answer READ with structured replies,
    // also when the client then enters transmission with EXPORT_NAME (clients whose GO is
    // refused fall back to it with their earlier options in force).
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    let r = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("mem", &["base:allocation"]),
    );
    assert_eq!(r[0].reply, REP_META_CONTEXT);
    c.send_opt(OPT_EXPORT_NAME, b"mem");
    let r = c.read_n(10);
    assert_eq!(be64(&r[0..8]), 64 * MIB);
    assert_ne!(
        be16(&r[8..10]) & (1 << 7),
        0,
        "SEND_DF with structured replies"
    );
    c.send_req(0, CMD_WRITE, 1, 0, 4);
    c.write(b"abcd");
    assert_eq!(c.read_reply(|_| 0).error(), 0);
    assert_eq!(c.read_structured(2, 0, 4).unwrap(), b"abcd");
    assert_eq!(extents(&mut c, 3, FLAG_REQ_ONE, 0, 8192), vec![(4096, 0)]);
}

#[test]
fn meta_context_only_for_the_export_it_named() {
    let srv = TestServer::start();
    // Contexts selected for "ro", then GO "mem": BLOCK_STATUS is not negotiated.
    let mut c = srv.connect();
    c.send_flags();
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    let r = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("ro", &["base:allocation"]),
    );
    assert_eq!(r[0].reply, REP_META_CONTEXT);
    assert_eq!(
        c.opt(OPT_GO, &info_payload("mem", &[]))
            .last()
            .unwrap()
            .reply,
        REP_ACK
    );
    c.send_req(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(c.chunks().last().unwrap().error(), EINVAL);

    // A failed SET_META_CONTEXT replaces the earlier selection too.
    let mut d = srv.connect();
    d.send_flags();
    assert_eq!(d.opt(OPT_STRUCTURED_REPLY, &[])[0].reply, REP_ACK);
    let r = d.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("mem", &["base:allocation"]),
    );
    assert_eq!(r[0].reply, REP_META_CONTEXT);
    let r = d.opt(OPT_SET_META_CONTEXT, &[0, 0, 0, 9, b'x']);
    assert_eq!(r[0].reply, REP_ERR_INVALID);
    assert_eq!(
        d.opt(OPT_GO, &info_payload("mem", &[]))
            .last()
            .unwrap()
            .reply,
        REP_ACK
    );
    d.send_req(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(d.chunks().last().unwrap().error(), EINVAL);
}

#[test]
fn handshake_deadline_covers_the_whole_handshake() {
    // One deadline from accept: sending the client flags late must not restart the clock.
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(2000),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, MIB);
    let t = Instant::now();
    let mut c = srv.connect();
    std::thread::sleep(Duration::from_millis(1400));
    c.send_flags();
    c.expect_closed();
    let took = t.elapsed();
    // A clock restarted at the flags would close at 3.4 s.
    assert!(
        took < Duration::from_millis(2900),
        "closed after {took:?}, deadline 2 s"
    );
}

#[test]
fn bad_option_magic_closes() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let mut b = b"IHAVEOPX".to_vec();
    b.extend_from_slice(&OPT_LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    c.write(&b);
    c.expect_closed();
    // Truncated option header then EOF: the server just drops it; others are fine.
    let mut d = srv.connect();
    d.send_flags();
    d.write(&IHAVEOPT[..5]);
    drop(d);
    let mut e = srv.connect();
    e.go("mem", false, false);
}

#[test]
fn shutdown_ends_sessions_in_every_phase() {
    let mut srv = TestServer::start();
    // One idle in the handshake, one idle in transmission, one mid-request-stream.
    let mut hs = srv.connect();
    hs.send_flags();
    let mut idle = srv.connect();
    idle.go("mem", false, false);
    let mut busy = srv.connect();
    busy.go("mem", false, false);
    assert_eq!(busy.write_simple(1, 0, &[1; 4096]), 0);
    let took = srv
        .shutdown_within(Duration::from_secs(5))
        .expect("serve returns after shutdown, not after the handshake deadline");
    eprintln!("serve returned {took:?} after shutdown");
    hs.expect_closed();
    idle.expect_closed();
    busy.expect_closed();
}

#[test]
fn export_name_without_no_zeroes_sends_124_zero_bytes() {
    // nbd-client style: FIXED_NEWSTYLE only (no NO_ZEROES), straight to EXPORT_NAME.
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.write(&1u32.to_be_bytes());
    c.send_opt(OPT_EXPORT_NAME, b"ro");
    let r = c.read_n(10 + 124);
    assert_eq!(be64(&r[0..8]), MIB);
    assert_ne!(be16(&r[8..10]) & TF_READ_ONLY, 0);
    assert!(r[10..].iter().all(|b| *b == 0), "124 zero bytes");
    assert_eq!(c.read_simple(1, 512, 512).unwrap(), vec![0; 512]);
    // Non-fixed newstyle client (flags 0) and the empty (default) name are refused here
    // because two exports exist: the connection closes without size.
    let mut d = srv.connect();
    d.write(&0u32.to_be_bytes());
    d.send_opt(OPT_EXPORT_NAME, b"");
    d.expect_closed();
}

#[test]
fn default_export_name_with_a_single_export() {
    let (srv, _) = TestServer::start_mem(2 * MIB);
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(OPT_GO, &info_payload("", &[INFO_NAME]));
    assert_eq!(r.last().unwrap().reply, REP_ACK);
    let name = r.iter().find(|x| be16(&x.data) == INFO_NAME).unwrap();
    assert_eq!(
        &name.data[2..],
        b"mem",
        "canonical name of the default export"
    );
}

#[test]
fn read_only_export_block_size_follows_its_sector_size() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_flags();
    let r = c.opt(OPT_INFO, &info_payload("ro", &[INFO_BLOCK_SIZE]));
    let b = r.iter().find(|x| be16(&x.data) == INFO_BLOCK_SIZE).unwrap();
    assert_eq!(
        (be32(&b.data[2..]), be32(&b.data[6..]), be32(&b.data[10..])),
        (1, 512, 32 << 20)
    );
}

#[test]
fn multi_conn_writes_visible_on_other_connections_after_reply() {
    let srv = TestServer::start();
    let mut a = srv.connect();
    let (_, fa) = a.go("mem", false, false);
    let mut b = srv.connect();
    b.go("mem", true, false);
    assert_ne!(fa & TF_CAN_MULTI_CONN, 0);
    let d = pattern(9, 12_345);
    assert_eq!(a.write_simple(1, 777, &d), 0);
    b.send_req(0, CMD_FLUSH, 2, 0, 0);
    assert_eq!(b.chunks()[0].error(), 0);
    assert_eq!(b.read_structured(3, 777, 12_345).unwrap(), d);
}

#[test]
fn non_reading_clients_do_not_starve_other_connections() {
    // Each connection may have its replies stuck behind a client that does not read. That
    // must cost the server memory within the per-connection bounds, not shared worker
    // threads: ten such clients, then a well-behaved one must still be served promptly.
    let srv = TestServer::start();
    let mut hostile = Vec::new();
    for _ in 0..10 {
        let mut h = srv.connect();
        h.go("mem", false, false);
        let mut batch = Vec::new();
        for i in 0..200u64 {
            batch.extend(Conn::request_bytes(0, CMD_READ, i, 0, 65536));
        }
        h.write(&batch);
        hostile.push(h);
    }
    let mut good = srv.connect();
    good.go("mem", false, false);
    good.s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t = Instant::now();
    assert_eq!(good.write_simple(1, 0, &[4; 4096]), 0);
    assert_eq!(good.read_simple(2, 0, 4096).unwrap(), vec![4; 4096]);
    eprintln!("served beside 10 non-reading clients in {:?}", t.elapsed());
    drop(hostile);
}

/// Panics on any read at offset 4096 (a backend bug), otherwise a RAM disk.
struct PanickyBackend(cryptvol::server::MemBackend);

impl cryptvol::server::Backend for PanickyBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.0.preferred_block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        assert_ne!(offset, 4096, "injected backend bug");
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> std::io::Result<()> {
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, may_trim: bool, fua: bool) -> std::io::Result<()> {
        self.0.write_zeroes(o, l, may_trim, fua)
    }
    fn extents(&self, o: u64, l: u64) -> std::io::Result<Vec<cryptvol::server::Extent>> {
        self.0.extents(o, l)
    }
}

#[test]
fn backend_panic_becomes_eio_and_the_connection_goes_on() {
    use cryptvol::server::{MemBackend, StaticRegistry};
    let b = std::sync::Arc::new(PanickyBackend(MemBackend::new(MIB, 4096)));
    let reg = StaticRegistry::new().with("mem", b, false);
    let srv = TestServer::start_registry(ServerConfig::default(), reg);
    let mut c = srv.connect();
    c.go("mem", true, false);
    assert_eq!(c.read_structured(1, 4096, 512), Err(5), "EIO");
    assert_eq!(c.read_structured(2, 0, 512).unwrap(), vec![0; 512]);
    let mut d = srv.connect();
    d.go("mem", false, false);
    assert_eq!(d.read_simple(1, 4096, 512), Err(5));
    assert_eq!(d.read_simple(2, 8192, 512).unwrap(), vec![0; 512]);
}

#[test]
fn max_connections_queues_the_next_client_until_a_slot_frees() {
    let cfg = ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, MIB);
    let mut held: Vec<Conn> = (0..4)
        .map(|_| {
            let mut c = srv.connect();
            c.go("mem", false, false);
            c
        })
        .collect();
    // The fifth waits in the backlog: no greeting while all slots are taken.
    let mut fifth = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut g = [0u8; 18];
    let early = std::io::Read::read_exact(&mut fifth, &mut g);
    assert!(early.is_err(), "served beyond max_connections");
    // A client leaves (DISC): its slot goes to the fifth.
    let mut gone = held.pop().unwrap();
    gone.send_req(0, CMD_DISC, 0, 0, 0);
    gone.expect_closed();
    fifth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Read::read_exact(&mut fifth, &mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    let mut c = Conn { s: fifth };
    c.go("mem", false, false);
    assert_eq!(c.read_simple(1, 0, 8).unwrap(), vec![0; 8]);
    assert_eq!(held[0].read_simple(1, 0, 8).unwrap(), vec![0; 8]);
}

#[test]
fn structured_read_errors_are_never_simple_replies() {
    // "MUST NOT use a simple reply for NBD_CMD_READ (even for an early EINVAL)".
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.go("mem", true, false);
    for (i, (flags, off, len, want)) in [
        (1u16 << 12, 0u64, 512u32, EINVAL), // unknown flag
        (FLAG_REQ_ONE, 0, 512, EINVAL),     // flag of another command
        (0, 64 * MIB, 1, EINVAL),           // out of range
        (0, 1 << 63, 512, EINVAL),          // offset 2^63
    ]
    .into_iter()
    .enumerate()
    {
        c.send_req(flags, CMD_READ, i as u64, off, len);
        let ch = c.chunks();
        assert_eq!(ch.len(), 1);
        match &ch[0] {
            Reply::Chunk {
                flags, ty, payload, ..
            } => {
                assert_eq!(*ty, REPLY_ERROR);
                assert_ne!(flags & REPLY_FLAG_DONE, 0);
                assert_eq!(be32(payload), want);
                let msg_len = be16(&payload[4..]) as usize;
                assert_eq!(payload.len(), 6 + msg_len, "message length consistent");
            }
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(c.read_structured(9, 0, 4).unwrap(), vec![0; 4]);
}
