//! The workload runner: a [`vbucket::Store`] of several vbuckets in a fresh
//! temporary directory (or `--dir`) with automatic compaction on, driven for
//! a fixed time by writer threads issuing sets and deletes with a Zipfian key
//! choice at a set rate (some of them waiting for each mutation to be
//! persisted), reader threads doing gets, the store's flusher threads and its
//! automatic compactions. Each run ends with the raw-disk baseline and a
//! final check: the store is closed, reopened, and every key compared with
//! what the writers last persisted. [`crate::report`] prints the outcome and
//! [`crate::chart`] draws it.

use crate::disk::{self, Baseline};
use crate::{chart, mib, report, work_dir, BoxError};
use clap::ValueEnum;
use flusher::{FlusherConfig, LatencyHistogram};
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vbucket::{
    AutoCompaction, CommitEvent, CompactionMode, CompactionOptions, CompactionReport, History,
    ItemMeta, Store, StoreConfig, VBucket,
};

/// How compactions share a vbucket with its flusher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// The flusher keeps committing; it waits only for the final round.
    Concurrent,
    /// The old behaviour: the commit lock is held for the whole compaction.
    Blocking,
}

impl ModeArg {
    /// The vbucket crate's mode.
    fn mode(self) -> CompactionMode {
        match self {
            ModeArg::Concurrent => CompactionMode::Concurrent,
            ModeArg::Blocking => CompactionMode::Blocking,
        }
    }

    /// Lower-case name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            ModeArg::Concurrent => "concurrent",
            ModeArg::Blocking => "blocking",
        }
    }
}

/// The options of the workload runner.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Data directory (must be empty or absent); default: a fresh temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of vbuckets.
    #[arg(long, default_value_t = 8)]
    pub vbuckets: u16,
    /// Keys per vbucket.
    #[arg(long, default_value_t = 20_000)]
    pub keys: u64,
    /// Value size in bytes (at least 8).
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Writer threads (each owns a disjoint key subset of every vbucket).
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// How many of the writers wait for each mutation to be persisted (they
    /// run as fast as persistence allows; `--rate` paces the others).
    #[arg(long, default_value_t = 1)]
    pub durable_writers: usize,
    /// Mutations per second of the other writers together (0: as fast as
    /// they can, which measures the backlog rather than the engine).
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Fraction of mutations that are deletes.
    #[arg(long, default_value_t = 0.05)]
    pub delete_ratio: f64,
    /// Zipf exponent of the key choice (0: uniform).
    #[arg(long, default_value_t = 0.99)]
    pub zipf: f64,
    /// Reader threads.
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Gets per second of the readers together (0: as fast as they can).
    #[arg(long, default_value_t = 20_000)]
    pub read_rate: u64,
    /// Length of the load in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// How compactions run.
    #[arg(long, value_enum, default_value_t = ModeArg::Concurrent)]
    pub compaction: ModeArg,
    /// Run the load twice, concurrent then blocking compaction, and print
    /// them side by side with their ratios (`--compaction` is then ignored).
    #[arg(long, conflicts_with = "history")]
    pub compare: bool,
    /// Run the load twice, compaction without history then keeping history
    /// (`--history-age`, `--history-granularity`), and print them side by
    /// side: the space and the compaction time the history costs.
    #[arg(long)]
    pub history: bool,
    /// With `--history`: how far back the compactions keep headers
    /// (a number and a unit: ns, us, ms, s, m, h, d).
    #[arg(long, default_value = "30s", value_parser = vbucket::tool::parse_duration)]
    pub history_age: Duration,
    /// With `--history`: one header kept per period of this length.
    #[arg(long, default_value = "2s", value_parser = vbucket::tool::parse_duration)]
    pub history_granularity: Duration,
    /// Compact a vbucket once this fraction of its file is garbage.
    #[arg(long, default_value_t = 0.5)]
    pub fragmentation_threshold: f64,
    /// Files smaller than this (bytes) are not compacted.
    #[arg(long, default_value_t = 1 << 20)]
    pub min_file_size: u64,
    /// Most compactions running at a time.
    #[arg(long, default_value_t = 1)]
    pub max_concurrent_compactions: usize,
    /// Flusher threads (vbucket v is flushed by thread v % threads).
    #[arg(long, default_value_t = 1)]
    pub flusher_threads: usize,
    /// MiB of decoded B-tree nodes the store keeps in memory (0: none; the
    /// store's default is 32).
    #[arg(long, default_value_t = vbucket::DEFAULT_NODE_CACHE_BYTES >> 20)]
    pub node_cache_mib: u64,
    /// Seed of the key and operation choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the SVG chart (flush latency and file size over time) here.
    #[arg(long, default_value = "bench-chart.svg")]
    pub chart: PathBuf,
    /// Do not write the chart.
    #[arg(long)]
    pub no_chart: bool,
}

