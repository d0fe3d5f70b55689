//! The workload runner's report: the figures of a [`Run`], printed one per
//! line by section, side by side for two runs (`--compare`), and as JSON.

use crate::workload::{Args, CommitSample, Run};
use crate::{mib, ms};
use flusher::LatencyHistogram;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// One figure of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The section it is printed under.
    pub section: &'static str,
    /// What it is.
    pub name: String,
    /// Its value, in `unit`.
    pub value: f64,
    /// The unit: "ms", "/s", "x", "MiB", "MiB/s", "%", or "" for counts.
    pub unit: &'static str,
}

/// Collects the figures of a run, in report order.
struct Figures(Vec<Figure>);

impl Figures {
    fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        self.0.push(Figure {
            section,
            name: name.into(),
            value,
            unit,
        });
    }

    /// p50, p99 and maximum of a latency distribution.
    fn latency(&mut self, section: &'static str, name: &str, h: &LatencyHistogram) {
        let s = h.summary();
        self.add(section, format!("{name} p50"), ms(s.p50), "ms");
        self.add(section, format!("{name} p99"), ms(s.p99), "ms");
        self.add(section, format!("{name} max"), ms(s.max), "ms");
    }
}

/// When the steady state starts: the end of the first compaction, in
/// seconds since the load started (infinite when none finished).
fn steady_from(run: &Run) -> f64 {
    run.compactions
        .iter()
        .map(|c| c.t + c.report.duration.as_secs_f64())
        .fold(f64::INFINITY, f64::min)
}

/// Space amplification (file size over live data) of the samples taken in
/// the steady state, or of all of them when no compaction finished:
/// (average, maximum).
fn space_amplification(run: &Run) -> (f64, f64) {
    let steady_from = steady_from(run);
    let amps: Vec<f64> = run
        .sizes
        .iter()
        .filter(|s| s.space_used > 0 && (steady_from.is_infinite() || s.t >= steady_from))
        .map(|s| s.file_size as f64 / s.space_used as f64)
        .collect();
    let average = amps.iter().sum::<f64>() / amps.len().max(1) as f64;
    (average, amps.iter().copied().fold(0.0, f64::max))
}

/// The slowest commit while its vbucket compacted over the p99 of the
/// others, counting only the commits that began in the steady state: the
/// first compaction starts within a second of a cold start, when a single
/// slow commit is more often the process warming up than the compaction.
fn steady_commit_ratio(commits: &[CommitSample], steady_from: f64) -> f64 {
    let mut max_during = Duration::ZERO;
    let mut otherwise = LatencyHistogram::new();
    for c in commits.iter().filter(|c| c.t >= steady_from) {
        if c.during_compaction {
            max_during = max_during.max(c.latency);
        } else {
            otherwise.record(c.latency);
        }
    }
    ms(max_during) / ms(otherwise.summary().p99).max(1e-9)
}

