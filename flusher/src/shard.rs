//! The flusher threads: each serves a shard of the vbuckets, cutting batches
//! from their queues, committing them and retrying failed commits.

use crate::error::{Error, Result};
use crate::queue::{VbQueue, VbShared};
use crate::stats::FlushStats;
use crate::{Batch, FlushItem, FlushTarget, FlusherConfig, Vbid};
use crossbeam_channel::{select, unbounded, Receiver, Sender};
use parking_lot::Mutex;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A vbucket taken out of the flusher.
#[derive(Debug)]
pub struct Removed<T> {
    /// Its flush target, handed back.
    pub target: T,
    /// Items still queued that could not be committed before
    /// [`FlusherConfig::close_timeout`] (their commits kept failing); they
    /// were never reported persisted.
    pub unflushed_items: usize,
}

enum Control<T: FlushTarget> {
    Add(Slot<T>),
    /// Retire the vbucket, giving up on failing commits at the deadline
    /// (`None`: never).
    Remove(Vbid, Option<Instant>, Sender<Removed<T>>),
    Shutdown,
}

/// A removal under way ([`Flusher::begin_remove`]): the vbucket refuses new
/// items already; [`PendingRemoval::wait`] waits for its queue to be flushed.
#[must_use = "the removal is only complete once waited for"]
pub struct PendingRemoval<T> {
    vbid: Vbid,
    reply: Receiver<Removed<T>>,
}

impl<T> std::fmt::Debug for PendingRemoval<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRemoval")
            .field("vbid", &self.vbid)
            .finish_non_exhaustive()
    }
}

impl<T> PendingRemoval<T> {
    /// Waits until the vbucket's queue is flushed (or given up on at the
    /// deadline) and its waiters released; returns its target.
    pub fn wait(self) -> Result<Removed<T>> {
        self.reply.recv().map_err(|_| Error::ThreadGone(self.vbid))
    }
}

struct ShardHandle<T: FlushTarget> {
    /// Names the thread for [`on_shard_thread`]: unique in the process.
    id: u64,
    control: Sender<Control<T>>,
    wake: Sender<Vbid>,
    thread: Option<JoinHandle<()>>,
}

thread_local! {
    /// The id of the flusher thread this is (0 on any other thread).
    static SHARD_THREAD: Cell<u64> = const { Cell::new(0) };
    /// What a flusher thread keeps until it ends
    /// ([`Flusher::keep_until_own_thread_ends`]).
    static KEPT_UNTIL_THREAD_ENDS: RefCell<Vec<Box<dyn Send>>> = const { RefCell::new(Vec::new()) };
}

/// A new flusher thread's id, unique in the process (never 0).
fn next_shard_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// True on the flusher thread `id` (running a persistence callback).
pub(crate) fn on_shard_thread(id: u64) -> bool {
    SHARD_THREAD.with(Cell::get) == id
}

/// A pool of flusher threads serving any number of vbuckets, each with its
/// own [`FlushTarget`]. Dropping it flushes what is queued (see
/// [`FlusherConfig::close_timeout`]) and stops the threads.
pub struct Flusher<T: FlushTarget> {
    config: FlusherConfig,
    shards: Vec<ShardHandle<T>>,
    queues: Mutex<HashMap<Vbid, Arc<VbShared<T::Item>>>>,
}

impl<T: FlushTarget> std::fmt::Debug for Flusher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("config", &self.config)
            .field("vbuckets", &self.queues.lock().len())
            .finish()
    }
}

