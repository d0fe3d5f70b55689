//! The peers comparison, `bench peers`: one durable batch workload against
//! this project (`ours`, its default configuration, and `ours-uncached` without
//! a node cache, whose ratios to `ours` show what the cache changes; neither
//! counts as a peer) and, when
//! built with the `peers` feature, against redb, sled,
//! fjall, nebari and heed (LMDB), with RocksDB behind its own `rocksdb`
//! feature (its C++ build is slow). Without features only this project runs.
//!
//! The workload, the same for every engine and run one engine at a time,
//! each in its own subdirectory: `--keys` random keys of `--key-size` bytes
//! with random values of `--value-size` bytes, written in batches of
//! `--batch` with one durable commit each (the commit returns once the batch
//! is synced). Pass 1 inserts every key in a random order, pass 2 overwrites
//! every key once in another order. Then the engine's compaction runs in one
//! thread while another keeps committing batches of overwrites until the
//! compaction ends (their commit latency is the cost of compaction to
//! writers; an engine whose compaction needs the database to itself blocks
//! them). Then the engine is closed, reopened, and every key is read back
//! and compared with the last value written to it.
//!
//! Sizes are measured alike for every engine: the sum of the lengths of the
//! files under its directory; the size after compaction includes what the
//! writer added while it ran (the `cp commits` column). The report gives, per engine, the time of each
//! pass, commits per second, commit latency, the size after the passes and
//! after compaction (also as a multiple of the live data, keys times key and
//! value size), the compaction time, the commit latency while compacting,
//! the read-back time and mismatches, then every figure as a ratio to this
//! project. A raw-disk figure (sequential write and sync, [`crate::disk`])
//! is printed as context.
//!
//! Versions and modes of the peers: redb 4 (`Durability::Immediate`, the
//! default; compaction takes `&mut Database`, so it excludes writers), sled
//! 0.34 (`flush` after each batch; no explicit compaction), fjall 3
//! (`PersistMode::SyncAll` on the write batch; compaction: memtable flush,
//! then a major compaction), nebari 0.5 (transactions are durable; tree
//! compaction), heed 0.11 (LMDB, durable by default; compaction: a compacting
//! copy, swapped in with the environment closed, so it excludes writers; heed
//! 0.11 is the last heed whose `EnvOpenOptions::open` is safe: later ones
//! make it `unsafe`, which this workspace forbids) and rocksdb 0.25
//! (`WriteOptions::set_sync(true)`; `compact_range` over all keys; built
//! without compression libraries). redb 4, fjall 3 and rocksdb 0.25 need a
//! newer Rust than the workspace's minimum: only the optional features do.

mod ours;

#[cfg(feature = "fjall")]
mod fjall;
#[cfg(feature = "heed")]
mod heed;
#[cfg(feature = "nebari")]
mod nebari;
#[cfg(feature = "redb")]
mod redb;
#[cfg(feature = "rocksdb")]
mod rocksdb;
#[cfg(feature = "sled")]
mod sled;

use crate::{mib, ms, work_dir, BoxError};
use flusher::LatencyHistogram;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// The options of `bench peers`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Number of distinct keys.
    #[arg(long, default_value_t = 200_000)]
    pub keys: usize,
    /// Key size in bytes (at least 8).
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Items per durable commit.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Seed of the keys, the orders and the values.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Directory to run in (each engine in its own subdirectory, which must
    /// not exist yet); default: a fresh temporary one, removed at the end.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Engines to run, a comma-separated list (default: every engine built
    /// in; `ours` is always run first, it is the yardstick of the ratios).
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<String>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the raw-disk baseline.
    #[arg(long)]
    pub no_disk_baseline: bool,
    /// Instead of the workload, read back what an earlier run with the same
    /// workload options left in `--dir`: each engine found there is opened
    /// once and reads every key back this many times (each value checked
    /// for its presence and size: which version it is, only the run knew).
    /// Read-backs without the workload's writes before them in the process
    /// are steadier, for comparing builds.
    #[arg(long, requires = "dir")]
    pub reread: Option<u32>,
}

/// One batch: key and value pairs, written with one durable commit.
pub type Batch = [(Vec<u8>, Vec<u8>)];

/// An owned [`Batch`].
type OwnedBatch = Vec<(Vec<u8>, Vec<u8>)>;