/// Every figure of a run.
pub fn figures(run: &Run) -> Vec<Figure> {
    let mut f = Figures(Vec::new());
    let secs = run.load.as_secs_f64().max(1e-9);

    const LOAD: &str = "load";
    f.add(LOAD, "seconds", secs, "s");
    f.add(LOAD, "mutations accepted", run.accepted as f64 / secs, "/s");
    f.add(
        LOAD,
        "mutations persisted",
        run.persisted as f64 / secs,
        "/s",
    );
    f.add(
        LOAD,
        "mutations rejected (queue full)",
        run.rejected as f64,
        "",
    );
    f.add(LOAD, "drain after the load", ms(run.drain), "ms");
    f.latency(LOAD, "persistence latency", &run.persist_latency);
    f.add(
        LOAD,
        "persistence waits failed",
        run.persist_failures as f64,
        "",
    );
    f.add(LOAD, "gets", run.reads as f64 / secs, "/s");
    f.latency(LOAD, "read latency", &run.read_latency);

    if let Some(cache) = &run.node_cache {
        const CACHE: &str = "node cache";
        let most_used = run
            .sizes
            .iter()
            .map(|s| s.node_cache_used)
            .max()
            .unwrap_or(0);
        f.add(CACHE, "capacity", mib(cache.capacity), "MiB");
        f.add(CACHE, "most held (sampled)", mib(most_used), "MiB");
        f.add(
            CACHE,
            "hit rate",
            100.0 * cache.hits as f64 / (cache.hits + cache.misses).max(1) as f64,
            "%",
        );
        f.add(CACHE, "evictions", cache.evictions as f64, "");
    }

    const FLUSH: &str = "flush-batch commits";
    f.add(FLUSH, "batches", run.flush.batches_flushed as f64, "");
    f.add(
        FLUSH,
        "items per batch",
        run.flush.items_flushed as f64 / run.flush.batches_flushed.max(1) as f64,
        "",
    );
    f.add(FLUSH, "written", mib(run.flush.bytes_written), "MiB");
    f.latency(FLUSH, "no compaction running:", &run.commit_otherwise);
    f.latency(FLUSH, "compaction running:", &run.commit_during_compaction);
    let max_during = run.commit_during_compaction.summary().max;
    let p99_otherwise = run.commit_otherwise.summary().p99;
    f.add(
        FLUSH,
        "max while compacting / p99 otherwise",
        ms(max_during) / ms(p99_otherwise).max(1e-9),
        "x",
    );
    f.add(
        FLUSH,
        "the same, in the steady state",
        steady_commit_ratio(&run.commits, steady_from(run)),
        "x",
    );

    const COMPACTION: &str = "compactions";
    let n = run.compactions.len();
    let total: Duration = run.compactions.iter().map(|c| c.report.duration).sum();
    let read: u64 = run.compactions.iter().map(|c| c.report.size_before).sum();
    let written: u64 = run.compactions.iter().map(|c| c.report.size_after).sum();
    let unlocked_rounds: usize = run
        .compactions
        .iter()
        .map(|c| c.report.rounds.iter().filter(|r| !r.locked).count())
        .sum();
    let mut lock_held = LatencyHistogram::new();
    let mut duration = LatencyHistogram::new();
    for c in &run.compactions {
        lock_held.record(c.report.lock_held);
        duration.record(c.report.duration);
    }
    let flusher_waited: Duration = run
        .compactions
        .iter()
        .map(|c| c.report.flusher_waited)
        .sum();
    let total_secs = total.as_secs_f64().max(1e-9);
    f.add(COMPACTION, "count", n as f64, "");
    f.add(
        COMPACTION,
        "failed or cancelled",
        run.compaction_errors.len() as f64,
        "",
    );
    f.latency(COMPACTION, "duration", &duration);
    f.add(
        COMPACTION,
        "throughput (file read)",
        mib(read) / total_secs,
        "MiB/s",
    );
    f.add(
        COMPACTION,
        "throughput (file written)",
        mib(written) / total_secs,
        "MiB/s",
    );
    if let Some(disk) = &run.disk {
        f.add(
            COMPACTION,
            "raw disk write+sync, same bytes",
            disk.mib_per_sec(),
            "MiB/s",
        );
        f.add(
            COMPACTION,
            "written throughput / raw disk",
            mib(written) / total_secs / disk.mib_per_sec().max(1e-9) * 100.0,
            "%",
        );
    }
    f.add(
        COMPACTION,
        "catch-up rounds per compaction",
        unlocked_rounds as f64 / n.max(1) as f64,
        "",
    );
    f.latency(COMPACTION, "commit lock held", &lock_held);
    f.add(
        COMPACTION,
        "flusher waited for the lock (total)",
        ms(flusher_waited),
        "ms",
    );
    let history_headers: u64 = run
        .compactions
        .iter()
        .map(|c| c.report.history_headers)
        .sum();
    let history_bytes: u64 = run.compactions.iter().map(|c| c.report.history_bytes).sum();
    f.add(
        COMPACTION,
        "history headers kept per compaction",
        history_headers as f64 / n.max(1) as f64,
        "",
    );
    f.add(
        COMPACTION,
        "history replayed (total written)",
        mib(history_bytes),
        "MiB",
    );

    const SPACE: &str = "space (file size / live data, sampled every 0.5 s)";
    let (average, max) = space_amplification(run);
    f.add(SPACE, "steady-state average", average, "x");
    f.add(SPACE, "steady-state maximum", max, "x");
    if let Some(last) = run.sizes.last() {
        f.add(SPACE, "file size at the end", mib(last.file_size), "MiB");
        f.add(SPACE, "live data at the end", mib(last.space_used), "MiB");
    }

    const CHECK: &str = "final check (close, reopen, read back)";
    f.add(CHECK, "keys checked", run.check.checked as f64, "");
    f.add(
        CHECK,
        "keys written during the load",
        run.check.written as f64,
        "",
    );
    f.add(CHECK, "keys that differ", run.check.differ as f64, "");
    f.add(CHECK, "reopen and read back", ms(run.check.duration), "ms");
    f.0
}

