//! The vbucket crate's errors.

use couchfile::OpenMode;
use flusher::Vbid;
use std::path::PathBuf;

/// Errors of vbuckets, stores and the couchtool library ([`crate::tool`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory operation failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The byte layer failed (I/O on a file, or bad bytes at an offset).
    #[error(transparent)]
    File(#[from] couchfile::Error),
    /// The document layer failed.
    #[error(transparent)]
    Tree(#[from] btree::Error),
    /// The flusher refused or timed out (see [`Error::is_temporarily_full`]).
    #[error(transparent)]
    Flusher(#[from] flusher::Error),
    /// The `_local/vbstate` document cannot be parsed.
    #[error("{path}: bad _local/vbstate: {reason}")]
    BadVbstate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A document's revision metadata cannot be parsed.
    #[error("{path}: document {key:?}: bad rev_meta: {source}")]
    BadRevMeta {
        /// The file.
        path: PathBuf,
        /// The document's key (lossy UTF-8).
        key: String,
        /// Why.
        #[source]
        source: couchfile::Error,
    },
    /// Compaction failed.
    #[error(transparent)]
    Compaction(#[from] compactor::Error),
    /// A compaction of this vbucket is already running.
    #[error("vbucket {0} is already being compacted")]
    CompactionRunning(Vbid),
    /// The compaction stopped because the vbucket was closed, deleted or
    /// the compaction cancelled; its files were removed.
    #[error("compaction of vbucket {0} aborted")]
    CompactionAborted(Vbid),
    /// The vbucket was closed.
    #[error("vbucket {0} is closed")]
    Closed(Vbid),
    /// The store has no such vbucket.
    #[error("vbucket {0} is not open in this store")]
    NoSuchVbucket(Vbid),
    /// A key that cannot be stored (empty, or longer than 4095 bytes).
    #[error("invalid key of {len} bytes (1 to {max} allowed)")]
    InvalidKey {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Document metadata the file format cannot hold, or a reserved value.
    #[error("invalid {field} {value}: {reason}")]
    InvalidMeta {
        /// The [`crate::ItemMeta`] field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The vbucket's seqnos reached the largest the format holds (2^48 - 1).
    #[error("vbucket {0}: no seqno left (2^48 - 1 reached)")]
    SeqnosExhausted(Vbid),
    /// The CAS clock reached its last value (a CAS near `u64::MAX` was given
    /// explicitly): an automatic CAS would repeat or go backwards.
    #[error("vbucket {0}: no automatic CAS left above the largest stored one")]
    CasExhausted(Vbid),
    /// The vbucket's file is at the last revision number (2^64 - 1): it
    /// cannot be compacted into a next one.
    #[error("vbucket {0}: no file revision left (2^64 - 1 reached)")]
    RevisionsExhausted(Vbid),
    /// A configuration value that cannot work.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig {
        /// The field, as a path in [`crate::StoreConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A value over the size a chunk can hold.
    #[error("value of {len} bytes is over the limit of {max}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Closing a vbucket could not flush everything queued (its commits kept
    /// failing); those mutations were never reported persisted.
    #[error("vbucket {vbid}: {items} queued mutations could not be flushed before closing")]
    Unflushed {
        /// The vbucket.
        vbid: Vbid,
        /// Mutations left unflushed.
        items: usize,
    },
    /// Writing a couchtool listing failed (a closed pipe, a full disk).
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    /// couchtool could not open a file at a header.
    #[error("cannot open ({} mode): {}: {source}", crate::tool::mode_name(*mode), source.couchstore_name())]
    Open {
        /// The file.
        path: PathBuf,
        /// How it was opened.
        mode: OpenMode,
        /// Why it failed.
        #[source]
        source: btree::Error,
    },
    /// The data directory is in use by another store, of this process or
    /// another: a directory has one owner at a time (its lock is held for
    /// the life of the [`crate::Store`]).
    #[error("{path}: the data directory is in use by {} (its lock is held until that store is closed)", holder_text(*pid, host.as_deref()))]
    DirectoryLocked {
        /// The data directory.
        path: PathBuf,
        /// The holder's process id, where its lock file names it.
        pid: Option<u32>,
        /// The holder's host name, where its lock file names it.
        host: Option<String>,
    },
    /// A revision file has no valid header where the file protocol says it
    /// must have one: it was damaged (cut short, overwritten) after it was
    /// written. Nothing of the vbucket was removed or created; see
    /// [`crate::DamagedFiles`] to move such a file aside and open anyway.
    #[error("{path}: damaged revision file of {size} bytes: {reason}; every file of the vbucket was left as it is")]
    DamagedRevision {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// Why it is taken for damage.
        reason: String,
    },
    /// The file reopened after a failed commit is older than what had been
    /// committed: durable data was lost underneath us.
    #[error("{path}: after a failed commit the last valid header has seq {found}, below the committed {committed}")]
    LostCommit {
        /// The file.
        path: PathBuf,
        /// Update seq of the header found.
        found: u64,
        /// Update seq that had been committed.
        committed: u64,
    },
    /// No header of the file's history is at or before the point asked
    /// for (the history starts later, or, for a time, its headers have no
    /// timestamps).
    #[error("{path}: no header at or before {point} (the oldest header has update seq {})", oldest.map_or_else(|| "none".to_owned(), |s| s.to_string()))]
    NoHeaderAsOf {
        /// The file.
        path: PathBuf,
        /// The point asked for.
        point: crate::history::AsOf,
        /// Update seq of the oldest header of the history, if any.
        oldest: Option<u64>,
    },
}

impl Error {
    /// True when a wait for persistence ended because a rollback removed
    /// the seqno waited for ([`crate::VBucket::rollback`]).
    pub fn is_rolled_back(&self) -> bool {
        matches!(self, Error::Flusher(flusher::Error::RolledBack { .. }))
    }

    /// True when the vbucket's queue is over its memory bound: retry later.
    pub fn is_temporarily_full(&self) -> bool {
        matches!(self, Error::Flusher(flusher::Error::TemporarilyFull { .. }))
    }

    /// True when a flush-batch commit failed in a way that retrying cannot
    /// fix: the batch cannot be encoded, or the file's bytes are damaged.
    /// Failures of the medium (I/O errors, a full disk, a file that lost
    /// its name) keep the batch queued: they may pass, and until then
    /// nothing is reported durable.
    pub(crate) fn is_permanent_commit_failure(&self) -> bool {
        let file_error = match self {
            Error::File(e) | Error::Tree(btree::Error::File(e)) => e,
            Error::Tree(_) => return true,
            _ => return false,
        };
        !matches!(
            file_error,
            couchfile::Error::Io { .. } | couchfile::Error::Unlinked { .. }
        )
    }

    /// True when a wait for persistence timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Flusher(flusher::Error::Timeout { .. }))
    }

    /// True when the error is a write to a closed pipe (`couchtool ... | head`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The error of a failed [`couchfile::Directory::lock`]:
    /// [`Error::DirectoryLocked`] when another owner holds it.
    pub(crate) fn from_lock(e: couchfile::Error) -> Self {
        match e {
            couchfile::Error::Locked { path, holder } => {
                let (pid, host) = holder.map_or((None, None), |h| (h.pid, h.host));
                Error::DirectoryLocked { path, pid, host }
            }
            other => Error::File(other),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// `process 1234 on host h`, as far as it is known.
fn holder_text(pid: Option<u32>, host: Option<&str>) -> String {
    let mut text = match pid {
        Some(pid) => format!("process {pid}"),
        None => "another store (pid unknown)".to_owned(),
    };
    if let Some(host) = host {
        text.push_str(&format!(" on host {host}"));
    }
    text
}

/// The vbucket crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
