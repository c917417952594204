//! One NBD connection: handshake, then transmission. Plain sockets go to [`super::threaded`]
//! after GO; TLS connections (and plain ones with `threaded_transmission` off) stay here, with
//! a reader loop and a writer task so replies go out in completion order.
//!
//! ```text
//!  socket ─▶ reader: header ─▶ validate ─▶ payload ─┬▶ inline (small) ──────────────┐
//!                                                   └▶ spawn_blocking(backend) ─┐   │
//!                                                                               ▼   ▼
//!  socket ◀─ buffered writer (shared) ◀── writer task ◀── mpsc ◀───────────────┘  reader
//! ```
//!
//! Small requests are served by the reader itself, which also writes their replies into the
//! shared buffered writer and flushes when it has no further request in hand: a QD1 round
//! trip involves no other task or thread, and a burst of small requests leaves in one write.

use std::any::Any;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::backend::{ExportRegistry, OpenExport};
use super::bufpool::BufPool;
use super::dispatch::{Completions, dispatch};
use super::exec::{
    BASE_ALLOCATION_ID, Reply, Tally, budget_kib, error_reply, execute_inline, max_payload,
    request_kib, runs_inline,
};
use super::identity::PeerIdentity;
use super::{ServerConfig, threaded};
use crate::aligned::AlignedBuf;
use crate::nbd::DecodeError;
use crate::nbd::consts::*;
use crate::nbd::handshake::{self, OPTION_HEADER_LEN};
use crate::nbd::transmission::{self as tx, Command, ExportLimits, Framing, ReplyTo};

/// Any byte stream a session runs over (Unix, TCP, or TLS on either).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Any {
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
pub type BoxStream = Box<dyn Stream>;

/// What the handshake ended with.
enum Outcome {
    /// Enter transmission on this export.
    Go {
        export: OpenExport,
        name: String,
        framing: Framing,
        meta_allocation: bool,
        /// The client asked for `NBD_INFO_BLOCK_SIZE` in GO (and so keeps to its maximum).
        asked_block_size: bool,
    },
    /// The client asked for TLS: upgrade the stream and negotiate again from scratch.
    StartTls,
    /// Client aborted or the connection should close.
    Close,
}

/// The per-connection facts the handshake needs.
pub struct Peer {
    pub tcp: bool,
    pub tls_active: bool,
    /// Who the registry is asked on behalf of; set from the client certificate after
    /// STARTTLS on TCP (a Unix-socket client stays `Local`).
    pub identity: PeerIdentity,
    /// The connection's slot among those in the handshake phase, given back at GO.
    pub handshake: Option<OwnedSemaphorePermit>,
}

pub async fn run(
    mut stream: BoxStream,
    registry: Arc<dyn ExportRegistry>,
    cfg: Arc<ServerConfig>,
    mut peer: Peer,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    // Counted as failed unless transmission begins.
    let mut counted = crate::metrics::HandshakeTally::start();
    // One deadline for the whole handshake, greeting and client flags included.
    let deadline = tokio::time::Instant::now() + cfg.handshake_timeout;
    // Server shutdown ends a session still in the handshake at once (it would otherwise
    // hold `serve` up to the deadline).
    let mut stop = shutdown.clone();
    let mut flags = [0u8; 4];
    tokio::select! {
        r = tokio::time::timeout_at(deadline, async {
            stream.write_all(&handshake::greeting()).await?;
            stream.read_exact(&mut flags).await
        }) => {
            r.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
        }
        _ = wait_true(&mut stop) => return Ok(()),
    }
    let client = handshake::parse_client_flags(&flags).map_err(invalid)?;
    loop {
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(
                deadline,
                negotiate(&mut stream, &*registry, &cfg, &peer, client.no_zeroes),
            ) => r.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??,
            _ = wait_true(&mut stop) => return Ok(()),
        };
        match outcome {
            Outcome::Close => return Ok(()),
            Outcome::StartTls => {
                let acceptor = match &cfg.tls {
                    Some(tls) => tokio_rustls::TlsAcceptor::from(tls.clone()),
                    None => unreachable!("STARTTLS is only accepted when TLS is configured"),
                };
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        ));
                    }
                    Ok(Err(e)) => {
                        // A refused client certificate (expired, unknown CA, none) ends here:
                        // worth the operator's eye.
                        tracing::info!(error = %e, "TLS handshake failed");
                        return Err(e);
                    }
                    Ok(Ok(tls)) => tls,
                };
                if peer.tcp {
                    peer.identity =
                        PeerIdentity::from_tls_chain(tls.get_ref().1.peer_certificates());
                    tracing::debug!(client = %peer.identity, "TLS established");
                }
                stream = Box::new(tls);
                peer.tls_active = true;
                counted.tls = true;
            }
            Outcome::Go {
                export,
                name,
                framing,
                meta_allocation,
                asked_block_size,
            } => {
                let terms = Terms {
                    framing,
                    meta_allocation,
                    max_payload: max_payload(asked_block_size, cfg.max_buffer_bytes),
                };
                tracing::debug!(volume = %name, client = %peer.identity, ?framing, max_payload = terms.max_payload, "transmission");
                // Established: no longer counted among the handshakes.
                drop(peer.handshake.take());
                counted.done();
                let stream = if cfg.threaded_transmission {
                    match threaded::into_plain(stream) {
                        Ok(sock) => {
                            return threaded::transmission(sock?, export, terms, cfg, shutdown)
                                .await;
                        }
                        Err(tls) => tls,
                    }
                } else {
                    stream
                };
                return transmission(stream, export, terms, cfg, shutdown).await;
            }
        }
    }
}

