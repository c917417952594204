//! One NBD connection of the load generator: handshake, then one task that keeps `iodepth`
//! requests in flight and takes replies in any order.
//!
//! ```text
//!          ┌──────────── select! ────────────┐
//!   plan ─▶ queue ──writev (many requests)──▶ server ──replies──▶ read buffer ─▶ stats
//!    ▲       (slot = cookie)                                         │
//!    └─────────────────────── free slots ◀───────────────────────────┘
//! ```
//! Reading and writing wait in the same `select!`, so a server that blocks on sending read data
//! never deadlocks against us blocking on sending write data, and no request crosses a thread
//! or a channel (at queue depth 1 the path is: reply read, next request written).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::BenchError;
use super::uri::{NbdUri, Target};
use super::workload::{Mismatch, Op, Plan, check_pattern, fill_pattern};
use crate::nbd::client::{
    ClientError, Handshake, HandshakeOptions, Negotiated, ReplyHeader, RequestHeader,
    SIMPLE_REPLY_LEN, decode_reply_header,
};
use crate::nbd::consts::*;

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// An open connection after the handshake.
pub struct Conn {
    rd: Reader,
    wr: Writer,
    pub negotiated: Negotiated,
}

/// Connects and negotiates.
pub async fn connect(uri: &NbdUri) -> Result<Conn, BenchError> {
    let io = |e: std::io::Error| BenchError::Connect(e.to_string());
    let (mut rd, mut wr): (Reader, Writer) = match &uri.target {
        Target::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| BenchError::Connect(format!("{}: {e}", path.display())))?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        Target::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| BenchError::Connect(format!("{addr}: {e}")))?;
            s.set_nodelay(true).map_err(io)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    let mut hs = Handshake::new(HandshakeOptions {
        export_name: uri.export.clone(),
        structured_replies: false,
    });
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            wr.write_all(&out).await.map_err(io)?;
        }
        if let Some(negotiated) = hs.negotiated() {
            return Ok(Conn { rd, wr, negotiated });
        }
        let n = rd.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            return Err(BenchError::Connect(
                "server closed during the handshake".into(),
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
        let used = hs
            .receive(&buf)
            .map_err(|e| BenchError::Handshake(e.to_string()))?;
        buf.drain(..used);
    }
}

/// What a connection does, fixed before it starts.
pub struct Job {
    pub plan: Plan,
    /// Byte offset of block 0 of this connection's stripe.
    pub base: u64,
    /// Bytes from one block of the stripe to the next: `bs` for a contiguous stripe,
    /// `connections * bs` when the connections' blocks interleave.
    pub stride: u64,
    pub bs: usize,
    pub iodepth: usize,
    /// `Some(run_id)`: write the pattern, check reads, and read back every written block at the end.
    pub verify: Option<u32>,
    /// Number of blocks in the stripe (for the verify bookkeeping).
    pub blocks: u64,
    /// Requests issued before this instant (the ramp) are not measured.
    pub record_from: Instant,
    /// Filler for unverified writes (not zeros, so that no server can skip them).
    pub filler: Arc<Vec<u8>>,
}

/// Shared progress counters, read by the progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
}

/// What a connection measured.
pub struct ConnStats {
    pub read: Histogram<u64>,
    pub write: Histogram<u64>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    /// When the last main-phase reply arrived.
    pub main_end: Option<Instant>,
    pub verified_blocks: u64,
    pub unverified_reads: u64,
    pub mismatches: u64,
    pub first_mismatches: Vec<Mismatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Main,
    Verify,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    start: Instant,
    read: bool,
    offset: u64,
    /// For reads in verify mode: the generation expected, 0 when the block was never written.
    expect: u32,
    phase: Phase,
}

/// A request waiting to be (fully) written.
struct Queued {
    slot: usize,
    read: bool,
    header: [u8; 28],
}

/// Requests not yet on the wire; `head_done` bytes of the first one are already written.
#[derive(Default)]
struct OutQueue {
    items: VecDeque<Queued>,
    head_done: usize,
}

impl OutQueue {
    /// Up to 64 requests as I/O slices (headers and write payloads).
    fn slices<'a>(&'a self, payload: &dyn Fn(usize) -> &'a [u8]) -> Vec<IoSlice<'a>> {
        let mut iov = Vec::with_capacity(self.items.len().min(64) * 2);
        let mut skip = self.head_done;
        for q in self.items.iter().take(64) {
            let data: &[u8] = if q.read { &[] } else { payload(q.slot) };
            for part in [&q.header[..], data] {
                if skip >= part.len() {
                    skip -= part.len();
                } else {
                    iov.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                }
            }
        }
        iov
    }

