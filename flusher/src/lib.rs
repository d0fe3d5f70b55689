//! `flusher`: the persistence pipeline between front-end writes and storage,
//! generic over a [`FlushTarget`]. It owns one dirty queue per vbucket (a
//! crossbeam channel), runs a configurable number of flusher threads that each
//! serve a shard of the vbuckets, cuts batches by item count and bytes, keeps
//! only the newest mutation of a key within a batch (as kv-engine's
//! checkpoints do, so seqno gaps on disk are normal), calls the target's
//! commit, and wakes whoever waits for a seqno to be persisted — only after the
//! commit, sync included, has returned. A queue over its byte bound makes
//! writers wait, then fail with [`Error::TemporarilyFull`]. A failed commit
//! keeps its batch queued, asks the target to recover, and is retried with
//! backoff. A rollback ([`VbQueue::rollback`]) forgets what is queued and in
//! flight and fails the waits above its seqno. It is not a storage format and knows nothing about files, B-trees
//! or compaction: the `vbucket` crate supplies the flush target.
//!
//! ```
//! use flusher::{Batch, Committed, FlushItem, FlushTarget, Flusher, FlusherConfig};
//! use std::time::Duration;
//!
//! struct Set { key: Vec<u8>, seqno: u64 }
//! impl FlushItem for Set {
//!     fn key(&self) -> &[u8] { &self.key }
//!     fn seqno(&self) -> u64 { self.seqno }
//!     fn size(&self) -> usize { self.key.len() }
//! }
//!
//! /// A target that only counts what it was given.
//! struct Counter { items: u64 }
//! impl FlushTarget for Counter {
//!     type Item = Set;
//!     type Error = std::io::Error;
//!     fn commit(&mut self, batch: &Batch<Set>) -> std::io::Result<Committed> {
//!         self.items += batch.items.len() as u64;
//!         Ok(Committed { header_offset: 0, high_seqno: batch.high_seqno, bytes_written: 0 })
//!     }
//!     fn recover(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! # fn main() -> Result<(), flusher::Error> {
//! let flusher = Flusher::new(FlusherConfig::default())?;
//! let queue = flusher.add(0, Counter { items: 0 }, 0)?;
//! for seqno in 1..=3 {
//!     queue.enqueue(Set { key: b"k".to_vec(), seqno })?;
//! }
//! queue.wait_persisted(3, Duration::from_secs(10))?;
//! let removed = flusher.remove(0)?;
//! // Three sets of one key: one item written if they shared a batch; the
//! // flusher may have cut a batch between them.
//! assert!((1..=3).contains(&removed.target.items));
//! # Ok(())
//! # }
//! ```

mod error;
mod queue;
mod shard;
mod stats;

pub use error::{Error, Result};
pub use queue::{RollbackNotice, VbQueue};
pub use shard::{Flusher, PendingRemoval, Removed};
pub use stats::{FlushStats, LatencyHistogram, LatencySummary};

use std::time::Duration;

/// A vbucket id.
pub type Vbid = u16;

/// One queued mutation, as the flusher sees it.
pub trait FlushItem: Send + 'static {
    /// The key: within a batch only the newest mutation of a key is written.
    fn key(&self) -> &[u8];
    /// The sequence number, assigned when the mutation was accepted; items
    /// are enqueued in increasing seqno order.
    fn seqno(&self) -> u64;
    /// Bytes the item holds in memory (for batching and backpressure).
    fn size(&self) -> usize;
}

/// One batch handed to [`FlushTarget::commit`].
#[derive(Debug)]
pub struct Batch<I> {
    /// The items to write: one per key (the newest), in seqno order.
    pub items: Vec<I>,
    /// The highest seqno the batch covers (of all items drained, including
    /// the older mutations dedup dropped): persisted once the commit returns.
    pub high_seqno: u64,
    /// Items drained from the queue for this batch, before dedup.
    pub drained: usize,
    /// Bytes of the items drained (what persisting releases from the queue).
    pub drained_bytes: usize,
    /// The queue's rollback epoch its items were queued in (see
    /// [`VbQueue::rollback`]). Once the queue is rolled back, a batch of an
    /// earlier epoch is forgotten: a target that rolls back must not write
    /// it (it compares this with the epoch [`VbQueue::rollback`] returned).
    pub epoch: u64,
}

/// What a successful commit made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Offset of the header the commit wrote.
    pub header_offset: u64,
    /// The highest seqno now durable.
    pub high_seqno: u64,
    /// Bytes the commit appended.
    pub bytes_written: u64,
}