/// How long a durable writer or the final drain waits for persistence.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(120);

/// How often file sizes are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The most bytes the raw-disk baseline writes.
const MAX_BASELINE_BYTES: u64 = 1 << 30;

/// The key of index `index` (the same in every vbucket).
fn key_of(index: u64) -> Vec<u8> {
    format!("key:{index:010}").into_bytes()
}

/// The value of version `version` of key `index` in vbucket `vb`: the
/// version in the first 8 bytes (little-endian), then pseudo-random filler
/// determined by (vb, key, version), so any mismatch is detectable.
fn value_of(vb: u16, index: u64, version: u64, size: usize) -> Vec<u8> {
    let mut value = vec![0u8; size.max(8)];
    value[..8].copy_from_slice(&version.to_le_bytes());
    let seed = (u64::from(vb) << 48) ^ index.rotate_left(17) ^ version.wrapping_mul(31);
    SmallRng::seed_from_u64(seed).fill(&mut value[8..]);
    value
}

/// The version stored in a value's first 8 bytes (0 when too short).
fn version_in(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Keeps a thread at `per_sec` operations per second: call [`Pacer::wait`]
/// before each operation. Sleeps only when more than a millisecond ahead, so
/// high rates do not pay a sleep per operation.
struct Pacer {
    start: Instant,
    interval: Option<Duration>,
    done: u32,
}

impl Pacer {
    fn new(per_sec: f64) -> Self {
        Self {
            start: Instant::now(),
            interval: (per_sec > 0.0).then(|| Duration::from_secs_f64(1.0 / per_sec)),
            done: 0,
        }
    }

    fn wait(&mut self) {
        let Some(interval) = self.interval else {
            return;
        };
        let due = self.start + interval * self.done;
        self.done = self.done.saturating_add(1);
        let now = Instant::now();
        if due > now + Duration::from_millis(1) {
            std::thread::sleep(due - now);
        }
    }
}

/// What one writer did, and the last accepted state of every key it wrote:
/// `Some(version)` for a set, `None` for a delete.
#[derive(Default)]
struct WriterOut {
    model: HashMap<(u16, u64), Option<u64>>,
    persist_latency: LatencyHistogram,
    rejected: u64,
    persist_failures: u64,
}

/// Shared counters of the running load.
#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    mutations: AtomicU64,
    reads: AtomicU64,
}

