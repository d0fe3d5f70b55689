//! `couchtool compact`: a couchstore file copied at one header into a new
//! file with [`compactor::copy_snapshot`], the way couchstore's
//! `couch_compact` does: without `--upgrade` a version 11 file stays
//! version 11 (CRC-32), as couchstore's compaction without its
//! `COUCHSTORE_COMPACT_FLAG_UPGRADE_DB`; with it, or from any other
//! version, the new file is version 14.

use super::{open_or_error, Error, OpenOptions, Result};
use crate::history::HeaderIndex;
use compactor::{CompactionConfig, Control, CopyStats, NoHooks, PurgePolicy, PurgeSeqRule};
use couchfile::{CouchFile, Directory, FileWriter, OsDirectory};
use std::fmt;
use std::path::{Path, PathBuf};

/// What `couchtool compact` keeps and where it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactOptions {
    /// Which header of the source is copied.
    pub open: OpenOptions,
    /// Drop every tombstone. As couchstore's `COUCHSTORE_COMPACT_FLAG_DROP_DELETES`
    /// does, the new file's purge seqno is then the source's plus one (the
    /// flag counts purges; see `couchstore-format.md`, compaction step 2),
    /// not the highest seqno dropped.
    pub drop_deletes: bool,
    /// Drop the tombstones whose seqno is below this (0: none); the purge
    /// seqno is raised to the highest seqno dropped. Cannot be combined
    /// with `drop_deletes`.
    pub purge_before_seq: u64,
    /// Write disk version 14 whatever the source's version (couchstore's
    /// `couch_compact --upgrade`, `COUCHSTORE_COMPACT_FLAG_UPGRADE_DB`).
    /// Off by default: a version 11 source then stays version 11, with
    /// CRC-32 chunks, and any other version is written as 14, as
    /// couchstore's compaction does without the flag.
    pub upgrade: bool,
    /// History to keep: one header per granularity period of the window
    /// (see [`crate::History`]), each listing what the source header it
    /// stands for lists; nothing they see is purged. `None`: the one
    /// header copied.
    pub history: Option<crate::History>,
}

/// What a compaction did (its [`fmt::Display`] is the one-line summary the
/// binary prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactSummary {
    /// The source file.
    pub source: PathBuf,
    /// Offset of the source header copied.
    pub source_header: u64,
    /// The new file.
    pub target: PathBuf,
    /// Offset of the new file's only header.
    pub target_header: u64,
    /// Update seqno of both headers.
    pub update_seq: u64,
    /// Purge seqno of the new file.
    pub purge_seq: u64,
    /// Disk version of the source.
    pub source_version: u8,
    /// Disk version of the new file.
    pub target_version: u8,
    /// What the copy did (documents copied, tombstones purged, bytes).
    pub copy: CopyStats,
    /// Size of the source file, in bytes.
    pub size_before: u64,
    /// Size of the new file, in bytes.
    pub size_after: u64,
    /// Headers the new file has (1 without history).
    pub headers: u64,
}

impl fmt::Display for CompactSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "compacted {} (header {}, version {}) into {} (header {}, version {}): {} docs copied, {} tombstones purged, update_seq {}, purge_seq {}, {} -> {} bytes, {} header(s)",
            self.source.display(),
            self.source_header,
            self.source_version,
            self.target.display(),
            self.target_header,
            self.target_version,
            self.copy.docs_copied,
            self.copy.tombstones_purged,
            self.update_seq,
            self.purge_seq,
            self.size_before,
            self.size_after,
            self.headers
        )
    }
}

/// Removes the target (and, through the sorter's own cleanup, its sort
/// runs) unless disarmed.
struct PartialTarget<'a> {
    dir: &'a OsDirectory,
    name: &'a str,
    armed: bool,
}

impl Drop for PartialTarget<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.dir.remove(self.name) {
                tracing::warn!(file = self.name, error = %e, "cannot remove the partial target");
            }
        }
    }
}

fn io_error(path: &Path, op: &'static str, source: std::io::Error) -> Error {
    Error::Compaction(compactor::Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    })
}

/// `couchtool compact`: opens `src` read-only at the header `options.open`
/// names, creates `dst` (an error if it exists), copies the header's
/// documents (tombstones dropped as `options` say; bodies as stored) and
/// local documents into it with [`compactor::copy_snapshot`] (sort runs,
/// if any, go next to `dst`, named after it), commits its one header (the
/// source's update seqno and timestamp; disk version 14, or 11 for a
/// version 11 source without `options.upgrade`) and syncs the file and its
/// directory. On error `dst` is removed.
pub fn compact(src: &Path, dst: &Path, options: &CompactOptions) -> Result<CompactSummary> {
    if options.drop_deletes && options.purge_before_seq != 0 {
        return Err(Error::Compaction(compactor::Error::InvalidArgument(
            "drop-deletes drops every tombstone: purge-before-seq cannot be combined with it"
                .into(),
        )));
    }
    let source = open_or_error(src, &options.open)?;
    let size_before = source.file().len()?;
    let name = dst.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::Compaction(compactor::Error::InvalidArgument(format!(
            "{}: the target must be a file name in UTF-8",
            dst.display()
        )))
    })?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(io_error(
            parent,
            "open directory",
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    let dir = OsDirectory::new(parent).map_err(|e| io_error(parent, "open directory", e))?;
    let backend = dir.create(name).map_err(|e| io_error(dst, "create", e))?;
    let mut guard = PartialTarget {
        dir: &dir,
        name,
        armed: true,
    };
    let config = CompactionConfig {
        purge: PurgePolicy {
            drop_deletes: options.drop_deletes,
            purge_before_seq: options.purge_before_seq,
            purge_before_time: 0,
        },
        // couch_compact's rule, so the result matches couchstore's.
        purge_seq_rule: PurgeSeqRule::CountDropDeletes,
        upgrade: options.upgrade,
        // The disk writes the copy while it runs (`bench disk`'s rate is
        // the yardstick): the final sync had been a third of the time.
        writeback_every_bytes: 8 << 20,
        ..CompactionConfig::default()
    };
    let target = FileWriter::create_without_header(CouchFile::new(backend, dst)?)?;
    let plan = match &options.history {
        Some(history) => {
            let index =
                HeaderIndex::build(source.file(), source.located_header(), options.open.mode)?;
            Some(crate::history::plan(
                &index,
                source.located_header(),
                history,
            ))
        }
        None => None,
    };
    let (mut db, copy, headers) = match plan {
        Some((kept, true)) => {
            let (db, copy, replayed) = crate::history::copy_keeping_history(
                source.file(),
                &kept,
                target,
                &dir,
                name,
                &config,
                &Control::new(),
            )?;
            (db, copy, 1 + replayed.headers)
        }
        _ => {
            let (db, copy) = compactor::copy_snapshot(
                &source,
                target,
                &dir,
                name,
                &config,
                &mut NoHooks,
                &Control::new(),
            )?;
            (db, copy, 1)
        }
    };
    let committed = db.committed().clone();
    db.writer_mut().sync()?;
    dir.sync()
        .map_err(|e| io_error(parent, "sync directory", e))?;
    let size_after = db.writer_mut().file().len()?;
    guard.armed = false;
    Ok(CompactSummary {
        source: src.to_path_buf(),
        source_header: source.offset(),
        target: dst.to_path_buf(),
        target_header: committed.offset,
        update_seq: committed.header.update_seq,
        purge_seq: committed.header.purge_seq,
        source_version: source.header().disk_version,
        target_version: committed.header.disk_version,
        copy,
        size_before,
        size_after,
        headers,
    })
}