/// How an engine's compaction shares the database with writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionKind {
    /// Writers keep committing while it runs.
    Concurrent,
    /// It needs the database to itself: writers wait for it.
    #[cfg_attr(not(any(feature = "redb", feature = "heed")), allow(dead_code))]
    Exclusive,
    /// The engine has no explicit compaction.
    None,
}

impl CompactionKind {
    /// The word of the report.
    fn label(self) -> &'static str {
        match self {
            Self::Concurrent => "concurrent",
            Self::Exclusive => "exclusive",
            Self::None => "none",
        }
    }
}

/// Receives each key's value as read back: the key's index and its value.
pub type ReadBackCheck<'a> = dyn FnMut(usize, Option<&[u8]>) + 'a;

/// The loop of an [`Engine::read_back`]: looks every key up with `get` and
/// hands `check` its index and value.
fn read_each<V, E>(
    keys: &[Vec<u8>],
    check: &mut ReadBackCheck<'_>,
    mut get: impl FnMut(&[u8]) -> Result<Option<V>, E>,
) -> Result<(), BoxError>
where
    V: AsRef<[u8]>,
    E: Into<BoxError>,
{
    for (i, key) in keys.iter().enumerate() {
        let value = get(key).map_err(Into::into)?;
        check(i, value.as_ref().map(AsRef::as_ref));
    }
    Ok(())
}

/// An open engine. Shared by a writer thread and a compacting thread, so
/// every operation takes `&self`.
pub trait Engine: Send + Sync {
    /// Writes the batch in one transaction and returns once it is durable.
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError>;
    /// How [`Engine::compact`] shares the database with writers.
    fn compaction_kind(&self) -> CompactionKind;
    /// Runs the engine's compaction to its end (a no-op for
    /// [`CompactionKind::None`]).
    fn compact(&self) -> Result<(), BoxError>;
    /// Looks up every key (in one read transaction or snapshot where the
    /// engine has them) and hands each value to `check`.
    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError>;
    /// A line of engine-specific context for the report, if any.
    fn notes(&self) -> Option<String> {
        None
    }
    /// Closes the engine, making everything durable.
    fn close(self: Box<Self>) -> Result<(), BoxError>;
}

/// An engine that can be run: its name and how to open it in a directory
/// (created, or reopened when it holds the engine's files).
#[derive(Clone, Copy)]
pub struct EngineSpec {
    /// The engine's name in the report and in `--engines`.
    pub name: &'static str,
    /// Opens the engine in a directory.
    pub open: fn(&Path) -> Result<Box<dyn Engine>, BoxError>,
}

/// True for this project's own engines (not peers of the target).
fn is_ours(name: &str) -> bool {
    name == ours::SPEC.name || name == ours::SPEC_UNCACHED.name
}

/// The engines this binary was built with, this project first.
fn built_in() -> Vec<EngineSpec> {
    #[allow(unused_mut)]
    let mut engines = vec![ours::SPEC, ours::SPEC_UNCACHED];
    #[cfg(feature = "redb")]
    engines.push(self::redb::SPEC);
    #[cfg(feature = "sled")]
    engines.push(self::sled::SPEC);
    #[cfg(feature = "fjall")]
    engines.push(self::fjall::SPEC);
    #[cfg(feature = "nebari")]
    engines.push(self::nebari::SPEC);
    #[cfg(feature = "heed")]
    engines.push(self::heed::SPEC);
    #[cfg(feature = "rocksdb")]
    engines.push(self::rocksdb::SPEC);
    engines
}

/// The peers a build without their features leaves out, with the feature
/// that adds each.
fn left_out() -> Vec<(&'static str, &'static str)> {
    let all = [
        ("redb", "peers"),
        ("sled", "peers"),
        ("fjall", "peers"),
        ("nebari", "peers"),
        ("heed", "peers"),
        ("rocksdb", "rocksdb"),
    ];
    let built: Vec<&str> = built_in().iter().map(|e| e.name).collect();
    all.into_iter()
        .filter(|(name, _)| !built.contains(name))
        .collect()
}

/// The keys and the values of the workload.
struct Workload {
    /// The distinct random keys.
    keys: Vec<Vec<u8>>,
    /// Bytes per value.
    value_size: usize,
    /// Items per commit.
    batch: usize,
    /// The seed of the values.
    seed: u64,
    /// The key order of pass 1, of pass 2 and of the overwrites while
    /// compacting.
    orders: [Vec<usize>; 3],
}