/// One writer: sets and deletes on its own keys (index % writers == id)
/// of random vbuckets, Zipf-distributed over its keys.
fn writer(
    args: &Args,
    id: usize,
    durable: bool,
    vbs: &[VBucket],
    counters: &Counters,
) -> Result<WriterOut, BoxError> {
    let mut out = WriterOut::default();
    let writers = args.writers as u64;
    let owned = args.keys / writers + u64::from((id as u64) < args.keys % writers);
    if owned == 0 {
        return Ok(out);
    }
    let zipf = Zipf::new(owned as f64, args.zipf)?;
    let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(1000).wrapping_add(id as u64));
    let paced = args.writers - args.durable_writers.min(args.writers);
    let mut pacer = Pacer::new(if durable || paced == 0 {
        0.0
    } else {
        args.rate as f64 / paced as f64
    });
    let mut version: u64 = 0;
    while !counters.stop.load(Ordering::Relaxed) {
        pacer.wait();
        let vb = &vbs[rng.random_range(0..vbs.len())];
        let vbid = vb.vbid();
        // Zipf samples lie in [1, owned].
        let rank = (zipf.sample(&mut rng) as u64).clamp(1, owned) - 1;
        let index = rank * writers + id as u64;
        let key = key_of(index);
        let delete = rng.random_bool(args.delete_ratio.clamp(0.0, 1.0));
        version += 1;
        let started = Instant::now();
        let result = if delete {
            vb.delete(&key, ItemMeta::default())
        } else {
            let value = value_of(vbid, index, version, args.value_size);
            vb.set(&key, &value, ItemMeta::default())
        };
        let mutation = match result {
            Ok(m) => m,
            Err(e) if e.is_temporarily_full() => {
                out.rejected += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        counters.mutations.fetch_add(1, Ordering::Relaxed);
        // Accepted: after the final drain it is persisted, so it is the
        // key's expected state (this writer alone writes this key).
        out.model
            .insert((vbid, index), (!delete).then_some(version));
        if durable {
            match vb.wait_persisted(mutation.seqno, PERSIST_TIMEOUT) {
                Ok(_) => out.persist_latency.record(started.elapsed()),
                Err(_) => out.persist_failures += 1,
            }
        }
    }
    Ok(out)
}

/// One reader: gets of Zipf-chosen keys of random vbuckets.
fn reader(
    args: &Args,
    id: usize,
    vbs: &[VBucket],
    counters: &Counters,
) -> Result<LatencyHistogram, BoxError> {
    let mut latency = LatencyHistogram::new();
    if args.keys == 0 {
        return Ok(latency);
    }
    let zipf = Zipf::new(args.keys as f64, args.zipf)?;
    let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(7919).wrapping_add(id as u64));
    let mut pacer = Pacer::new(args.read_rate as f64 / args.readers.max(1) as f64);
    while !counters.stop.load(Ordering::Relaxed) {
        pacer.wait();
        let vb = &vbs[rng.random_range(0..vbs.len())];
        let index = (zipf.sample(&mut rng) as u64).clamp(1, args.keys) - 1;
        let key = key_of(index);
        let started = Instant::now();
        vb.get(&key)?;
        latency.record(started.elapsed());
        counters.reads.fetch_add(1, Ordering::Relaxed);
    }
    Ok(latency)
}

/// The result of a load thread, a panic turned into an error.
fn joined<T>(r: std::thread::Result<Result<T, BoxError>>) -> Result<T, BoxError> {
    r.unwrap_or_else(|_| Err("a load thread panicked".into()))
}

/// Sums of high and persisted seqnos over the vbuckets.
fn seqno_sums(vbs: &[VBucket]) -> (u64, u64) {
    vbs.iter().fold((0, 0), |(h, p), vb| {
        (h + vb.high_seqno(), p + vb.persisted_seqno())
    })
}

/// File size and live data at one moment.
#[derive(Debug, Clone, Copy)]
pub struct SizeSample {
    /// Seconds since the load started.
    pub t: f64,
    /// Sum of the vbuckets' file sizes.
    pub file_size: u64,
    /// Sum of the space their latest headers use.
    pub space_used: u64,
    /// Bytes the store's node cache held.
    pub node_cache_used: u64,
}

/// One flush-batch commit on the run's clock.
#[derive(Debug, Clone, Copy)]
pub struct CommitSample {
    /// Seconds since the load started, when the commit began.
    pub t: f64,
    /// Its latency.
    pub latency: Duration,
    /// True when a compaction of its vbucket ran at some point of it.
    pub during_compaction: bool,
}

/// One compaction on the run's clock.
#[derive(Debug, Clone)]
pub struct CompactionSample {
    /// The vbucket.
    pub vbid: u16,
    /// Seconds since the load started.
    pub t: f64,
    /// What it did.
    pub report: CompactionReport,
}

/// What the final close, reopen and read-back found.
#[derive(Debug, Clone, Default)]
pub struct Check {
    /// Keys compared.
    pub checked: u64,
    /// Keys the writers wrote.
    pub written: u64,
    /// Keys whose value differs from the model.
    pub differ: u64,
    /// The first few differences, described.
    pub first_diffs: Vec<String>,
    /// How long the reopen and read-back took.
    pub duration: Duration,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// The compaction mode.
    pub mode: ModeArg,
    /// The history the compactions kept (`None`: none).
    pub history: Option<History>,
    /// Length of the load.
    pub load: Duration,
    /// Mutations accepted.
    pub accepted: u64,
    /// Mutations persisted by the end of the load.
    pub persisted: u64,
    /// Mutations refused because a queue was full.
    pub rejected: u64,
    /// Persistence waits that failed.
    pub persist_failures: u64,
    /// Time to persist the rest after the load.
    pub drain: Duration,
    /// Gets done.
    pub reads: u64,
    /// Durable writers' set-to-persisted latency.
    pub persist_latency: LatencyHistogram,
    /// Get latency.
    pub read_latency: LatencyHistogram,
    /// Flush-batch commit latency while a compaction of the vbucket ran.
    pub commit_during_compaction: LatencyHistogram,
    /// Flush-batch commit latency otherwise.
    pub commit_otherwise: LatencyHistogram,
    /// The flusher's totals.
    pub flush: flusher::FlushStats,
    /// Every flush-batch commit.
    pub commits: Vec<CommitSample>,
    /// Every successful compaction.
    pub compactions: Vec<CompactionSample>,
    /// Failed or cancelled compactions.
    pub compaction_errors: Vec<String>,
    /// File size and live data over time.
    pub sizes: Vec<SizeSample>,
    /// The raw sequential write-and-sync rate, over the bytes the
    /// compactions wrote.
    pub disk: Option<Baseline>,
    /// The final read-back.
    pub check: Check,
    /// The node cache after the load (`None` without one).
    pub node_cache: Option<vbucket::CacheStats>,
}