impl<T: FlushTarget> Flusher<T> {
    /// Starts `config.threads` flusher threads (at least one), once the
    /// configuration is checked ([`FlusherConfig::validate`]).
    pub fn new(config: FlusherConfig) -> Result<Self> {
        config.validate()?;
        let threads = config.threads.max(1);
        let mut shards = Vec::with_capacity(threads);
        for i in 0..threads {
            let (control, control_rx) = unbounded();
            let (wake, wake_rx) = unbounded();
            let shard = Shard {
                config: config.clone(),
                control: control_rx,
                wake: wake_rx,
                slots: HashMap::new(),
                ready: VecDeque::new(),
            };
            let id = next_shard_id();
            let thread = std::thread::Builder::new()
                .name(format!("flusher-{i}"))
                .spawn(move || {
                    SHARD_THREAD.with(|t| t.set(id));
                    shard.run();
                    // After the thread's last commit. (On a panic, the
                    // thread-local's destructor drops them.)
                    let kept = KEPT_UNTIL_THREAD_ENDS.with(|kept| kept.take());
                    drop(kept);
                })
                .map_err(Error::Spawn)?;
            shards.push(ShardHandle {
                id,
                control,
                wake,
                thread: Some(thread),
            });
        }
        Ok(Self {
            config,
            shards,
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FlusherConfig {
        &self.config
    }

    /// True on the thread of this flusher that serves `vbid` (in a
    /// persistence callback): there, waiting for `vbid` to be flushed or
    /// removed would wait for the waiting thread itself.
    pub fn serves_on_this_thread(&self, vbid: Vbid) -> bool {
        on_shard_thread(self.shard(vbid).id)
    }

    /// True on any of this flusher's threads (in a persistence callback).
    pub fn on_own_thread(&self) -> bool {
        self.shards.iter().any(|shard| on_shard_thread(shard.id))
    }

    /// On one of this flusher's threads (in a persistence callback): keeps
    /// `value` until that thread ends, after its last commit, and returns
    /// `Ok`. On any other thread: returns `Err(value)`. For what must
    /// outlive every commit of a flusher dropped by a callback on its own
    /// thread (which a drop cannot wait for), such as the lock on the
    /// directory it writes in.
    pub fn keep_until_own_thread_ends<V: Send + 'static>(
        &self,
        value: V,
    ) -> std::result::Result<(), V> {
        if !self.on_own_thread() {
            return Err(value);
        }
        KEPT_UNTIL_THREAD_ENDS.with(|kept| kept.borrow_mut().push(Box::new(value)));
        Ok(())
    }

    fn shard(&self, vbid: Vbid) -> &ShardHandle<T> {
        &self.shards[usize::from(vbid) % self.shards.len()]
    }

    /// Starts serving `vbid`, whose target has persisted up to
    /// `persisted_seqno`; returns the queue its writers use.
    pub fn add(&self, vbid: Vbid, target: T, persisted_seqno: u64) -> Result<VbQueue<T::Item>> {
        let mut queues = self.queues.lock();
        if queues.contains_key(&vbid) {
            return Err(Error::AlreadyAdded(vbid));
        }
        let shard = self.shard(vbid);
        let (tx, rx) = unbounded();
        let shared = Arc::new(VbShared::new(
            vbid,
            shard.id,
            tx,
            shard.wake.clone(),
            self.config.max_queued_bytes,
            persisted_seqno,
        ));
        let slot = Slot {
            target,
            shared: Arc::clone(&shared),
            items: rx,
            retry: None,
            retry_at: Instant::now(),
            backoff: self.config.retry_backoff_min,
        };
        shard
            .control
            .send(Control::Add(slot))
            .map_err(|_| Error::ThreadGone(vbid))?;
        queues.insert(vbid, Arc::clone(&shared));
        Ok(VbQueue { shared })
    }

    /// The queue of `vbid`, if it is served.
    pub fn queue(&self, vbid: Vbid) -> Option<VbQueue<T::Item>> {
        self.queues.lock().get(&vbid).map(|shared| VbQueue {
            shared: Arc::clone(shared),
        })
    }

    /// The vbuckets served, in no particular order.
    pub fn vbuckets(&self) -> Vec<Vbid> {
        self.queues.lock().keys().copied().collect()
    }

    /// Stops serving `vbid`: new items are refused, what is queued is
    /// flushed (retrying failures for up to the close timeout), waiters
    /// are released, and the target is handed back.
    pub fn remove(&self, vbid: Vbid) -> Result<Removed<T>> {
        self.begin_remove(vbid, crate::deadline_after(self.config.close_timeout))?
            .wait()
    }

    /// Removes the vbuckets `vbids` together, with one deadline for all of
    /// them (the close timeout from now): their shards flush them in
    /// parallel. Returns each one's outcome, in the order given.
    pub fn remove_all(&self, vbids: &[Vbid]) -> Vec<(Vbid, Result<Removed<T>>)> {
        let deadline = crate::deadline_after(self.config.close_timeout);
        let pending: Vec<_> = vbids
            .iter()
            .map(|&vbid| (vbid, self.begin_remove(vbid, deadline)))
            .collect();
        pending
            .into_iter()
            .map(|(vbid, p)| (vbid, p.and_then(PendingRemoval::wait)))
            .collect()
    }

    /// Starts removing `vbid`: from now on its queue refuses new items; its
    /// shard flushes what is queued, giving up on failing commits at
    /// `deadline` (`None`: never). Wait for it with [`PendingRemoval::wait`].
    pub fn begin_remove(&self, vbid: Vbid, deadline: Option<Instant>) -> Result<PendingRemoval<T>> {
        if self.serves_on_this_thread(vbid) {
            return Err(Error::RemoveOnFlusherThread(vbid));
        }
        // The remove message is sent under the map's lock, so an `add` of
        // the same vbid (which sends under it too) cannot reach the shard
        // first and have its slot taken for the one removed.
        let mut queues = self.queues.lock();
        let shared = queues.remove(&vbid).ok_or(Error::NotAdded(vbid))?;
        shared.close_queue();
        let (reply, reply_rx) = crossbeam_channel::bounded(1);
        self.shard(vbid)
            .control
            .send(Control::Remove(vbid, deadline, reply))
            .map_err(|_| Error::ThreadGone(vbid))?;
        Ok(PendingRemoval {
            vbid,
            reply: reply_rx,
        })
    }

    /// Flush statistics of `vbid`.
    pub fn stats(&self, vbid: Vbid) -> Option<FlushStats> {
        self.queues.lock().get(&vbid).map(|s| s.stats())
    }

    /// Flush statistics of every vbucket served, merged.
    pub fn total_stats(&self) -> FlushStats {
        let queues: Vec<_> = self.queues.lock().values().cloned().collect();
        let mut total = FlushStats::default();
        for shared in queues {
            total.merge(&shared.stats());
        }
        total
    }

    /// Removes every vbucket (flushing their queues, with one deadline for
    /// all) and stops the threads.
    pub fn shutdown(self) -> Vec<(Vbid, Result<Removed<T>>)> {
        let mut vbids = self.vbuckets();
        vbids.sort_unstable();
        self.remove_all(&vbids)
        // Drop stops the threads.
    }
}

impl<T: FlushTarget> Drop for Flusher<T> {
    fn drop(&mut self) {
        let queues: Vec<_> = self.queues.lock().drain().map(|(_, s)| s).collect();
        for shared in &queues {
            shared.close_queue();
        }
        for shard in &self.shards {
            let _ = shard.control.send(Control::Shutdown);
        }
        for shard in &mut self.shards {
            // Dropped by a persistence callback on one of its own threads
            // (holding the last handle): that thread ends once the callback
            // returns, as told; joining it from itself would fail.
            if on_shard_thread(shard.id) {
                continue;
            }
            if let Some(thread) = shard.thread.take() {
                if thread.join().is_err() {
                    tracing::error!("a flusher thread panicked");
                }
            }
        }
    }
}

/// One vbucket as its flusher thread holds it.
struct Slot<T: FlushTarget> {
    target: T,
    shared: Arc<VbShared<T::Item>>,
    /// The queued items, each with the rollback epoch it was queued in.
    items: Receiver<(u64, T::Item)>,
    /// A batch whose commit failed, to retry at `retry_at`.
    retry: Option<Batch<T::Item>>,
    retry_at: Instant,
    backoff: Duration,
}

/// What one flush step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing was queued.
    Idle,
    /// A batch was committed and nothing more is queued.
    Flushed,
    /// A batch was committed and more is queued.
    More,
    /// A commit failed or a retry is not due yet.
    Backoff,
}

impl<T: FlushTarget> Slot<T> {
    fn has_queued(&self) -> bool {
        self.retry.is_some() || !self.items.is_empty()
    }

