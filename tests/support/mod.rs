//! Shared helpers for the NBD tests: an in-process server on a temp Unix socket (its own tokio
//! runtime), and a tiny blocking raw-socket client that writes the wire bytes by hand.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cryptvol::server::{self, Listener, MemBackend, ServerConfig, StaticRegistry};

pub const MIB: u64 = 1 << 20;

// Wire constants, written out here so the tests do not trust the codec under test.
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 2;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_NONE: u16 = 0;
pub const REPLY_OFFSET_DATA: u16 = 1;
pub const REPLY_OFFSET_HOLE: u16 = 2;
pub const REPLY_BLOCK_STATUS: u16 = 5;
pub const REPLY_ERROR: u16 = (1 << 15) | 1;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// An in-process NBD server on a temp Unix socket; stopped when dropped.
pub struct TestServer {
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
    shutdown: tokio::sync::watch::Sender<bool>,
    rt: Option<tokio::runtime::Runtime>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Exports "mem" (64 MiB, writable) and "ro" (1 MiB, read-only).
    pub fn start() -> TestServer {
        TestServer::start_with(ServerConfig::default(), 64 * MIB)
    }

    pub fn start_with(cfg: ServerConfig, size: u64) -> TestServer {
        let reg = StaticRegistry::new()
            .with("mem", Arc::new(MemBackend::new(size, 4096)), false)
            .with("ro", Arc::new(MemBackend::new(MIB, 512)), true);
        TestServer::start_registry(cfg, reg)
    }

    /// One writable export "mem" of `size` bytes; the backend is returned for direct checks.
    pub fn start_mem(size: u64) -> (TestServer, Arc<MemBackend>) {
        let b = Arc::new(MemBackend::new(size, 4096));
        let reg = StaticRegistry::new().with("mem", b.clone(), false);
        (TestServer::start_registry(ServerConfig::default(), reg), b)
    }

    pub fn start_registry(cfg: ServerConfig, reg: StaticRegistry) -> TestServer {
        TestServer::start_listening(cfg, reg, false).0
    }

    /// Also listens on TCP 127.0.0.1 (an ephemeral port, returned).
    pub fn start_tcp(size: u64) -> (TestServer, std::net::SocketAddr) {
        let reg = StaticRegistry::new().with("mem", Arc::new(MemBackend::new(size, 4096)), false);
        let (s, a) = TestServer::start_listening(ServerConfig::default(), reg, true);
        (s, a.expect("tcp address"))
    }

