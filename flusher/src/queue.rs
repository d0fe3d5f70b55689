//! One vbucket's dirty queue: the writers' side (enqueue, backpressure, waits
//! for persistence) and the state the flusher thread updates.

use crate::error::{Error, Result};
use crate::stats::FlushStats;
use crate::{deadline_after, wait_until, Batch, Committed, FlushItem, Vbid};
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A callback told the persisted seqno once it covers the seqno it was
/// registered for, or the error that ended the wait.
pub(crate) type PersistCallback = Box<dyn FnOnce(Result<u64>) + Send>;

/// Enqueue times are sampled at most once per this interval, so the age
/// bookkeeping stays small however many items are queued.
const AGE_RESOLUTION: Duration = Duration::from_millis(1);

#[derive(Debug, Default)]
struct QueueState {
    items: usize,
    bytes: usize,
    last_seqno: u64,
    /// `(s, t)`: the items of seqno `s` up to the next entry's were
    /// enqueued at `t` or later.
    ages: VecDeque<(u64, Instant)>,
    closed: bool,
}

struct PersistState {
    /// Every seqno up to this one is decided: persisted, or in `failed`.
    seqno: u64,
    callbacks: Vec<(u64, PersistCallback)>,
    closed: bool,
    /// Seqno ranges (inclusive) of batches dropped after a permanent
    /// failure, with the error; adjacent ranges of one error are merged.
    failed: Vec<(u64, u64, Arc<str>)>,
    /// The seqno each rollback went back to, in order: the `n`th rollback
    /// (counting from 1) made epoch `n`. A wait that began in epoch `e` for
    /// a seqno above one of the later targets was rolled back.
    rollbacks: Vec<u64>,
}

impl PersistState {
    /// The error of a wait for `seqno` that began in `epoch`, if a rollback
    /// since went below it.
    fn rolled_back(&self, vbid: Vbid, seqno: u64, epoch: usize) -> Option<Error> {
        let to = self.rollbacks.get(epoch..)?.iter().copied().min()?;
        (seqno > to).then_some(Error::RolledBack { vbid, seqno, to })
    }

    /// The outcome of a wait for `seqno`, once it is decided.
    fn outcome(&self, vbid: Vbid, seqno: u64) -> Option<Result<u64>> {
        if seqno > self.seqno {
            return None;
        }
        // Failures are rare and few: a linear search is fine.
        match self
            .failed
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&seqno))
        {
            Some((_, _, reason)) => Some(Err(Error::CommitFailed {
                vbid,
                seqno,
                reason: Arc::clone(reason),
            })),
            None => Some(Ok(self.seqno)),
        }
    }

    /// Takes the callbacks whose seqno is decided, each with its outcome,
    /// and keeps the others waiting.
    fn take_decided(&mut self, vbid: Vbid) -> Vec<(PersistCallback, Result<u64>)> {
        let mut decided = Vec::new();
        for (seqno, cb) in std::mem::take(&mut self.callbacks) {
            match self.outcome(vbid, seqno) {
                Some(outcome) => decided.push((cb, outcome)),
                None => self.callbacks.push((seqno, cb)),
            }
        }
        decided
    }
}

/// State shared by a vbucket's writers and its flusher thread.
pub(crate) struct VbShared<I> {
    pub(crate) vbid: Vbid,
    /// The id of the flusher thread that persists it.
    shard: u64,
    /// Each item with the rollback epoch it was queued in.
    items: Sender<(u64, I)>,
    /// Rollbacks so far (see [`VbQueue::rollback`]); changed only with
    /// both the queue and the persist lock held, so either lock sees it
    /// stable.
    epoch: AtomicU64,
    wake: Sender<Vbid>,
    /// True while a wake-up for this vbucket is pending at the flusher.
    scheduled: AtomicBool,
    max_queued_bytes: usize,
    queue: Mutex<QueueState>,
    room: Condvar,
    persist: Mutex<PersistState>,
    persisted: Condvar,
    stats: Mutex<FlushStats>,
}