    /// What follows a batch that is done with (committed or dropped).
    fn next_step(&self) -> Step {
        if self.has_queued() {
            Step::More
        } else {
            Step::Flushed
        }
    }

    /// Waits while the queue grows, up to `config.gather_max` (group commit).
    fn gather(&self, config: &FlusherConfig) {
        if config.gather_max.is_zero() {
            return;
        }
        let deadline = crate::deadline_after(config.gather_max);
        let mut queued = self.items.len();
        while queued > 0
            && queued < config.max_batch_items
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            std::thread::sleep(crate::GATHER_POLL);
            let now_queued = self.items.len();
            if now_queued == queued {
                return;
            }
            queued = now_queued;
        }
    }

    /// Drains up to one batch's worth of items and keeps the newest of each
    /// key. Items a rollback forgot (of an earlier epoch than the batch's)
    /// are dropped; an item of a later epoch means the items gathered so far
    /// were rolled back meanwhile, so the batch starts again from it.
    fn cut_batch(&self, config: &FlusherConfig) -> Option<Batch<T::Item>> {
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut epoch = self.shared.epoch();
        while items.len() < config.max_batch_items.max(1) && bytes < config.max_batch_bytes {
            match self.items.try_recv() {
                Ok((item_epoch, item)) => {
                    if item_epoch > epoch {
                        items.clear();
                        bytes = 0;
                        epoch = item_epoch;
                    }
                    if item_epoch < epoch {
                        continue;
                    }
                    bytes += item.size();
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        (!items.is_empty()).then(|| dedup(items, bytes, epoch))
    }

    /// True when a rollback forgot `batch` after it was cut.
    fn is_rolled_back(&self, batch: &Batch<T::Item>) -> bool {
        batch.epoch != self.shared.epoch()
    }

    /// Commits one batch (a due retry first).
    fn flush_step(&mut self, config: &FlusherConfig) -> Step {
        let now = Instant::now();
        let batch = match self.retry.take() {
            Some(batch) if now < self.retry_at => {
                self.retry = Some(batch);
                return Step::Backoff;
            }
            Some(batch) if self.is_rolled_back(&batch) => {
                tracing::debug!(vbid = self.shared.vbid, "a failed batch was rolled back");
                return self.next_step();
            }
            Some(batch) => {
                self.shared.record_retry();
                batch
            }
            None => {
                self.gather(config);
                self.shared.clear_scheduled();
                match self.cut_batch(config) {
                    Some(batch) => batch,
                    None => return Step::Idle,
                }
            }
        };
        let vbid = self.shared.vbid;
        let _span = tracing::debug_span!(
            "flush",
            vbid,
            items = batch.items.len(),
            high_seqno = batch.high_seqno
        )
        .entered();
        let start = Instant::now();
        let result = self.target.commit(&batch);
        if self.is_rolled_back(&batch) {
            // The rollback decided its waiters and reset the accounting;
            // the target refused it (or committed it just before the
            // rollback, which then went back past it).
            return self.next_step();
        }
        match result {
            Ok(committed) => {
                self.shared.persisted(&batch, &committed, start.elapsed());
                self.backoff = config.retry_backoff_min;
                self.next_step()
            }
            Err(error) => {
                let permanent = self.target.is_permanent(&error);
                let reason = error.to_string();
                self.shared.record_failure(reason.clone());
                if let Err(error) = self.target.recover() {
                    tracing::warn!(vbid, %error, "recovery after a failed commit failed");
                }
                if permanent {
                    // Retrying cannot fix it: drop the batch and fail its
                    // waiters rather than wedge the vbucket behind it.
                    tracing::error!(vbid, error = %reason, items = batch.items.len(), "commit failed for good; the batch is dropped");
                    self.target.discard(&batch);
                    self.shared.dropped(&batch, &reason);
                    return self.next_step();
                }
                tracing::warn!(vbid, error = %reason, backoff = ?self.backoff, "commit failed; the batch stays queued");
                self.retry = Some(batch);
                let now = Instant::now();
                // A backoff too long to represent: retry at the longest
                // representable wait, which is no shorter than asked.
                self.retry_at = now
                    .checked_add(self.backoff)
                    .unwrap_or_else(|| now + RETRY_BACKOFF_CAP);
                self.backoff = self
                    .backoff
                    .saturating_mul(2)
                    .min(config.retry_backoff_max)
                    .min(RETRY_BACKOFF_CAP);
                Step::Backoff
            }
        }
    }

    /// Flushes everything queued, giving up on failing commits at
    /// `deadline` (`None`: never); returns how many items were left
    /// unflushed.
    fn drain(&mut self, config: &FlusherConfig, deadline: Option<Instant>) -> usize {
        loop {
            match self.flush_step(config) {
                Step::Idle | Step::Flushed => return 0,
                Step::More => {}
                Step::Backoff => {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) {
                        let retry = self.retry.as_ref().map_or(0, |b| b.drained);
                        return retry + self.items.len();
                    }
                    let until = deadline.map_or(self.retry_at, |d| self.retry_at.min(d));
                    std::thread::sleep(until.saturating_duration_since(now));
                }
            }
        }
    }
}

/// Keeps only the newest item of each key; the result stays in seqno order.
fn dedup<I: FlushItem>(items: Vec<I>, drained_bytes: usize, epoch: u64) -> Batch<I> {
    let drained = items.len();
    let high_seqno = items.iter().map(FlushItem::seqno).max().unwrap_or(0);
    let mut order: Vec<usize> = (0..drained).collect();
    order.sort_by(|&a, &b| {
        items[a]
            .key()
            .cmp(items[b].key())
            .then(items[a].seqno().cmp(&items[b].seqno()))
    });
    let mut keep = vec![false; drained];
    for (i, &idx) in order.iter().enumerate() {
        let last_of_key = order
            .get(i + 1)
            .is_none_or(|&next| items[next].key() != items[idx].key());
        keep[idx] = last_of_key;
    }
    let items = items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, keep)| keep.then_some(item))
        .collect();
    Batch {
        items,
        high_seqno,
        drained,
        drained_bytes,
        epoch,
    }
}

