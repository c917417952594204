//! Large READs on a backend whose data is never in memory (every `try_read` declines, as on
//! a disk with a cold page cache): whether a READ got one of the process's CPU slots or was to
//! be served on the connection thread (`src/server/threaded.rs`), it tries the page cache
//! once, then reads on the blocking pool with the real data; and large WRITEs pipelined past
//! the slots land whole; small pipelined READs the page cache declines are answered with the
//! real data off the connection. Raw sockets on the threaded transmission path.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptvol::server::{Backend, Extent, MemBackend, ServerConfig, StaticRegistry};
use support::*;

/// Every `try_read` declines (and scribbles: that must never reach the client).
struct Cold {
    inner: MemBackend,
    declined: AtomicU64,
}

impl Backend for Cold {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.inner.preferred_block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn try_read(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        buf.fill(0xEE);
        self.declined.fetch_add(1, Ordering::Relaxed);
        Ok(false)
    }
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> std::io::Result<()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, may_trim: bool, fua: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l, may_trim, fua)
    }
    fn extents(&self, o: u64, l: u64) -> std::io::Result<Vec<Extent>> {
        self.inner.extents(o, l)
    }
}

#[test]
fn cold_large_reads_past_the_cpu_slots_read_the_real_data_once_tried() {
    const N: u64 = 24;
    const LEN: usize = 256 << 10;
    let cold = std::sync::Arc::new(Cold {
        inner: MemBackend::new(N * LEN as u64, 4096),
        declined: AtomicU64::new(0),
    });
    let reg = StaticRegistry::new().with("cold", cold.clone(), false);
    let srv = TestServer::start_registry(ServerConfig::default(), reg);
    let mut c = srv.connect();
    c.go("cold", false, false);
    let data: Vec<u8> = (0..N as usize * LEN)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1])
        .collect();
    // WRITEs pipelined, more than there are CPU slots: some on the pool, some served on the
    // connection thread.
    for i in 0..N {
        let at = i as usize * LEN;
        c.send_req(0, CMD_WRITE, i, at as u64, LEN as u32);
        c.write(&data[at..at + LEN]);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        assert!(seen.insert(cookie));
    }
    // READs pipelined the same way, every one declined by the page cache.
    for i in 0..N {
        c.send_req(0, CMD_READ, 100 + i, i * LEN as u64, LEN as u32);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let Reply::Simple {
            error,
            cookie,
            data: got,
        } = c.read_reply(|_| LEN)
        else {
            panic!("simple reply expected")
        };
        assert_eq!(error, 0);
        let i = (cookie - 100) as usize;
        assert!(
            got == data[i * LEN..(i + 1) * LEN],
            "READ {i}: not the data written"
        );
        assert!(seen.insert(cookie));
    }
    assert_eq!(
        cold.declined.load(Ordering::Relaxed),
        N,
        "each large READ asked the page cache exactly once"
    );
}

#[test]
fn small_reads_that_would_wait_are_served_off_the_connection() {
    let cold = std::sync::Arc::new(Cold {
        inner: MemBackend::new(MIB, 512),
        declined: AtomicU64::new(0),
    });
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    cold.write(4096, &mut data.clone(), false).unwrap();
    let reg = StaticRegistry::new().with("cold", cold.clone(), false);
    let srv = TestServer::start_registry(ServerConfig::default(), reg);
    let mut c = srv.connect();
    c.go("cold", false, false);
    // Pipelined small reads (inline candidates), all declined by try_read, all answered
    // with the real data through the waiting read.
    for i in 0..16u64 {
        c.send_req(0, CMD_READ, i, 4096 + i * 512, 512);
    }
    let mut seen = HashSet::new();
    for _ in 0..16 {
        let Reply::Simple {
            error,
            cookie,
            data: got,
        } = c.read_reply(|_| 512)
        else {
            panic!("simple reply expected")
        };
        assert_eq!(error, 0);
        let i = cookie as usize;
        assert_eq!(got, data[i * 512..(i + 1) * 512], "read {i}");
        assert!(seen.insert(cookie));
    }
    assert_eq!(
        cold.declined.load(Ordering::Relaxed),
        16,
        "every small read asked try_read first"
    );
}
