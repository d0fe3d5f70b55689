//! A file's history: the chain of headers a file keeps, indexed once so
//! that "the newest header at or before seqno S" (or time T) is a binary
//! search, and listed for people ([`HistoryEntry`]).
//!
//! The chain is walked back from a header with
//! [`CouchFile::previous_header`] (the version 14 `prev_header_pos` hint,
//! else couchstore's scan back over the block-aligned header markers). A
//! rollback ([`crate::VBucket::rollback`]) appends a copy of an older
//! header, so the raw chain can go back in update seq: the headers of the
//! abandoned branch (those between the older header and its copy, all with
//! a higher update seq) are not part of the history and are left out. What
//! is left has non-decreasing update seqs from the oldest to the newest
//! (equal ones where only local documents were committed), which is what
//! the binary search needs. Commit timestamps are non-decreasing too in
//! the files a vbucket writes (`Writer::commit` never lets them go back).

use crate::error::{Error, Result};
use couchfile::{CouchFile, LocatedHeader, OpenMode};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One header of a file's history, as [`crate::VBucket::history`] and
/// [`crate::ReadSnapshot::history`] list it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Offset of the header's block.
    pub offset: u64,
    /// The highest seqno it covers.
    pub update_seq: u64,
    /// Its purge seqno.
    pub purge_seq: u64,
    /// Its commit time in nanoseconds since the epoch; `None` for headers
    /// of disk versions before 13, which have no timestamp.
    pub timestamp: Option<u64>,
    /// Live documents it lists.
    pub doc_count: u64,
    /// Deletions (tombstones) it lists.
    pub deleted_count: u64,
}

impl HistoryEntry {
    /// The entry of `header`.
    pub fn of(header: &LocatedHeader) -> Result<Self> {
        let counts = match &header.header.by_id_root {
            Some(root) => btree::IdReduce::decode(&root.reduce)?,
            None => btree::IdReduce::default(),
        };
        Ok(Self {
            offset: header.offset,
            update_seq: header.header.update_seq,
            purge_seq: header.header.purge_seq,
            timestamp: timestamp_of(header),
            doc_count: counts.live,
            deleted_count: counts.deleted,
        })
    }
}

/// The commit time of `header`, in nanoseconds since the epoch; `None`
/// before disk version 13.
pub(crate) fn timestamp_of(header: &LocatedHeader) -> Option<u64> {
    (header.header.disk_version >= 13).then_some(header.header.timestamp)
}

/// `time` in nanoseconds since the epoch (0 before it, `u64::MAX` past
/// what 64 bits hold).
pub fn unix_nanos_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The time `nanos` nanoseconds after the epoch.
pub fn time_of_unix_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// A point of a file's history to read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The newest header whose update seq is at or below this seqno.
    Seqno(u64),
    /// The newest header committed at or before this time (nanoseconds
    /// since the epoch).
    Time(u64),
}

impl std::fmt::Display for AsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsOf::Seqno(s) => write!(f, "seqno {s}"),
            AsOf::Time(t) => write!(f, "time {t} ns since the epoch"),
        }
    }
}

/// The headers of one file's history, oldest first (see the module
/// documentation). Built by walking the chain back once; extended by
/// walking back only as far as the newest header already indexed.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeaderIndex {
    headers: Vec<LocatedHeader>,
}

impl HeaderIndex {
    /// The history of `file` up to `latest`.
    pub(crate) fn build(
        file: &CouchFile,
        latest: &LocatedHeader,
        mode: OpenMode,
    ) -> couchfile::Result<Self> {
        let mut index = Self::default();
        index.extend_to(file, latest, mode)?;
        Ok(index)
    }

    /// Adds the headers from the newest indexed one up to `latest`, which
    /// must be a later header of the same file (or the same one). Headers
    /// are appended in order, never rewritten, so the part already indexed
    /// stays valid; should the walk not meet it (a different file), the
    /// index is rebuilt.
    pub(crate) fn extend_to(
        &mut self,
        file: &CouchFile,
        latest: &LocatedHeader,
        mode: OpenMode,
    ) -> couchfile::Result<()> {
        let known = self.headers.last().map(|h| h.offset);
        if known == Some(latest.offset) {
            return Ok(());
        }
        let mut newer = Vec::new();
        let mut current = latest.clone();
        let met = loop {
            if Some(current.offset) == known {
                break true;
            }
            if known.is_some_and(|k| current.offset < k) {
                break false;
            }
            let previous = file.previous_header(&current, mode)?;
            newer.push(current);
            match previous {
                Some(p) => current = p,
                None => break known.is_none(),
            }
        };
        if !met {
            tracing::debug!(path = %file.path().display(), "header index rebuilt");
            self.headers.clear();
            return self.extend_to(file, latest, mode);
        }
        for header in newer.into_iter().rev() {
            self.push(header);
        }
        Ok(())
    }

    /// Appends the next header of the chain. A header whose update seq is
    /// below the newest kept ones is a rollback's copy of an older header:
    /// the newer headers it abandons leave the history.
    fn push(&mut self, header: LocatedHeader) {
        while self
            .headers
            .last()
            .is_some_and(|h| h.header.update_seq > header.header.update_seq)
        {
            self.headers.pop();
        }
        self.headers.push(header);
    }

    /// The newest header at or before `point`, by binary search; `None`
    /// when every header is after it (or, for a time, none has a
    /// timestamp).
    pub(crate) fn find(&self, point: AsOf) -> Option<&LocatedHeader> {
        let n = match point {
            AsOf::Seqno(seqno) => self
                .headers
                .partition_point(|h| h.header.update_seq <= seqno),
            AsOf::Time(nanos) => self
                .headers
                .partition_point(|h| timestamp_of(h).is_none_or(|t| t <= nanos)),
        };
        let found = self.headers[..n].last()?;
        match point {
            AsOf::Time(_) if timestamp_of(found).is_none() => None,
            _ => Some(found),
        }
    }

    /// The header a rollback to `seqno` goes back to: the newest at or
    /// below it, unless the purge seqno of `latest` (the file's newest
    /// header) is above it (deletions the target would need are gone).
    /// `None` means "roll back to zero".
    pub(crate) fn rollback_target(
        &self,
        latest: &LocatedHeader,
        seqno: u64,
    ) -> Option<&LocatedHeader> {
        if latest.header.purge_seq > seqno {
            tracing::info!(
                purge_seq = latest.header.purge_seq,
                seqno,
                "the purge seqno is above the rollback's target"
            );
            return None;
        }
        self.find(AsOf::Seqno(seqno))
    }

    /// [`HeaderIndex::find`], or [`Error::NoHeaderAsOf`] naming `path`.
    pub(crate) fn find_or_error(&self, point: AsOf, path: &Path) -> Result<&LocatedHeader> {
        self.find(point).ok_or_else(|| Error::NoHeaderAsOf {
            path: path.to_path_buf(),
            point,
            oldest: self.headers.first().map(|h| h.header.update_seq),
        })
    }

    /// The history, newest first.
    pub(crate) fn entries(&self) -> Result<Vec<HistoryEntry>> {
        self.headers.iter().rev().map(HistoryEntry::of).collect()
    }
}