/// One flusher thread's state.
struct Shard<T: FlushTarget> {
    config: FlusherConfig,
    control: Receiver<Control<T>>,
    wake: Receiver<Vbid>,
    slots: HashMap<Vbid, Slot<T>>,
    /// Vbuckets with work, in round-robin order.
    ready: VecDeque<Vbid>,
}

/// How long an idle flusher thread sleeps between checks of its retries.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between two retries of a failed commit, whatever
/// [`FlusherConfig::retry_backoff_max`] says.
const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(3600);

impl<T: FlushTarget> Shard<T> {
    fn run(mut self) {
        loop {
            if self.ready.is_empty() {
                let timeout = self
                    .slots
                    .values()
                    .filter(|s| s.retry.is_some())
                    .map(|s| s.retry_at.saturating_duration_since(Instant::now()))
                    .min()
                    .unwrap_or(IDLE_WAIT);
                select! {
                    recv(self.control) -> msg => match msg {
                        Ok(msg) => if !self.handle(msg) { return },
                        Err(_) => return,
                    },
                    recv(self.wake) -> vbid => if let Ok(vbid) = vbid { self.ready.push_back(vbid) },
                    default(timeout) => {}
                }
            }
            while let Ok(msg) = self.control.try_recv() {
                if !self.handle(msg) {
                    return;
                }
            }
            while let Ok(vbid) = self.wake.try_recv() {
                self.ready.push_back(vbid);
            }
            let now = Instant::now();
            for (vbid, slot) in &self.slots {
                if slot.retry.is_some() && slot.retry_at <= now {
                    self.ready.push_back(*vbid);
                }
            }
            self.flush_round();
        }
    }

