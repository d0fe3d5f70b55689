//! A store: many vbuckets in one data directory, served by one pool of
//! flusher threads.

use crate::error::{Error, Result};
use crate::files;
use crate::vbucket::{VBucket, VBucketStats, VbOptions, VbTarget};
use btree::{DbOptions, NodeConfig};
use couchfile::{Directory, OpenMode, OsDirectory};
use flusher::{FlushStats, Flusher, FlusherConfig, Vbid};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// How a [`Store`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Flusher threads, batching, queue bounds and retries.
    pub flusher: FlusherConfig,
    /// Store bodies snappy-compressed.
    pub compress_bodies: bool,
    /// B-tree node sizes of the files written.
    pub nodes: NodeConfig,
    /// How to treat a corrupt last header when opening a vbucket
    /// ([`OpenMode::Recovery`] falls back to an older header).
    pub open_mode: OpenMode,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            flusher: FlusherConfig::default(),
            compress_bodies: true,
            nodes: NodeConfig::default(),
            open_mode: OpenMode::Normal,
        }
    }
}

/// Statistics of a store: per vbucket and in total.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// One entry per open vbucket, by id.
    pub vbuckets: Vec<VBucketStats>,
    /// The sums (seqnos: maxima; flush statistics merged).
    pub total: StoreTotals,
}

/// Totals over a store's vbuckets.
#[derive(Debug, Clone, Default)]
pub struct StoreTotals {
    /// Sum of file sizes.
    pub file_size: u64,
    /// Sum of the space the latest headers use.
    pub space_used: u64,
    /// Live documents.
    pub live_docs: u64,
    /// Deletions.
    pub deleted_docs: u64,
    /// Mutations not yet persisted.
    pub dirty_items: u64,
    /// Headers committed.
    pub commits: u64,
    /// The flusher's statistics, merged.
    pub flush: FlushStats,
}

/// Many vbuckets in one directory, each in its own `<vbid>.couch.<rev>`
/// file, flushed by a shared pool of flusher threads. Dropping the store
/// flushes what is queued; [`Store::close`] does too and reports failures.
#[derive(Debug)]
pub struct Store {
    dir: Arc<dyn Directory>,
    config: StoreConfig,
    vbuckets: RwLock<BTreeMap<Vbid, VBucket>>,
    // Declared last: dropped after the vbucket handles.
    flusher: Flusher<VbTarget>,
}

impl Store {
    /// Opens the store in the directory `path` (created if missing) and
    /// every vbucket that has files there.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        let path = path.as_ref();
        let dir = OsDirectory::new(path).map_err(|e| Error::io(path, "open directory", e))?;
        Self::open_in(Arc::new(dir), config)
    }

    /// Opens the store on any [`Directory`] (an in-memory, fault-injecting
    /// one in tests) and every vbucket that has files there.
    pub fn open_in(dir: Arc<dyn Directory>, config: StoreConfig) -> Result<Self> {
        let _span = tracing::info_span!("open_store", dir = %dir.path().display()).entered();
        let store = Self {
            flusher: Flusher::new(config.flusher.clone())?,
            dir,
            config,
            vbuckets: RwLock::new(BTreeMap::new()),
        };
        for vbid in files::vbids_in(&*store.dir)? {
            store.open_vbucket(vbid)?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.dir
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn vb_options(&self) -> VbOptions {
        VbOptions {
            db: DbOptions {
                mode: self.config.open_mode,
                nodes: self.config.nodes,
                ..DbOptions::default()
            },
            compress_bodies: self.config.compress_bodies,
            write_timeout: self.config.flusher.backpressure_timeout,
        }
    }

    /// Vbucket `vbid`, opened from its newest complete revision, or created
    /// at revision 1 when it has no file yet. Returns the open one if it is
    /// open already.
    pub fn open_vbucket(&self, vbid: Vbid) -> Result<VBucket> {
        let mut vbuckets = self.vbuckets.write();
        if let Some(vb) = vbuckets.get(&vbid) {
            return Ok(vb.clone());
        }
        let vb = VBucket::open(
            Arc::clone(&self.dir),
            vbid,
            self.vb_options(),
            &self.flusher,
        )?;
        vbuckets.insert(vbid, vb.clone());
        Ok(vb)
    }

    /// The open vbucket `vbid`.
    pub fn vbucket(&self, vbid: Vbid) -> Result<VBucket> {
        self.vbuckets
            .read()
            .get(&vbid)
            .cloned()
            .ok_or(Error::NoSuchVbucket(vbid))
    }

    /// The ids of the open vbuckets, ascending.
    pub fn vbuckets(&self) -> Vec<Vbid> {
        self.vbuckets.read().keys().copied().collect()
    }

    /// Closes vbucket `vbid`: further mutations are refused, what is queued
    /// is flushed, and its flusher queue is removed. Handles still held keep
    /// reading the files they have open.
    pub fn close_vbucket(&self, vbid: Vbid) -> Result<()> {
        let vb = self
            .vbuckets
            .write()
            .remove(&vbid)
            .ok_or(Error::NoSuchVbucket(vbid))?;
        vb.close_front();
        let removed = self.flusher.remove(vbid)?;
        match removed.unflushed_items {
            0 => Ok(()),
            items => Err(Error::Unflushed { vbid, items }),
        }
    }

    /// Closes vbucket `vbid` and removes its files.
    pub fn delete_vbucket(&self, vbid: Vbid) -> Result<()> {
        let closed = self.close_vbucket(vbid);
        let names = self
            .dir
            .list()
            .map_err(|e| Error::io(self.dir.path(), "list", e))?;
        for name in names {
            if files::parse_name(&name).is_some_and(|(v, _)| v == vbid) {
                self.dir
                    .remove(&name)
                    .map_err(|e| Error::io(self.dir.path().join(&name), "remove", e))?;
            }
        }
        self.dir
            .sync()
            .map_err(|e| Error::io(self.dir.path(), "sync directory", e))?;
        match closed {
            // Its unflushed mutations are gone with it.
            Err(Error::Unflushed { .. }) => Ok(()),
            other => other,
        }
    }

    /// Statistics of every open vbucket and their totals.
    pub fn stats(&self) -> Result<StoreStats> {
        let vbuckets: Vec<VBucket> = self.vbuckets.read().values().cloned().collect();
        let mut stats = StoreStats::default();
        for vb in vbuckets {
            let s = vb.stats()?;
            let t = &mut stats.total;
            t.file_size += s.file_size;
            t.space_used += s.space_used;
            t.live_docs += s.live_docs;
            t.deleted_docs += s.deleted_docs;
            t.dirty_items += s.dirty_items;
            t.commits += s.commits;
            t.flush.merge(&s.flush);
            stats.vbuckets.push(s);
        }
        Ok(stats)
    }

    /// Closes every vbucket (flushing their queues) and the flusher threads.
    /// Returns the first error; every vbucket is closed regardless.
    pub fn close(self) -> Result<()> {
        let mut first_error = None;
        for vbid in self.vbuckets() {
            if let Err(e) = self.close_vbucket(vbid) {
                tracing::error!(vbid, error = %e, "closing a vbucket failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