impl Run {
    /// The run's name in reports: the mode, and whether history was kept.
    pub fn name(&self) -> String {
        run_name(self.mode, self.history.as_ref())
    }
}

/// `concurrent`, or `concurrent+history` when history is kept.
fn run_name(mode: ModeArg, history: Option<&History>) -> String {
    match history {
        Some(_) => format!("{}+history", mode.name()),
        None => mode.name().to_string(),
    }
}

/// Runs the load in `mode` (keeping `history`, if any) in `dir` (empty)
/// and does the final check.
fn run(args: &Args, mode: ModeArg, history: Option<History>, dir: &Path) -> Result<Run, BoxError> {
    let commits: Arc<Mutex<Vec<CommitEvent>>> = Arc::default();
    let on_commit = {
        let commits = Arc::clone(&commits);
        Arc::new(move |event: &CommitEvent| commits.lock().push(*event))
    };
    let config = StoreConfig {
        auto_compaction: Some(AutoCompaction {
            fragmentation_threshold: args.fragmentation_threshold,
            min_file_size: args.min_file_size,
            max_concurrent: args.max_concurrent_compactions,
            options: CompactionOptions {
                mode: mode.mode(),
                history,
                ..CompactionOptions::default()
            },
            ..AutoCompaction::default()
        }),
        on_commit: Some(on_commit),
        flusher: FlusherConfig {
            threads: args.flusher_threads.max(1),
            ..FlusherConfig::default()
        },
        node_cache_bytes: args.node_cache_mib << 20,
        ..StoreConfig::default()
    };
    println!(
        "bench: {} vbuckets x {} keys, {}-byte values, {} writers ({} durable) at {} mutations/s, \
         {} readers at {} gets/s, delete ratio {}, zipf {}, {} compaction at fragmentation {}, \
         {} flusher threads, {} s, in {}",
        args.vbuckets,
        args.keys,
        args.value_size,
        args.writers,
        args.durable_writers.min(args.writers),
        if args.rate == 0 {
            "max".to_string()
        } else {
            args.rate.to_string()
        },
        args.readers,
        if args.read_rate == 0 {
            "max".to_string()
        } else {
            args.read_rate.to_string()
        },
        args.delete_ratio,
        args.zipf,
        run_name(mode, history.as_ref()),
        args.fragmentation_threshold,
        args.flusher_threads,
        args.seconds,
        dir.display()
    );
    let store = Store::open(dir, config)?;
    let vbs = (0..args.vbuckets)
        .map(|vbid| store.open_vbucket(vbid))
        .collect::<Result<Vec<_>, _>>()?;
    let counters = Counters::default();
    let mut compaction_log = Vec::new();
    let mut sizes = Vec::new();

    let progress = ProgressBar::new(args.seconds);
    progress.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{bar:20}] {msg}",
    )?);
    let started = Instant::now();
    let duration = Duration::from_secs(args.seconds);

    let (writer_outs, reader_outs, load, (_, persisted)) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..args.writers)
            .map(|id| {
                let durable = id < args.durable_writers;
                let (vbs, counters) = (&vbs, &counters);
                s.spawn(move || writer(args, id, durable, vbs, counters))
            })
            .collect();
        let readers: Vec<_> = (0..args.readers)
            .map(|id| {
                let (vbs, counters) = (&vbs, &counters);
                s.spawn(move || reader(args, id, vbs, counters))
            })
            .collect();
        let mut next_sample = Duration::ZERO;
        let mut last = (Instant::now(), 0u64);
        let mut sample_error = None;
        while started.elapsed() < duration {
            let now = started.elapsed();
            if now < next_sample {
                std::thread::sleep((next_sample - now).min(duration - now));
                continue;
            }
            next_sample += SAMPLE_EVERY;
            let stats = match store.stats() {
                Ok(stats) => stats,
                Err(e) => {
                    sample_error = Some(e);
                    break;
                }
            };
            compaction_log.extend(store.take_compaction_log());
            let t = stats.total;
            sizes.push(SizeSample {
                t: now.as_secs_f64(),
                file_size: t.file_size,
                space_used: t.space_used,
                node_cache_used: stats.node_cache.map_or(0, |c| c.used),
            });
            let mutations = counters.mutations.load(Ordering::Relaxed);
            let rate = (mutations - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
            last = (Instant::now(), mutations);
            let (high, persisted) = seqno_sums(&vbs);
            progress.set_position(now.as_secs());
            progress.set_message(format!(
                "{} {rate:>7.0} mut/s  lag {:>6}  file {:>6.1} MiB  live {:>6.1} MiB  compactions {}",
                run_name(mode, history.as_ref()),
                high.saturating_sub(persisted),
                mib(t.file_size),
                mib(t.space_used),
                compaction_log.len()
            ));
        }
        counters.stop.store(true, Ordering::Relaxed);
        let load = started.elapsed();
        let seqnos = seqno_sums(&vbs);
        let writer_outs: Vec<_> = writers.into_iter().map(|t| joined(t.join())).collect();
        let reader_outs: Vec<_> = readers.into_iter().map(|t| joined(t.join())).collect();
        if let Some(e) = sample_error {
            return Err::<_, BoxError>(e.into());
        }
        Ok((writer_outs, reader_outs, load, seqnos))
    })?;
    progress.finish_and_clear();

    // Drain: every accepted mutation persisted, so the model is exact.
    let drain_started = Instant::now();
    for vb in &vbs {
        vb.wait_persisted(vb.high_seqno(), PERSIST_TIMEOUT)?;
    }
    let drain = drain_started.elapsed();
    let final_stats = store.stats()?;
    compaction_log.extend(store.take_compaction_log());
    sizes.push(SizeSample {
        t: started.elapsed().as_secs_f64(),
        file_size: final_stats.total.file_size,
        space_used: final_stats.total.space_used,
        node_cache_used: final_stats.node_cache.map_or(0, |c| c.used),
    });

    let mut model: HashMap<(u16, u64), Option<u64>> = HashMap::new();
    let mut persist_latency = LatencyHistogram::new();
    let (mut rejected, mut persist_failures) = (0u64, 0u64);
    for out in writer_outs {
        let out = out?;
        model.extend(out.model);
        persist_latency.merge(&out.persist_latency);
        rejected += out.rejected;
        persist_failures += out.persist_failures;
    }
    let mut read_latency = LatencyHistogram::new();
    for out in reader_outs {
        read_latency.merge(&out?);
    }
    let since_start = |at: Instant| at.saturating_duration_since(started).as_secs_f64();
    let mut compactions = Vec::new();
    let mut compaction_errors = Vec::new();
    for (vbid, outcome) in compaction_log {
        match outcome {
            Ok(report) => compactions.push(CompactionSample {
                vbid,
                t: since_start(report.started),
                report,
            }),
            Err(e) => compaction_errors.push(format!("vbucket {vbid}: {e}")),
        }
    }
    let commits = commits
        .lock()
        .iter()
        .map(|e| CommitSample {
            t: since_start(e.started),
            latency: e.latency,
            during_compaction: e.during_compaction,
        })
        .collect();

    drop(vbs);
    store.close()?;
    let check = check(args, dir, &model)?;
    let disk = baseline(dir, &compactions)?;
    let node_cache = final_stats.node_cache;
    let total = final_stats.total;
    Ok(Run {
        mode,
        history,
        load,
        accepted: counters.mutations.load(Ordering::Relaxed),
        persisted,
        rejected,
        persist_failures,
        drain,
        reads: counters.reads.load(Ordering::Relaxed),
        persist_latency,
        read_latency,
        commit_during_compaction: total.commit_latency_during_compaction,
        commit_otherwise: total.commit_latency_otherwise,
        flush: total.flush,
        commits,
        compactions,
        compaction_errors,
        sizes,
        disk,
        check,
        node_cache,
    })
}