    fn start_listening(
        mut cfg: ServerConfig,
        reg: StaticRegistry,
        tcp: bool,
    ) -> (TestServer, Option<std::net::SocketAddr>) {
        // `.ci/run` runs the protocol and hostile-client tiers a second time on the async
        // transmission path (the one TLS connections take) with this set.
        if std::env::var("CRYPTVOL_TEST_TRANSMISSION").as_deref() == Ok("async") {
            cfg.threaded_transmission = false;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // Bound before `serve` runs: connections queue in the backlog, so the socket is ready
        // as soon as this returns (no sleeping).
        let mut listeners = Vec::new();
        let mut tcp_addr = None;
        {
            let _g = rt.enter();
            listeners.push(Listener::Unix(
                tokio::net::UnixListener::bind(&sock).expect("bind"),
            ));
            if tcp {
                let std_l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
                std_l.set_nonblocking(true).unwrap();
                tcp_addr = Some(std_l.local_addr().unwrap());
                listeners.push(Listener::Tcp(
                    tokio::net::TcpListener::from_std(std_l).unwrap(),
                ));
            }
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        let served = rt.spawn(server::serve(listeners, Arc::new(reg), cfg, rx));
        let srv = TestServer {
            sock,
            dir,
            shutdown: tx,
            rt: Some(rt),
            served: Some(served),
        };
        (srv, tcp_addr)
    }

    /// A raw connection with the greeting already read and checked.
    pub fn connect(&self) -> Conn {
        Conn::connect(&self.sock)
    }

    /// The NBD URI of an export, for libnbd-based clients.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl TestServer {
    /// Signals shutdown and waits (up to `limit`) for `serve` to return; returns how long
    /// it took, or None if it had not returned by then.
    pub fn shutdown_within(&mut self, limit: Duration) -> Option<Duration> {
        let t = std::time::Instant::now();
        let _ = self.shutdown.send(true);
        let handle = self.served.take()?;
        let rt = self.rt.as_ref()?;
        rt.block_on(async { tokio::time::timeout(limit, handle).await })
            .ok()
            .map(|r| {
                r.expect("serve task").expect("serve result");
                t.elapsed()
            })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One raw client connection (blocking, with timeouts so a bug fails instead of hanging).
pub struct Conn {
    pub s: UnixStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

/// A reply in the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
    /// The error of a simple reply or of an ERROR chunk (0 otherwise).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { ty, payload, .. } if ty & 0x8000 != 0 => be32(&payload[0..4]),
            Reply::Chunk { .. } => 0,
        }
    }
    pub fn done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// GO / INFO payload: name, then the info requests.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// SET/LIST_META_CONTEXT payload.
pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

impl Conn {
    /// A raw connection to any NBD Unix socket, with the greeting already read and checked.
    pub fn connect(sock: &std::path::Path) -> Conn {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut c = Conn { s };
        let g = c.read_n(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        c
    }

    pub fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write to server");
    }

    /// Writes bytes the server may refuse to read: it is allowed to hang up first (EPIPE or
    /// ECONNRESET); any other error fails the test. Pair with `expect_closed`.
    pub fn write_may_close(&mut self, b: &[u8]) {
        match self.s.write_all(b) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
            Err(e) => panic!("write to server: {e}"),
        }
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    /// Client flags: FIXED_NEWSTYLE | NO_ZEROES.
    pub fn send_flags(&mut self) {
        self.write(&3u32.to_be_bytes());
    }

    pub fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(IHAVEOPT);
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write(&b);
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..20]) as usize;
        assert!(len < 1 << 20, "absurd option reply length {len}");
        OptReply {
            option: be32(&h[8..12]),
            reply: be32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Sends an option and reads replies up to and including the final one (ACK or error).
    pub fn opt(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(option, data);
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.option, option, "reply to the option asked");
            let last = r.reply == REP_ACK || r.reply & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Full handshake into transmission; returns (size, transmission flags).
    pub fn go(&mut self, export: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.send_flags();
        if structured {
            let r = self.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].reply, REP_ACK);
        }
        if meta {
            let r = self.opt(
                OPT_SET_META_CONTEXT,
                &meta_payload(export, &["base:allocation"]),
            );
            assert_eq!(r.len(), 2, "one context and ACK: {r:?}");
            assert_eq!(r[0].reply, REP_META_CONTEXT);
        }
        let r = self.opt(OPT_GO, &info_payload(export, &[]));
        let last = r.last().unwrap();
        assert_eq!(last.reply, REP_ACK, "GO acked: {r:?}");
        let e = r
            .iter()
            .find(|r| r.reply == REP_INFO && be16(&r.data) == INFO_EXPORT)
            .expect("INFO_EXPORT");
        (be64(&e.data[2..10]), be16(&e.data[10..12]))
    }

