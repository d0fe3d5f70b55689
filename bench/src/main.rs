//! `bench`: the project's main job. With no subcommand it runs the workload
//! runner ([`workload`]): a store of vbuckets under writes, reads, the
//! flusher and automatic compaction, with a live progress line, a report, a
//! JSON file and an SVG chart, and a final close, reopen and read-back check
//! (exit status 1 when any key differs). `bench peers` runs the same durable
//! batch workload against this project and, when built with the `peers` (and
//! `rocksdb`) features, against other embedded engines ([`peers`]). `bench
//! disk` measures the raw sequential write-and-sync rate of the disk
//! ([`disk`]), the yardstick of compaction throughput.
//!
//! It is not a micro-benchmark harness: the criterion benches run with
//! `cargo xtask bench`.

mod chart;
mod disk;
mod peers;
mod report;
mod workload;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The allocator of the binary, as a server would link one (see
/// `Cargo.toml`); the engine's crates leave the choice to their user.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The error type of the runner's plumbing (the engines' errors, I/O, JSON).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The directory to work in: `dir` (created if missing), or else a fresh
/// temporary one, removed when the returned guard is dropped.
pub fn work_dir(dir: Option<&Path>) -> std::io::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Ok((dir.to_path_buf(), None))
        }
        None => {
            let temp = tempfile::tempdir()?;
            Ok((temp.path().to_path_buf(), Some(temp)))
        }
    }
}

/// The workload runner (default), the peers comparison and the disk baseline.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: workload::Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The durable batch workload against this project and its peers.
    Peers(peers::Args),
    /// The raw sequential write-and-sync rate of the disk.
    Disk(disk::Args),
}

/// Parses the options and runs; exit status 1 on an error or a difference.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        None => workload::main(&cli.run),
        Some(Command::Peers(args)) => peers::main(args),
        Some(Command::Disk(args)) => disk::main(args),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(1)
        }
    }
}
