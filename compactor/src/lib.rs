//! `compactor`: copies the live data of a snapshot at one header into a new
//! couchstore file and replays the changes between two headers of the source
//! into it. The copy goes in by-seq order, copies bodies as stored
//! (compressed stays compressed), builds the by-seq tree bottom-up and the
//! by-id tree from the ids sorted in memory up to a budget, otherwise through
//! sorted runs spilled next to the target and merged ([`ExternalSorter`]), and
//! copies the local documents. The new file is written at disk version 14
//! unless [`CompactionConfig::upgrade`] is off and the source is a version
//! 11 file, as couchstore does. A [`PurgePolicy`] drops tombstones below a
//! purge seqno or older than a time and raises the purge seqno (never lowers
//! it); [`Hooks`] are told about expired documents (keep, drop, or turn into
//! a deletion) and can filter any document. Work can be throttled, synced
//! every N bytes, cancelled at any point, and watched ([`Progress`]). The
//! catch-up [`replay`] copies the documents changed between two headers and
//! the local documents, including the removal of local documents (which
//! couchstore's replay misses). It is not the orchestration of a compaction:
//! taking the vbucket lock, deciding when catch-up rounds stop, renaming and
//! swapping files belong to the `vbucket` crate; `docs/design.md` in the
//! repository describes that protocol step by step.
//!
//! ```
//! use std::sync::Arc;
//! use btree::{Body, Db, DbOptions, DocUpdate};
//! use compactor::{copy_snapshot, CompactionConfig, Control, NoHooks};
//! use couchfile::{CouchFile, FaultController, FaultyDirectory, FileWriter, MemBackend};
//!
//! # fn main() -> compactor::Result<()> {
//! let source = CouchFile::new(Arc::new(MemBackend::new()), "0.couch.1")?;
//! let mut db = Db::open(source.clone(), &DbOptions::default())?;
//! for round in 0..3 {
//!     let doc = DocUpdate { id: b"k".to_vec(), seq: None, rev_seq: round + 1,
//!         rev_seq_above_stored: false,
//!         rev_meta: vec![0; 16], deleted: false, content_meta: 0x80,
//!         body: Body::Plain(vec![b'x'; 1000]) };
//!     db.save(&[doc], &[])?;
//!     db.commit(0)?;
//! }
//! let target = CouchFile::new(Arc::new(MemBackend::new()), "0.couch.2.compact")?;
//! let dir = FaultyDirectory::new(FaultController::new()); // for sort runs
//! let (compacted, stats) = copy_snapshot(
//!     &db.snapshot(), FileWriter::create_without_header(target)?, &dir, "0.couch.2.compact",
//!     &CompactionConfig::default(), &mut NoHooks, &Control::new())?;
//! assert_eq!(stats.docs_copied, 1);
//! assert_eq!(compacted.snapshot().header().update_seq, 3);
//! assert!(compacted.snapshot().file().len()? < source.len()?);
//! # Ok(())
//! # }
//! ```

mod copy;
mod error;
mod pacer;
mod replay;
mod sort;

pub use copy::{copy_snapshot, CopyStats};
pub use error::{Error, Result};
pub use pacer::{Control, Progress};
pub use replay::{replay, ReplayStats};
pub use sort::{ExternalSorter, SortedEntries};

/// Bytes of the source file read at a time when copying or replaying bodies.
const BODY_WINDOW: usize = 256 << 10;

use btree::NodeConfig;
use couchfile::{DocInfo, CURRENT_DISK_VERSION, OLDEST_DISK_VERSION};

/// Which tombstones compaction drops. A dropped tombstone raises the
/// file's purge seqno to its seqno (readers of changes since an older
/// seqno may have missed the deletion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgePolicy {
    /// Drop every tombstone.
    pub drop_deletes: bool,
    /// Drop tombstones whose seqno is below this (0: none).
    pub purge_before_seq: u64,
    /// Drop tombstones deleted before this time, in seconds since the epoch
    /// (0: none). kv-engine stores a tombstone's delete time in its exptime.
    pub purge_before_time: u32,
}

impl PurgePolicy {
    /// True when the tombstone `info`, deleted at `delete_time`, goes.
    pub fn purges(&self, info: &DocInfo, delete_time: u32) -> bool {
        info.deleted
            && (self.drop_deletes
                || info.db_seq < self.purge_before_seq
                || (self.purge_before_time != 0 && delete_time < self.purge_before_time))
    }
}

/// How a copy sets the new file's purge seqno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PurgeSeqRule {
    /// kv-engine's rule: the highest seqno purged (never below the source's).
    #[default]
    HighestPurged,
    /// couchstore's `couch_compact` rule when [`PurgePolicy::drop_deletes`]
    /// is set: the source's purge seqno plus one (a counter of such
    /// compactions); otherwise as `HighestPurged`.
    CountDropDeletes,
}