impl<I: FlushItem> VbShared<I> {
    pub(crate) fn new(
        vbid: Vbid,
        shard: u64,
        items: Sender<(u64, I)>,
        wake: Sender<Vbid>,
        max_queued_bytes: usize,
        persisted_seqno: u64,
    ) -> Self {
        Self {
            vbid,
            shard,
            items,
            epoch: AtomicU64::new(0),
            wake,
            scheduled: AtomicBool::new(false),
            max_queued_bytes,
            queue: Mutex::new(QueueState {
                last_seqno: persisted_seqno,
                ..QueueState::default()
            }),
            room: Condvar::new(),
            persist: Mutex::new(PersistState {
                seqno: persisted_seqno,
                callbacks: Vec::new(),
                closed: false,
                failed: Vec::new(),
                rollbacks: Vec::new(),
            }),
            persisted: Condvar::new(),
            stats: Mutex::new(FlushStats::default()),
        }
    }

    /// The current rollback epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The flusher is about to look at the queue: later enqueues wake it again.
    pub(crate) fn clear_scheduled(&self) {
        // A swap, not a store: reading the `true` of an enqueue that skipped
        // its wake-up synchronizes with it, so the flusher's next receive
        // sees the item that enqueue sent before setting the flag.
        self.scheduled.swap(false, Ordering::SeqCst);
    }

    /// Stops accepting items (the vbucket is being removed).
    pub(crate) fn close_queue(&self) {
        self.queue.lock().closed = true;
        self.room.notify_all();
    }

    /// Ends every wait for persistence: the queue is gone.
    pub(crate) fn close_persistence(&self) {
        let (decided, closed, persisted) = {
            let mut p = self.persist.lock();
            p.closed = true;
            let decided = p.take_decided(self.vbid);
            (decided, std::mem::take(&mut p.callbacks), p.seqno)
        };
        self.persisted.notify_all();
        for (cb, outcome) in decided {
            cb(outcome);
        }
        for (_, cb) in closed {
            cb(Err(Error::Closed {
                vbid: self.vbid,
                persisted,
            }));
        }
    }

    /// Records a failed commit.
    pub(crate) fn record_failure(&self, error: String) {
        let mut s = self.stats.lock();
        s.commit_failures += 1;
        s.last_error = Some(error);
    }

    /// Records a retry of a failed batch.
    pub(crate) fn record_retry(&self) {
        self.stats.lock().retries += 1;
    }

    /// A batch is durable: update the statistics, release its bytes from
    /// the queue (waking writers waiting for room), advance the persisted
    /// seqno and wake its waiters.
    pub(crate) fn persisted(&self, batch: &Batch<I>, committed: &Committed, latency: Duration) {
        {
            let mut s = self.stats.lock();
            s.items_flushed += batch.items.len() as u64;
            s.items_deduplicated += (batch.drained - batch.items.len()) as u64;
            s.batches_flushed += 1;
            s.bytes_written += committed.bytes_written;
            s.commit_latency.record(latency);
        }
        self.release(batch);
        self.decide(batch.epoch, batch.high_seqno, None);
    }

    /// A batch failed with an error that retrying cannot fix and was
    /// dropped: release its bytes and fail the waiters of its seqnos.
    pub(crate) fn dropped(&self, batch: &Batch<I>, reason: &str) {
        self.stats.lock().batches_dropped += 1;
        self.release(batch);
        self.decide(batch.epoch, batch.high_seqno, Some(Arc::from(reason)));
    }

    /// Releases a batch's items and bytes from the queue's accounting (a
    /// rollback since the batch was cut released them already).
    fn release(&self, batch: &Batch<I>) {
        {
            let mut q = self.queue.lock();
            if self.epoch() != batch.epoch {
                return;
            }
            q.items = q.items.saturating_sub(batch.drained);
            q.bytes = q.bytes.saturating_sub(batch.drained_bytes);
            if q.items == 0 {
                q.ages.clear();
            } else {
                while q.ages.len() >= 2 && q.ages[1].0 <= batch.high_seqno + 1 {
                    q.ages.pop_front();
                }
            }
        }
        self.room.notify_all();
    }