    /// One batch for each vbucket with work; those with more go round again.
    fn flush_round(&mut self) {
        let mut round: Vec<Vbid> = self.ready.drain(..).collect();
        round.sort_unstable();
        round.dedup();
        for vbid in round {
            if let Some(slot) = self.slots.get_mut(&vbid) {
                if slot.flush_step(&self.config) == Step::More {
                    self.ready.push_back(vbid);
                }
            }
        }
    }

    /// Handles a control message; false means stop the thread.
    fn handle(&mut self, msg: Control<T>) -> bool {
        match msg {
            Control::Add(slot) => {
                let vbid = slot.shared.vbid;
                if slot.has_queued() {
                    self.ready.push_back(vbid);
                }
                self.slots.insert(vbid, slot);
                true
            }
            Control::Remove(vbid, deadline, reply) => {
                if let Some(slot) = self.slots.remove(&vbid) {
                    let _ = reply.send(self.retire(slot, deadline));
                }
                true
            }
            Control::Shutdown => {
                let deadline = crate::deadline_after(self.config.close_timeout);
                let slots: Vec<_> = self.slots.drain().map(|(_, s)| s).collect();
                for slot in slots {
                    let vbid = slot.shared.vbid;
                    let removed = self.retire(slot, deadline);
                    if removed.unflushed_items > 0 {
                        tracing::error!(
                            vbid,
                            items = removed.unflushed_items,
                            "shutting down with items that could not be flushed"
                        );
                    }
                }
                false
            }
        }
    }

    /// Flushes a removed vbucket's queue (giving up at `deadline`) and
    /// releases its waiters.
    fn retire(&self, mut slot: Slot<T>, deadline: Option<Instant>) -> Removed<T> {
        let unflushed_items = slot.drain(&self.config, deadline);
        slot.shared.close_persistence();
        Removed {
            target: slot.target,
            unflushed_items,
        }
    }
}