/// What transmission runs under, as the handshake settled it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Terms {
    pub(super) framing: Framing,
    /// `base:allocation` selected for this export.
    pub(super) meta_allocation: bool,
    /// Largest READ/WRITE served ([`max_payload`]).
    pub(super) max_payload: u32,
}

pub(super) fn invalid(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn transmission_flags(export: &OpenExport, framing: Framing) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_CAN_MULTI_CONN;
    if framing.structured() {
        f |= NBD_FLAG_SEND_DF;
    }
    if export.read_only {
        f |= NBD_FLAG_READ_ONLY;
    }
    f
}

/// Resolves a name for `peer`; the empty name (kernel client without -N) means the only
/// export that peer may see, if one.
fn open_export(
    registry: &dyn ExportRegistry,
    name: &str,
    peer: &PeerIdentity,
) -> Option<(OpenExport, String)> {
    if name.is_empty() {
        let list = registry.list(peer);
        if list.len() == 1 {
            let n = list[0].name.clone();
            return registry.open(&n, peer).map(|e| (e, n));
        }
        return None;
    }
    registry.open(name, peer).map(|e| (e, name.to_owned()))
}

/// One round of option haggling, until GO/EXPORT_NAME, STARTTLS, ABORT or a fatal error.
async fn negotiate(
    s: &mut BoxStream,
    registry: &dyn ExportRegistry,
    cfg: &ServerConfig,
    peer: &Peer,
    no_zeroes: bool,
) -> io::Result<Outcome> {
    let mut framing = Framing::Simple;
    let mut meta_allocation = false;
    // The export the last SET_META_CONTEXT named: contexts hold only for that export.
    let mut meta_export: Option<String> = None;
    let tls_required = peer.tcp && cfg.require_tls_on_tcp && cfg.tls.is_some() && !peer.tls_active;
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match s.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Close),
            Err(e) => return Err(e),
        }
        let h = handshake::parse_option_header(&hdr).map_err(invalid)?;
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data).await?;
        let mut out = Vec::new();
        let opt = h.option;
        if tls_required && !matches!(opt, NBD_OPT_STARTTLS | NBD_OPT_ABORT) {
            if opt == NBD_OPT_EXPORT_NAME {
                return Ok(Outcome::Close);
            }
            handshake::encode_option_reply(&mut out, opt, NBD_REP_ERR_TLS_REQD, b"TLS required");
            s.write_all(&out).await?;
            continue;
        }
        match opt {
            NBD_OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some((export, name)) = open_export(registry, &name, &peer.identity) else {
                    return Ok(Outcome::Close);
                };
                // Structured replies and meta contexts negotiated before EXPORT_NAME stay in
                // force: once STRUCTURED_REPLY is acked, READ MUST get structured replies.
                let meta_allocation = meta_allocation && meta_export.as_deref() == Some(&name);
                let flags = transmission_flags(&export, framing);
                handshake::encode_export_name_reply(
                    &mut out,
                    export.backend.size(),
                    flags,
                    no_zeroes,
                );
                s.write_all(&out).await?;
                return Ok(Outcome::Go {
                    export,
                    name,
                    framing,
                    meta_allocation,
                    asked_block_size: false,
                });
            }
            NBD_OPT_GO | NBD_OPT_INFO => {
                let req = match handshake::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(_) => {
                        handshake::encode_option_reply(
                            &mut out,
                            opt,
                            NBD_REP_ERR_INVALID,
                            b"malformed request",
                        );
                        s.write_all(&out).await?;
                        continue;
                    }
                };
                let Some((export, name)) = open_export(registry, &req.name, &peer.identity) else {
                    handshake::encode_option_reply(
                        &mut out,
                        opt,
                        NBD_REP_ERR_UNKNOWN,
                        b"no such export",
                    );
                    s.write_all(&out).await?;
                    continue;
                };
                let b = &export.backend;
                for r in &req.requests {
                    match *r {
                        NBD_INFO_NAME => {
                            handshake::encode_info_text(&mut out, opt, NBD_INFO_NAME, &name)
                        }
                        NBD_INFO_DESCRIPTION => {
                            let d = registry
                                .list(&peer.identity)
                                .into_iter()
                                .find(|e| e.name == name)
                                .map(|e| e.description);
                            handshake::encode_info_text(
                                &mut out,
                                opt,
                                NBD_INFO_DESCRIPTION,
                                &d.unwrap_or_default(),
                            )
                        }
                        NBD_INFO_BLOCK_SIZE => handshake::encode_info_block_size(
                            &mut out,
                            opt,
                            1,
                            b.preferred_block_size(),
                            MAX_PAYLOAD,
                        ),
                        _ => {}
                    }
                }
                handshake::encode_info_export(
                    &mut out,
                    opt,
                    b.size(),
                    transmission_flags(&export, framing),
                );
                handshake::encode_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                s.write_all(&out).await?;
                if opt == NBD_OPT_GO {
                    let meta_allocation = meta_allocation && meta_export.as_deref() == Some(&name);
                    return Ok(Outcome::Go {
                        export,
                        name,
                        framing,
                        meta_allocation,
                        asked_block_size: req.requests.contains(&NBD_INFO_BLOCK_SIZE),
                    });
                }
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    handshake::encode_option_reply(
                        &mut out,
                        opt,
                        NBD_REP_ERR_INVALID,
                        b"LIST takes no data",
                    );
                } else {
                    for e in registry.list(&peer.identity) {
                        handshake::encode_server(&mut out, &e.name, &e.description);
                    }
                    handshake::encode_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                }
                s.write_all(&out).await?;
            }
            NBD_OPT_ABORT => {
                handshake::encode_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                // The client may already have closed: a failed ACK is not an error.
                let _ = s.write_all(&out).await;
                return Ok(Outcome::Close);
            }
            NBD_OPT_STARTTLS => {
                let (reply, upgrade): (u32, bool) = if !data.is_empty() {
                    (NBD_REP_ERR_INVALID, false)
                } else if cfg.tls.is_none() {
                    (NBD_REP_ERR_POLICY, false)
                } else if peer.tls_active {
                    (NBD_REP_ERR_INVALID, false)
                } else {
                    (NBD_REP_ACK, true)
                };
                handshake::encode_option_reply(&mut out, opt, reply, &[]);
                s.write_all(&out).await?;
                if upgrade {
                    return Ok(Outcome::StartTls);
                }
            }
            NBD_OPT_STRUCTURED_REPLY | NBD_OPT_EXTENDED_HEADERS => {
                // As qemu-nbd and nbdkit answer: extended headers imply structured replies
                // and need nothing before them (libnbd and qemu ask for them first, and fall
                // back to structured replies only when refused); asking again for what is in
                // force is refused, and so are structured replies under extended headers.
                let (reply, msg): (u32, &[u8]) = match (opt, framing) {
                    _ if !data.is_empty() => (NBD_REP_ERR_INVALID, b"takes no data"),
                    (NBD_OPT_STRUCTURED_REPLY, Framing::Simple) => {
                        framing = Framing::Structured;
                        (NBD_REP_ACK, b"")
                    }
                    (NBD_OPT_STRUCTURED_REPLY, Framing::Structured) => (
                        NBD_REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    ),
                    (NBD_OPT_STRUCTURED_REPLY, _) => (
                        NBD_REP_ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    ),
                    (_, Framing::Extended) => {
                        (NBD_REP_ERR_INVALID, b"extended headers already negotiated")
                    }
                    _ => {
                        framing = Framing::Extended;
                        (NBD_REP_ACK, b"")
                    }
                };
                handshake::encode_option_reply(&mut out, opt, reply, msg);
                s.write_all(&out).await?;
            }
            NBD_OPT_SET_META_CONTEXT | NBD_OPT_LIST_META_CONTEXT => {
                let set = opt == NBD_OPT_SET_META_CONTEXT;
                if set {
                    // SET replaces the previous selection, also when it fails.
                    meta_allocation = false;
                    meta_export = None;
                }
                // The export is resolved once (and only when the request can be answered):
                // its canonical name is what GO must match.
                let parsed = handshake::parse_meta_context_request(&data).map(|req| {
                    let export = framing
                        .structured()
                        .then(|| open_export(registry, &req.export, &peer.identity))
                        .flatten();
                    (req, export.map(|(_, name)| name))
                });
                match parsed {
                    _ if !framing.structured() => handshake::encode_option_reply(
                        &mut out,
                        opt,
                        NBD_REP_ERR_INVALID,
                        b"structured replies first",
                    ),
                    Err(_) => handshake::encode_option_reply(
                        &mut out,
                        opt,
                        NBD_REP_ERR_INVALID,
                        b"malformed request",
                    ),
                    Ok((_, None)) => handshake::encode_option_reply(
                        &mut out,
                        opt,
                        NBD_REP_ERR_UNKNOWN,
                        b"no such export",
                    ),
                    Ok((req, Some(name))) => {
                        let matches = if req.queries.is_empty() {
                            !set
                        } else {
                            req.queries
                                .iter()
                                .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
                        };
                        if set {
                            meta_allocation = matches;
                            meta_export = Some(name);
                        }
                        if matches {
                            handshake::encode_meta_context(
                                &mut out,
                                opt,
                                BASE_ALLOCATION_ID,
                                BASE_ALLOCATION,
                            );
                        }
                        handshake::encode_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                    }
                }
                s.write_all(&out).await?;
            }
            _ => {
                handshake::encode_option_reply(
                    &mut out,
                    opt,
                    NBD_REP_ERR_UNSUP,
                    b"option not supported",
                );
                s.write_all(&out).await?;
            }
        }
    }
}