    /// Every seqno up to `high_seqno` is decided: persisted, or (with a
    /// `failure`) those above the previous decided seqno failed. Wakes the
    /// waiters whose seqno is now decided. A batch of an `epoch` before the
    /// last rollback decides nothing: the rollback did.
    fn decide(&self, epoch: u64, high_seqno: u64, failure: Option<Arc<str>>) {
        let decided = {
            let mut p = self.persist.lock();
            if self.epoch() != epoch {
                return;
            }
            if let Some(reason) = failure {
                if high_seqno > p.seqno {
                    let lo = p.seqno + 1;
                    match p.failed.last_mut() {
                        Some((_, hi, last)) if *hi + 1 == lo && **last == *reason => {
                            *hi = high_seqno;
                        }
                        _ => p.failed.push((lo, high_seqno, reason)),
                    }
                }
            }
            p.seqno = p.seqno.max(high_seqno);
            p.take_decided(self.vbid)
        };
        self.persisted.notify_all();
        for (cb, outcome) in decided {
            cb(outcome);
        }
    }

    pub(crate) fn stats(&self) -> FlushStats {
        let mut stats = self.stats.lock().clone();
        {
            let q = self.queue.lock();
            stats.queued_items = q.items as u64;
            stats.queued_bytes = q.bytes as u64;
            stats.high_seqno = q.last_seqno;
            stats.oldest_queued_age = match q.ages.front() {
                Some((_, at)) if q.items > 0 => at.elapsed(),
                _ => Duration::ZERO,
            };
        }
        stats.persisted_seqno = self.persist.lock().seqno;
        stats
    }
}

/// A writer's handle on one vbucket's dirty queue. Cheap to clone.
pub struct VbQueue<I> {
    pub(crate) shared: Arc<VbShared<I>>,
}

impl<I> Clone for VbQueue<I> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<I> std::fmt::Debug for VbQueue<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbQueue")
            .field("vbid", &self.shared.vbid)
            .finish_non_exhaustive()
    }
}

impl<I: FlushItem> VbQueue<I> {
    /// The vbucket this queue belongs to.
    pub fn vbid(&self) -> Vbid {
        self.shared.vbid
    }

