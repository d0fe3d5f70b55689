//! This project: a [`Store`] with one vbucket (vbid 0) in the engine's
//! directory, default configuration but for the flusher's group commit
//! (`gather_max`, off by default), so with its default node cache;
//! `ours-uncached` is the same without a node cache
//! (`StoreConfig::node_cache_bytes` 0). A durable
//! commit of a batch is a `set` of each item followed by `wait_persisted` of
//! the last seqno (with the group commit, one file commit per batch);
//! compaction is [`VBucket::compact`] with the default options (concurrent
//! with the flusher).

use super::{read_each, Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use flusher::FlusherConfig;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use vbucket::{CompactionOptions, CompactionReport, ItemMeta, Store, StoreConfig, VBucket};

/// How long the flusher waits for a growing queue to stop growing.
const GATHER_MAX: Duration = Duration::from_millis(2);

/// How long a batch may take to persist before the run fails.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(300);

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec { name: "ours", open };

/// The same without a node cache, to show what the cache changes.
pub const SPEC_UNCACHED: EngineSpec = EngineSpec {
    name: "ours-uncached",
    open: open_uncached,
};

/// An open store and its one vbucket.
struct Ours {
    /// The store.
    store: Store,
    /// Vbucket 0.
    vb: VBucket,
    /// The batches written since opening.
    batches: Mutex<u64>,
    /// The last compaction's report.
    report: Mutex<Option<CompactionReport>>,
}

/// Opens (or creates) the store in `dir` and its vbucket 0.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    open_with_cache(dir, StoreConfig::default().node_cache_bytes)
}

/// [`open`] without a node cache.
fn open_uncached(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    open_with_cache(dir, 0)
}

fn open_with_cache(dir: &Path, node_cache_bytes: u64) -> Result<Box<dyn Engine>, BoxError> {
    let store = Store::open(
        dir,
        StoreConfig {
            // Group commit: the batch's sets land in one file commit instead
            // of being split wherever the flusher woke (1.6 commits each).
            flusher: FlusherConfig {
                gather_max: GATHER_MAX,
                ..FlusherConfig::default()
            },
            node_cache_bytes,
            ..StoreConfig::default()
        },
    )?;
    let vb = store.open_vbucket(0)?;
    Ok(Box::new(Ours {
        store,
        vb,
        batches: Mutex::new(0),
        report: Mutex::new(None),
    }))
}

impl Engine for Ours {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let mut last = 0;
        for (key, value) in batch {
            last = self.vb.set(key, value, ItemMeta::default())?.seqno;
        }
        self.vb.wait_persisted(last, PERSIST_TIMEOUT)?;
        if let Ok(mut batches) = self.batches.lock() {
            *batches += 1;
        }
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::Concurrent
    }

    fn compact(&self) -> Result<(), BoxError> {
        let report = self.vb.compact(&CompactionOptions::default())?;
        if let Ok(mut last) = self.report.lock() {
            *last = Some(report);
        }
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        let snapshot = self.vb.snapshot();
        read_each(keys, check, |key| {
            snapshot.get(key).map(|doc| doc.map(|d| d.value))
        })
    }

    fn notes(&self) -> Option<String> {
        let stats = self.vb.stats().ok()?;
        let batches = self.batches.lock().map(|b| *b).unwrap_or(0);
        let commit = stats.flush.commit_latency.summary();
        let mut notes = format!(
            "{batches} durable batches took {} file commits (flusher commit p50 {:.2} ms, p99 {:.2} ms)",
            stats.flush.commit_latency.count(),
            commit.p50.as_secs_f64() * 1e3,
            commit.p99.as_secs_f64() * 1e3,
        );
        if let Some(cache) = self.store.node_cache() {
            let c = cache.stats();
            notes.push_str(&format!(
                "; node cache: {} hits, {} misses, {} evictions, {:.1} of {:.1} MiB",
                c.hits,
                c.misses,
                c.evictions,
                c.used as f64 / (1024.0 * 1024.0),
                c.capacity as f64 / (1024.0 * 1024.0)
            ));
        }
        if let Some(report) = self.report.lock().ok()?.as_ref() {
            let unlocked: Duration = report.rounds.iter().map(|r| r.duration).sum();
            let slipped: Duration = report
                .rounds_waiting_for_commit
                .iter()
                .map(|r| r.duration)
                .sum();
            notes.push_str(&format!(
                "; compaction: {:.2} s: copy of {} docs {:.2} s, {} catch-up rounds {:.2} s, {} rounds waiting for a commit {:.2} s, lock held {:.2} ms, flusher waited {:.2} ms, file {:.1} -> {:.1} MiB",
                report.duration.as_secs_f64(),
                report.copy.docs_copied,
                report.copy.duration.as_secs_f64(),
                report.rounds.len(),
                unlocked.as_secs_f64(),
                report.rounds_waiting_for_commit.len(),
                slipped.as_secs_f64(),
                report.lock_held.as_secs_f64() * 1e3,
                report.flusher_waited.as_secs_f64() * 1e3,
                report.size_before as f64 / (1024.0 * 1024.0),
                report.size_after as f64 / (1024.0 * 1024.0),
            ));
        }
        Some(notes)
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        let Ours { store, vb, .. } = *self;
        drop(vb);
        store.close()?;
        Ok(())
    }
}