    pub fn request_bytes(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    pub fn send_req(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.write(&Conn::request_bytes(flags, cmd, cookie, offset, len));
    }

    /// Reads one reply. A simple reply carries `read_len(cookie)` bytes of data when its error
    /// is zero (the client must know which cookies were reads).
    pub fn read_reply(&mut self, read_len: impl Fn(u64) -> usize) -> Reply {
        let m = be32(&self.read_n(4));
        match m {
            SIMPLE_MAGIC => {
                let h = self.read_n(12);
                let (error, cookie) = (be32(&h[0..4]), be64(&h[4..12]));
                let data = if error == 0 {
                    self.read_n(read_len(cookie))
                } else {
                    Vec::new()
                };
                Reply::Simple {
                    error,
                    cookie,
                    data,
                }
            }
            STRUCTURED_MAGIC => {
                let h = self.read_n(16);
                let len = be32(&h[12..16]) as usize;
                assert!(len <= 33 << 20, "absurd chunk length {len}");
                Reply::Chunk {
                    flags: be16(&h[0..2]),
                    ty: be16(&h[2..4]),
                    cookie: be64(&h[4..12]),
                    payload: self.read_n(len),
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// Simple reply of a non-read command.
    pub fn simple(&mut self) -> (u32, u64) {
        match self.read_reply(|_| 0) {
            Reply::Simple { error, cookie, .. } => (error, cookie),
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }

    /// Every chunk of one structured reply, up to DONE.
    pub fn chunks(&mut self) -> Vec<Reply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_reply(|_| 0);
            assert!(matches!(r, Reply::Chunk { .. }), "structured: {r:?}");
            let done = r.done();
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Simple-mode write; returns the error.
    pub fn write_simple(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send_req(0, CMD_WRITE, cookie, offset, data.len() as u32);
        self.write(data);
        let (e, c) = self.simple();
        assert_eq!(c, cookie);
        e
    }

    /// Simple-mode read: Ok(data) or Err(errno).
    pub fn read_simple(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_req(0, CMD_READ, cookie, offset, len);
        match self.read_reply(|_| len as usize) {
            Reply::Simple {
                error: 0,
                cookie: c,
                data,
            } => {
                assert_eq!(c, cookie);
                Ok(data)
            }
            Reply::Simple { error, .. } => Err(error),
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }

    /// Structured read: reassembles OFFSET_DATA / OFFSET_HOLE chunks (checking they are in
    /// range, non-overlapping and covering) or returns the error.
    pub fn read_structured(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_req(0, CMD_READ, cookie, offset, len);
        let chunks = self.chunks();
        let mut buf = vec![0u8; len as usize];
        let mut seen = vec![false; len as usize];
        for c in &chunks {
            let Reply::Chunk {
                ty,
                cookie: ck,
                payload,
                ..
            } = c
            else {
                unreachable!()
            };
            assert_eq!(*ck, cookie);
            let (o, data): (u64, Option<&[u8]>) = match *ty {
                REPLY_OFFSET_DATA => (be64(payload), Some(&payload[8..])),
                REPLY_OFFSET_HOLE => (be64(payload), None),
                REPLY_NONE => continue,
                t if t & 0x8000 != 0 => return Err(be32(payload)),
                t => panic!("unexpected chunk type {t}"),
            };
            let n = data.map_or_else(|| be32(&payload[8..12]) as usize, <[u8]>::len);
            assert!(
                o >= offset && o + n as u64 <= offset + u64::from(len),
                "chunk in range"
            );
            let start = (o - offset) as usize;
            for s in &mut seen[start..start + n] {
                assert!(!*s, "chunks overlap");
                *s = true;
            }
            if let Some(d) = data {
                buf[start..start + n].copy_from_slice(d);
            }
        }
        assert!(seen.iter().all(|s| *s), "chunks cover the read");
        Ok(buf)
    }

    /// Asserts the server closes the connection (EOF or reset) without sending anything more.
    pub fn expect_closed(&mut self) {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("expected close, got {n} bytes: {:?}", &b[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected close, got {e}"),
        }
    }
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

impl Conn {
    /// Handshake into transmission with GO asking for `NBD_INFO_BLOCK_SIZE` (a client that
    /// then keeps to the advertised maximum); returns (minimum, preferred, maximum).
    pub fn go_block_size(&mut self, export: &str, structured: bool) -> (u32, u32, u32) {
        self.send_flags();
        if structured {
            let r = self.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].reply, REP_ACK);
        }
        let r = self.opt(OPT_GO, &info_payload(export, &[INFO_BLOCK_SIZE]));
        assert_eq!(r.last().unwrap().reply, REP_ACK, "GO acked: {r:?}");
        let b = r
            .iter()
            .find(|r| r.reply == REP_INFO && be16(&r.data) == INFO_BLOCK_SIZE)
            .expect("INFO_BLOCK_SIZE");
        (
            be32(&b.data[2..6]),
            be32(&b.data[6..10]),
            be32(&b.data[10..14]),
        )
    }
}

/// Whether `bin` is on PATH; when it is not, prints SKIP (or panics under CI).
pub fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{bin} is not installed (CI installs it)"
        );
        eprintln!("SKIP: {bin} is not installed");
    }
    found
}

/// Runs a command under `timeout`, returning its output.
pub fn run(secs: u32, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    if out.status.code() == Some(124) {
        panic!("{args:?} timed out after {secs} s");
    }
    out
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(secs: u32, args: &[&str]) -> String {
    let out = run(secs, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
