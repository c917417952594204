//! Prometheus metrics: per-volume I/O counters kept by the NBD connections, daemon-wide
//! counters (KMS operations, attach/detach, NBD handshakes), process figures, and the text
//! exposition format (`GET /metrics`, `docs/metrics.md`).
//!
//! Hand-written rather than the `prometheus-client` crate: the hot path needs counters
//! sharded per connection (each NBD connection owns a [`ConnStats`] block of relaxed atomics,
//! found once at connect; a request costs a clock read and four uncontended atomic adds, no
//! map lookup, no lock, no cache line shared with another connection). `prometheus-client`'s
//! `Family` keeps one shared atomic per label set behind a map, so the sharding and its
//! collection would be ours anyway, leaving it only the text encoder: about 60 lines here,
//! checked by `promtool check metrics` in tests/metrics.rs.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Instant, SystemTime};

/// NBD commands as metric label values, in [`Op`] order.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

/// An NBD command, as an index into the per-op counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Cache,
}

/// NBD errors as label values, indexed by [`errno_index`]; the last one is any other value.
pub const ERRNOS: [&str; 9] = [
    "EPERM",
    "EIO",
    "ENOMEM",
    "EINVAL",
    "ENOSPC",
    "EOVERFLOW",
    "ENOTSUP",
    "ESHUTDOWN",
    "other",
];

/// The [`ERRNOS`] slot of an NBD error value (the protocol's numbers, Linux's for these).
pub fn errno_index(nbd_errno: u32) -> usize {
    match nbd_errno {
        1 => 0,
        5 => 1,
        12 => 2,
        22 => 3,
        28 => 4,
        75 => 5,
        95 => 6,
        108 => 7,
        _ => 8,
    }
}

/// Upper bounds of the latency buckets, in nanoseconds (10 µs .. 2.5 s; then +Inf).
const BUCKETS_NS: [u64; 17] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];
const NB: usize = BUCKETS_NS.len() + 1;
const NOPS: usize = OPS.len();

/// One connection's counters (or, for a volume, those of its closed connections).
/// Written by the connection's threads only, with relaxed atomics.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Requests taken (validated) per op; minus `done`, those in flight.
    received: [AtomicU64; NOPS],
    /// Replies written per op, by latency bucket.
    buckets: [[AtomicU64; NB]; NOPS],
    /// Sum of the latencies per op, ns.
    latency_ns: [AtomicU64; NOPS],
    /// Bytes of successful requests per op.
    bytes: [AtomicU64; NOPS],
    /// Error replies (including requests refused before execution) per errno.
    errors: [AtomicU64; ERRNOS.len()],
}

impl ConnStats {
    /// A request of `op` was taken.
    #[inline]
    pub fn begin(&self, op: Op) {
        self.received[op as usize].fetch_add(1, Relaxed);
    }

    /// The reply to a request of `op` that arrived at `arrived` is written: `errno` 0 is
    /// success and counts `bytes`.
    #[inline]
    pub fn end(&self, op: Op, arrived: Instant, bytes: u64, errno: u32) {
        let ns = arrived.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        let o = op as usize;
        let b = BUCKETS_NS.iter().position(|&le| ns <= le).unwrap_or(NB - 1);
        self.buckets[o][b].fetch_add(1, Relaxed);
        self.latency_ns[o].fetch_add(ns, Relaxed);
        if errno == 0 {
            self.bytes[o].fetch_add(bytes, Relaxed);
        } else {
            self.errors[errno_index(errno)].fetch_add(1, Relaxed);
        }
    }

    /// A request refused before execution (bad range, flags, read-only...).
    pub fn refused(&self, errno: u32) {
        self.errors[errno_index(errno)].fetch_add(1, Relaxed);
    }

    fn add_to(&self, into: &mut Totals) {
        for o in 0..NOPS {
            into.received[o] += self.received[o].load(Relaxed);
            for b in 0..NB {
                into.buckets[o][b] += self.buckets[o][b].load(Relaxed);
            }
            into.latency_ns[o] += self.latency_ns[o].load(Relaxed);
            into.bytes[o] += self.bytes[o].load(Relaxed);
        }
        for (e, v) in self.errors.iter().enumerate() {
            into.errors[e] += v.load(Relaxed);
        }
    }

