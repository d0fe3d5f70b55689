//! The raw-disk baseline: how fast the disk under a directory takes a
//! sequential write of N bytes followed by an fsync (the file created, written
//! in 1 MiB chunks, synced, and its directory synced, as a compaction does).
//! Compaction throughput is reported as a fraction of this rate.

use crate::{mib, ms, work_dir, BoxError};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The options of `bench disk`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Directory to write in; default: a fresh temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Bytes to write.
    #[arg(long, default_value_t = 256 << 20)]
    pub bytes: u64,
}

/// What one sequential write-and-sync took.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// Bytes written.
    pub bytes: u64,
    /// Time from the create to the end of the directory sync.
    pub duration: Duration,
}

impl Baseline {
    /// The rate in MiB/s.
    pub fn mib_per_sec(&self) -> f64 {
        mib(self.bytes) / self.duration.as_secs_f64().max(1e-9)
    }
}

/// Size of each write.
const CHUNK: usize = 1 << 20;

/// Writes `bytes` pseudo-random bytes sequentially to a new file in `dir`,
/// syncs it and the directory, removes it, and says how long that took.
pub fn sequential_write_sync(dir: &Path, bytes: u64) -> std::io::Result<Baseline> {
    let path = dir.join("bench-disk-baseline.tmp");
    // Incompressible-looking data, so a compressing file system cannot cheat.
    let mut chunk = vec![0u8; CHUNK];
    SmallRng::seed_from_u64(1).fill(&mut chunk[..]);
    let started = Instant::now();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    let duration = started.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Baseline { bytes, duration })
}

/// Runs `bench disk`.
pub fn main(args: &Args) -> Result<bool, BoxError> {
    let (dir, _temp) = work_dir(args.dir.as_deref())?;
    let baseline = sequential_write_sync(&dir, args.bytes)?;
    println!(
        "raw disk: {:.1} MiB written and synced sequentially in {:.1} ms: {:.1} MiB/s ({})",
        mib(args.bytes),
        ms(baseline.duration),
        baseline.mib_per_sec(),
        dir.display()
    );
    Ok(true)
}