/// The raw-disk baseline over as many bytes as the compactions wrote (at
/// most [`MAX_BASELINE_BYTES`]), in files of their mean output size, each
/// synced: the same sequential write-and-sync pattern at full speed.
fn baseline(dir: &Path, compactions: &[CompactionSample]) -> Result<Option<Baseline>, BoxError> {
    if compactions.is_empty() {
        return Ok(None);
    }
    let written: u64 = compactions.iter().map(|c| c.report.size_after).sum();
    let file_size = (written / compactions.len() as u64).max(1);
    let mut total = Baseline {
        bytes: 0,
        duration: Duration::ZERO,
    };
    while total.bytes < written.min(MAX_BASELINE_BYTES) {
        let one = disk::sequential_write_sync(dir, file_size)?;
        total.bytes += one.bytes;
        total.duration += one.duration;
    }
    Ok(Some(total))
}

/// Reopens the store in `dir` and compares every key with the model.
fn check(
    args: &Args,
    dir: &Path,
    model: &HashMap<(u16, u64), Option<u64>>,
) -> Result<Check, BoxError> {
    let started = Instant::now();
    let store = Store::open(dir, StoreConfig::default())?;
    let mut check = Check {
        written: model.len() as u64,
        ..Check::default()
    };
    let describe = |v: Option<Vec<u8>>| {
        v.map_or("absent".to_string(), |v| {
            format!("version {}", version_in(&v))
        })
    };
    for vbid in 0..args.vbuckets {
        let vb = store.vbucket(vbid)?;
        for index in 0..args.keys {
            let got = vb.get(&key_of(index))?.map(|d| d.value);
            let want = model
                .get(&(vbid, index))
                .copied()
                .flatten()
                .map(|version| value_of(vbid, index, version, args.value_size));
            check.checked += 1;
            if got != want {
                check.differ += 1;
                if check.first_diffs.len() < 5 {
                    check.first_diffs.push(format!(
                        "vbucket {vbid} key {index}: expected {}, found {}",
                        describe(want),
                        describe(got)
                    ));
                }
            }
        }
    }
    store.close()?;
    check.duration = started.elapsed();
    Ok(check)
}

