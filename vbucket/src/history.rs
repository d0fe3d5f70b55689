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
use btree::{Db, Snapshot};
use compactor::{copy_snapshot, replay, CompactionConfig, Control, CopyStats, Hooks, NoHooks};
use couchfile::{CouchFile, Directory, FileWriter, LocatedHeader, OpenMode};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
        if known.is_some_and(|k| latest.offset <= k) {
            // Indexed already (callers that want an older end filter by
            // offset).
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

    /// The headers, oldest first.
    pub(crate) fn headers(&self) -> &[LocatedHeader] {
        &self.headers
    }

    /// The history, newest first.
    pub(crate) fn entries(&self) -> Result<Vec<HistoryEntry>> {
        self.headers.iter().rev().map(HistoryEntry::of).collect()
    }
}

/// The history a compaction keeps: for the window from `now - max_age` to
/// `now`, one header per `granularity` (the newest of each period), each
/// listing exactly what the source header it stands for lists. Everything
/// older is compacted as usual into the oldest header kept. Periods are
/// aligned to the UNIX epoch, so that compacting again keeps the same
/// headers (a kept header stays the newest of its period).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// How far back from `now` headers are kept.
    pub max_age: Duration,
    /// One header per period of this length; zero keeps every header of
    /// the window.
    pub granularity: Duration,
    /// The end of the window, in nanoseconds since the epoch (`None`: the
    /// clock at the start of the compaction). Header timestamps come from
    /// the file, so a fixed `now` makes a compaction reproducible.
    pub now: Option<u64>,
}

impl History {
    /// The window's start: `now - max_age`, in nanoseconds since the epoch.
    fn window_start(&self) -> u64 {
        let now = self.now.unwrap_or_else(|| unix_nanos_of(SystemTime::now()));
        let age = u64::try_from(self.max_age.as_nanos()).unwrap_or(u64::MAX);
        now.saturating_sub(age)
    }

    /// The period of a timestamp.
    fn period(&self, timestamp: u64) -> u64 {
        match u64::try_from(self.granularity.as_nanos()) {
            Ok(0) => timestamp,
            Ok(g) => timestamp / g,
            Err(_) => 0,
        }
    }

    /// Of `headers` (consecutive headers of a history, oldest first), the
    /// ones to keep: the newest of each period among those in the window
    /// (with a timestamp at or after its start), and the last one always.
    /// Nothing is decided by counting headers: consecutive headers with the
    /// same update seq are kept or not by their own timestamps.
    pub(crate) fn select(&self, headers: &[LocatedHeader]) -> Vec<LocatedHeader> {
        let start = self.window_start();
        let in_window: Vec<&LocatedHeader> = headers
            .iter()
            .filter(|h| timestamp_of(h).is_some_and(|t| t >= start))
            .collect();
        let mut kept: Vec<LocatedHeader> = Vec::new();
        for (i, h) in in_window.iter().enumerate() {
            let newest_of_period = in_window.get(i + 1).is_none_or(|next| {
                self.period(timestamp_of(next).unwrap_or(0))
                    != self.period(timestamp_of(h).unwrap_or(0))
            });
            if newest_of_period {
                kept.push((*h).clone());
            }
        }
        if let Some(last) = headers.last() {
            if kept.last().is_none_or(|k| k.offset != last.offset) {
                kept.push(last.clone());
            }
        }
        kept
    }
}

/// What replaying a run of headers into a compaction's new file did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeadersReplayed {
    /// Documents replayed.
    pub(crate) docs: u64,
    /// Bytes written.
    pub(crate) bytes_written: u64,
    /// How long it took.
    pub(crate) duration: Duration,
    /// Headers committed (one per header replayed).
    pub(crate) headers: u64,
}

/// The timestamp a new file's header standing for the source's `header`
/// gets: the source header's, where its version has one, else the clock.
fn commit_time(header: &LocatedHeader) -> u64 {
    match timestamp_of(header) {
        Some(t) if t != 0 => t,
        _ => unix_nanos_of(SystemTime::now()),
    }
}

/// Replays into `db` (whose last header stands for `from`) each of
/// `headers` of `source` in turn (later headers of the same history, oldest
/// first) and commits a header for each, with its timestamp: the new file's
/// header chain then has one header per source header given, each listing
/// what that header lists. One header alone is a plain catch-up round.
pub(crate) fn replay_headers(
    source: &CouchFile,
    db: &mut Db,
    from: &LocatedHeader,
    headers: &[LocatedHeader],
    config: &CompactionConfig,
    control: &Control,
) -> Result<HeadersReplayed> {
    let start = Instant::now();
    let mut done = HeadersReplayed::default();
    let mut previous = from;
    for header in headers {
        let stats = replay(source, previous, header, db, config, control)?;
        db.commit(commit_time(header))?;
        done.docs += stats.docs;
        done.bytes_written += stats.bytes_written;
        done.headers += 1;
        previous = header;
    }
    done.duration = start.elapsed();
    Ok(done)
}

/// The copy phase of a compaction keeping history: `kept` (oldest first,
/// from [`History::select`], not empty) are the source headers the new file
/// keeps. The oldest is copied as usual (purge policy and hooks off, since
/// it is kept as it was: nothing a kept header can see is dropped), then the
/// others are replayed forward, a header committed for each. Returns the
/// new file, the copy's figures and the replays'.
pub(crate) fn copy_keeping_history(
    source: &CouchFile,
    kept: &[LocatedHeader],
    target: FileWriter,
    dir: &dyn Directory,
    sort_prefix: &str,
    config: &CompactionConfig,
    control: &Control,
) -> Result<(Db, CopyStats, HeadersReplayed)> {
    let (base, later) = kept.split_first().ok_or_else(|| {
        Error::Compaction(compactor::Error::InvalidArgument(
            "no header to keep".into(),
        ))
    })?;
    let _span = tracing::info_span!(
        "copy_keeping_history",
        headers = kept.len(),
        oldest = base.offset
    )
    .entered();
    let exact = CompactionConfig {
        purge: compactor::PurgePolicy::default(),
        ..config.clone()
    };
    let snapshot = Snapshot::new(source.clone(), base.clone());
    let (mut db, copy) = copy_snapshot(
        &snapshot,
        target,
        dir,
        sort_prefix,
        &exact,
        &mut NoHooks as &mut dyn Hooks,
        control,
    )?;
    let replayed = replay_headers(source, &mut db, base, later, &exact, control)?;
    Ok((db, copy, replayed))
}

/// The headers a compaction of `latest` keeps with `history`, oldest first
/// (the last is `latest`), and whether any is inside the window (if none
/// is, the compaction is a plain one of `latest`, purging as usual).
pub(crate) fn plan(
    index: &HeaderIndex,
    latest: &LocatedHeader,
    history: &History,
) -> (Vec<LocatedHeader>, bool) {
    let upto: Vec<LocatedHeader> = index
        .headers()
        .iter()
        .take_while(|h| h.offset <= latest.offset)
        .cloned()
        .collect();
    let kept = history.select(&upto);
    let start = history.window_start();
    let any_in_window = kept
        .iter()
        .any(|h| timestamp_of(h).is_some_and(|t| t >= start));
    if any_in_window {
        (kept, true)
    } else {
        (vec![latest.clone()], false)
    }
}