/// A value with the precision its unit deserves.
fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{value:.3}"),
        "x" => format!("{value:.2}"),
        "MiB" | "MiB/s" | "%" | "s" => format!("{value:.1}"),
        "" if value.fract() != 0.0 => format!("{value:.2}"),
        _ => format!("{value:.0}"),
    }
}

/// Prints one run's report.
pub fn print(run: &Run) {
    let mut section = "";
    println!("\n==== {} compaction ====", run.name());
    for fig in figures(run) {
        if fig.section != section {
            section = fig.section;
            println!("-- {section}");
        }
        println!(
            "  {:<40} {:>12} {}",
            fig.name,
            format_value(fig.value, fig.unit),
            fig.unit
        );
    }
    for e in run.compaction_errors.iter().take(5) {
        println!("  compaction error: {e}");
    }
    for d in &run.check.first_diffs {
        println!("  DIFFERS: {d}");
    }
    println!(
        "  {}",
        if run.check.differ == 0 {
            format!(
                "all {} keys read back as persisted: none differ",
                run.check.checked
            )
        } else {
            format!("{} of {} keys DIFFER", run.check.differ, run.check.checked)
        }
    );
}

/// Prints two runs side by side with the ratio of the second to the first.
pub fn print_comparison(a: &Run, b: &Run) {
    println!("\n==== side by side ({} / {}) ====", b.name(), a.name());
    println!(
        "  {:<40} {:>12} {:>12} {:>9}",
        "",
        a.name(),
        b.name(),
        "ratio"
    );
    let mut section = "";
    for (x, y) in figures(a).into_iter().zip(figures(b)) {
        if x.section != section {
            section = x.section;
            println!("-- {section}");
        }
        let ratio = if x.value == 0.0 {
            if y.value == 0.0 {
                "=".to_string()
            } else {
                "-".to_string()
            }
        } else {
            format!("{:.2}x", y.value / x.value)
        };
        println!(
            "  {:<40} {:>12} {:>12} {:>9}  {}",
            x.name,
            format_value(x.value, x.unit),
            format_value(y.value, y.unit),
            ratio,
            x.unit
        );
    }
}

/// The cost of keeping history, `with` against `without` (runs of the same
/// load): space (file size at the end, steady-state amplification) and
/// compaction time (total, per compaction).
pub fn print_history_cost(without: &Run, with: &Run) {
    let end_size = |r: &Run| r.sizes.last().map_or(0, |s| s.file_size);
    let total = |r: &Run| -> Duration { r.compactions.iter().map(|c| c.report.duration).sum() };
    let per = |r: &Run| total(r).as_secs_f64() / r.compactions.len().max(1) as f64;
    let ratio = |a: f64, b: f64| if a == 0.0 { 0.0 } else { b / a };
    let (amp_without, _) = space_amplification(without);
    let (amp_with, _) = space_amplification(with);
    println!("\n==== the cost of history ====");
    if let Some(h) = &with.history {
        println!(
            "  history kept: {:?} back, one header per {:?}",
            h.max_age, h.granularity
        );
    }
    println!(
        "  space: file size at the end {:.1} -> {:.1} MiB ({:.2}x); steady-state amplification {:.2} -> {:.2}x",
        mib(end_size(without)),
        mib(end_size(with)),
        ratio(end_size(without) as f64, end_size(with) as f64),
        amp_without,
        amp_with
    );
    println!(
        "  compaction time: {:.3} -> {:.3} ms per compaction ({:.2}x); {} -> {} compactions, {:.1} -> {:.1} s in all",
        per(without) * 1e3,
        per(with) * 1e3,
        ratio(per(without), per(with)),
        without.compactions.len(),
        with.compactions.len(),
        total(without).as_secs_f64(),
        total(with).as_secs_f64()
    );
}