/// A fresh directory for one run: `--dir` itself (or a subdirectory per
/// mode when comparing), or a temporary one.
fn run_in_dir(args: &Args, mode: ModeArg, history: Option<History>) -> Result<Run, BoxError> {
    let dir = match &args.dir {
        Some(dir) if args.compare || args.history => {
            Some(dir.join(run_name(mode, history.as_ref())))
        }
        other => other.clone(),
    };
    let (dir, _temp) = work_dir(dir.as_deref())?;
    // The read-back model assumes the store starts empty.
    if std::fs::read_dir(&dir)?.next().is_some() {
        return Err(format!("--dir {} is not empty", dir.display()).into());
    }
    run(args, mode, history, &dir)
}

/// Runs the workload (once, or in both modes with `--compare`), prints the
/// report, writes the JSON and the chart; `Ok(false)` when a key read back
/// differs from what was persisted.
pub fn main(args: &Args) -> Result<bool, BoxError> {
    if args.vbuckets == 0 || args.writers == 0 {
        return Err("--vbuckets and --writers must be at least 1".into());
    }
    let history = History {
        max_age: args.history_age,
        granularity: args.history_granularity,
        now: None,
    };
    let plan = if args.compare {
        vec![(ModeArg::Concurrent, None), (ModeArg::Blocking, None)]
    } else if args.history {
        vec![(args.compaction, None), (args.compaction, Some(history))]
    } else {
        vec![(args.compaction, None)]
    };
    let mut runs = Vec::new();
    for (mode, history) in plan {
        let run = run_in_dir(args, mode, history)?;
        report::print(&run);
        runs.push(run);
    }
    if let [without, with] = runs.as_slice() {
        report::print_comparison(without, with);
        if args.history {
            report::print_history_cost(without, with);
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&report::json(args, &runs))?,
        )?;
        println!("report written to {}", out.display());
    }
    if !args.no_chart {
        chart::write(&args.chart, &runs)?;
        println!("chart written to {}", args.chart.display());
    }
    Ok(runs.iter().all(|r| r.check.differ == 0))
}
