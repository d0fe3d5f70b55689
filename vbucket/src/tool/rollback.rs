//! `couchtool rollback`: a couchstore file rolled back to a seqno, the way
//! couchstore's `couchstore_rewind_db_header` and a commit do it: the newest
//! header whose update seq is at or below the seqno is appended again as the
//! newest header, synced. Nothing else is written, so a crash leaves the
//! file before or after the rollback.

use super::{Error, Result};
use crate::history::HeaderIndex;
use crate::RollbackTo;
use btree::{Db, DbOptions};
use couchfile::{CouchFile, Directory, OpenMode, OsDirectory};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What `couchtool rollback` did (its [`fmt::Display`] is the line the
/// binary prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackSummary {
    /// The file.
    pub path: PathBuf,
    /// Where it went.
    pub to: RollbackTo,
    /// Offset of the header rolled back to (`None` for zero).
    pub source_header: Option<u64>,
    /// Offset of the header appended (`None` when nothing was appended:
    /// zero, or the newest header was already the one).
    pub new_header: Option<u64>,
}

impl fmt::Display for RollbackSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.to, self.source_header, self.new_header) {
            (RollbackTo::Seqno(seq), Some(from), Some(new)) => write!(
                f,
                "rolled back {} to seqno {seq}: the header at {from} appended at {new}",
                self.path.display()
            ),
            (RollbackTo::Seqno(seq), _, _) => write!(
                f,
                "rolled back {} to seqno {seq}: the newest header already is at it, nothing appended",
                self.path.display()
            ),
            (RollbackTo::Zero, _, _) => write!(
                f,
                "rolled back {} to zero: no header can serve, nothing changed (rebuild it from scratch)",
                self.path.display()
            ),
        }
    }
}

/// `couchtool rollback FILE --to-seq N`: opens `path` for writing (no other
/// process may be writing it: stop the store that owns it first), chooses
/// the newest header of its history whose update seq is at or below
/// `seqno` (unless the purge seqno is above `seqno`: then "zero", and
/// nothing is written) and commits it again as the newest header (a new
/// timestamp, never below the newest header's; `prev_header_pos` pointing
/// at the newest header), synced.
pub fn rollback(path: &Path, seqno: u64) -> Result<RollbackSummary> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::Compaction(compactor::Error::InvalidArgument(format!(
            "{}: the file must be a file name in UTF-8",
            path.display()
        )))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = OsDirectory::new(parent).map_err(|e| Error::io(parent, "open directory", e))?;
    let backend = dir.open(name).map_err(|e| Error::io(path, "open", e))?;
    let file = CouchFile::new(backend, path)?;
    // A file without a header (an empty one too) has no history to roll
    // back, and is left as it is.
    let mut db = Db::open_existing(file, &DbOptions::default())?;
    let latest = db.committed().clone();
    let index = HeaderIndex::build(db.writer_mut().file(), &latest, OpenMode::Normal)?;
    let Some(chosen) = index.rollback_target(&latest, seqno).cloned() else {
        return Ok(RollbackSummary {
            path: path.to_path_buf(),
            to: RollbackTo::Zero,
            source_header: None,
            new_header: None,
        });
    };
    let new_header = if chosen.offset == latest.offset {
        None
    } else {
        db.rewind_to(&chosen.header)?;
        let now = crate::history::unix_nanos_of(SystemTime::now());
        Some(db.commit(now.max(latest.header.timestamp))?)
    };
    Ok(RollbackSummary {
        path: path.to_path_buf(),
        to: RollbackTo::Seqno(chosen.header.update_seq),
        source_header: Some(chosen.offset),
        new_header,
    })
}