/// Where batches go: one per vbucket, owned by the flusher thread serving it.
pub trait FlushTarget: Send + 'static {
    /// The queued item type.
    type Item: FlushItem;
    /// The target's error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Writes `batch` and makes it durable (sync included) before returning.
    /// On error the batch stays queued and is offered again after
    /// [`FlushTarget::recover`].
    fn commit(&mut self, batch: &Batch<Self::Item>) -> std::result::Result<Committed, Self::Error>;
    /// Called after a failed commit: return to the last durable state (for a
    /// file, reopen it at its last valid header) so the batch can be retried.
    fn recover(&mut self) -> std::result::Result<(), Self::Error>;
    /// True when retrying the commit cannot fix `error` (the batch itself
    /// cannot be written, or the file is damaged), as opposed to a failure
    /// of the medium that may pass (a full disk, an I/O error). The flusher
    /// then drops the batch: after [`FlushTarget::recover`] it calls
    /// [`FlushTarget::discard`], and every waiter for one of the batch's
    /// seqnos gets [`Error::CommitFailed`] instead of waiting forever. By
    /// default every error is worth retrying.
    fn is_permanent(&self, error: &Self::Error) -> bool {
        let _ = error;
        false
    }
    /// Called when a batch is dropped after a permanent failure: forget
    /// whatever the target holds for it (it will never be persisted).
    fn discard(&mut self, batch: &Batch<Self::Item>) {
        let _ = batch;
    }
}

/// The instant `timeout` from now, or `None` when it is too far to
/// represent (a huge timeout, such as [`Duration::MAX`], means "forever").
pub fn deadline_after(timeout: Duration) -> Option<std::time::Instant> {
    std::time::Instant::now().checked_add(timeout)
}

/// Waits on `condvar` until `deadline` (forever when `None`, as
/// [`deadline_after`] gives for a huge timeout); true when the deadline
/// passed.
pub fn wait_until<T>(
    condvar: &parking_lot::Condvar,
    guard: &mut parking_lot::MutexGuard<'_, T>,
    deadline: Option<std::time::Instant>,
) -> bool {
    match deadline {
        Some(deadline) => condvar.wait_until(guard, deadline).timed_out(),
        None => {
            condvar.wait(guard);
            false
        }
    }
}

/// How the flusher batches, bounds memory and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlusherConfig {
    /// Flusher threads; vbucket `v` is served by thread `v % threads`.
    pub threads: usize,
    /// A batch is cut after this many queued items.
    pub max_batch_items: usize,
    /// ... or after this many queued bytes.
    pub max_batch_bytes: usize,
    /// Bytes a vbucket may have queued before writers wait.
    pub max_queued_bytes: usize,
    /// How long a writer waits for room before [`Error::TemporarilyFull`]:
    /// the timeout callers (the `vbucket` crate) pass to
    /// [`VbQueue::wait_for_room`] and [`VbQueue::push`].
    pub backpressure_timeout: Duration,
    /// First delay before retrying a failed commit; doubled on each failure.
    pub retry_backoff_min: Duration,
    /// Longest delay between retries.
    pub retry_backoff_max: Duration,
    /// How long removing a vbucket (or shutting down) keeps retrying a
    /// failing commit before giving up on its queued items. Removing many
    /// vbuckets at once ([`Flusher::remove_all`], shutdown) gives them all
    /// one deadline.
    pub close_timeout: Duration,
    /// Group commit: before cutting a batch, the flusher waits while the
    /// queue is still growing (checked every [`GATHER_POLL`]), for at most
    /// this long, so a writer's burst lands in one commit instead of being
    /// split at whatever point the flusher woke. A queue that does not grow
    /// between two checks is cut at once. Zero: always cut at once.
    pub gather_max: Duration,
}

/// How often a gathering flusher checks whether the queue still grows.
pub const GATHER_POLL: Duration = Duration::from_micros(50);

impl FlusherConfig {
    /// Checks that the configuration can work: a batch and a queue must be
    /// able to hold something (a byte bound of 0 would never let a writer
    /// in, or never cut a batch). Returns what is wrong.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |field: &'static str, reason: &'static str| Err(Error::InvalidConfig { field, reason });
        if self.max_batch_items == 0 {
            return invalid("max_batch_items", "must be at least 1");
        }
        if self.max_batch_bytes == 0 {
            return invalid("max_batch_bytes", "must be at least 1");
        }
        if self.max_queued_bytes == 0 {
            return invalid("max_queued_bytes", "must be at least 1");
        }
        if self.retry_backoff_min.is_zero() {
            return invalid("retry_backoff_min", "must be above zero");
        }
        if self.retry_backoff_max < self.retry_backoff_min {
            return invalid("retry_backoff_max", "must be at least retry_backoff_min");
        }
        Ok(())
    }
}

impl Default for FlusherConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            max_batch_items: 10_000,
            max_batch_bytes: 16 << 20,
            max_queued_bytes: 64 << 20,
            backpressure_timeout: Duration::from_secs(1),
            retry_backoff_min: Duration::from_millis(1),
            retry_backoff_max: Duration::from_secs(1),
            close_timeout: Duration::from_secs(10),
            gather_max: Duration::ZERO,
        }
    }
}

/// Compiles and runs the examples in the crate's README.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
