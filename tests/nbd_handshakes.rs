//! The cap on connections still in the handshake (`max_handshakes`), on the in-process server:
//! clients that connect and never negotiate hold at most that many slots, each until the
//! handshake deadline; established sessions keep being served meanwhile, and the next client
//! is greeted as soon as a slot frees.

mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cryptvol::server::ServerConfig;
use support::{Conn, MIB, TestServer};

/// Reads the 18-byte greeting within `wait`, if it comes.
fn greeting_within(s: &mut UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut g = [0u8; 18];
    match s.read_exact(&mut g) {
        Ok(()) => {
            assert_eq!(&g[..8], b"NBDMAGIC");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn stalled_handshakes_hold_their_slots_only_and_only_until_the_deadline() {
    let cfg = ServerConfig {
        max_handshakes: 2,
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, MIB);
    // Established sessions, more than the handshake cap: they do not count against it.
    let mut established: Vec<Conn> = (0..3)
        .map(|_| {
            let mut c = srv.connect();
            c.go("mem", false, false);
            c
        })
        .collect();
    // Two clients that are greeted and then say nothing take both handshake slots.
    let stalled: Vec<Conn> = (0..2).map(|_| srv.connect()).collect();
    // The next one waits in the backlog: not greeted while the slots are taken ...
    let mut next = UnixStream::connect(&srv.sock).unwrap();
    assert!(
        !greeting_within(&mut next, Duration::from_millis(300)),
        "greeted beyond max_handshakes"
    );
    // ... while every established session is served.
    for (i, c) in established.iter_mut().enumerate() {
        assert_eq!(c.write_simple(i as u64, 4096 * i as u64, &[7; 4096]), 0);
        assert_eq!(c.read_simple(9, 4096 * i as u64, 4096).unwrap(), [7; 4096]);
    }
    // The stalled ones are dropped at the handshake deadline; the waiting client is greeted
    // then (the 10 s wait is a hang guard, the deadline is 1 s) and served.
    assert!(greeting_within(&mut next, Duration::from_secs(10)));
    let mut c = Conn { s: next };
    c.s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.go("mem", false, false);
    assert_eq!(c.read_simple(1, 0, 8).unwrap(), [7; 8]);
    for mut s in stalled {
        s.expect_closed();
    }
}

#[test]
fn a_flood_on_tcp_does_not_hold_up_unix_socket_clients() {
    // Default limits: 64 handshakes per listener, 10 s to finish one.
    let (srv, addr) = TestServer::start_tcp(MIB);
    let cap = ServerConfig::default().max_handshakes;
    let mut flood: Vec<std::net::TcpStream> = (0..cap)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
    }
    // The TCP listener is full ...
    let mut next = std::net::TcpStream::connect(addr).unwrap();
    next.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut g = [0u8; 18];
    assert!(
        next.read_exact(&mut g).is_err(),
        "greeted beyond max_handshakes"
    );
    // ... and a Unix-socket client is greeted well before the flood's deadline (a shared cap
    // would keep it waiting those 10 s), and served.
    let s = UnixStream::connect(&srv.sock).unwrap();
    assert!(greeting_within(
        &mut s.try_clone().unwrap(),
        Duration::from_secs(5)
    ));
    let mut c = Conn { s };
    c.s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.go("mem", false, false);
    assert_eq!(c.read_simple(1, 0, 8).unwrap(), [0; 8]);
}