    /// Waits until the queue is under its byte bound, for up to `timeout`;
    /// then [`Error::TemporarilyFull`] (at once on the flusher thread that
    /// drains the queue, in a persistence callback, where the wait could only
    /// end with the timeout). Call it before taking the lock under
    /// which seqnos are assigned and [`VbQueue::enqueue`] is called, so a
    /// full queue never blocks other writers' bookkeeping.
    pub fn wait_for_room(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let mut q = self.shared.queue.lock();
        loop {
            if q.closed {
                return Err(self.closed_error());
            }
            if q.bytes < self.shared.max_queued_bytes {
                return Ok(());
            }
            // On the thread that drains it (a persistence callback), room
            // only comes once this returns: full now is full for the wait.
            let drains_here = crate::shard::on_shard_thread(self.shared.shard);
            if (drains_here || wait_until(&self.shared.room, &mut q, deadline))
                && q.bytes >= self.shared.max_queued_bytes
            {
                return Err(Error::TemporarilyFull {
                    vbid: self.shared.vbid,
                    queued_bytes: q.bytes,
                    limit: self.shared.max_queued_bytes,
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Queues `item` for the flusher. Seqnos must increase from one item to
    /// the next (the caller assigns them under its own lock); the byte bound
    /// is not checked here (see [`VbQueue::wait_for_room`]).
    pub fn enqueue(&self, item: I) -> Result<()> {
        let seqno = item.seqno();
        let size = item.size();
        {
            let mut q = self.shared.queue.lock();
            if q.closed {
                return Err(self.closed_error());
            }
            if seqno <= q.last_seqno {
                return Err(Error::SeqnoNotIncreasing {
                    vbid: self.shared.vbid,
                    seqno,
                    last: q.last_seqno,
                });
            }
            // Sent under the lock so that channel order is seqno order.
            let epoch = self.shared.epoch();
            if self.shared.items.send((epoch, item)).is_err() {
                return Err(Error::ThreadGone(self.shared.vbid));
            }
            q.last_seqno = seqno;
            q.items += 1;
            q.bytes += size;
            let now = Instant::now();
            if q.ages
                .back()
                .is_none_or(|(_, at)| now.duration_since(*at) >= AGE_RESOLUTION)
            {
                q.ages.push_back((seqno, now));
            }
        }
        if !self.shared.scheduled.swap(true, Ordering::SeqCst)
            && self.shared.wake.send(self.shared.vbid).is_err()
        {
            return Err(Error::ThreadGone(self.shared.vbid));
        }
        Ok(())
    }

    /// [`VbQueue::wait_for_room`] then [`VbQueue::enqueue`].
    pub fn push(&self, item: I, timeout: Duration) -> Result<()> {
        self.wait_for_room(timeout)?;
        self.enqueue(item)
    }

    /// The highest seqno persisted.
    pub fn persisted_seqno(&self) -> u64 {
        self.shared.persist.lock().seqno
    }

    /// Waits until `seqno` is durable, for up to `timeout` (a timeout too
    /// large to represent, such as [`Duration::MAX`], waits for as long as
    /// it takes). Fails with [`Error::CommitFailed`] if the batch holding
    /// it was dropped after a permanent failure, with [`Error::Closed`]
    /// if the queue is removed first, and with [`Error::RolledBack`] if a
    /// rollback ([`VbQueue::rollback`]) removed `seqno`, before or during
    /// the wait. (Seqnos above a rollback's target are assigned again
    /// after it: a wait that begins after the rollback, for a seqno that
    /// has been assigned again, waits for the new mutation.)
    pub fn wait_persisted(&self, seqno: u64, timeout: Duration) -> Result<u64> {
        let deadline = deadline_after(timeout);
        let (epoch, rolled_back) = self.wait_start(seqno);
        if let Some(e) = rolled_back {
            return Err(e);
        }
        let mut p = self.shared.persist.lock();
        loop {
            if let Some(e) = p.rolled_back(self.shared.vbid, seqno, epoch) {
                return Err(e);
            }
            if let Some(outcome) = p.outcome(self.shared.vbid, seqno) {
                return outcome;
            }
            if p.closed {
                return Err(Error::Closed {
                    vbid: self.shared.vbid,
                    persisted: p.seqno,
                });
            }
            if crate::shard::on_shard_thread(self.shared.shard) {
                // A persistence callback waiting for its own flusher thread.
                return Err(Error::WaitOnFlusherThread {
                    vbid: self.shared.vbid,
                    seqno,
                    persisted: p.seqno,
                });
            }
            if wait_until(&self.shared.persisted, &mut p, deadline) && p.seqno < seqno {
                return Err(Error::Timeout {
                    vbid: self.shared.vbid,
                    seqno,
                    persisted: p.seqno,
                    timeout,
                });
            }
        }
    }

    /// Calls `callback` with the persisted seqno once `seqno` is durable
    /// (right away, on this thread, if it already is; otherwise on the
    /// flusher thread), with [`Error::CommitFailed`] if its batch was
    /// dropped after a permanent failure, or with [`Error::Closed`] if the
    /// queue is removed first, or with [`Error::RolledBack`] as
    /// [`VbQueue::wait_persisted`]. Keep it short: it runs on the flusher's
    /// thread, where waiting for a seqno of a vbucket that thread serves
    /// fails at once with [`Error::WaitOnFlusherThread`], and removing such
    /// a vbucket with [`Error::RemoveOnFlusherThread`] (either would wait
    /// for the thread itself).
    pub fn on_persisted(&self, seqno: u64, callback: impl FnOnce(Result<u64>) + Send + 'static) {
        let (epoch, rolled_back) = self.wait_start(seqno);
        let mut p = self.shared.persist.lock();
        if let Some(e) = rolled_back.or_else(|| p.rolled_back(self.shared.vbid, seqno, epoch)) {
            drop(p);
            callback(Err(e));
        } else if let Some(outcome) = p.outcome(self.shared.vbid, seqno) {
            drop(p);
            callback(outcome);
        } else if p.closed {
            let persisted = p.seqno;
            drop(p);
            callback(Err(Error::Closed {
                vbid: self.shared.vbid,
                persisted,
            }));
        } else {
            p.callbacks.push((seqno, Box::new(callback)));
        }
    }

    /// Rolls the queue back to `seqno` (the vbucket went back to a header
    /// covering exactly the seqnos up to it): every queued item is
    /// forgotten (the flusher drops it unwritten), as is any batch already
    /// cut (its commit decides nothing; a target that rolls back refuses
    /// it, see [`Batch::epoch`]); the next item enqueued must have a seqno
    /// above `seqno`; the persisted seqno becomes `seqno`; waits for a seqno
    /// above it (those under way, callbacks registered, and waits that
    /// began before the rollback) end with [`Error::RolledBack`], the
    /// others with the persisted seqno.
    ///
    /// The caller keeps enqueues and commits out meanwhile (the vbucket
    /// holds its front and commit locks). The callbacks decided are run
    /// when the returned notice is dropped (or [`RollbackNotice::notify`]),
    /// so that the caller can release its locks first.
    pub fn rollback(&self, seqno: u64) -> RollbackNotice {
        let vbid = self.shared.vbid;
        let mut q = self.shared.queue.lock();
        let mut p = self.shared.persist.lock();
        let epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        q.items = 0;
        q.bytes = 0;
        q.ages.clear();
        q.last_seqno = seqno;
        p.seqno = seqno;
        p.failed.retain(|(lo, _, _)| *lo <= seqno);
        if let Some(last) = p.failed.last_mut() {
            last.1 = last.1.min(seqno);
        }
        p.rollbacks.push(seqno);
        let mut callbacks = p.take_decided(vbid);
        callbacks.extend(std::mem::take(&mut p.callbacks).into_iter().map(|(s, cb)| {
            let outcome = Err(Error::RolledBack {
                vbid,
                seqno: s,
                to: seqno,
            });
            (cb, outcome)
        }));
        drop(p);
        drop(q);
        self.shared.room.notify_all();
        self.shared.persisted.notify_all();
        tracing::info!(vbid, seqno, epoch, "queue rolled back");
        RollbackNotice { epoch, callbacks }
    }

    /// The rollback epoch a wait for `seqno` begins in, and its error if
    /// `seqno` was rolled back before: after a rollback, a seqno above every
    /// one queued since can only be one the rollback removed (a wait is for
    /// a seqno already assigned). The epoch is read first, so a rollback
    /// after it is seen by [`PersistState::rolled_back`].
    fn wait_start(&self, seqno: u64) -> (usize, Option<Error>) {
        let epoch = self.shared.epoch();
        // Without a rollback there is nothing to check (and no lock taken).
        let rolled_back = epoch > 0 && seqno > self.shared.queue.lock().last_seqno;
        let error = if rolled_back {
            let to = self
                .shared
                .persist
                .lock()
                .rollbacks
                .last()
                .copied()
                .unwrap_or(0);
            Some(Error::RolledBack {
                vbid: self.shared.vbid,
                seqno,
                to,
            })
        } else {
            None
        };
        (usize::try_from(epoch).unwrap_or(usize::MAX), error)
    }

    /// This vbucket's flush statistics.
    pub fn stats(&self) -> FlushStats {
        self.shared.stats()
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            vbid: self.shared.vbid,
            persisted: self.persisted_seqno(),
        }
    }
}

/// What [`VbQueue::rollback`] decided: the new epoch, and the persistence
/// callbacks to run (when this is dropped, or by [`RollbackNotice::notify`]).
#[must_use = "the callbacks run when the notice is dropped: drop it once the caller's locks are released"]
pub struct RollbackNotice {
    epoch: u64,
    callbacks: Vec<(PersistCallback, Result<u64>)>,
}

impl std::fmt::Debug for RollbackNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollbackNotice")
            .field("epoch", &self.epoch)
            .field("callbacks", &self.callbacks.len())
            .finish()
    }
}

impl RollbackNotice {
    /// The queue's epoch from the rollback on ([`Batch::epoch`] of every
    /// batch cut from now on, until the next rollback).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Runs the decided callbacks now.
    pub fn notify(self) {
        drop(self);
    }
}

impl Drop for RollbackNotice {
    fn drop(&mut self) {
        for (cb, outcome) in self.callbacks.drain(..) {
            cb(outcome);
        }
    }
}