impl Workload {
    /// Draws `args.keys` distinct random keys and three random orders.
    fn new(args: &Args) -> Self {
        let mut rng = SmallRng::seed_from_u64(args.seed);
        let mut seen = HashSet::with_capacity(args.keys);
        let mut keys = Vec::with_capacity(args.keys);
        while keys.len() < args.keys {
            let mut key = vec![0u8; args.key_size];
            rng.fill(&mut key[..]);
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
        let mut order = || {
            let mut order: Vec<usize> = (0..args.keys).collect();
            order.shuffle(&mut rng);
            order
        };
        let orders = [order(), order(), order()];
        Self {
            keys,
            value_size: args.value_size,
            batch: args.batch.max(1),
            seed: args.seed,
            orders,
        }
    }

    /// Version `version` of key `index`'s value: pseudo-random bytes that
    /// depend on the seed, the version and the key.
    fn value(&self, version: u32, index: usize) -> Vec<u8> {
        let mix = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(u64::from(version) << 40)
            .wrapping_add(index as u64);
        let mut rng = SmallRng::seed_from_u64(mix);
        let mut value = vec![0u8; self.value_size];
        rng.fill(&mut value[..]);
        value
    }

    /// Batch `n` of order `order` with values of version `version`, and the
    /// key indexes it writes.
    fn batch(&self, order: usize, n: usize, version: u32) -> (OwnedBatch, &[usize]) {
        let order = &self.orders[order];
        let start = (n * self.batch).min(order.len());
        let end = (start + self.batch).min(order.len());
        let indexes = &order[start..end];
        let batch = indexes
            .iter()
            .map(|&i| (self.keys[i].clone(), self.value(version, i)))
            .collect();
        (batch, indexes)
    }

    /// Batches per full pass.
    fn batches(&self) -> usize {
        self.keys.len().div_ceil(self.batch)
    }

    /// The live data: keys times key and value size.
    fn live_bytes(&self) -> u64 {
        self.keys
            .iter()
            .map(|k| (k.len() + self.value_size) as u64)
            .sum()
    }
}

/// What one engine did.
#[derive(Debug, Clone)]
struct Outcome {
    /// The engine's name.
    name: &'static str,
    /// Time of pass 1 (the commits only, not the making of the batches).
    insert: Duration,
    /// Time of pass 2.
    overwrite: Duration,
    /// Durable commits of passes 1 and 2.
    commits: u64,
    /// Their latency.
    commit_latency: LatencyHistogram,
    /// Bytes on disk after the two passes.
    size_after_passes: u64,
    /// How the compaction shared the database.
    compaction_kind: CompactionKind,
    /// How long the compaction took.
    compaction: Duration,
    /// Bytes on disk after the compaction.
    size_after_compaction: u64,
    /// Latency of the commits made while the compaction ran.
    latency_while_compacting: LatencyHistogram,
    /// How long the reopen took.
    reopen: Duration,
    /// How long reading back every key took.
    read_back: Duration,
    /// Keys whose value read back differs from the last one written
    /// (missing ones included).
    mismatches: u64,
    /// Engine-specific context.
    notes: Option<String>,
}

impl Outcome {
    /// Durable commits per second over passes 1 and 2.
    fn commits_per_sec(&self) -> f64 {
        self.commits as f64 / (self.insert + self.overwrite).as_secs_f64().max(1e-9)
    }
}

/// The total length of the files under `dir`.
fn dir_size(dir: &Path) -> Result<u64, BoxError> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// One full pass over order `order` with values of version `version`:
/// returns its time (the sum of the commits) and records each commit's
/// latency. The batches are made before the clock starts.
fn run_pass(
    engine: &dyn Engine,
    workload: &Workload,
    order: usize,
    version: u32,
    versions: &mut [u32],
    latency: &mut LatencyHistogram,
) -> Result<Duration, BoxError> {
    let batches: Vec<_> = (0..workload.batches())
        .map(|n| workload.batch(order, n, version))
        .collect();
    let started = Instant::now();
    for (batch, indexes) in &batches {
        let t = Instant::now();
        engine.write_batch(batch)?;
        latency.record(t.elapsed());
        for &i in *indexes {
            versions[i] = version;
        }
    }
    Ok(started.elapsed())
}

/// `bench peers --reread`: `rounds` read-backs of every key by each engine
/// whose subdirectory `dir` holds, after one open. True when every value
/// was found with the workload's value size.
fn reread(
    specs: &[EngineSpec],
    workload: &Workload,
    dir: &Path,
    rounds: u32,
) -> Result<bool, BoxError> {
    let mut all_found = true;
    for spec in specs {
        let path = dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let engine = (spec.open)(&path)?;
        let mut times = Vec::new();
        let mut wrong = 0u64;
        for _ in 0..rounds {
            let started = Instant::now();
            engine.read_back(&workload.keys, &mut |_, value| {
                if value.map(<[u8]>::len) != Some(workload.value_size) {
                    wrong += 1;
                }
            })?;
            times.push(format!("{:.3}", started.elapsed().as_secs_f64()));
        }
        engine.close()?;
        println!(
            "{}: read-backs of {} keys (s): {}; {wrong} missing or of another size",
            spec.name,
            workload.keys.len(),
            times.join(" ")
        );
        all_found &= wrong == 0;
    }
    Ok(all_found)
}

/// The compaction phase: the compaction in this thread while a writer
/// thread commits overwrites (from version 3 on, one version per full pass)
/// until it ends. Returns the compaction time and the writer's latencies.
fn run_compaction(
    engine: &dyn Engine,
    workload: &Workload,
    versions: &mut [u32],
) -> Result<(Duration, LatencyHistogram), BoxError> {
    if engine.compaction_kind() == CompactionKind::None {
        return Ok((Duration::ZERO, LatencyHistogram::new()));
    }
    let done = AtomicBool::new(false);
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> Result<LatencyHistogram, BoxError> {
            let mut latency = LatencyHistogram::new();
            start.wait();
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                let version = 3 + u32::try_from(n / workload.batches()).unwrap_or(u32::MAX - 3);
                let (batch, indexes) = workload.batch(2, n % workload.batches(), version);
                let t = Instant::now();
                engine.write_batch(&batch)?;
                latency.record(t.elapsed());
                for &i in indexes {
                    versions[i] = version;
                }
                n += 1;
            }
            Ok(latency)
        });
        start.wait();
        let started = Instant::now();
        let compacted = engine.compact();
        let took = started.elapsed();
        done.store(true, Ordering::Release);
        let latency = writer
            .join()
            .map_err(|_| BoxError::from("the writer thread panicked"))??;
        compacted?;
        Ok((took, latency))
    })
}

