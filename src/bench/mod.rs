//! `cryptvol bench`: an NBD client load generator (SPEC §7), built on the client side of the
//! `nbd` codec. CONTRACT: `BenchArgs` (clap::Args) and `run(args, json) -> Result<(), BenchError>`.
//!
//! ```text
//!   run ─▶ measure ─▶ N × conn::connect ─▶ N × conn::run (writer + reader tasks) ─▶ Report
//!                           (URI)              (workload::Plan, verify pattern)     (report.rs)
//! ```
//! Offsets: sequential workloads split the export into one contiguous stripe per connection;
//! verified ones interleave the connections' blocks (block i belongs to connection i mod N), so
//! that with blocks smaller than a sector several connections write into the same sector at
//! once while each block keeps a single writer; unverified random ones spread over the whole
//! export. Latency is measured from the moment a
//! request is queued for sending to the moment its whole reply has arrived.

mod conn;
mod report;
pub mod uri;
pub mod workload;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use report::{Direction, Latency, Report, VerifyReport};
pub use workload::Rw;

use uri::NbdUri;
use workload::{Bound, Plan, Rng};

/// Arguments of `cryptvol bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`
    pub uri: String,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,
    /// Percentage of reads in `--rw mixed`.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix_read: u8,
    /// Block size per request (bytes, or with K/M suffix: 4K, 1M).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub iodepth: u32,
    /// Number of NBD connections (the server must advertise CAN_MULTI_CONN for writes to be
    /// coherent across them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Run for this long (e.g. 10s, 500ms, 1m); default: one pass over the export.
    #[arg(long, value_parser = parse_duration, conflicts_with = "size")]
    pub time: Option<Duration>,
    /// With --time: run this long first without measuring (e.g. 2s).
    #[arg(long, value_parser = parse_duration, requires = "time")]
    pub ramp: Option<Duration>,
    /// Move this many bytes in total (e.g. 1G); default: the export size.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Write a pattern naming offset, run and generation in every 16 bytes, check every read of a
    /// block written in this run, and read back every written block at the end.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(String),
    #[error("{errors} requests failed, {mismatches} blocks read back wrong")]
    Failed { errors: u64, mismatches: u64 },
}

/// Runs the workload and prints the result table (or one JSON document with `json`). Fails when
/// any request failed or any verified block mismatched (after printing the result).
pub fn run(args: BenchArgs, json: bool) -> Result<(), BenchError> {
    let show_progress = std::io::stderr().is_terminal();
    let report = measure(&args, show_progress)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print!("{report}");
    }
    let mismatches = report.verify.as_ref().map_or(0, |v| v.mismatches);
    if report.errors > 0 || mismatches > 0 {
        return Err(BenchError::Failed {
            errors: report.errors,
            mismatches,
        });
    }
    Ok(())
}

/// Runs the workload and returns what was measured (no output except the optional progress bar
/// on stderr). Runs its own tokio runtime on a separate thread, so it may be called from
/// anywhere, including from inside another runtime.
pub fn measure(args: &BenchArgs, show_progress: bool) -> Result<Report, BenchError> {
    let uri: NbdUri = args.uri.parse().map_err(BenchError::Args)?;
    let args = args.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads((args.connections as usize).clamp(1, threads))
                .enable_all()
                .build()
                .map_err(|e| BenchError::Io(e.to_string()))?;
            rt.block_on(measure_async(&args, &uri, show_progress))
        })
        .join()
        .unwrap_or_else(|_| Err(BenchError::Io("benchmark thread panicked".into())))
    })
}

