//! The workload runner: a [`vbucket::Store`] of several vbuckets in a fresh
//! temporary directory (or `--dir`) with automatic compaction on, driven for
//! a fixed time by writer threads issuing sets and deletes with a Zipfian key
//! choice (some of them waiting for each mutation to be persisted), reader
//! threads doing gets, the store's flusher threads and its automatic
//! compactions. It ends with a report, then closes the store, reopens it and
//! compares every key with what the writers last persisted.

use crate::BoxError;
use clap::ValueEnum;
use flusher::LatencyHistogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vbucket::{
    AutoCompaction, CompactionMode, CompactionOptions, CompactionReport, ItemMeta, Store,
    StoreConfig, VBucket,
};

/// How compactions share a vbucket with its flusher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// The flusher keeps committing; it waits only for the final round.
    Concurrent,
    /// The old behaviour: the commit lock is held for the whole compaction.
    Blocking,
}

/// The options of the workload runner.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Data directory (must be empty or absent); default: a fresh temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of vbuckets.
    #[arg(long, default_value_t = 8)]
    vbuckets: u16,
    /// Keys per vbucket.
    #[arg(long, default_value_t = 20_000)]
    keys: u64,
    /// Value size in bytes (at least 8).
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Writer threads (each owns a disjoint key subset of every vbucket).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// How many of the writers wait for each mutation to be persisted.
    #[arg(long, default_value_t = 1)]
    durable_writers: usize,
    /// Fraction of mutations that are deletes.
    #[arg(long, default_value_t = 0.05)]
    delete_ratio: f64,
    /// Zipf exponent of the key choice (0: uniform).
    #[arg(long, default_value_t = 0.99)]
    zipf: f64,
    /// Reader threads.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Length of the load in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// How compactions run.
    #[arg(long, value_enum, default_value_t = ModeArg::Concurrent)]
    compaction: ModeArg,
    /// Compact a vbucket once this fraction of its file is garbage.
    #[arg(long, default_value_t = 0.5)]
    fragmentation_threshold: f64,
    /// Files smaller than this (bytes) are not compacted.
    #[arg(long, default_value_t = 1 << 20)]
    min_file_size: u64,
    /// Most compactions running at a time.
    #[arg(long, default_value_t = 1)]
    max_concurrent_compactions: usize,
    /// Seed of the key and operation choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How long a durable writer or the final drain waits for persistence.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(120);

/// SplitMix64: a cheap, well-mixed deterministic generator for values.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of index `index` (the same in every vbucket).
fn key_of(index: u64) -> Vec<u8> {
    format!("key:{index:010}").into_bytes()
}