/// Runs the whole workload against one engine in `dir`.
fn run_engine(spec: &EngineSpec, workload: &Workload, dir: &Path) -> Result<Outcome, BoxError> {
    let name = spec.name;
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()).into());
    }
    std::fs::create_dir_all(dir)?;
    let engine = (spec.open)(dir)?;
    let mut versions = vec![0u32; workload.keys.len()];
    let mut commit_latency = LatencyHistogram::new();

    let insert = run_pass(&*engine, workload, 0, 1, &mut versions, &mut commit_latency)?;
    println!(
        "{name}: insert pass: {} commits in {:.2} s",
        workload.batches(),
        insert.as_secs_f64()
    );
    let overwrite = run_pass(&*engine, workload, 1, 2, &mut versions, &mut commit_latency)?;
    println!(
        "{name}: overwrite pass: {} commits in {:.2} s",
        workload.batches(),
        overwrite.as_secs_f64()
    );
    let size_after_passes = dir_size(dir)?;

    let compaction_kind = engine.compaction_kind();
    let (compaction, latency_while_compacting) = run_compaction(&*engine, workload, &mut versions)?;
    let size_after_compaction = dir_size(dir)?;
    println!(
        "{name}: compaction ({}): {:.2} s, {} commits meanwhile; {:.1} MiB -> {:.1} MiB",
        compaction_kind.label(),
        compaction.as_secs_f64(),
        latency_while_compacting.count(),
        mib(size_after_passes),
        mib(size_after_compaction)
    );
    let notes = engine.notes();
    engine.close()?;

    let started = Instant::now();
    let engine = (spec.open)(dir)?;
    let reopen = started.elapsed();
    let mut mismatches = 0u64;
    let started = Instant::now();
    engine.read_back(&workload.keys, &mut |i, value| {
        let expected = workload.value(versions[i], i);
        if value != Some(expected.as_slice()) {
            mismatches += 1;
        }
    })?;
    let read_back = started.elapsed();
    engine.close()?;
    println!(
        "{name}: reopen {:.2} s, read-back of {} keys {:.2} s, {mismatches} mismatches",
        reopen.as_secs_f64(),
        workload.keys.len(),
        read_back.as_secs_f64()
    );
    Ok(Outcome {
        name,
        insert,
        overwrite,
        commits: commit_latency.count(),
        commit_latency,
        size_after_passes,
        compaction_kind,
        compaction,
        size_after_compaction,
        latency_while_compacting,
        reopen,
        read_back,
        mismatches,
        notes,
    })
}

