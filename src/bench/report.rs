//! The result of a run: per direction IOPS, MiB/s and latency percentiles; the text table and
//! (through serde) the `--json` document.

use std::fmt;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::conn::ConnStats;
use super::{BenchArgs, Rw};
use crate::nbd::client::Negotiated;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub uri: String,
    pub rw: Rw,
    pub bs: u64,
    pub iodepth: u32,
    pub connections: u32,
    pub export_size: u64,
    /// Seconds from the first measured request (after the ramp) to the last main-phase reply.
    pub elapsed_s: f64,
    pub read: Option<Direction>,
    pub write: Option<Direction>,
    pub total: Direction,
    /// Requests answered with an NBD error.
    pub errors: u64,
    pub verify: Option<VerifyReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Direction {
    pub ops: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub lat_us: Latency,
}

/// Latency in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Blocks read (during the run or in the final read-back) and found as last written.
    pub verified_blocks: u64,
    /// Reads of blocks this run had not written yet: not checkable.
    pub unverified_reads: u64,
    pub mismatches: u64,
    pub first_mismatches: Vec<String>,
}

impl Report {
    pub(super) fn new(
        args: &BenchArgs,
        neg: &Negotiated,
        start: Instant,
        stats: &[ConnStats],
    ) -> Self {
        let end = stats
            .iter()
            .filter_map(|s| s.main_end)
            .max()
            .unwrap_or(start);
        let elapsed = end.saturating_duration_since(start).as_secs_f64().max(1e-9);
        let merge = |pick: fn(&ConnStats) -> &Histogram<u64>| {
            let mut h = stats.first().map_or_else(
                || Histogram::new(3).expect("valid histogram"),
                |s| pick(s).clone(),
            );
            for s in stats.iter().skip(1) {
                h.add(pick(s)).expect("histograms with equal bounds");
            }
            h
        };
        let read = merge(|s| &s.read);
        let write = merge(|s| &s.write);
        let read_bytes = stats.iter().map(|s| s.read_bytes).sum();
        let write_bytes = stats.iter().map(|s| s.write_bytes).sum();
        let mut all = read.clone();
        all.add(&write).expect("histograms with equal bounds");
        let verify = args.verify.then(|| VerifyReport {
            verified_blocks: stats.iter().map(|s| s.verified_blocks).sum(),
            unverified_reads: stats.iter().map(|s| s.unverified_reads).sum(),
            mismatches: stats.iter().map(|s| s.mismatches).sum(),
            first_mismatches: stats
                .iter()
                .flat_map(|s| s.first_mismatches.iter().map(|m| m.to_string()))
                .take(5)
                .collect(),
        });
        Report {
            uri: args.uri.clone(),
            rw: args.rw,
            bs: args.bs,
            iodepth: args.iodepth,
            connections: args.connections,
            export_size: neg.size,
            elapsed_s: elapsed,
            read: (!read.is_empty()).then(|| direction(&read, read_bytes, elapsed)),
            write: (!write.is_empty()).then(|| direction(&write, write_bytes, elapsed)),
            total: direction(&all, read_bytes + write_bytes, elapsed),
            errors: stats.iter().map(|s| s.errors).sum(),
            verify,
        }
    }
}

fn direction(h: &Histogram<u64>, bytes: u64, elapsed: f64) -> Direction {
    let us = |ns: u64| ns as f64 / 1e3;
    Direction {
        ops: h.len(),
        bytes,
        iops: h.len() as f64 / elapsed,
        mib_s: bytes as f64 / elapsed / 1048576.0,
        lat_us: Latency {
            min: us(h.min()),
            mean: h.mean() / 1e3,
            p50: us(h.value_at_quantile(0.5)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        },
    }
}

/// `812us`, `1.25ms`, `2.1s`.
fn lat(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 1e6 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

fn iops(v: f64) -> String {
    if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} rw={} bs={} iodepth={} connections={}: {:.2}s",
            self.uri,
            self.rw.name(),
            self.bs,
            self.iodepth,
            self.connections,
            self.elapsed_s
        )?;
        writeln!(
            f,
            "{:<6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
            "", "IOPS", "MiB/s", "p50", "p99", "p99.9", "max"
        )?;
        let rows = [("read", &self.read), ("write", &self.write)];
        let mut rows: Vec<(&str, &Direction)> = rows
            .iter()
            .filter_map(|(n, d)| d.as_ref().map(|d| (*n, d)))
            .collect();
        if rows.len() > 1 {
            rows.push(("total", &self.total));
        }
        for (name, d) in rows {
            writeln!(
                f,
                "{:<6} {:>10} {:>10.1} {:>9} {:>9} {:>9} {:>9}",
                name,
                iops(d.iops),
                d.mib_s,
                lat(d.lat_us.p50),
                lat(d.lat_us.p99),
                lat(d.lat_us.p99_9),
                lat(d.lat_us.max)
            )?;
        }
        if self.errors > 0 {
            writeln!(f, "errors: {} requests failed", self.errors)?;
        }
        if let Some(v) = &self.verify {
            writeln!(
                f,
                "verify: {} blocks verified, {} reads of unwritten blocks, {} mismatches",
                v.verified_blocks, v.unverified_reads, v.mismatches
            )?;
            for m in &v.first_mismatches {
                writeln!(f, "  {m}")?;
            }
        }
        Ok(())
    }
}
