//! Hostile byte streams: valid sessions with random mutations (flipped bytes, truncation,
//! inserted junk, huge lengths) thrown at the server. Every connection must end in a reply or
//! a close, never a panic, and the server must keep serving. Its own test binary so the
//! panic hook counts only the server's panics.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn opt(b: &mut Vec<u8>, option: u32, data: &[u8]) {
    b.extend_from_slice(IHAVEOPT);
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
}

/// A plausible client session: flags, some options, GO, some requests, DISC.
fn session(r: &mut Rng) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    let structured = r.below(2) == 0;
    if structured {
        opt(&mut b, OPT_STRUCTURED_REPLY, &[]);
        opt(
            &mut b,
            OPT_SET_META_CONTEXT,
            &meta_payload("mem", &["base:allocation"]),
        );
    }
    if r.below(3) == 0 {
        opt(&mut b, OPT_LIST, &[]);
        opt(&mut b, OPT_INFO, &info_payload("mem", &[1, 2, 3]));
        opt(&mut b, OPT_EXTENDED_HEADERS, &[]);
    }
    opt(&mut b, OPT_GO, &info_payload("mem", &[3]));
    for i in 0..r.below(12) {
        let cmd = [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_CACHE,
            CMD_WRITE_ZEROES,
            CMD_BLOCK_STATUS,
        ][r.below(7)];
        let len = [0u32, 1, 512, 4096, 65536][r.below(5)];
        let off = [0u64, 4095, MIB - 4096][r.below(3)];
        b.extend(Conn::request_bytes(0, cmd, i as u64, off, len));
        if cmd == CMD_WRITE {
            b.extend(vec![0x5a; len as usize]);
        }
    }
    b.extend(Conn::request_bytes(0, CMD_DISC, 99, 0, 0));
    b
}

fn mutate(r: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + r.below(4) {
        match r.below(6) {
            0 | 1 => {
                let i = r.below(b.len());
                b[i] ^= 1 << r.below(8);
            }
            2 => {
                let i = r.below(b.len());
                b[i] = [0x00, 0xff, 0x7f, 0x80][r.below(4)];
            }
            3 => {
                let n = r.below(b.len());
                b.truncate(n);
                if b.is_empty() {
                    b.push(0);
                }
            }
            4 => {
                let i = r.below(b.len());
                let junk: Vec<u8> = (0..r.below(40)).map(|_| r.next() as u8).collect();
                b.splice(i..i, junk);
            }
            _ => {
                // A huge big-endian length somewhere.
                let i = r.below(b.len().saturating_sub(4).max(1));
                let end = (i + 4).min(b.len());
                let v = [0xffff_ffffu32, 0x8000_0000, 0x0200_0001][r.below(3)].to_be_bytes();
                b[i..end].copy_from_slice(&v[..end - i]);
            }
        }
    }
    b
}

#[test]
fn mutated_sessions_never_panic_or_wedge_the_server() {
    let panics = Arc::new(AtomicUsize::new(0));
    {
        let panics = panics.clone();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panics.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    }
    let srv = TestServer::start_with(
        cryptvol::server::ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        MIB,
    );
    let rounds: u64 = std::env::var("CRYPTVOL_GARBAGE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let sock = srv.sock.clone();
            std::thread::spawn(move || {
                let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t + 1) * 0x1234_5678_9abc));
                for _ in 0..rounds / 4 {
                    let s = session(&mut r);
                    let s = mutate(&mut r, s);
                    let mut c = UnixStream::connect(&sock).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                    // The server may close early; a failed write is fine.
                    let _ = c.write_all(&s);
                    let _ = c.shutdown(Shutdown::Write);
                    let mut sink = Vec::new();
                    // Ends with EOF (or reset), never with a timeout: the server must not
                    // wait for more than the client sent once it has half-closed.
                    if let Err(e) = c.read_to_end(&mut sink) {
                        assert_ne!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock,
                            "server neither replied nor closed"
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(panics.load(Ordering::SeqCst), 0, "the server panicked");
    // Still serving.
    let mut c = srv.connect();
    c.go("mem", true, true);
    c.send_req(0, CMD_WRITE, 1, 0, 4);
    c.write(b"okay");
    assert_eq!(c.chunks()[0].error(), 0);
    assert_eq!(c.read_structured(2, 0, 4).unwrap(), b"okay");
}