    /// Drops what the last write took.
    fn advance(&mut self, mut n: usize, bs: usize) {
        while n > 0 {
            let front = self
                .items
                .front()
                .expect("written bytes belong to queued requests");
            let len = 28 + if front.read { 0 } else { bs };
            let left = len - self.head_done;
            if n >= left {
                n -= left;
                self.head_done = 0;
                self.items.pop_front();
            } else {
                self.head_done += n;
                n = 0;
            }
        }
    }
}

/// The issuing side: plan, phases and the verify bookkeeping.
struct Issuer {
    job: Job,
    phase: Phase,
    /// Generation last written per block (verify), and blocks with an I/O in flight.
    gens: Vec<u32>,
    busy: Vec<bool>,
    slot_block: Vec<Option<usize>>,
    /// Per-slot payload buffers (verify); unverified writes all send `job.filler`.
    payloads: Vec<Vec<u8>>,
    verify_next: usize,
}

impl Issuer {
    fn new(job: Job) -> Self {
        let verifying = job.verify.is_some();
        let blocks = if verifying { job.blocks as usize } else { 0 };
        let slots = if verifying { job.iodepth } else { 0 };
        Issuer {
            phase: Phase::Main,
            gens: vec![0; blocks],
            busy: vec![false; blocks],
            slot_block: vec![None; job.iodepth],
            payloads: (0..slots).map(|_| vec![0u8; job.bs]).collect(),
            verify_next: 0,
            job,
        }
    }

    fn payload(&self, slot: usize) -> &[u8] {
        if self.job.verify.is_some() {
            &self.payloads[slot]
        } else {
            &self.job.filler
        }
    }

    /// A slot came back: its block may be used again.
    fn release(&mut self, slot: usize) {
        if let Some(b) = self.slot_block[slot].take() {
            self.busy[b] = false;
        }
    }

    /// Queues requests into free slots while the plan has work.
    fn fill(&mut self, free: &mut Vec<usize>, slots: &mut [Slot], out: &mut OutQueue) {
        let verifying = self.job.verify.is_some();
        let now = Instant::now();
        while let Some(&s) = free.last() {
            let op = match self.phase {
                Phase::Main => {
                    let busy = &self.busy;
                    self.job.plan.next(|b| verifying && busy[b as usize])
                }
                Phase::Verify => {
                    while self.verify_next < self.gens.len() && self.gens[self.verify_next] == 0 {
                        self.verify_next += 1;
                    }
                    (self.verify_next < self.gens.len()).then(|| {
                        self.verify_next += 1;
                        Op {
                            read: true,
                            block: (self.verify_next - 1) as u64,
                        }
                    })
                }
            };
            let Some(op) = op else { break };
            free.pop();
            let offset = self.job.base + op.block * self.job.stride;
            let mut expect = 0;
            if let Some(run_id) = self.job.verify {
                let b = op.block as usize;
                self.busy[b] = true;
                self.slot_block[s] = Some(b);
                if op.read {
                    expect = self.gens[b];
                } else {
                    self.gens[b] = self.gens[b].wrapping_add(1).max(1);
                    fill_pattern(&mut self.payloads[s], offset, run_id, self.gens[b]);
                }
            }
            slots[s] = Slot {
                start: now,
                read: op.read,
                offset,
                expect,
                phase: self.phase,
            };
            let header = RequestHeader {
                flags: 0,
                command: if op.read { NBD_CMD_READ } else { NBD_CMD_WRITE },
                cookie: s as u64,
                offset,
                length: self.job.bs as u32,
            }
            .encode();
            out.items.push_back(Queued {
                slot: s,
                read: op.read,
                header,
            });
        }
    }
}

enum Event {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
}