/// The value of version `version` of key `index` in vbucket `vb`: the
/// version in the first 8 bytes (little-endian), then pseudo-random filler
/// determined by (vb, key, version), so any mismatch is detectable.
fn value_of(vb: u16, index: u64, version: u64, size: usize) -> Vec<u8> {
    let mut value = Vec::with_capacity(size.max(8));
    value.extend_from_slice(&version.to_le_bytes());
    let mut state = (u64::from(vb) << 48) ^ index.rotate_left(17) ^ version.wrapping_mul(31);
    while value.len() < size {
        value.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    value.truncate(size.max(8));
    value
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
    let mut version: u64 = 0;
    while !counters.stop.load(Ordering::Relaxed) {
        let vb_index = rng.random_range(0..vbs.len());
        let vb = &vbs[vb_index];
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
    while !counters.stop.load(Ordering::Relaxed) {
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

/// Milliseconds as a float, for printing and JSON.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99 and maximum of a histogram, in milliseconds, as JSON.
fn latency_json(h: &LatencyHistogram) -> serde_json::Value {
    let s = h.summary();
    json!({
        "count": s.count,
        "p50_ms": ms(s.p50),
        "p99_ms": ms(s.p99),
        "max_ms": ms(s.max),
        "mean_ms": ms(s.mean),
    })
}

/// One report line of a histogram.
fn latency_line(name: &str, h: &LatencyHistogram) -> String {
    let s = h.summary();
    format!(
        "{name:<28} p50 {:>9.3} ms   p99 {:>9.3} ms   max {:>9.3} ms   ({} samples)",
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        s.count
    )
}

/// Sums of high and persisted seqnos over the vbuckets.
fn seqno_sums(vbs: &[VBucket]) -> (u64, u64) {
    vbs.iter().fold((0, 0), |(h, p), vb| {
        (h + vb.high_seqno(), p + vb.persisted_seqno())
    })
}

/// Bytes as MiB.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs the load, prints the report and does the final check; `Ok(false)`
/// when a key read back differs from what was persisted.
pub fn main(args: &Args) -> Result<bool, BoxError> {
    if args.vbuckets == 0 || args.writers == 0 {
        return Err("--vbuckets and --writers must be at least 1".into());
    }
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            // The read-back model assumes the store starts empty.
            if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
                return Err(format!("--dir {} is not empty", dir.display()).into());
            }
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mode = match args.compaction {
        ModeArg::Concurrent => CompactionMode::Concurrent,
        ModeArg::Blocking => CompactionMode::Blocking,
    };
    let config = StoreConfig {
        auto_compaction: Some(AutoCompaction {
            fragmentation_threshold: args.fragmentation_threshold,
            min_file_size: args.min_file_size,
            max_concurrent: args.max_concurrent_compactions,
            options: CompactionOptions {
                mode,
                ..CompactionOptions::default()
            },
            ..AutoCompaction::default()
        }),
        ..StoreConfig::default()
    };
    println!(
        "bench: {} vbuckets x {} keys, {}-byte values, {} writers ({} durable), {} readers, \
         delete ratio {}, zipf {}, {:?} compaction at fragmentation {}, {} s, in {}",
        args.vbuckets,
        args.keys,
        args.value_size,
        args.writers,
        args.durable_writers.min(args.writers),
        args.readers,
        args.delete_ratio,
        args.zipf,
        mode,
        args.fragmentation_threshold,
        args.seconds,
        dir.display()
    );
    let store = Store::open(&dir, config)?;
    let vbs = (0..args.vbuckets)
        .map(|vbid| store.open_vbucket(vbid))
        .collect::<Result<Vec<_>, _>>()?;
    let counters = Counters::default();
    let mut compactions: Vec<(u16, Result<CompactionReport, String>)> = Vec::new();
    // (seconds since start, file size, space used) each second.
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();

    let progress = ProgressBar::new_spinner();
    progress.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    let started = Instant::now();
    let duration = Duration::from_secs(args.seconds);

    let (writer_outs, reader_outs, load_elapsed, seqnos_at_end) = std::thread::scope(|s| {
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
        let mut next_sample = Duration::from_secs(1);
        let mut last = (Instant::now(), 0u64);
        let mut sample_error = None;
        while started.elapsed() < duration && !counters.stop.load(Ordering::Relaxed) {
            std::thread::sleep(
                Duration::from_millis(100).min(duration - started.elapsed().min(duration)),
            );
            if started.elapsed() < next_sample && started.elapsed() < duration {
                continue;
            }
            next_sample += Duration::from_secs(1);
            let stats = match store.stats() {
                Ok(stats) => stats,
                Err(e) => {
                    sample_error = Some(e);
                    counters.stop.store(true, Ordering::Relaxed);
                    break;
                }
            };
            compactions.extend(store.take_compaction_log());
            let t = stats.total;
            samples.push((started.elapsed().as_secs_f64(), t.file_size, t.space_used));
            let mutations = counters.mutations.load(Ordering::Relaxed);
            let rate = (mutations - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
            last = (Instant::now(), mutations);
            let (high, persisted) = seqno_sums(&vbs);
            progress.set_message(format!(
                "{rate:>9.0} mut/s  lag {:>7} seqnos  file {:>8.1} MiB  live {:>8.1} MiB  compactions {}",
                high.saturating_sub(persisted),
                mib(t.file_size),
                mib(t.space_used),
                compactions.len()
            ));
            progress.tick();
        }
        counters.stop.store(true, Ordering::Relaxed);
        let load_elapsed = started.elapsed();
        let seqnos_at_end = seqno_sums(&vbs);
        let writer_outs: Vec<_> = writers.into_iter().map(|t| joined(t.join())).collect();
        let reader_outs: Vec<_> = readers.into_iter().map(|t| joined(t.join())).collect();
        if let Some(e) = sample_error {
            return Err::<_, BoxError>(e.into());
        }
        Ok((writer_outs, reader_outs, load_elapsed, seqnos_at_end))
    })?;
    progress.finish_and_clear();

    // Drain: every accepted mutation persisted, so the model is exact.
    let drain_started = Instant::now();
    for vb in &vbs {
        vb.wait_persisted(vb.high_seqno(), PERSIST_TIMEOUT)?;
    }
    let drain = drain_started.elapsed();
    let final_stats = store.stats()?;
    compactions.extend(store.take_compaction_log());

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

    // Report.
    let secs = load_elapsed.as_secs_f64().max(1e-9);
    let accepted = counters.mutations.load(Ordering::Relaxed);
    let (_, persisted_at_end) = seqnos_at_end;
    let flush = &final_stats.total.flush;

    let mut lock_held = LatencyHistogram::new();
    let (mut n_ok, mut n_err, mut total_dur, mut bytes_before, mut bytes_after) =
        (0u64, 0u64, Duration::ZERO, 0u64, 0u64);
    let (mut rounds, mut flusher_waited) = (0usize, Duration::ZERO);
    let mut errors = Vec::new();
    for (vbid, outcome) in &compactions {
        match outcome {
            Ok(r) => {
                n_ok += 1;
                total_dur += r.duration;
                bytes_before += r.size_before;
                bytes_after += r.size_after;
                rounds += r.rounds.len();
                flusher_waited += r.flusher_waited;
                lock_held.record(r.lock_held);
            }
            Err(e) => {
                n_err += 1;
                errors.push(format!("vbucket {vbid}: {e}"));
            }
        }
    }
    let mean_dur = if n_ok > 0 {
        total_dur / n_ok as u32
    } else {
        Duration::ZERO
    };
    let throughput = mib(bytes_before) / total_dur.as_secs_f64().max(1e-9);
    let amps: Vec<f64> = samples
        .iter()
        .filter(|s| s.2 > 0)
        .map(|s| s.1 as f64 / s.2 as f64)
        .collect();
    let amp_avg = amps.iter().sum::<f64>() / amps.len().max(1) as f64;
    let amp_max = amps.iter().copied().fold(0.0, f64::max);
    let amp_final = final_stats.total.file_size as f64 / final_stats.total.space_used.max(1) as f64;

    println!("\n== load: {secs:.1} s ==");
    println!(
        "mutations accepted      {accepted:>12}  ({:.0}/s; {rejected} rejected as queue full)",
        accepted as f64 / secs
    );
    println!(
        "mutations persisted     {persisted_at_end:>12}  ({:.0}/s by the end of the load; the rest in a {:.0} ms drain)",
        persisted_at_end as f64 / secs,
        ms(drain)
    );
    println!(
        "reads                   {:>12}  ({:.0}/s)",
        counters.reads.load(Ordering::Relaxed),
        counters.reads.load(Ordering::Relaxed) as f64 / secs
    );
    println!("{}", latency_line("persistence latency", &persist_latency));
    if persist_failures > 0 {
        println!("persistence waits failed: {persist_failures}");
    }
    println!("{}", latency_line("read latency", &read_latency));
    println!(
        "{}",
        latency_line("flush commit latency", &flush.commit_latency)
    );
    println!(
        "flush: {} batches, {} items, {} deduplicated, {:.1} MiB written",
        flush.batches_flushed,
        flush.items_flushed,
        flush.items_deduplicated,
        mib(flush.bytes_written)
    );
    println!("\n== compactions ({mode:?}) ==");
    println!(
        "count {n_ok} ({n_err} failed or cancelled); total {:.1} ms, mean {:.1} ms; \
         {:.1} MiB -> {:.1} MiB at {throughput:.1} MiB/s",
        ms(total_dur),
        ms(mean_dur),
        mib(bytes_before),
        mib(bytes_after)
    );
    println!(
        "catch-up rounds {rounds} ({:.2} per compaction); flusher waited {:.3} ms in total",
        rounds as f64 / n_ok.max(1) as f64,
        ms(flusher_waited)
    );
    println!("{}", latency_line("lock held", &lock_held));
    for e in errors.iter().take(5) {
        println!("  {e}");
    }
    println!("\n== space amplification (file size / live data, sampled each second) ==");
    println!(
        "average {amp_avg:.2}x, max {amp_max:.2}x, final {amp_final:.2}x ({:.1} MiB in files, {:.1} MiB live)",
        mib(final_stats.total.file_size),
        mib(final_stats.total.space_used)
    );

    // Final check: close, reopen, compare every key with the model.
    drop(vbs);
    store.close()?;
    let check_started = Instant::now();
    let store = Store::open(&dir, StoreConfig::default())?;
    let (mut checked, mut differ) = (0u64, 0u64);
    let mut first_diffs = Vec::new();
    for vbid in 0..args.vbuckets {
        let vb = store.vbucket(vbid)?;
        for index in 0..args.keys {
            let got = vb.get(&key_of(index))?.map(|d| d.value);
            let want = model
                .get(&(vbid, index))
                .copied()
                .flatten()
                .map(|version| value_of(vbid, index, version, args.value_size));
            checked += 1;
            if got != want {
                differ += 1;
                if first_diffs.len() < 5 {
                    first_diffs.push(format!(
                        "vbucket {vbid} key {index}: expected {}, found {}",
                        want.map_or("absent".to_string(), |v| format!(
                            "version {}",
                            version_in(&v)
                        )),
                        got.map_or("absent".to_string(), |v| format!(
                            "version {}",
                            version_in(&v)
                        )),
                    ));
                }
            }
        }
    }
    store.close()?;
    println!("\n== final check (close, reopen, read back) ==");
    println!(
        "{checked} keys checked ({} written during the load) in {:.0} ms: {}",
        model.len(),
        ms(check_started.elapsed()),
        if differ == 0 {
            "none differ".to_string()
        } else {
            format!("{differ} DIFFER")
        }
    );
    for d in &first_diffs {
        println!("  {d}");
    }

    if let Some(out) = &args.out {
        let report = json!({
            "parameters": {
                "vbuckets": args.vbuckets, "keys_per_vbucket": args.keys,
                "value_size": args.value_size, "writers": args.writers,
                "durable_writers": args.durable_writers.min(args.writers),
                "readers": args.readers, "delete_ratio": args.delete_ratio,
                "zipf": args.zipf, "seconds": args.seconds,
                "compaction": format!("{mode:?}").to_lowercase(),
                "fragmentation_threshold": args.fragmentation_threshold,
                "min_file_size": args.min_file_size, "seed": args.seed,
            },
            "load_seconds": secs,
            "mutations": {
                "accepted": accepted, "accepted_per_s": accepted as f64 / secs,
                "persisted": persisted_at_end, "persisted_per_s": persisted_at_end as f64 / secs,
                "rejected": rejected, "drain_ms": ms(drain),
            },
            "reads": counters.reads.load(Ordering::Relaxed),
            "persistence_latency": latency_json(&persist_latency),
            "read_latency": latency_json(&read_latency),
            "flush_commit_latency": latency_json(&flush.commit_latency),
            "flush": {
                "batches": flush.batches_flushed, "items": flush.items_flushed,
                "deduplicated": flush.items_deduplicated, "bytes_written": flush.bytes_written,
            },
            "compactions": {
                "count": n_ok, "failed": n_err, "errors": errors,
                "total_ms": ms(total_dur), "mean_ms": ms(mean_dur),
                "bytes_before": bytes_before, "bytes_after": bytes_after,
                "throughput_mib_s": throughput, "catch_up_rounds": rounds,
                "lock_held": latency_json(&lock_held),
                "flusher_waited_ms": ms(flusher_waited),
            },
            "space_amplification": {
                "average": amp_avg, "max": amp_max, "final": amp_final,
                "samples": samples.iter().map(|s| json!({"t": s.0, "file_size": s.1, "space_used": s.2})).collect::<Vec<_>>(),
            },
            "final_check": { "checked": checked, "written": model.len(), "differ": differ },
        });
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", out.display());
    }
    Ok(differ == 0)
}

/// The version stored in a value's first 8 bytes (0 when too short).
fn version_in(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}