/// The figures of the report, in column order: table header, JSON name
/// and value.
fn figures(o: &Outcome, live: u64) -> Vec<(&'static str, &'static str, f64)> {
    let commit = o.commit_latency.summary();
    let compacting = o.latency_while_compacting.summary();
    let x_live = |bytes: u64| bytes as f64 / live.max(1) as f64;
    vec![
        ("insert s", "insert_s", o.insert.as_secs_f64()),
        ("overwr s", "overwrite_s", o.overwrite.as_secs_f64()),
        ("commits/s", "commits_per_sec", o.commits_per_sec()),
        ("p50 ms", "commit_p50_ms", ms(commit.p50)),
        ("p99 ms", "commit_p99_ms", ms(commit.p99)),
        (
            "size MiB",
            "size_after_passes_mib",
            mib(o.size_after_passes),
        ),
        (
            "x live",
            "size_after_passes_x_live",
            x_live(o.size_after_passes),
        ),
        (
            "compact MiB",
            "size_after_compaction_mib",
            mib(o.size_after_compaction),
        ),
        (
            "x live",
            "size_after_compaction_x_live",
            x_live(o.size_after_compaction),
        ),
        ("compact s", "compaction_s", o.compaction.as_secs_f64()),
        (
            "cp p99 ms",
            "commit_p99_while_compacting_ms",
            ms(compacting.p99),
        ),
        (
            "cp max ms",
            "commit_max_while_compacting_ms",
            ms(compacting.max),
        ),
        ("read s", "read_back_s", o.read_back.as_secs_f64()),
    ]
}

/// Prints the table of figures and the table of ratios to this project.
fn print_report(outcomes: &[Outcome], live: u64) {
    let Some(ours) = outcomes.first() else {
        return;
    };
    let headers: Vec<&str> = figures(ours, live).iter().map(|f| f.0).collect();
    let mut line = format!("{:<8}", "engine");
    for h in &headers {
        line.push_str(&format!(" {h:>11}"));
    }
    line.push_str(&format!(
        " {:>11} {:>9} {:>10}",
        "compaction", "cp commits", "mismatches"
    ));
    println!("\n{line}");
    for o in outcomes {
        let mut line = format!("{:<8}", o.name);
        for (_, _, value) in figures(o, live) {
            line.push_str(&format!(" {:>11}", format_value(value)));
        }
        line.push_str(&format!(
            " {:>11} {:>9} {:>10}",
            o.compaction_kind.label(),
            o.latency_while_compacting.count(),
            o.mismatches
        ));
        println!("{line}");
    }
    if outcomes.len() < 2 {
        return;
    }
    println!(
        "\nratios engine / {} (commits/s: above 1 the peer is faster; every other column: above 1 the peer is slower or bigger, so below 1 is better for the peer):",
        ours.name
    );
    let mut line = format!("{:<8}", "engine");
    for h in &headers {
        line.push_str(&format!(" {h:>11}"));
    }
    println!("{line}");
    let base = figures(ours, live);
    for o in outcomes.iter().skip(1) {
        let mut line = format!("{:<8}", o.name);
        for ((_, _, value), (_, _, ours)) in figures(o, live).iter().zip(&base) {
            line.push_str(&format!(" {:>11}", format_ratio(*value, *ours)));
        }
        println!("{line}");
    }
}

/// A figure with a precision that suits its size.
fn format_value(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `value / base`, or "-" when the base is zero.
fn format_ratio(value: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}", value / base)
    } else if value > 0.0 {
        "inf".into()
    } else {
        "-".into()
    }
}

/// The JSON form of a latency distribution (milliseconds).
fn latency_json(h: &LatencyHistogram) -> serde_json::Value {
    let s = h.summary();
    json!({
        "count": s.count,
        "p50_ms": ms(s.p50),
        "p99_ms": ms(s.p99),
        "p999_ms": ms(s.p999),
        "mean_ms": ms(s.mean),
        "max_ms": ms(s.max),
    })
}

