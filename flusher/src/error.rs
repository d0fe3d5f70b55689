//! The flusher's errors.

use crate::Vbid;
use std::time::Duration;

/// Errors of the flusher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vbucket's queue stayed over its byte bound for the whole
    /// backpressure timeout: retry later.
    #[error("vbucket {vbid} is temporarily full: {queued_bytes} bytes queued (bound {limit}) after waiting {waited:?}")]
    TemporarilyFull {
        /// The vbucket.
        vbid: Vbid,
        /// Bytes queued when the wait gave up.
        queued_bytes: usize,
        /// The bound.
        limit: usize,
        /// How long the writer waited.
        waited: Duration,
    },
    /// A wait for persistence timed out.
    #[error(
        "vbucket {vbid}: seqno {seqno} not persisted within {timeout:?} (persisted: {persisted})"
    )]
    Timeout {
        /// The vbucket.
        vbid: Vbid,
        /// The seqno waited for.
        seqno: u64,
        /// The persisted seqno when the wait gave up.
        persisted: u64,
        /// The timeout.
        timeout: Duration,
    },
    /// The vbucket's queue was removed from the flusher.
    #[error("vbucket {vbid} is closed (persisted seqno {persisted})")]
    Closed {
        /// The vbucket.
        vbid: Vbid,
        /// Its last persisted seqno.
        persisted: u64,
    },
    /// An item was enqueued with a seqno not above the previous one.
    #[error("vbucket {vbid}: seqno {seqno} enqueued after {last}")]
    SeqnoNotIncreasing {
        /// The vbucket.
        vbid: Vbid,
        /// The item's seqno.
        seqno: u64,
        /// The last seqno enqueued.
        last: u64,
    },
    /// The vbucket is already served by this flusher.
    #[error("vbucket {0} is already added")]
    AlreadyAdded(Vbid),
    /// The vbucket is not served by this flusher.
    #[error("vbucket {0} is not added")]
    NotAdded(Vbid),
    /// A flusher thread could not be started.
    #[error("cannot start a flusher thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The batch holding this seqno failed with an error that retrying
    /// cannot fix ([`crate::FlushTarget::is_permanent`]): it was dropped and
    /// will never be persisted.
    #[error("vbucket {vbid}: seqno {seqno} was not persisted: its batch failed: {reason}")]
    CommitFailed {
        /// The vbucket.
        vbid: Vbid,
        /// The seqno waited for.
        seqno: u64,
        /// The commit's error.
        reason: std::sync::Arc<str>,
    },
    /// A configuration value that cannot work.
    #[error("invalid flusher configuration: {field} {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The seqno waited for was removed by a rollback of the vbucket
    /// ([`crate::VbQueue::rollback`]) before it was persisted, or after,
    /// to a point below it: it is no longer part of the vbucket's history.
    #[error("vbucket {vbid}: seqno {seqno} was rolled back (the vbucket went back to seqno {to})")]
    RolledBack {
        /// The vbucket.
        vbid: Vbid,
        /// The seqno waited for.
        seqno: u64,
        /// The seqno the vbucket was rolled back to.
        to: u64,
    },
    /// A flusher thread is gone (it panicked).
    #[error("flusher thread of vbucket {0} is gone")]
    ThreadGone(Vbid),
    /// A removal of a vbucket (closing or deleting it) on the flusher thread
    /// that serves it (from a persistence callback): the removal waits for
    /// that thread, so it would wait for itself for ever. Nothing changed.
    #[error("vbucket {0}: removed from its own flusher thread (a persistence callback), which would wait for itself")]
    RemoveOnFlusherThread(Vbid),
    /// A wait for a seqno not yet persisted, on the flusher thread that is
    /// to persist it (from a persistence callback): it would wait for
    /// itself until the timeout, or for ever.
    #[error("vbucket {vbid}: waiting for seqno {seqno} (persisted: {persisted}) on its own flusher thread, which would wait for itself")]
    WaitOnFlusherThread {
        /// The vbucket.
        vbid: Vbid,
        /// The seqno waited for.
        seqno: u64,
        /// The vbucket's persisted seqno.
        persisted: u64,
    },
}

/// The flusher's result type.
pub type Result<T> = std::result::Result<T, Error>;