    fn absorb(&self, other: &ConnStats) {
        let mut t = Totals::default();
        other.add_to(&mut t);
        for o in 0..NOPS {
            self.received[o].fetch_add(t.received[o], Relaxed);
            for b in 0..NB {
                self.buckets[o][b].fetch_add(t.buckets[o][b], Relaxed);
            }
            self.latency_ns[o].fetch_add(t.latency_ns[o], Relaxed);
            self.bytes[o].fetch_add(t.bytes[o], Relaxed);
        }
        for (e, v) in t.errors.iter().enumerate() {
            self.errors[e].fetch_add(*v, Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    received: [u64; NOPS],
    buckets: [[u64; NB]; NOPS],
    latency_ns: [u64; NOPS],
    bytes: [u64; NOPS],
    errors: [u64; ERRNOS.len()],
    in_flight: u64,
}

impl Totals {
    fn done(&self, o: usize) -> u64 {
        self.buckets[o].iter().sum()
    }
}

/// One volume's counters while it is attached: the live connections' shards, and the sum of
/// those that closed. The lock is taken at connect, disconnect and scrape only.
#[derive(Debug, Default)]
pub struct VolumeStats {
    live: Mutex<Vec<Weak<ConnStats>>>,
    closed: ConnStats,
}

/// A connection's shard; folded into its volume's totals when dropped.
#[derive(Debug)]
pub struct ConnHandle {
    stats: Arc<ConnStats>,
    volume: Option<Arc<VolumeStats>>,
}

impl ConnHandle {
    /// Counters that belong to no volume (an export without metrics).
    pub fn unregistered() -> ConnHandle {
        ConnHandle {
            stats: Arc::default(),
            volume: None,
        }
    }
    pub fn stats(&self) -> &Arc<ConnStats> {
        &self.stats
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        if let Some(v) = &self.volume {
            let mut live = v.live.lock().unwrap_or_else(PoisonError::into_inner);
            // Folded under the lock: a scrape sees it either live or closed, never both.
            v.closed.absorb(&self.stats);
            live.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), &*self.stats));
        }
    }
}

impl VolumeStats {
    /// A new connection's shard.
    pub fn connect(self: &Arc<Self>) -> ConnHandle {
        let stats = Arc::new(ConnStats::default());
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&stats));
        ConnHandle {
            stats,
            volume: Some(self.clone()),
        }
    }

    /// [`connect`](Self::connect) for an export that may have no metrics.
    pub fn connect_opt(v: Option<&Arc<Self>>) -> ConnHandle {
        v.map_or_else(ConnHandle::unregistered, Self::connect)
    }

    fn totals(&self) -> (Totals, usize) {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut t = Totals::default();
        self.closed.add_to(&mut t);
        let mut n = 0;
        for c in live.iter().filter_map(Weak::upgrade) {
            let mut one = Totals::default();
            c.add_to(&mut one);
            // In flight: live connections only (a closed one may have dropped requests it
            // took when the client went away).
            t.in_flight += (0..NOPS)
                .map(|o| one.received[o].saturating_sub(one.done(o)))
                .sum::<u64>();
            c.add_to(&mut t);
            n += 1;
        }
        (t, n)
    }
}