/// Runs `bench peers`.
pub fn main(args: &Args) -> Result<bool, BoxError> {
    if args.keys == 0 || args.key_size < 8 {
        return Err("--keys must be at least 1 and --key-size at least 8".into());
    }
    let mut specs = built_in();
    if !args.engines.is_empty() {
        for name in &args.engines {
            if !specs.iter().any(|s| s.name == name) {
                return Err(format!(
                    "unknown engine {name:?}; built in: {}",
                    specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                )
                .into());
            }
        }
        specs.retain(|s| s.name == ours::SPEC.name || args.engines.iter().any(|e| e == s.name));
    }
    for (name, feature) in left_out() {
        println!("{name}: not built in (build with --features {feature})");
    }

    let workload = Workload::new(args);
    if let (Some(rounds), Some(dir)) = (args.reread, &args.dir) {
        return reread(&specs, &workload, dir, rounds);
    }
    let (dir, _temp) = work_dir(args.dir.as_deref())?;

    let live = workload.live_bytes();
    println!(
        "workload: {} keys of {} bytes, values of {} bytes ({:.1} MiB live), batches of {} with one durable commit each, in {}",
        args.keys,
        args.key_size,
        args.value_size,
        mib(live),
        workload.batch,
        dir.display()
    );
    let disk = if args.no_disk_baseline {
        None
    } else {
        // Twice the live data, at least 16 MiB and at most 256 MiB.
        let bytes = (2 * live).clamp(16 << 20, 256 << 20);
        let baseline = crate::disk::sequential_write_sync(&dir, bytes)?;
        println!(
            "raw disk: {:.1} MiB written sequentially and synced at {:.1} MiB/s",
            mib(bytes),
            baseline.mib_per_sec()
        );
        Some(baseline)
    };

    let mut outcomes = Vec::new();
    for spec in &specs {
        let outcome = run_engine(spec, &workload, &dir.join(spec.name))?;
        if let Some(notes) = &outcome.notes {
            println!("{}: {notes}", spec.name);
        }
        outcomes.push(outcome);
    }
    print_report(&outcomes, live);

    if let Some(ours) = outcomes.first() {
        let fastest_peer = outcomes
            .iter()
            .filter(|o| !is_ours(o.name))
            .max_by(|a, b| a.commits_per_sec().total_cmp(&b.commits_per_sec()));
        if let Some(peer) = fastest_peer {
            println!(
                "\ndurable batch commits: {} {:.0}/s, fastest peer {} {:.0}/s: {}",
                ours.name,
                ours.commits_per_sec(),
                peer.name,
                peer.commits_per_sec(),
                if ours.commits_per_sec() >= peer.commits_per_sec() {
                    "target met"
                } else {
                    "target missed"
                }
            );
        }
    }

    if let Some(out) = &args.out {
        let base = outcomes.first().map(|o| figures(o, live));
        let engines: Vec<_> = outcomes
            .iter()
            .map(|o| {
                let ratios: serde_json::Map<String, serde_json::Value> = match &base {
                    Some(base) => figures(o, live)
                        .iter()
                        .zip(base)
                        .map(|((_, key, v), (_, _, b))| {
                            let ratio = if *b > 0.0 { json!(v / b) } else { json!(null) };
                            (key.to_string(), ratio)
                        })
                        .collect(),
                    None => serde_json::Map::new(),
                };
                json!({
                    "name": o.name,
                    "insert_s": o.insert.as_secs_f64(),
                    "overwrite_s": o.overwrite.as_secs_f64(),
                    "commits": o.commits,
                    "commits_per_sec": o.commits_per_sec(),
                    "commit_latency": latency_json(&o.commit_latency),
                    "size_after_passes": o.size_after_passes,
                    "size_after_compaction": o.size_after_compaction,
                    "size_after_passes_x_live": o.size_after_passes as f64 / live.max(1) as f64,
                    "size_after_compaction_x_live": o.size_after_compaction as f64 / live.max(1) as f64,
                    "compaction": o.compaction_kind.label(),
                    "compaction_s": o.compaction.as_secs_f64(),
                    "latency_while_compacting": latency_json(&o.latency_while_compacting),
                    "reopen_s": o.reopen.as_secs_f64(),
                    "read_back_s": o.read_back.as_secs_f64(),
                    "mismatches": o.mismatches,
                    "notes": o.notes,
                    "ratios_to_ours": ratios,
                })
            })
            .collect();
        let report = json!({
            "keys": args.keys,
            "key_size": args.key_size,
            "value_size": args.value_size,
            "batch": workload.batch,
            "seed": args.seed,
            "live_bytes": live,
            "raw_disk_mib_per_sec": disk.map(|d| d.mib_per_sec()),
            "engines": engines,
        });
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", out.display());
    }
    Ok(outcomes.iter().all(|o| o.mismatches == 0))
}
