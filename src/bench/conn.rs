//! One NBD connection of the load generator: handshake, then a writer task that keeps `iodepth`
//! requests in flight and a reader task that takes replies in any order.
//!
//! ```text
//!   writer ──requests (one vectored write per batch)──▶ server ──replies──▶ reader
//!     ▲                                                                        │
//!     └──────────────── free slots (cookie = slot index) ◀─────────────────────┘
//! ```
//! The reader and writer are separate tasks so that a server which blocks on sending read data
//! never deadlocks against us blocking on sending write data.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::BenchError;
use super::uri::{NbdUri, Target};
use super::workload::{Mismatch, Op, Plan, check_pattern, fill_pattern};
use crate::nbd::client::{
    Handshake, HandshakeOptions, Negotiated, ReplyHeader, RequestHeader, SIMPLE_REPLY_LEN,
    decode_reply_header,
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

/// Runs the job to completion on an open connection.
pub async fn run(conn: Conn, job: Job, progress: Arc<Progress>) -> Result<ConnStats, BenchError> {
    let now = Instant::now();
    let slot0 = Slot {
        start: now,
        read: true,
        offset: 0,
        expect: 0,
        phase: Phase::Main,
    };
    let slots = Arc::new(Mutex::new(vec![slot0; job.iodepth]));
    let (free_tx, free_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let reader = tokio::spawn(reader(
        conn.rd,
        slots.clone(),
        free_tx,
        stop_rx,
        job.bs,
        job.verify,
        progress,
    ));
    let written = writer(conn.wr, job, slots, free_rx, stop_tx).await;
    let stats = reader.await.map_err(|e| BenchError::Io(e.to_string()))?;
    // A reader error (the server closed) explains a writer error better than the writer's own.
    let stats = stats?;
    written?;
    Ok(stats)
}

async fn writer(
    mut wr: Writer,
    mut job: Job,
    slots: Arc<Mutex<Vec<Slot>>>,
    mut free_rx: mpsc::UnboundedReceiver<usize>,
    stop: oneshot::Sender<()>,
) -> Result<(), BenchError> {
    let io = |e: std::io::Error| BenchError::Io(e.to_string());
    let depth = job.iodepth;
    let verifying = job.verify.is_some();
    // Verify bookkeeping: generation last written per block, and blocks with an I/O in flight.
    let mut gens = vec![0u32; if verifying { job.blocks as usize } else { 0 }];
    let mut busy = vec![false; gens.len()];
    let mut slot_block = vec![None::<usize>; depth];
    let mut payloads: Vec<Vec<u8>> = (0..if verifying { depth } else { 0 })
        .map(|_| vec![0u8; job.bs])
        .collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut phase = Phase::Main;
    let mut verify_next = 0usize;
    let mut headers: Vec<u8> = Vec::with_capacity(depth * 28);
    let mut batch: Vec<(usize, bool)> = Vec::with_capacity(depth);

    loop {
        // Take back every slot the reader has finished with.
        while let Ok(s) = free_rx.try_recv() {
            free.push(s);
        }
        if free.is_empty() {
            match free_rx.recv().await {
                Some(s) => free.push(s),
                None => return Ok(()), // the reader stopped: it reports why
            }
            continue;
        }
        for &s in &free {
            if let Some(b) = slot_block[s].take() {
                busy[b] = false;
            }
        }
        headers.clear();
        batch.clear();
        let now = Instant::now();
        {
            let mut meta = slots.lock().expect("slot table lock");
            while let Some(&s) = free.last() {
                let op = match phase {
                    Phase::Main => job.plan.next(|b| verifying && busy[b as usize]),
                    Phase::Verify => {
                        while verify_next < gens.len() && gens[verify_next] == 0 {
                            verify_next += 1;
                        }
                        (verify_next < gens.len()).then(|| {
                            verify_next += 1;
                            Op {
                                read: true,
                                block: (verify_next - 1) as u64,
                            }
                        })
                    }
                };
                let Some(op) = op else { break };
                free.pop();
                let offset = job.base + op.block * job.stride;
                let mut expect = 0;
                if verifying {
                    let b = op.block as usize;
                    busy[b] = true;
                    slot_block[s] = Some(b);
                    if op.read {
                        expect = gens[b];
                    } else {
                        gens[b] = gens[b].wrapping_add(1).max(1);
                        fill_pattern(&mut payloads[s], offset, job.verify.unwrap_or(0), gens[b]);
                    }
                }
                meta[s] = Slot {
                    start: now,
                    read: op.read,
                    offset,
                    expect,
                    phase,
                };
                let cmd = if op.read { NBD_CMD_READ } else { NBD_CMD_WRITE };
                let h = RequestHeader {
                    flags: 0,
                    command: cmd,
                    cookie: s as u64,
                    offset,
                    length: job.bs as u32,
                };
                headers.extend_from_slice(&h.encode());
                batch.push((s, op.read));
            }
        }
        let in_flight = depth - free.len();
        if batch.is_empty() {
            if in_flight > 0 {
                // The plan is paused (verify: only busy blocks left) or this phase is draining.
                match free_rx.recv().await {
                    Some(s) => free.push(s),
                    None => return Ok(()),
                }
                continue;
            }
            if phase == Phase::Main && verifying {
                phase = Phase::Verify;
                continue;
            }
            break;
        }
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for (i, &(s, read)) in batch.iter().enumerate() {
            iov.push(IoSlice::new(&headers[i * 28..(i + 1) * 28]));
            if !read {
                let data = if verifying {
                    &payloads[s][..]
                } else {
                    &job.filler[..]
                };
                iov.push(IoSlice::new(data));
            }
        }
        write_all_vectored(&mut wr, &mut iov).await.map_err(io)?;
    }
    let _ = stop.send(());
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
    Ok(())
}

async fn write_all_vectored(wr: &mut Writer, mut iov: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !iov.is_empty() {
        let n = wr.write_vectored(iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut iov, n);
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

async fn reader(
    mut rd: Reader,
    slots: Arc<Mutex<Vec<Slot>>>,
    free: mpsc::UnboundedSender<usize>,
    mut stop: oneshot::Receiver<()>,
    bs: usize,
    verify: Option<u32>,
    progress: Arc<Progress>,
) -> Result<ConnStats, BenchError> {
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
        // Take every complete reply in the buffer.
        loop {
            let (hlen, header) = match decode_reply_header(&buf) {
                Ok(x) => x,
                Err(crate::nbd::client::ClientError::Incomplete) => break,
                Err(e) => return Err(BenchError::Protocol(e.to_string())),
            };
            let ReplyHeader::Simple { error, cookie } = header else {
                return Err(BenchError::Protocol(
                    "structured reply not negotiated".into(),
                ));
            };
            let s = cookie as usize;
            let slot = *slots
                .lock()
                .expect("slot table lock")
                .get(s)
                .ok_or_else(|| {
                    BenchError::Protocol(format!("reply with unknown cookie {cookie}"))
                })?;
            let payload = if slot.read && error == 0 { bs } else { 0 };
            if buf.len() < hlen + payload {
                buf.reserve(hlen + payload - buf.len() + chunk);
                break;
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
            if slot.phase == Phase::Main {
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
            // The writer may have finished already (after an error): nobody to tell.
            let _ = free.send(s);
        }
        if buf.capacity() - buf.len() < chunk / 2 {
            buf.reserve(chunk);
        }
        tokio::select! {
            biased;
            _ = &mut stop => return Ok(st),
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return Err(BenchError::Io("server closed the connection".into())),
                Ok(_) => {}
                Err(e) => return Err(BenchError::Io(e.to_string())),
            },
        }
    }
}