/// Daemon-wide counters: a process serves one daemon.
#[derive(Debug, Default)]
struct Global {
    /// (operation, result) -> count: KMS API operations.
    kms: BTreeMap<(&'static str, String), u64>,
    /// (operation, result) -> count: volume API operations.
    volume_ops: BTreeMap<(&'static str, String), u64>,
    /// (outcome, tls) -> count.
    handshakes: BTreeMap<(&'static str, bool), u64>,
    attaches: u64,
    detaches: u64,
}

fn global() -> std::sync::MutexGuard<'static, Global> {
    static G: OnceLock<Mutex<Global>> = OnceLock::new();
    G.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Records the start time reported as `process_start_time_seconds`; call early in `main`.
pub fn process_started() -> SystemTime {
    static T: OnceLock<SystemTime> = OnceLock::new();
    *T.get_or_init(SystemTime::now)
}

/// KMS operation names known to the API; anything else is counted as "other" (the name
/// comes from the URL: an unbounded label set would be a memory leak).
const KMS_OPS: [&str; 19] = [
    "create-key",
    "describe-key",
    "list-keys",
    "enable-key",
    "disable-key",
    "rotate-key",
    "schedule-key-deletion",
    "cancel-key-deletion",
    "create-datakey",
    "create-datakey-without-plaintext",
    "decrypt-datakey",
    "encrypt-datakey",
    "encrypt-data",
    "decrypt-data",
    "create-alias",
    "delete-alias",
    "list-aliases",
    "get-key-rotation-status",
    "re-encrypt",
];

const VOLUME_OPS: [&str; 7] = [
    "create", "import", "attach", "detach", "resize", "rewrap", "delete",
];

fn bounded(name: &str, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .find(|k| **k == name)
        .copied()
        .unwrap_or("other")
}

/// A result label: "ok", or an error code of the API's fixed set (`KMS.0201`...), trimmed to
/// a safe charset and length.
fn result_label(r: Result<(), &str>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(code) => code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
            .take(32)
            .collect(),
    }
}

/// A KMS API operation ended (`Err` carries its error code).
pub fn kms_op(op: &str, r: Result<(), &str>) {
    *global()
        .kms
        .entry((bounded(op, &KMS_OPS), result_label(r)))
        .or_default() += 1;
}

/// A volume API operation ended.
pub fn volume_op(op: &str, r: Result<(), &str>) {
    *global()
        .volume_ops
        .entry((bounded(op, &VOLUME_OPS), result_label(r)))
        .or_default() += 1;
}

/// A volume was attached (API or start-up) / detached (API, shutdown).
pub fn attached() {
    global().attaches += 1;
}
pub fn detached() {
    global().detaches += 1;
}

/// An NBD handshake ended: `ok` when transmission began, with or without TLS.
pub fn handshake(ok: bool, tls: bool) {
    *global()
        .handshakes
        .entry((if ok { "ok" } else { "failed" }, tls))
        .or_default() += 1;
}

/// Counts the handshake as failed unless [`done`](Self::done) is called (every early return
/// of a session is a failed or abandoned handshake).
#[derive(Debug)]
pub struct HandshakeTally {
    pub tls: bool,
    done: bool,
}

impl HandshakeTally {
    pub fn start() -> HandshakeTally {
        HandshakeTally {
            tls: false,
            done: false,
        }
    }
    pub fn done(&mut self) {
        self.done = true;
        handshake(true, self.tls);
    }
}

impl Drop for HandshakeTally {
    fn drop(&mut self) {
        if !self.done {
            handshake(false, self.tls);
        }
    }
}

/// Prometheus text exposition format (version 0.0.4).
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.0.push_str("\\\\"),
                        '"' => self.0.push_str("\\\""),
                        '\n' => self.0.push_str("\\n"),
                        c => self.0.push(c),
                    }
                }
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// The exposition of every metric; `volumes` are the attached volumes' counters by name.
pub fn render(volumes: &[(String, Arc<VolumeStats>)]) -> String {
    let mut t = Text(String::with_capacity(16 * 1024 + volumes.len() * 12 * 1024));
    let totals: Vec<(&str, Totals, usize)> = volumes
        .iter()
        .map(|(n, v)| {
            let (t, c) = v.totals();
            (n.as_str(), t, c)
        })
        .collect();

    t.family(
        "cryptvol_volume_requests_total",
        "counter",
        "NBD requests answered, by command.",
    );
    for (v, s, _) in &totals {
        for (o, op) in OPS.iter().enumerate() {
            t.sample(
                "cryptvol_volume_requests_total",
                &[("volume", v), ("op", op)],
                s.done(o),
            );
        }
    }
    t.family(
        "cryptvol_volume_bytes_total",
        "counter",
        "Bytes of successful requests, by command (read, written, trimmed, zeroed).",
    );
    for (v, s, _) in &totals {
        for op in [Op::Read, Op::Write, Op::Trim, Op::WriteZeroes] {
            t.sample(
                "cryptvol_volume_bytes_total",
                &[("volume", v), ("op", OPS[op as usize])],
                s.bytes[op as usize],
            );
        }
    }
    t.family(
        "cryptvol_volume_errors_total",
        "counter",
        "NBD error replies, by errno (requests refused before execution included).",
    );
    for (v, s, _) in &totals {
        for (e, name) in ERRNOS.iter().enumerate() {
            t.sample(
                "cryptvol_volume_errors_total",
                &[("volume", v), ("errno", name)],
                s.errors[e],
            );
        }
    }
    t.family(
        "cryptvol_volume_in_flight_requests",
        "gauge",
        "Requests taken whose reply is not written yet.",
    );
    for (v, s, _) in &totals {
        t.sample(
            "cryptvol_volume_in_flight_requests",
            &[("volume", v)],
            s.in_flight,
        );
    }
    t.family(
        "cryptvol_volume_connections",
        "gauge",
        "NBD connections in transmission.",
    );
    for (v, _, c) in &totals {
        t.sample("cryptvol_volume_connections", &[("volume", v)], c);
    }
    let h = "cryptvol_volume_request_duration_seconds";
    t.family(
        h,
        "histogram",
        "From a request's arrival (header read) to its reply written (or queued for the \
         batched write of small replies).",
    );
    let le: Vec<String> = BUCKETS_NS
        .iter()
        .map(|&ns| format!("{}", ns as f64 / 1e9))
        .chain(["+Inf".to_owned()])
        .collect();
    for (v, s, _) in &totals {
        for (o, op) in OPS.iter().enumerate() {
            let mut cum = 0;
            for (b, le) in le.iter().enumerate() {
                cum += s.buckets[o][b];
                t.sample(
                    &format!("{h}_bucket"),
                    &[("volume", v), ("op", op), ("le", le)],
                    cum,
                );
            }
            t.sample(
                &format!("{h}_sum"),
                &[("volume", v), ("op", op)],
                s.latency_ns[o] as f64 / 1e9,
            );
            t.sample(&format!("{h}_count"), &[("volume", v), ("op", op)], cum);
        }
    }

    let g = global();
    t.family(
        "cryptvol_attached_volumes",
        "gauge",
        "Volumes attached (served over NBD).",
    );
    t.sample("cryptvol_attached_volumes", &[], volumes.len());
    t.family(
        "cryptvol_volume_attaches_total",
        "counter",
        "Volumes attached since start (API and start-up re-attach).",
    );
    t.sample("cryptvol_volume_attaches_total", &[], g.attaches);
    t.family(
        "cryptvol_volume_detaches_total",
        "counter",
        "Volumes detached since start.",
    );
    t.sample("cryptvol_volume_detaches_total", &[], g.detaches);
    t.family(
        "cryptvol_volume_operations_total",
        "counter",
        "Volume API operations, by operation and result (ok or error code).",
    );
    for ((op, r), n) in &g.volume_ops {
        t.sample(
            "cryptvol_volume_operations_total",
            &[("operation", op), ("result", r)],
            n,
        );
    }
    t.family(
        "cryptvol_kms_operations_total",
        "counter",
        "KMS API operations, by operation and result (ok or error code).",
    );
    for ((op, r), n) in &g.kms {
        t.sample(
            "cryptvol_kms_operations_total",
            &[("operation", op), ("result", r)],
            n,
        );
    }
    t.family(
        "cryptvol_nbd_handshakes_total",
        "counter",
        "NBD handshakes, by outcome (ok: transmission began; failed: closed, refused, timed \
         out) and whether TLS was established.",
    );
    for outcome in ["ok", "failed"] {
        for tls in [false, true] {
            let n = g.handshakes.get(&(outcome, tls)).copied().unwrap_or(0);
            let tls = if tls { "true" } else { "false" };
            t.sample(
                "cryptvol_nbd_handshakes_total",
                &[("outcome", outcome), ("tls", tls)],
                n,
            );
        }
    }
    drop(g);
    process(&mut t);
    t.0
}