async fn transmission(
    stream: BoxStream,
    export: OpenExport,
    terms: Terms,
    cfg: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let (reply_tx, mut reply_rx) =
        mpsc::channel::<(Reply, Option<OwnedSemaphorePermit>)>(cfg.max_in_flight.max(1));
    let pool = Arc::new(BufPool::default());
    let out = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        wr,
    )));
    let (writer_pool, writer_out) = (pool.clone(), out.clone());
    let writer = tokio::spawn(async move {
        // Each reply's byte budget is given back when it goes out of scope, once written.
        while let Some((r, _budget)) = reply_rx.recv().await {
            let mut w = writer_out.lock().await;
            write_reply(&mut w, r, &writer_pool).await?;
            // Batch whatever else is ready into the same flush.
            while let Ok((r, _budget)) = reply_rx.try_recv() {
                write_reply(&mut w, r, &writer_pool).await?;
            }
            w.flush().await?;
        }
        Ok::<(), io::Error>(())
    });
    // Inline replies written but not flushed yet.
    let mut unflushed = false;
    let backend = export.backend.clone();
    // This connection's metrics shard, found once.
    let counted = crate::metrics::VolumeStats::connect_opt(export.stats.as_ref());
    let stats = counted.stats().clone();
    let lim = ExportLimits {
        size: backend.size(),
        read_only: export.read_only,
        framing: terms.framing,
        meta_allocation: terms.meta_allocation,
        max_payload: terms.max_payload,
    };
    let header_len = terms.framing.request_header_len();
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let completions = Completions::new(tokio::runtime::Handle::current());
    // Bytes of payload buffered per connection (requests being read, replies not yet sent).
    let budget_kib = budget_kib(cfg.max_buffer_bytes);
    let buffered = Arc::new(Semaphore::new(budget_kib as usize));
    let detached = export.detached.clone();
    // Every wait of the reader (for the client, for buffer budget, for an in-flight slot, for
    // room to write a reply) also ends on a detach or a shutdown: a client that stalls
    // mid-request or stops reading cannot keep the session, and so the volume and its key.
    // One stop future for the whole session: it stays registered with both watches between
    // polls, instead of re-subscribing at every await. A dead writer (the client closed or
    // broke the connection) also stops the reader: nothing more could be answered, so the
    // requests still buffered are not worth executing.
    let (mut stop_detach, mut stop_shutdown) = (detached.clone(), shutdown.clone());
    let writer_gone = reply_tx.clone();
    let mut stop = Box::pin(async move {
        tokio::select! {
            _ = wait_true(&mut stop_detach) => {}
            _ = wait_true(&mut stop_shutdown) => {}
            _ = writer_gone.closed() => {}
        }
    });
    macro_rules! until_stop {
        ($fut:expr) => {
            tokio::select! {
                biased;
                r = $fut => r,
                _ = &mut stop => break Ok(()),
            }
        };
    }
    let result = loop {
        // About to wait for the client: what we owe it goes out first.
        let owed = flush_owed(&out, &mut unflushed, rd.buffer().len(), header_len);
        if let Err(e) = until_stop!(owed) {
            break Err(e);
        }
        let mut hdr_buf = [0u8; tx::EXTENDED_REQUEST_HEADER_LEN];
        let hdr = &mut hdr_buf[..header_len];
        let idle = async {
            match cfg.idle_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let read = until_stop!(async {
            tokio::select! {
                r = rd.read_exact(hdr) => r.map(Some),
                _ = idle => Ok(None),
            }
        });
        match read {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::debug!("idle timeout");
                break Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let arrived = std::time::Instant::now();
        let h = match tx::parse_request(hdr, terms.framing) {
            Ok(h) => h,
            // Bad magic: the stream is out of sync; nothing sensible can follow.
            Err(e) => break Err(invalid(e)),
        };
        let to = ReplyTo {
            framing: terms.framing,
            cookie: h.cookie,
            offset: h.offset,
        };
        let cmd = match tx::validate(&h, &lim) {
            Ok(c) => c,
            Err(rej) => {
                if rej.skip_payload > tx::MAX_SKIP {
                    // A payload this large is not worth reading to stay in sync.
                    break Err(invalid(DecodeError::Invalid("refused payload too large")));
                }
                if rej.skip_payload > 0 {
                    // Skip the payload we refuse, to stay in sync, without buffering it.
                    let mut sink = tokio::io::sink();
                    let mut rest = (&mut rd).take(rej.skip_payload);
                    match until_stop!(tokio::io::copy(&mut rest, &mut sink)) {
                        Ok(n) if n == rej.skip_payload => {}
                        Ok(_) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                stats.refused(rej.errno);
                let msg = "request rejected";
                let reply = error_reply(to, rej.errno, msg);
                if until_stop!(reply_tx.send((reply, None))).is_err() {
                    break Ok(());
                }
                continue;
            }
        };
        if cmd == Command::Disconnect {
            break Ok(());
        }
        // Over the volume's QoS limit: wait here (an async sleep; the reactor runs on).
        if let Some(q) = &export.qos
            && let Some(ticket) = q.admit(&cmd)
        {
            if let Err(e) = until_stop!(flush_owed(&out, &mut unflushed, 0, 1)) {
                break Err(e);
            }
            until_stop!(q.wait(ticket));
        }
        let tally = Tally::begin(&stats, &cmd, arrived);
        let budget = match request_kib(&cmd, budget_kib) {
            0 => None,
            kib => Some(
                until_stop!(buffered.clone().acquire_many_owned(kib))
                    .expect("semaphore never closed"),
            ),
        };
        let payload = if let Command::Write { length, .. } = cmd {
            let owed = flush_owed(&out, &mut unflushed, rd.buffer().len(), length as usize);
            if let Err(e) = until_stop!(owed) {
                break Err(e);
            }
            let mut p = pool.take(length as usize);
            if let Err(e) = until_stop!(rd.read_exact(&mut p)) {
                break Err(e);
            }
            p
        } else {
            AlignedBuf::default()
        };
        let (cmd, payload) = if runs_inline(&*backend, &cmd) {
            // Small requests are cheaper to serve here than to hand to another thread and back:
            // 4 KiB of XTS is about a microsecond, a thread handoff several. Not a READ that
            // would wait for the disk: that would stall the reactor.
            match execute_inline(&*backend, &pool, cmd, to, payload) {
                Ok(reply) => {
                    let errno = reply.errno;
                    // A client that stops reading blocks this write, and so stops us reading
                    // more requests: that is the backpressure.
                    let wrote = until_stop!(async {
                        write_reply(&mut *out.lock().await, reply, &pool).await
                    });
                    if let Err(e) = wrote {
                        break Err(e);
                    }
                    drop(budget);
                    unflushed = true;
                    tally.end(&stats, errno);
                    continue;
                }
                Err(cmd) => (cmd, AlignedBuf::default()),
            }
        } else {
            (cmd, payload)
        };
        let permit =
            until_stop!(in_flight.clone().acquire_owned()).expect("semaphore never closed");
        let (reply_tx, stats) = (reply_tx.clone(), stats.clone());
        // The blocking pool is shared by every connection, so a blocking thread only runs
        // the backend call: when this connection's reply queue is full (a client that does
        // not read its replies), the wait for room moves to a cheap async task. Before, each
        // such wait parked a blocking thread, and ten non-reading clients took all of them.
        let rt = tokio::runtime::Handle::current();
        let rt2 = rt.clone();
        // On a blocking-pool thread, whether the pool executed the request or librbd completed
        // it (server/dispatch.rs).
        let deliver = Box::new(move |reply: Reply| {
            // Counted when handed to the writer task (TLS path).
            tally.end(&stats, reply.errno);
            match reply_tx.try_send((reply, budget)) {
                Err(mpsc::error::TrySendError::Full(item)) => {
                    rt2.spawn(async move {
                        let _ = reply_tx.send(item).await;
                        drop(permit);
                    });
                }
                _ => drop(permit),
            }
        });
        dispatch(
            &rt,
            &completions,
            &backend,
            &pool,
            cmd,
            to,
            payload,
            deliver,
        );
    };
    // Let in-flight requests finish (their replies still go out), then close. (`stop` holds
    // a sender too: the writer ends once every sender is gone.)
    drop((stop, reply_tx));
    let writer_abort = writer.abort_handle();
    let drain = async {
        let _ = in_flight
            .acquire_many(cfg.max_in_flight.max(1) as u32)
            .await;
        let written = match writer.await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        };
        let mut w = out.lock().await;
        w.flush().await?;
        w.shutdown().await.ok();
        written
    };
    // After a detach or a shutdown, a client that does not read its replies must not keep
    // the session (and with it the volume and its key) alive.
    let stopping = *detached.borrow() || *shutdown.borrow();
    let drained = if stopping {
        tokio::time::timeout(DRAIN_AFTER_STOP, drain)
            .await
            .unwrap_or_else(|_| {
                writer_abort.abort();
                tracing::debug!("replies not taken after detach/shutdown; closing");
                Ok(())
            })
    } else {
        drain.await
    };
    result.and(drained)
}

/// How long replies may take to leave once the export is detached or the server stops.
pub(super) const DRAIN_AFTER_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Flushes the inline replies written since the last flush when the next `need` bytes are not
/// all in the read buffer (`buffered`): the reader is about to wait for the client.
async fn flush_owed<W: AsyncWrite + Unpin>(
    out: &tokio::sync::Mutex<BufWriter<W>>,
    unflushed: &mut bool,
    buffered: usize,
    need: usize,
) -> io::Result<()> {
    if *unflushed && buffered < need {
        out.lock().await.flush().await?;
        *unflushed = false;
    }
    Ok(())
}

/// Writes one reply into the buffered writer; its data buffer goes back to the pool.
async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    r: Reply,
    pool: &BufPool,
) -> io::Result<()> {
    if r.split.is_empty() {
        w.write_all(&r.head).await?;
        if let Some(d) = &r.data {
            w.write_all(d).await?;
        }
    } else {
        for p in r.pieces() {
            w.write_all(p).await?;
        }
    }
    if let Some(d) = r.data {
        pool.give(d);
    }
    Ok(())
}

/// Resolves when the watch holds `true`; never, if its sender is gone while it holds `false`.
pub(super) async fn wait_true(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