/// What to do with a live document whose expiry time has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryAction {
    /// Copy it as it is.
    Keep,
    /// Leave it out (raises the purge seqno).
    Drop,
    /// Copy it as a deletion without a body, same seqno.
    Delete,
}

/// Callbacks of a copy. The defaults keep everything.
pub trait Hooks {
    /// `info` is live and its exptime (`exptime`, seconds since the epoch)
    /// is at or before the compaction's `now`.
    fn expired(&mut self, info: &DocInfo, exptime: u32) -> ExpiryAction {
        let _ = (info, exptime);
        ExpiryAction::Keep
    }

    /// False leaves `info` out (raises the purge seqno). Called for every
    /// document the purge policy keeps.
    fn keep(&mut self, info: &DocInfo) -> bool {
        let _ = info;
        true
    }
}

/// Hooks that keep everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}

/// How a compaction runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionConfig {
    /// Which tombstones go.
    pub purge: PurgePolicy,
    /// How the purge seqno follows.
    pub purge_seq_rule: PurgeSeqRule,
    /// "Now" for expiry, in seconds since the epoch (`None`: the clock).
    pub now: Option<u32>,
    /// Sync the target after every this many bytes written (0: only at the
    /// end), so the page cache never holds a huge dirty tail.
    pub sync_every_bytes: u64,
    /// Have a second thread sync the target every time this many more
    /// bytes were appended (0: never), so that the disk writes the copy
    /// while it runs and the commit's sync finds little left to write. The
    /// commit's syncs are unchanged; an error of one of these syncs fails
    /// the copy. Off by default: the extra thread's syncs are not in a
    /// deterministic order with the copy's other I/O.
    pub writeback_every_bytes: u64,
    /// Write at most this many bytes per second (`None`: no limit).
    pub throttle_bytes_per_sec: Option<u64>,
    /// Bytes of (id, by-id value) pairs sorted in memory before sorted runs
    /// are spilled to files next to the target.
    pub id_sort_memory: usize,
    /// Node sizes of the trees written.
    pub nodes: NodeConfig,
    /// Documents saved per batch by the catch-up replay. Large batches make
    /// the replay cheaper per document than the flusher's commits it
    /// replays (each tree node is rewritten once per batch), which is what
    /// lets the catch-up rounds converge under a saturating writer.
    pub replay_batch: usize,
    /// Whether a replay's large saves may modify the trees on two threads
    /// ([`btree::Db::set_parallel_modifies`]; the default). A compaction
    /// beside a flusher turns it off until the flusher waits for it: the
    /// two threads are a pool every tree shares, and a long replay on them
    /// delays the flusher's commits that wait for them.
    pub parallel_replays: bool,
    /// Whether the copy sorts the ids on every core (rayon's global pool;
    /// the default) rather than on its own thread alone. A compaction
    /// beside a flusher turns it off, leaving the other core to the
    /// flusher's commits.
    pub parallel_sort: bool,
    /// Write the new file at disk version 14 (CRC-32C) whatever the
    /// source's version: couchstore's `COUCHSTORE_COMPACT_FLAG_UPGRADE_DB`,
    /// which kv_engine always passes, and the default. Without it the new
    /// file's version is couchstore's choice without the flag: a version 11
    /// source stays version 11 (CRC-32), any other is written as 14 (see
    /// [`CompactionConfig::target_disk_version`]).
    pub upgrade: bool,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            purge: PurgePolicy::default(),
            purge_seq_rule: PurgeSeqRule::default(),
            now: None,
            sync_every_bytes: 64 << 20,
            writeback_every_bytes: 0,
            throttle_bytes_per_sec: None,
            id_sort_memory: 64 << 20,
            nodes: NodeConfig::default(),
            replay_batch: 100_000,
            parallel_replays: true,
            parallel_sort: true,
            upgrade: true,
        }
    }
}

impl CompactionConfig {
    /// The disk version of the file a compaction of a `source_version` file
    /// writes: 14 ([`CURRENT_DISK_VERSION`]) with [`Self::upgrade`];
    /// without it, as couchstore's `couch_compact` without its upgrade flag
    /// (`db_compact.cc`), 11 for a version 11 source and 14 for any other
    /// (couchstore writes only those two versions).
    pub fn target_disk_version(&self, source_version: u8) -> u8 {
        if !self.upgrade && source_version == OLDEST_DISK_VERSION {
            OLDEST_DISK_VERSION
        } else {
            CURRENT_DISK_VERSION
        }
    }

    pub(crate) fn now(&self) -> u32 {
        self.now.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_version_is_couchstores_choice() {
        let upgrade = CompactionConfig::default();
        assert!(upgrade.upgrade, "kv_engine's default");
        let keep = CompactionConfig {
            upgrade: false,
            ..CompactionConfig::default()
        };
        for source in 11..=14 {
            assert_eq!(upgrade.target_disk_version(source), 14);
            let kept = if source == 11 { 11 } else { 14 };
            assert_eq!(keep.target_disk_version(source), kept);
        }
    }
}