/// The standard `process_*` metrics, from /proc/self (readable under ProcSubset=pid).
fn process(t: &mut Text) {
    // Linux reports times in USER_HZ, 100 on every architecture (sysconf would need unsafe).
    const TICKS: f64 = 100.0;
    const PAGE: u64 = 4096;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): state is field 3.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (num(14), num(15)) {
            t.family(
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, in seconds.",
            );
            t.sample("process_cpu_seconds_total", &[], (u + s) as f64 / TICKS);
        }
        if let Some(v) = num(23) {
            t.family(
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
            );
            t.sample("process_virtual_memory_bytes", &[], v);
        }
        if let Some(r) = num(24) {
            t.family(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
            );
            t.sample("process_resident_memory_bytes", &[], r * PAGE);
        }
        if let Some(n) = num(20) {
            t.family("process_threads", "gauge", "Threads of the process.");
            t.sample("process_threads", &[], n);
        }
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        t.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        t.sample("process_open_fds", &[], d.count());
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(v) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<u64>().ok())
    {
        t.family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        t.sample("process_max_fds", &[], v);
    }
    if let Ok(d) = process_started().duration_since(SystemTime::UNIX_EPOCH) {
        t.family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        t.sample("process_start_time_seconds", &[], d.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_fold_into_the_volume_when_closed() {
        let v = Arc::new(VolumeStats::default());
        let a = v.connect();
        let b = v.connect();
        a.stats().begin(Op::Write);
        a.stats().end(Op::Write, Instant::now(), 4096, 0);
        b.stats().begin(Op::Read);
        b.stats().end(Op::Read, Instant::now(), 512, 5);
        b.stats().begin(Op::Read);
        let (t, n) = v.totals();
        assert_eq!((n, t.bytes[1], t.errors[1], t.bytes[0]), (2, 4096, 1, 0));
        drop(a);
        let (t, n) = v.totals();
        assert_eq!((n, t.bytes[1], t.done(1)), (1, 4096, 1));
        assert_eq!(t.in_flight, 1, "one read in flight");
        drop(b);
        assert_eq!(v.live.lock().unwrap().len(), 0);
    }

    #[test]
    fn label_values_are_escaped_and_names_bounded() {
        let v = Arc::new(VolumeStats::default());
        let out = render(&[("a\"b\\c\nd".into(), v)]);
        assert!(out.contains("volume=\"a\\\"b\\\\c\\nd\""), "{out}");
        kms_op("no-such-op-\u{1}", Err("KMS.0101\"x"));
        let out = render(&[]);
        assert!(
            out.contains("cryptvol_kms_operations_total{operation=\"other\",result=\"KMS.0101x\"}")
        );
    }
}
