//! What one connection does: which block to read or write next, and the verify pattern.
//!
//! Each connection works on its own stripe of the export for sequential and verified workloads
//! (so that blocks have one writer and the expected contents are known), and on the whole export
//! for unverified random ones.

use std::time::Instant;

/// The access pattern, as in fio's `--rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Random reads and writes, `--rwmix-read` percent reads.
    Mixed,
}

impl Rw {
    pub fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Mixed)
    }
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Mixed => "mixed",
        }
    }
    pub fn writes(self) -> bool {
        matches!(self, Rw::Write | Rw::Randwrite | Rw::Mixed)
    }
}

/// One I/O to issue: a block index within the connection's stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub read: bool,
    pub block: u64,
}

/// When a connection stops issuing.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    Ops(u64),
    Until(Instant),
}

/// The main-phase generator of one connection.
#[derive(Debug)]
pub struct Plan {
    rw: Rw,
    read_pct: u32,
    blocks: u64,
    next_seq: u64,
    issued: u64,
    bound: Bound,
    rng: Rng,
}

impl Plan {
    pub fn new(rw: Rw, read_pct: u8, blocks: u64, bound: Bound, seed: u64) -> Self {
        debug_assert!(blocks > 0, "a stripe has at least one block");
        Self {
            rw,
            read_pct: u32::from(read_pct.min(100)),
            blocks,
            next_seq: 0,
            issued: 0,
            bound,
            rng: Rng(seed | 1),
        }
    }

    /// The next op, or `None` once the bound is reached. `busy` says a block has an I/O in flight
    /// (verify mode avoids those, so that the expected contents stay exact).
    pub fn next(&mut self, busy: impl Fn(u64) -> bool) -> Option<Op> {
        match self.bound {
            Bound::Ops(n) if self.issued >= n => return None,
            Bound::Until(t) if self.issued.is_multiple_of(16) && Instant::now() >= t => {
                return None;
            }
            _ => {}
        }
        let read = match self.rw {
            Rw::Read | Rw::Randread => true,
            Rw::Write | Rw::Randwrite => false,
            Rw::Mixed => (self.rng.next_u64() % 100) < u64::from(self.read_pct),
        };
        let mut block = if self.rw.random() {
            self.rng.next_u64() % self.blocks
        } else {
            let b = self.next_seq;
            self.next_seq = (b + 1) % self.blocks;
            b
        };
        // Probe forward past busy blocks; the caller guarantees fewer in flight than blocks.
        let mut tries = 0;
        while busy(block) {
            block = (block + 1) % self.blocks;
            tries += 1;
            if tries > self.blocks {
                return None;
            }
        }
        self.issued += 1;
        Some(Op { read, block })
    }
}

/// xorshift64*: fast, seedable, good enough to spread offsets.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Size of one pattern unit: 8 bytes absolute offset, 4 bytes run id, 4 bytes generation.
pub const UNIT: usize = 16;

/// Fills a block with the verify pattern: every 16-byte unit names its own absolute offset, the
/// run and the block's write generation, so misplaced, stale and torn data are all caught.
pub fn fill_pattern(buf: &mut [u8], offset: u64, run_id: u32, generation: u32) {
    debug_assert!(
        buf.len().is_multiple_of(UNIT),
        "block sizes are multiples of 16"
    );
    for (i, unit) in buf.chunks_exact_mut(UNIT).enumerate() {
        unit[0..8].copy_from_slice(&(offset + (i * UNIT) as u64).to_le_bytes());
        unit[8..12].copy_from_slice(&run_id.to_le_bytes());
        unit[12..16].copy_from_slice(&generation.to_le_bytes());
    }
}

/// What a mismatching unit held instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: u64,
    pub found_offset: u64,
    pub found_run: u32,
    pub found_generation: u32,
    pub expected_generation: u32,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offset {}: expected generation {}, found offset {} run {:#x} generation {}",
            self.offset,
            self.expected_generation,
            self.found_offset,
            self.found_run,
            self.found_generation
        )
    }
}

/// Checks a block read back against the pattern; returns the first bad unit.
pub fn check_pattern(buf: &[u8], offset: u64, run_id: u32, generation: u32) -> Option<Mismatch> {
    for (i, unit) in buf.chunks_exact(UNIT).enumerate() {
        let at = offset + (i * UNIT) as u64;
        let found_offset = u64::from_le_bytes(unit[0..8].try_into().expect("8 bytes"));
        let found_run = u32::from_le_bytes(unit[8..12].try_into().expect("4 bytes"));
        let found_generation = u32::from_le_bytes(unit[12..16].try_into().expect("4 bytes"));
        if (found_offset, found_run, found_generation) != (at, run_id, generation) {
            return Some(Mismatch {
                offset: at,
                found_offset,
                found_run,
                found_generation,
                expected_generation: generation,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_wraps_and_stops() {
        let mut p = Plan::new(Rw::Read, 0, 3, Bound::Ops(5), 1);
        let blocks: Vec<u64> = std::iter::from_fn(|| p.next(|_| false))
            .map(|o| o.block)
            .collect();
        assert_eq!(blocks, [0, 1, 2, 0, 1]);
    }

    #[test]
    fn random_skips_busy_blocks_and_mixes() {
        let mut p = Plan::new(Rw::Mixed, 70, 8, Bound::Ops(10_000), 7);
        let mut reads = 0;
        while let Some(op) = p.next(|b| b % 2 == 0) {
            assert_eq!(op.block % 2, 1);
            reads += usize::from(op.read);
        }
        assert!(
            (6500..7500).contains(&reads),
            "{reads} reads of 10000 at 70%"
        );
    }

    #[test]
    fn pattern_round_trip_and_mismatches() {
        let mut b = vec![0u8; 4096];
        fill_pattern(&mut b, 8192, 0xabc, 3);
        assert_eq!(check_pattern(&b, 8192, 0xabc, 3), None);
        // Stale generation.
        let m = check_pattern(&b, 8192, 0xabc, 4).unwrap();
        assert_eq!((m.offset, m.found_generation), (8192, 3));
        // Misplaced block.
        assert_eq!(check_pattern(&b, 0, 0xabc, 3).unwrap().found_offset, 8192);
        // One torn unit in the middle.
        b[2048] ^= 1;
        assert_eq!(
            check_pattern(&b, 8192, 0xabc, 3).unwrap().offset,
            8192 + 2048
        );
    }
}