async fn measure_async(
    args: &BenchArgs,
    uri: &NbdUri,
    show_progress: bool,
) -> Result<Report, BenchError> {
    let bs = args.bs;
    let n = args.connections as u64;
    let mut conns = Vec::with_capacity(n as usize);
    for _ in 0..n {
        conns.push(conn::connect(uri).await?);
    }
    let neg = conns[0].negotiated.clone();
    if bs == 0 {
        return Err(BenchError::Args("--bs must not be zero".into()));
    }
    if args.verify && !bs.is_multiple_of(workload::UNIT as u64) {
        return Err(BenchError::Args(
            "--verify needs a block size that is a multiple of 16".into(),
        ));
    }
    if let Some((min, _, max)) = neg.block_size {
        if !bs.is_multiple_of(u64::from(min)) || bs > u64::from(max) {
            return Err(BenchError::Args(format!(
                "--bs {bs} does not fit the export's block sizes (minimum {min}, maximum {max})"
            )));
        }
    } else if bs > u64::from(crate::nbd::consts::MAX_PAYLOAD) {
        return Err(BenchError::Args(format!("--bs {bs} is over 32 MiB")));
    }
    if args.rw.writes() && neg.has(crate::nbd::consts::NBD_FLAG_READ_ONLY) {
        return Err(BenchError::Args("the export is read-only".into()));
    }
    let striped = args.verify || !args.rw.random();
    let total_blocks = neg.size / bs;
    let stripe_blocks = if striped {
        total_blocks / n
    } else {
        total_blocks
    };
    if stripe_blocks == 0 || (args.verify && stripe_blocks <= u64::from(args.iodepth)) {
        return Err(BenchError::Args(format!(
            "export of {} bytes is too small for {n} connection(s) of --bs {bs}{}",
            neg.size,
            if args.verify {
                " and --iodepth with --verify"
            } else {
                ""
            }
        )));
    }
    if args.verify && stripe_blocks > 1 << 28 {
        return Err(BenchError::Args(
            "--verify tracks at most 2^28 blocks per connection".into(),
        ));
    }

    let start = Instant::now();
    let ramp = args.ramp.unwrap_or_default();
    let total_bytes = match (args.time, args.size) {
        (Some(_), _) => None,
        (None, Some(size)) => Some(size),
        (None, None) => Some(neg.size),
    };
    let bound = |i: u64| match (args.time, total_bytes) {
        (Some(t), _) => Bound::Until(start + ramp + t),
        (None, Some(b)) => {
            let ops = b / bs;
            Bound::Ops(ops / n + u64::from(i < ops % n))
        }
        (None, None) => unreachable!("either a time or a byte bound is set"),
    };
    let seed = Rng(start.elapsed().as_nanos() as u64 ^ u64::from(std::process::id())).next_u64();
    let run_id = (seed >> 32) as u32 | 1;
    let mut filler = vec![0u8; bs as usize];
    let mut rng = Rng(seed);
    for c in filler.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&r[..c.len()]);
    }
    let filler = Arc::new(filler);
    let progress = Arc::new(conn::Progress::default());
    let bar = show_progress.then(|| progress_bar(args, total_bytes));
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64, 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (ops, bytes) = (
                    progress.ops.load(Ordering::Relaxed),
                    progress.bytes.load(Ordering::Relaxed),
                );
                let dt = last.0.elapsed().as_secs_f64().max(1e-6);
                bar.set_message(format!(
                    "{:.1}k IOPS {:.1} MiB/s",
                    (ops - last.1) as f64 / dt / 1e3,
                    (bytes - last.2) as f64 / dt / 1048576.0
                ));
                match total_bytes {
                    Some(_) => bar.set_position(bytes),
                    None => bar.set_position(start.elapsed().as_millis() as u64),
                }
                last = (Instant::now(), ops, bytes);
            }
        })
    });

    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let i = i as u64;
        let job = conn::Job {
            plan: Plan::new(
                args.rw,
                args.rwmix_read,
                stripe_blocks,
                bound(i),
                seed ^ (i + 1),
            ),
            base: match (args.verify, striped) {
                (true, _) => i * bs,
                (false, true) => i * stripe_blocks * bs,
                (false, false) => 0,
            },
            stride: if args.verify { n * bs } else { bs },
            bs: bs as usize,
            iodepth: args.iodepth as usize,
            verify: args.verify.then_some(run_id),
            blocks: stripe_blocks,
            record_from: start + ramp,
            filler: filler.clone(),
        };
        tasks.push(tokio::spawn(conn::run(c, job, progress.clone())));
    }
    let mut stats = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t
            .await
            .map_err(|e| BenchError::Io(e.to_string()))
            .and_then(|r| r)
        {
            Ok(s) => stats.push(s),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(Report::new(args, &neg, start + ramp, &stats))
}

fn progress_bar(args: &BenchArgs, total_bytes: Option<u64>) -> indicatif::ProgressBar {
    let (len, style) = match (args.time, total_bytes) {
        (Some(t), _) => {
            let total = t + args.ramp.unwrap_or_default();
            (
                total.as_millis() as u64,
                "{elapsed_precise} [{bar:30}] {msg}",
            )
        }
        (None, b) => (
            b.unwrap_or(0),
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {msg}",
        ),
    };
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(style)
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar
}

/// `4096`, `4K`, `4KiB`, `1M`, `2G`, `1T` (binary multiples, as fio reads them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let num: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
    };
    num.checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// `10`, `10s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let num: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "" | "s" => num,
        "ms" => num / 1e3,
        "m" => num * 60.0,
        _ => return Err(format!("unknown time unit in {s:?} (use ms, s, m)")),
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