/// The figures of a run as a JSON object: `{section: {name: value}}`.
fn figures_json(run: &Run) -> Value {
    let mut sections = Map::new();
    for fig in figures(run) {
        let section = sections
            .entry(fig.section)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = section {
            let key = if fig.unit.is_empty() {
                fig.name
            } else {
                format!("{} ({})", fig.name, fig.unit)
            };
            map.insert(key, json!(fig.value));
        }
    }
    Value::Object(sections)
}

/// The whole report: the parameters, then each run's figures and series.
pub fn json(args: &Args, runs: &[Run]) -> Value {
    json!({
        "parameters": {
            "vbuckets": args.vbuckets, "keys_per_vbucket": args.keys,
            "value_size": args.value_size, "writers": args.writers,
            "durable_writers": args.durable_writers.min(args.writers),
            "rate": args.rate, "readers": args.readers, "read_rate": args.read_rate,
            "delete_ratio": args.delete_ratio, "zipf": args.zipf, "seconds": args.seconds,
            "fragmentation_threshold": args.fragmentation_threshold,
            "min_file_size": args.min_file_size,
            "max_concurrent_compactions": args.max_concurrent_compactions,
            "flusher_threads": args.flusher_threads, "seed": args.seed,
        },
        "runs": runs.iter().map(|run| json!({
            "compaction": run.mode.name(),
            "history": run.history.map(|h| json!({
                "max_age_s": h.max_age.as_secs_f64(),
                "granularity_s": h.granularity.as_secs_f64(),
            })),
            "figures": figures_json(run),
            "compactions": run.compactions.iter().map(|c| json!({
                "vbid": c.vbid, "t": c.t,
                "duration_ms": ms(c.report.duration), "lock_held_ms": ms(c.report.lock_held),
                "size_before": c.report.size_before, "size_after": c.report.size_after,
                "rounds": c.report.rounds.len(),
                "history_headers": c.report.history_headers,
                "history_bytes": c.report.history_bytes,
                "copy_ms": ms(c.report.copy.duration),
                "copy_bytes_written": c.report.copy.bytes_written,
                "round_ms": c.report.rounds.iter().map(|r| ms(r.duration)).collect::<Vec<_>>(),
                "rounds_waiting_for_commit_ms": c.report.rounds_waiting_for_commit.iter()
                    .map(|r| ms(r.duration)).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "sizes": run.sizes.iter().map(|s| json!({
                "t": s.t, "file_size": s.file_size, "space_used": s.space_used,
            })).collect::<Vec<_>>(),
            "compaction_errors": run.compaction_errors,
            "differences": run.check.first_diffs,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(t: f64, latency_ms: u64, during_compaction: bool) -> CommitSample {
        CommitSample {
            t,
            latency: Duration::from_millis(latency_ms),
            during_compaction,
        }
    }

    #[test]
    fn the_steady_commit_ratio_leaves_out_the_commits_before_the_steady_state() {
        let mut commits = vec![
            // Warm-up: slow, during and outside a compaction.
            commit(0.2, 40, true),
            commit(0.3, 50, false),
        ];
        commits.extend((0..200).map(|i| commit(1.0 + f64::from(i) * 0.01, 2, false)));
        commits.push(commit(2.5, 3, true));
        commits.push(commit(2.6, 1, true));
        let ratio = steady_commit_ratio(&commits, 1.0);
        assert!((ratio - 1.5).abs() < 0.01, "{ratio}");
        // From the start, the warm-up's 40 ms commit is the slowest during a
        // compaction, and the 50 ms one is above the p99 of 201 others.
        let ratio = steady_commit_ratio(&commits, 0.0);
        assert!((ratio - 20.0).abs() < 0.1, "{ratio}");
    }
}