/// Runs the job to completion on an open connection.
pub async fn run(conn: Conn, job: Job, progress: Arc<Progress>) -> Result<ConnStats, BenchError> {
    let io = |e: std::io::Error| BenchError::Io(e.to_string());
    let Conn { mut rd, mut wr, .. } = conn;
    let (bs, depth, verify, from) = (job.bs, job.iodepth, job.verify, job.record_from);
    let mut issuer = Issuer::new(job);
    let now = Instant::now();
    let slot0 = Slot {
        start: now,
        read: true,
        offset: 0,
        expect: 0,
        phase: Phase::Main,
    };
    let mut slots = vec![slot0; depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut out = OutQueue::default();
    let mut st = ConnStats {
        read: new_histogram(),
        write: new_histogram(),
        read_bytes: 0,
        write_bytes: 0,
        errors: 0,
        main_end: None,
        verified_blocks: 0,
        unverified_reads: 0,
        mismatches: 0,
        first_mismatches: Vec::new(),
    };
    let chunk = (bs + SIMPLE_REPLY_LEN).max(256 * 1024);
    let mut buf = BytesMut::with_capacity(2 * chunk);
    loop {
        issuer.fill(&mut free, &mut slots, &mut out);
        if free.len() == depth {
            // Nothing queued, nothing in flight: this phase is over.
            if issuer.phase == Phase::Main && verify.is_some() {
                issuer.phase = Phase::Verify;
                continue;
            }
            break;
        }
        if buf.capacity() - buf.len() < chunk / 2 {
            buf.reserve(chunk);
        }
        let event = {
            let iov = out.slices(&|s| issuer.payload(s));
            tokio::select! {
                r = rd.read_buf(&mut buf) => Event::Read(r),
                w = wr.write_vectored(&iov), if !iov.is_empty() => Event::Wrote(w),
            }
        };
        match event {
            Event::Wrote(w) => out.advance(w.map_err(io)?, bs),
            Event::Read(Ok(0)) => {
                return Err(BenchError::Io("server closed the connection".into()));
            }
            Event::Read(Err(e)) => return Err(io(e)),
            Event::Read(Ok(_)) => {
                while let Some(s) =
                    take_reply(&mut buf, &slots, bs, verify, from, &mut st, &progress)?
                {
                    issuer.release(s);
                    free.push(s);
                }
            }
        }
    }
    let disc = RequestHeader {
        flags: 0,
        command: NBD_CMD_DISC,
        cookie: u64::MAX,
        offset: 0,
        length: 0,
    };
    // The server may already be gone; the measurement is complete either way.
    let _ = wr.write_all(&disc.encode()).await;
    let _ = wr.shutdown().await;
    Ok(st)
}

fn new_histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Takes one complete reply (header and read data) off the front of `buf`, accounts for it and
/// returns its slot; `None` when the buffer holds no complete reply yet.
fn take_reply(
    buf: &mut BytesMut,
    slots: &[Slot],
    bs: usize,
    verify: Option<u32>,
    record_from: Instant,
    st: &mut ConnStats,
    progress: &Progress,
) -> Result<Option<usize>, BenchError> {
    let (hlen, header) = match decode_reply_header(buf) {
        Ok(x) => x,
        Err(ClientError::Incomplete) => return Ok(None),
        Err(e) => return Err(BenchError::Protocol(e.to_string())),
    };
    let ReplyHeader::Simple { error, cookie } = header else {
        return Err(BenchError::Protocol(
            "structured reply not negotiated".into(),
        ));
    };
    let s = cookie as usize;
    let slot = *slots
        .get(s)
        .ok_or_else(|| BenchError::Protocol(format!("reply with unknown cookie {cookie}")))?;
    let payload = if slot.read && error == 0 { bs } else { 0 };
    if buf.len() < hlen + payload {
        buf.reserve(hlen + payload - buf.len());
        return Ok(None);
    }
    let now = Instant::now();
    if error != 0 {
        st.errors += 1;
    } else if let (true, Some(run_id)) = (slot.read, verify) {
        let data = &buf[hlen..hlen + payload];
        if slot.expect == 0 {
            st.unverified_reads += 1;
        } else if let Some(m) = check_pattern(data, slot.offset, run_id, slot.expect) {
            st.mismatches += 1;
            if st.first_mismatches.len() < 5 {
                st.first_mismatches.push(m);
            }
        } else {
            st.verified_blocks += 1;
        }
    }
    buf.advance(hlen + payload);
    if slot.phase == Phase::Main && slot.start >= record_from {
        let ns = now.saturating_duration_since(slot.start).as_nanos() as u64;
        if slot.read {
            st.read.saturating_record(ns.max(1));
            st.read_bytes += bs as u64;
        } else {
            st.write.saturating_record(ns.max(1));
            st.write_bytes += bs as u64;
        }
        st.main_end = Some(now);
        progress.ops.fetch_add(1, Ordering::Relaxed);
        progress.bytes.fetch_add(bs as u64, Ordering::Relaxed);
    }
    Ok(Some(s))
}
