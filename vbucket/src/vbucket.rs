//! One vbucket: accepting mutations (seqnos, the dirty table, the flusher's
//! queue), reads of unflushed and committed data, and the flush target that
//! commits batches to the vbucket's file under the commit lock.

use crate::error::{Error, Result};
use crate::files::{self, revision_name};
use crate::history::{unix_nanos_of, AsOf, HeaderIndex, HistoryEntry};
use crate::item::{live_only, Document, Item, ItemMeta, Mutation, QueuedItem, Rev};
use crate::snapshot::ReadSnapshot;
use crate::vbstate::{VbState, VbucketState, VBSTATE_ID};
use btree::{Db, DbOptions, LocalUpdate, Snapshot};
use couchfile::{
    CacheStats, ChunkCache, CouchFile, CrcKind, Directory, FileWriter, LocatedHeader, OpenMode,
    MAX_KEY_LEN, MAX_U48,
};
use flusher::{
    Batch, Committed, FlushStats, FlushTarget, Flusher, LatencyHistogram, VbQueue, Vbid,
};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest value accepted (kv-engine's default item size limit).
pub const MAX_VALUE_SIZE: usize = 20 << 20;

/// One flush-batch commit, as a [`CommitObserver`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct CommitEvent {
    /// The vbucket.
    pub vbid: Vbid,
    /// When the flusher asked for the commit lock.
    pub started: Instant,
    /// From then until the header was synced and published (lock wait,
    /// writes and syncs).
    pub latency: Duration,
    /// Items in the batch.
    pub items: usize,
    /// Bytes appended to the file.
    pub bytes_written: u64,
    /// True when a compaction of the vbucket ran at some point of the commit.
    pub during_compaction: bool,
}

/// Called after every successful flush-batch commit, on the flusher's thread
/// (keep it short: the next batch waits).
pub type CommitObserver = Arc<dyn Fn(&CommitEvent) + Send + Sync>;

/// Flush-batch commit latencies, split by whether a compaction ran.
#[derive(Debug, Default)]
struct CommitLatencies {
    during_compaction: LatencyHistogram,
    otherwise: LatencyHistogram,
}

/// How a vbucket writes its file.
#[derive(Debug, Clone)]
pub(crate) struct VbOptions {
    pub(crate) db: DbOptions,
    /// The store's node cache, shared by every vbucket's files.
    pub(crate) node_cache: Option<Arc<ChunkCache>>,
    /// The store's background syncs, shared by every vbucket's writers.
    pub(crate) writeback: Option<couchfile::Writeback>,
    pub(crate) compress_bodies: bool,
    /// How long a writer waits for room in a full queue.
    pub(crate) write_timeout: Duration,
    /// What opening the vbucket does with a damaged revision file.
    pub(crate) damaged_files: files::DamagedFiles,
}

/// The front end: seqno and CAS assignment and the mutations not yet
/// persisted, newest per key (reads see them first).
#[derive(Debug)]
struct Front {
    high_seqno: u64,
    max_cas: u64,
    closed: bool,
    dirty: HashMap<Vec<u8>, Arc<Item>>,
}

/// The CAS value memcached reserves for a locked document: never stored.
pub const RESERVED_CAS: u64 = u64::MAX;

/// The largest revision number the format holds (48 bits). An automatic
/// revision stays there once reached (it never wraps).
pub const MAX_REV_SEQ: u64 = MAX_U48;

/// The largest seqno the format holds (48 bits).
pub const MAX_SEQNO: u64 = MAX_U48;

impl Front {
    /// kv-engine's hybrid logical clock: wall-clock nanoseconds with the
    /// low 16 bits as a counter, never going backwards and never repeating;
    /// `None` once the counter has reached the last value below
    /// [`RESERVED_CAS`] (only a CAS given explicitly can get it there).
    fn next_cas(&mut self) -> Option<u64> {
        let now = u64::try_from(unix_nanos()).unwrap_or(u64::MAX) & !0xffff;
        let next = now.max(self.max_cas.checked_add(1)?);
        if next == RESERVED_CAS {
            return None;
        }
        self.max_cas = next;
        Some(next)
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The write side of the file. Its mutex is the vbucket's commit lock: the
/// flusher holds it for each commit, and compaction's final round holds it
/// to replay the last changes and switch files.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) db: Db,
    pub(crate) revision: u64,
    /// The vbstate as of the last commit.
    vbstate: VbState,
    /// A commit failed: reopen the file at its last valid header first.
    pub(crate) needs_recovery: bool,
    /// A compaction renamed its file into place but could not sync the
    /// directory: nothing may be reported durable until that sync succeeds.
    pub(crate) dir_sync_pending: bool,
    /// The flusher queue's rollback epoch as of the last rollback: a batch
    /// of an earlier epoch holds rolled-back mutations and is not written.
    pub(crate) epoch: u64,
}

/// The latest commit, as published to readers and to compaction.
#[derive(Debug, Clone)]
struct Published {
    revision: u64,
    /// The latest header of the file: cloned for a reader without
    /// allocating.
    snapshot: Snapshot,
    commits: u64,
}

/// A committed header as the flusher publishes it: the handoff that tells
/// compaction how far the file has moved on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommittedHeader {
    /// The file revision it is in.
    pub revision: u64,
    /// Offset of the header.
    pub offset: u64,
    /// Its update seq.
    pub update_seq: u64,
    /// Commits since the vbucket was opened (increases with every header).
    pub commits: u64,
}

impl Published {
    fn handoff(&self) -> CommittedHeader {
        CommittedHeader {
            revision: self.revision,
            offset: self.snapshot.offset(),
            update_seq: self.snapshot.header().update_seq,
            commits: self.commits,
        }
    }
}

/// State shared by the vbucket's handles and its flush target.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) vbid: Vbid,
    pub(crate) dir: Arc<dyn Directory>,
    pub(crate) options: VbOptions,
    front: Mutex<Front>,
    pub(crate) writer: Mutex<Writer>,
    published: Mutex<Published>,
    header_committed: Condvar,
    /// Total time the flusher waited for the commit lock (nanoseconds).
    pub(crate) flusher_lock_wait_nanos: AtomicU64,
    /// Size of the file the last compaction wrote (0: none since open).
    pub(crate) compacted_size: AtomicU64,
    /// The running compaction's control, so closing can cancel it.
    pub(crate) compaction: Mutex<Option<compactor::Control>>,
    /// Signalled when a compaction ends (closing waits for it).
    pub(crate) compaction_ended: Condvar,
    /// Flush-batch commit latencies.
    commit_latency: Mutex<CommitLatencies>,
    /// Told of every flush-batch commit.
    on_commit: OnCommit,
    /// The history of the current file revision, indexed as far as it was
    /// last asked for (extended by the next search).
    history: Mutex<HistoryCache>,
}

/// The header index of one file revision.
#[derive(Debug, Default)]
struct HistoryCache {
    revision: u64,
    index: HeaderIndex,
}

/// Where a [`VBucket::rollback`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackTo {
    /// To the newest header whose update seq is at or below the seqno asked
    /// for: this is its update seq, the vbucket's high and persisted seqno
    /// from now on.
    Seqno(u64),
    /// No header can serve: none has an update seq at or below the seqno
    /// asked for (or it is the file's first, empty header, without a
    /// vbstate), or the purge seqno is above it (deletions at or below it
    /// are gone). Nothing was changed: the vbucket, its file and its queue
    /// are as they were. The caller rebuilds the vbucket from scratch:
    /// [`crate::Store::delete_vbucket`], then
    /// [`crate::Store::open_vbucket`], then refill it.
    Zero,
}

/// The optional commit observer, debug-printable.
struct OnCommit(Option<CommitObserver>);

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(Fn)" } else { "None" })
    }
}

impl Shared {
    fn compaction_running(&self) -> bool {
        self.compaction.lock().is_some()
    }

    /// True once the store closed this vbucket: every handle refuses to
    /// write, commit or compact from then on.
    pub(crate) fn is_closed(&self) -> bool {
        self.front.lock().closed
    }

    /// Fails with [`Error::Closed`] once the vbucket is closed.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed(self.vbid));
        }
        Ok(())
    }

    /// Removes the dirty entries `batch` covers (those not replaced by a
    /// newer mutation since): after its header is published, or when it
    /// was dropped. The dirty table holds each key's newest mutation, so an
    /// entry the batch covers is the batch's own item; comparing identities
    /// rather than seqnos keeps a mutation accepted after a rollback (whose
    /// seqno may be below the batch's) in place.
    fn forget_dirty(&self, batch: &Batch<QueuedItem>) {
        let mut front = self.front.lock();
        for QueuedItem(item) in &batch.items {
            if front
                .dirty
                .get(&item.key)
                .is_some_and(|d| Arc::ptr_eq(d, item))
            {
                front.dirty.remove(&item.key);
            }
        }
    }

    /// Makes the writer's last commit the one readers see. Called with the
    /// commit lock held, so headers are published in commit order.
    pub(crate) fn publish(&self, writer: &Writer) {
        let snapshot = writer.db.snapshot();
        let mut p = self.published.lock();
        p.revision = writer.revision;
        p.snapshot = snapshot;
        p.commits += 1;
        drop(p);
        self.header_committed.notify_all();
    }
}

impl Writer {
    /// Writes the batch's documents and the vbstate, then commits (durably).
    fn commit_batch(
        &mut self,
        options: &VbOptions,
        batch: &Batch<QueuedItem>,
    ) -> Result<Committed> {
        let start = self.db.writer_mut().position();
        let mut vbstate = self.vbstate.clone();
        vbstate.persisted_seqno = vbstate.persisted_seqno.max(batch.high_seqno);
        for QueuedItem(item) in &batch.items {
            vbstate.max_cas = vbstate.max_cas.max(item.meta.cas);
            if item.deleted {
                vbstate.max_deleted_seqno = vbstate.max_deleted_seqno.max(item.seqno);
            }
        }
        let docs: Vec<_> = batch
            .items
            .iter()
            .map(|QueuedItem(item)| item.to_doc_update(options.compress_bodies))
            .collect();
        let saved = self.save(&docs, &[vbstate_update(&vbstate)])?;
        for (QueuedItem(item), saved) in batch.items.iter().zip(&saved) {
            if let Some(base) = item.unresolved_base() {
                // The revision the file held before the run (a reader may
                // have set the same base meanwhile, from the same file
                // state; a retried commit finds it set).
                let _ = base.set(saved.stored_rev_seq.unwrap_or(0));
            }
        }
        // Dedup leaves gaps: the header covers every seqno drained.
        let pending = self.db.pending_mut();
        pending.update_seq = pending.update_seq.max(batch.high_seqno);
        let header_offset = self.commit()?;
        self.vbstate = vbstate;
        Ok(Committed {
            header_offset,
            high_seqno: batch.high_seqno,
            bytes_written: self.db.writer_mut().position().saturating_sub(start),
        })
    }

    /// Saves documents and local documents into the pending commit; a
    /// failure leaves the pending state half-written, so the file is reopened
    /// at its last header before anything else is saved.
    fn save(
        &mut self,
        docs: &[btree::DocUpdate],
        locals: &[LocalUpdate],
    ) -> Result<Vec<btree::SavedDoc>> {
        let saved = self.db.save_docs(docs, locals);
        if saved.is_err() {
            self.needs_recovery = true;
        }
        Ok(saved?)
    }

    /// Commits a new vbstate alone.
    fn commit_vbstate(&mut self, vbstate: VbState) -> Result<u64> {
        self.save(&[], &[vbstate_update(&vbstate)])?;
        let offset = self.commit()?;
        self.vbstate = vbstate;
        Ok(offset)
    }

    /// Commits the pending header. Its timestamp is the clock's, but never
    /// below the last header's, so that the file's history is ordered by
    /// time as well as by seqno (see [`crate::history`]).
    pub(crate) fn commit(&mut self) -> Result<u64> {
        let timestamp = u64::try_from(unix_nanos())
            .unwrap_or(u64::MAX)
            .max(self.db.committed().header.timestamp);
        match self.db.commit(timestamp) {
            Ok(offset) => Ok(offset),
            Err(e) => {
                self.needs_recovery = true;
                Err(e.into())
            }
        }
    }

    /// Reopens the file at its last valid header after a failed commit.
    fn recover(&mut self, shared: &Shared) -> Result<()> {
        let committed = self.db.committed().header.update_seq;
        self.reopen(shared, committed).map(drop)
    }

    /// Reopens the file at its last valid header, which must cover
    /// `min_seq` ([`Error::LostCommit`] otherwise), and returns it.
    fn reopen(&mut self, shared: &Shared, min_seq: u64) -> Result<LocatedHeader> {
        let _span = tracing::info_span!("recovery", vbid = shared.vbid).entered();
        let name = revision_name(shared.vbid, self.revision);
        let mut file = files::open_file(&*shared.dir, &name, &shared.options)?;
        let committed = min_seq;
        let header = match file.find_last_header(shared.options.db.mode) {
            Ok(Some(header)) if header.header.update_seq >= committed => header,
            Ok(found) => {
                return Err(Error::LostCommit {
                    path: file.path().to_path_buf(),
                    found: found.map_or(0, |h| h.header.update_seq),
                    committed,
                })
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(header = header.offset, "reopened after a failed commit");
        file.set_crc(CrcKind::for_version(header.header.disk_version));
        self.db = Db::from_writer(
            FileWriter::new(file)?,
            header.clone(),
            shared.options.db.nodes,
        );
        self.needs_recovery = false;
        Ok(header)
    }

    /// Readies the writer for a commit after an earlier failure.
    pub(crate) fn recover_if_needed(&mut self, shared: &Shared) -> Result<()> {
        if self.needs_recovery {
            self.recover(shared)?;
        }
        if self.dir_sync_pending {
            shared
                .dir
                .sync()
                .map_err(|e| Error::io(shared.dir.path(), "sync directory", e))?;
            self.dir_sync_pending = false;
        }
        Ok(())
    }
}

fn vbstate_update(vbstate: &VbState) -> LocalUpdate {
    LocalUpdate {
        id: VBSTATE_ID.to_vec(),
        value: Some(vbstate.to_json()),
    }
}

/// The flusher's target for one vbucket.
#[derive(Debug)]
pub(crate) struct VbTarget {
    shared: Arc<Shared>,
}

impl FlushTarget for VbTarget {
    type Item = QueuedItem;
    type Error = Error;

    fn commit(&mut self, batch: &Batch<QueuedItem>) -> Result<Committed> {
        let shared = &*self.shared;
        let started = Instant::now();
        let compacting_at_start = shared.compaction_running();
        let committed = {
            let mut writer = match shared.writer.try_lock() {
                Some(writer) => writer,
                None => {
                    // Held by a compaction's final round (or set_state).
                    let start = Instant::now();
                    let writer = shared.writer.lock();
                    let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    shared
                        .flusher_lock_wait_nanos
                        .fetch_add(waited, Ordering::Relaxed);
                    writer
                }
            };
            if batch.epoch != writer.epoch {
                // Rolled back while it waited: the flusher forgets it.
                return Ok(Committed {
                    header_offset: writer.db.committed().offset,
                    high_seqno: batch.high_seqno,
                    bytes_written: 0,
                });
            }
            writer.recover_if_needed(shared)?;
            let committed = writer.commit_batch(&shared.options, batch)?;
            shared.publish(&writer);
            committed
        };
        let event = CommitEvent {
            vbid: shared.vbid,
            started,
            latency: started.elapsed(),
            items: batch.items.len(),
            bytes_written: committed.bytes_written,
            during_compaction: compacting_at_start || shared.compaction_running(),
        };
        {
            let mut latencies = shared.commit_latency.lock();
            if event.during_compaction {
                latencies.during_compaction.record(event.latency);
            } else {
                latencies.otherwise.record(event.latency);
            }
        }
        if let Some(observer) = &shared.on_commit.0 {
            observer(&event);
        }
        // Readers see the new header: the dirty entries it covers can go.
        shared.forget_dirty(batch);
        Ok(committed)
    }

    fn recover(&mut self) -> Result<()> {
        let shared = &*self.shared;
        shared.writer.lock().recover(shared)
    }

    fn is_permanent(&self, error: &Error) -> bool {
        error.is_permanent_commit_failure()
    }

    fn discard(&mut self, batch: &Batch<QueuedItem>) {
        // Never persisted: readers go back to what the file holds.
        self.shared.forget_dirty(batch);
    }
}

/// What a vbucket holds and how it is doing.
#[derive(Debug, Clone, Default)]
pub struct VBucketStats {
    /// The vbucket.
    pub vbid: Vbid,
    /// Its file revision.
    pub revision: u64,
    /// Size of its file.
    pub file_size: u64,
    /// Bytes the latest header's data occupies (bodies and trees): file
    /// size against this is the fragmentation.
    pub space_used: u64,
    /// Live documents in the latest header.
    pub live_docs: u64,
    /// Deletions (tombstones) in the latest header.
    pub deleted_docs: u64,
    /// Highest seqno accepted.
    pub high_seqno: u64,
    /// Mutations accepted and not yet persisted (newest per key).
    pub dirty_items: u64,
    /// Headers committed since the vbucket was opened.
    pub commits: u64,
    /// The flusher's statistics (persisted seqno, queue, latencies).
    pub flush: FlushStats,
    /// Latency of the flush-batch commits a compaction overlapped (from
    /// asking for the commit lock to the published header).
    pub commit_latency_during_compaction: LatencyHistogram,
    /// Latency of the other flush-batch commits.
    pub commit_latency_otherwise: LatencyHistogram,
    /// The store's node cache, which every vbucket of the store shares:
    /// its capacity, bytes, hits, misses and evictions (`None` when the
    /// store runs without one).
    pub node_cache: Option<CacheStats>,
    /// Size of the file the last compaction wrote, history included (0:
    /// no compaction since the vbucket was opened).
    pub compacted_size: u64,
}

/// One vbucket of a [`crate::Store`]. Cheap to clone; every clone is the same
/// vbucket, usable from any thread.
#[derive(Debug, Clone)]
pub struct VBucket {
    shared: Arc<Shared>,
    queue: VbQueue<QueuedItem>,
}

impl VBucket {
    /// Opens (or creates) vbucket `vbid` in `dir` and adds it to `flusher`;
    /// `on_commit` is told of each flush-batch commit.
    pub(crate) fn open(
        dir: Arc<dyn Directory>,
        vbid: Vbid,
        options: VbOptions,
        on_commit: Option<CommitObserver>,
        flusher: &Flusher<VbTarget>,
    ) -> Result<Self> {
        let opened = files::open_newest_revision(&*dir, vbid, &options)?;
        let snapshot = ReadSnapshot::new(vbid, opened.revision, opened.db.snapshot());
        let stored_vbstate = snapshot.vbstate()?;
        let header = opened.db.committed().clone();
        let mut writer = Writer {
            db: opened.db,
            revision: opened.revision,
            vbstate: stored_vbstate.clone().unwrap_or_else(VbState::new_vbucket),
            needs_recovery: false,
            dir_sync_pending: false,
            epoch: 0,
        };
        if stored_vbstate.is_none() {
            // A new vbucket: its identity (the failover uuid) must be durable.
            let vbstate = writer.vbstate.clone();
            writer.commit_vbstate(vbstate)?;
        }
        let high_seqno = header.header.update_seq;
        let max_cas = writer.vbstate.max_cas;
        let published = Published {
            revision: writer.revision,
            snapshot: writer.db.snapshot(),
            commits: 0,
        };
        let shared = Arc::new(Shared {
            vbid,
            dir,
            options,
            front: Mutex::new(Front {
                high_seqno,
                max_cas,
                closed: false,
                dirty: HashMap::new(),
            }),
            writer: Mutex::new(writer),
            published: Mutex::new(published),
            header_committed: Condvar::new(),
            flusher_lock_wait_nanos: AtomicU64::new(0),
            compacted_size: AtomicU64::new(0),
            compaction: Mutex::new(None),
            compaction_ended: Condvar::new(),
            commit_latency: Mutex::new(CommitLatencies::default()),
            on_commit: OnCommit(on_commit),
            history: Mutex::new(HistoryCache::default()),
        });
        let queue = flusher.add(
            vbid,
            VbTarget {
                shared: Arc::clone(&shared),
            },
            high_seqno,
        )?;
        Ok(Self { shared, queue })
    }

    /// Refuses further mutations, commits and compactions (the store is
    /// closing the vbucket), and cancels a running compaction.
    pub(crate) fn close_front(&self) {
        self.shared.front.lock().closed = true;
        {
            // Under the published lock: a waiter checks the flag under it.
            let _published = self.shared.published.lock();
            self.shared.header_committed.notify_all();
        }
        // A compaction registers itself only while the vbucket is open,
        // checked under this lock: once we hold it, none can start.
        if let Some(control) = self.shared.compaction.lock().as_ref() {
            control.cancel();
        }
    }

    /// Waits until no compaction of this vbucket runs (after
    /// [`VBucket::close_front`] cancelled it and refused new ones), so that
    /// nothing renames or removes its files any more.
    pub(crate) fn wait_for_compaction_end(&self) {
        let mut running = self.shared.compaction.lock();
        while running.is_some() {
            self.shared.compaction_ended.wait(&mut running);
        }
    }

    /// True once the store closed this vbucket.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The vbucket id.
    pub fn vbid(&self) -> Vbid {
        self.shared.vbid
    }

    /// Stores `value` under `key`. Waits up to the flusher's backpressure
    /// timeout when the queue is full, then fails with a temporarily-full
    /// error ([`Error::is_temporarily_full`]). The mutation is readable at
    /// once; it is durable once [`VBucket::wait_persisted`] of its seqno
    /// returns.
    pub fn set(&self, key: &[u8], value: &[u8], meta: ItemMeta) -> Result<Mutation> {
        if value.len() > MAX_VALUE_SIZE {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: MAX_VALUE_SIZE,
            });
        }
        self.mutate(key, value.to_vec(), false, meta)
    }

    /// Deletes `key` (writes a tombstone carrying `meta`).
    pub fn delete(&self, key: &[u8], meta: ItemMeta) -> Result<Mutation> {
        self.mutate(key, Vec::new(), true, meta)
    }

    fn mutate(
        &self,
        key: &[u8],
        value: Vec<u8>,
        deleted: bool,
        meta: ItemMeta,
    ) -> Result<Mutation> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::InvalidKey {
                len: key.len(),
                max: MAX_KEY_LEN,
            });
        }
        if meta.cas == RESERVED_CAS {
            return Err(Error::InvalidMeta {
                field: "cas",
                value: meta.cas,
                reason: "u64::MAX is reserved (memcached's locked CAS)",
            });
        }
        if meta.rev_seq > MAX_REV_SEQ {
            return Err(Error::InvalidMeta {
                field: "rev_seq",
                value: meta.rev_seq,
                reason: "over 2^48 - 1, the largest the file format holds",
            });
        }
        // Outside the front lock: a full queue must not stall bookkeeping.
        // Its queue is removed only once the vbucket is closed.
        self.queue
            .wait_for_room(self.shared.options.write_timeout)
            .map_err(|e| match e {
                flusher::Error::Closed { .. } => Error::Closed(self.shared.vbid),
                other => other.into(),
            })?;
        let mut front = self.shared.front.lock();
        if front.closed {
            return Err(Error::Closed(self.shared.vbid));
        }
        // An automatic revision of a clean key is resolved at its commit,
        // from the file: the write path does not read the disk.
        let rev = match (meta.rev_seq, front.dirty.get(key)) {
            (0, Some(dirty)) => dirty.rev.next(),
            (0, None) => Rev::Auto {
                base: Arc::default(),
                n: 1,
            },
            (given, _) => Rev::Known(given),
        };
        let seqno = front.high_seqno + 1;
        if seqno > MAX_SEQNO {
            return Err(Error::SeqnosExhausted(self.shared.vbid));
        }
        let cas = if meta.cas == 0 {
            front
                .next_cas()
                .ok_or(Error::CasExhausted(self.shared.vbid))?
        } else {
            front.max_cas = front.max_cas.max(meta.cas);
            meta.cas
        };
        let item = Arc::new(Item {
            key: key.to_vec(),
            value,
            deleted,
            seqno,
            meta: ItemMeta {
                cas,
                rev_seq: 0,
                ..meta
            },
            rev,
        });
        // Enqueued under the front lock: queue order is seqno order.
        self.queue.enqueue(QueuedItem(Arc::clone(&item)))?;
        front.high_seqno = seqno;
        front.dirty.insert(key.to_vec(), item);
        Ok(Mutation { seqno, cas })
    }

    /// The live document `key`: its newest mutation, flushed or not;
    /// `None` when absent or deleted.
    pub fn get(&self, key: &[u8]) -> Result<Option<Document>> {
        Ok(self.get_including_deleted(key)?.filter(|d| !d.deleted))
    }

    /// The newest mutation of `key`, deletions included. Once the vbucket
    /// is closed, a handle reads only what it committed (mutations it could
    /// not flush are not durable and never will be).
    pub fn get_including_deleted(&self, key: &[u8]) -> Result<Option<Document>> {
        let dirty = {
            let front = self.shared.front.lock();
            if front.closed {
                None
            } else {
                front.dirty.get(key).cloned()
            }
        };
        match dirty {
            Some(item) => {
                if let Some(base) = item.unresolved_base() {
                    // No commit of the key's run has read the base yet, so
                    // the file still holds the key's revision from before
                    // the run. Whoever reads it first sets it, so readers
                    // and the commit agree even if a compaction purges the
                    // key's tombstone meanwhile.
                    let stored = self
                        .snapshot()
                        .inner()
                        .doc_info(key)?
                        .map_or(0, |info| info.rev_seq);
                    let _ = base.set(stored);
                }
                Ok(Some(item.to_document()))
            }
            // The flusher publishes a header before it forgets the dirty
            // entries it covers, so this sees them.
            None => self.snapshot().get_including_deleted(key),
        }
    }

    /// The live documents `keys` (in any order, repeats allowed), in the
    /// caller's order: each key's newest mutation, flushed or not; `None`
    /// where absent or deleted. kv_engine's batched background fetch: the
    /// unflushed mutations are found under one lock, and the rest in one
    /// walk of the by-id tree over the sorted keys (see
    /// [`ReadSnapshot::get_many`]).
    pub fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Document>>> {
        Ok(live_only(self.get_many_including_deleted(keys)?))
    }

    /// [`VBucket::get_many`] with deletions included.
    pub fn get_many_including_deleted(&self, keys: &[&[u8]]) -> Result<Vec<Option<Document>>> {
        let dirty: Vec<Option<Arc<Item>>> = {
            let front = self.shared.front.lock();
            if front.closed {
                vec![None; keys.len()]
            } else {
                keys.iter()
                    .map(|key| front.dirty.get(*key).cloned())
                    .collect()
            }
        };
        // What the file is asked for: the keys without a dirty mutation, and
        // those whose mutation still waits for the stored revision (see
        // `get_including_deleted`).
        let from_file: Vec<usize> = (0..keys.len())
            .filter(|&i| {
                dirty[i]
                    .as_ref()
                    .is_none_or(|item| item.unresolved_base().is_some())
            })
            .collect();
        // Taken after the dirty table was read: the flusher publishes a
        // header before it forgets the dirty entries it covers.
        let snapshot = self.snapshot();
        let asked: Vec<&[u8]> = from_file.iter().map(|&i| keys[i]).collect();
        let mut infos = snapshot.inner().doc_infos_in_order(&asked)?;
        for (n, &i) in from_file.iter().enumerate() {
            if let Some(base) = dirty[i].as_ref().and_then(|item| item.unresolved_base()) {
                let _ = base.set(infos[n].take().map_or(0, |info| info.rev_seq));
            }
        }
        let mut stored = snapshot.documents(infos)?;
        let mut docs: Vec<Option<Document>> = dirty
            .iter()
            .map(|item| item.as_ref().map(|item| item.to_document()))
            .collect();
        for (n, &i) in from_file.iter().enumerate() {
            if dirty[i].is_none() {
                docs[i] = stored[n].take();
            }
        }
        Ok(docs)
    }

    /// A snapshot at the latest committed header. A snapshot is an
    /// immutable view of what was committed: it stays readable after the
    /// vbucket is closed (taken from a closed vbucket's handle, it is its
    /// last commit).
    pub fn snapshot(&self) -> ReadSnapshot {
        let (revision, snapshot) = {
            let p = self.shared.published.lock();
            (p.revision, p.snapshot.clone())
        };
        ReadSnapshot::new(self.shared.vbid, revision, snapshot)
    }

    /// A snapshot at an older header of the current file revision, given by
    /// its offset (see [`ReadSnapshot::previous`] to walk them).
    pub fn snapshot_at(&self, header_offset: u64) -> Result<ReadSnapshot> {
        let (revision, file) = {
            let p = self.shared.published.lock();
            (p.revision, p.snapshot.file().clone())
        };
        Ok(ReadSnapshot::new(
            self.shared.vbid,
            revision,
            Snapshot::open_at(file, header_offset)?,
        ))
    }

    /// Calls `f` with the history of `file` (revision `revision`) up to its
    /// header `latest` at least, indexed from the cache, which is extended
    /// first (it may go beyond `latest`: filter by offset where it matters).
    pub(crate) fn with_history_index<T>(
        &self,
        revision: u64,
        file: &CouchFile,
        latest: &LocatedHeader,
        f: impl FnOnce(&HeaderIndex) -> Result<T>,
    ) -> Result<T> {
        let mut cache = self.shared.history.lock();
        if cache.revision != revision {
            *cache = HistoryCache {
                revision,
                index: HeaderIndex::default(),
            };
        }
        cache.index.extend_to(file, latest, OpenMode::Normal)?;
        f(&cache.index)
    }

    /// The headers of the vbucket's current file revision, newest first,
    /// from the latest committed one back to the oldest (see
    /// [`crate::history`]: a rollback's abandoned headers are left out).
    /// Compaction keeps only the latest header, unless it keeps history
    /// ([`crate::CompactionOptions::history`]).
    pub fn history(&self) -> Result<Vec<HistoryEntry>> {
        let p = self.shared.published.lock().clone();
        self.with_history_index(
            p.revision,
            p.snapshot.file(),
            p.snapshot.located_header(),
            HeaderIndex::entries,
        )
    }

    fn snapshot_as_of(&self, point: AsOf) -> Result<ReadSnapshot> {
        let p = self.shared.published.lock().clone();
        let file = p.snapshot.file();
        let header =
            self.with_history_index(p.revision, file, p.snapshot.located_header(), |index| {
                Ok(index.find_or_error(point, file.path())?.clone())
            })?;
        Ok(ReadSnapshot::new(
            self.shared.vbid,
            p.revision,
            Snapshot::new(file.clone(), header),
        ))
    }

    /// A snapshot at the newest header of the current file revision whose
    /// update seq is at or below `seqno` (a binary search over the indexed
    /// header chain); [`Error::NoHeaderAsOf`] when there is none.
    pub fn snapshot_as_of_seqno(&self, seqno: u64) -> Result<ReadSnapshot> {
        self.snapshot_as_of(AsOf::Seqno(seqno))
    }

    /// A snapshot at the newest header of the current file revision
    /// committed at or before `time` (a binary search over the indexed
    /// header chain, by the headers' timestamps); [`Error::NoHeaderAsOf`]
    /// when there is none. A new revision's first header, the empty one it
    /// was created with, has no commit time (its timestamp is 0): any time
    /// before the first commit finds it, so that the vbucket reads as empty
    /// then rather than as missing, the time of its creation being unknown.
    pub fn snapshot_as_of_time(&self, time: SystemTime) -> Result<ReadSnapshot> {
        self.snapshot_as_of(AsOf::Time(unix_nanos_of(time)))
    }

    /// Rolls the vbucket back to the newest header whose update seq is at
    /// or below `seqno` (what a replica does when its history diverged from
    /// the new active's). It:
    ///
    /// 1. aborts a running compaction (its `.compact` file is removed) and
    ///    keeps new ones out until it is done;
    /// 2. takes the commit lock, so the flusher waits;
    /// 3. chooses the header (a binary search over the file's history) and
    ///    appends it again as the newest header, with the file's layout
    ///    (couchstore's `couchstore_rewind_db_header` and a commit), synced:
    ///    one header append, nothing written before it, so a crash leaves
    ///    the vbucket before or after the rollback;
    /// 4. drops every unflushed mutation (all are above the header's update
    ///    seq), queued or in a batch the flusher holds;
    /// 5. resets the high seqno, the persisted seqno, the CAS clock and the
    ///    vbstate (state, failover table) to the header's. Waits for a seqno
    ///    above it end with an error ([`Error::is_rolled_back`]).
    ///
    /// Readers see the rolled-back state once it returns. Returns
    /// [`RollbackTo::Zero`], having changed nothing, when no header can
    /// serve (see there). Fails with [`Error::Closed`] once the vbucket is
    /// closed.
    pub fn rollback(&self, seqno: u64) -> Result<RollbackTo> {
        let shared = &*self.shared;
        let _span = tracing::info_span!("rollback", vbid = shared.vbid, seqno).entered();
        let _no_compaction = self.exclude_compaction()?;
        let mut writer = shared.writer.lock();
        // Closing sets the flag, then waits for the commit lock and for the
        // compaction slot this holds: a closed vbucket is not rolled back.
        shared.check_open()?;
        writer.recover_if_needed(shared)?;
        let latest = writer.db.committed().clone();
        let file = writer.db.writer_mut().file().clone();
        let revision = writer.revision;
        let chosen = self.with_history_index(revision, &file, &latest, |index| {
            Ok(index.rollback_target(&latest, seqno).cloned())
        })?;
        let vbstate = match &chosen {
            Some(header) => {
                ReadSnapshot::new(shared.vbid, revision, Snapshot::new(file, header.clone()))
                    .vbstate()?
            }
            None => None,
        };
        let (Some(chosen), Some(vbstate)) = (chosen, vbstate) else {
            tracing::info!("rolled back to zero: nothing changed, the vbucket must be rebuilt");
            return Ok(RollbackTo::Zero);
        };
        let to = chosen.header.update_seq;
        let rewound = chosen.offset != latest.offset;
        if rewound {
            writer.db.rewind_to(&chosen.header)?;
            if let Err(e) = writer.commit() {
                // The header may have reached the file or not: reopen it
                // at its last valid header and see which.
                writer.db.rollback_pending();
                match writer.reopen(shared, to) {
                    Ok(h) if h.offset > latest.offset => {
                        tracing::warn!(error = %e, "the rollback's commit failed after its header was written");
                    }
                    Ok(_) => return Err(e),
                    Err(reopen) => {
                        tracing::warn!(error = %reopen, "cannot reopen after the rollback's failed commit");
                        return Err(e);
                    }
                }
            }
            shared.publish(&writer);
        }
        writer.vbstate = vbstate;
        let notice = {
            // Under the front lock: no mutation is accepted meanwhile.
            let mut front = shared.front.lock();
            let notice = self.queue.rollback(to);
            writer.epoch = notice.epoch();
            front.high_seqno = to;
            front.max_cas = writer.vbstate.max_cas;
            front.dirty.clear();
            notice
        };
        drop(writer);
        // The waiters' callbacks run without the vbucket's locks.
        notice.notify();
        tracing::info!(to, header = chosen.offset, rewound, "rolled back");
        Ok(RollbackTo::Seqno(to))
    }

    /// Calls `f` with every persisted document whose seqno is `since` or
    /// later, in seqno order (at the latest committed header).
    pub fn changes_since(
        &self,
        since: u64,
        f: &mut dyn FnMut(Document) -> ControlFlow<()>,
    ) -> Result<()> {
        self.snapshot().changes_since(since, f)
    }

    /// Waits until `seqno` is durable, for up to `timeout` (a timeout too
    /// large to represent, such as [`Duration::MAX`], waits as long as it
    /// takes); returns the persisted seqno. Fails if the vbucket is closed
    /// before, or if the commit of `seqno` failed in a way that retrying
    /// cannot fix (the mutation is then dropped, never persisted).
    pub fn wait_persisted(&self, seqno: u64, timeout: Duration) -> Result<u64> {
        Ok(self.queue.wait_persisted(seqno, timeout)?)
    }

    /// Calls `callback` once `seqno` is durable (see
    /// [`flusher::VbQueue::on_persisted`]), on the flusher thread. There,
    /// waiting for a seqno of this vbucket fails at once, and so do closing
    /// and deleting it (they would wait for that thread); a callback that
    /// drops the last handle on the store leaves its directory locked until
    /// that thread ends, after its last commit.
    pub fn on_persisted(
        &self,
        seqno: u64,
        callback: impl FnOnce(flusher::Result<u64>) + Send + 'static,
    ) {
        self.queue.on_persisted(seqno, callback);
    }

    /// The highest seqno accepted.
    pub fn high_seqno(&self) -> u64 {
        self.shared.front.lock().high_seqno
    }

    /// The highest seqno durable.
    pub fn persisted_seqno(&self) -> u64 {
        self.queue.persisted_seqno()
    }

    /// The latest committed header with its content (for compaction).
    pub(crate) fn latest_located_header(&self) -> (LocatedHeader, CommittedHeader) {
        let p = self.shared.published.lock();
        (p.snapshot.located_header().clone(), p.handoff())
    }

    /// The latest committed header: what the flusher publishes after every
    /// commit for compaction to catch up to.
    pub fn latest_header(&self) -> CommittedHeader {
        self.shared.published.lock().handoff()
    }

    /// Waits until a header newer than the `commits`-th is published, for up
    /// to `timeout` (a timeout too large to represent, such as
    /// [`Duration::MAX`], waits as long as it takes), or until the vbucket
    /// is closed; returns the latest header either way.
    pub fn wait_for_header(&self, commits: u64, timeout: Duration) -> CommittedHeader {
        let deadline = flusher::deadline_after(timeout);
        let mut p = self.shared.published.lock();
        // Closing notifies under the published lock, so the flag checked
        // here cannot be set between the check and the wait.
        while p.commits <= commits && !self.shared.is_closed() {
            if flusher::wait_until(&self.shared.header_committed, &mut p, deadline) {
                break;
            }
        }
        p.handoff()
    }

    /// The vbucket's state as persisted in `_local/vbstate`.
    pub fn vbstate(&self) -> VbState {
        self.shared.writer.lock().vbstate.clone()
    }

    /// Changes the vbucket's state and commits it durably at once. Fails
    /// with [`Error::Closed`] once the vbucket is closed (its file may have
    /// a new owner).
    pub fn set_state(&self, state: VbucketState) -> Result<()> {
        let shared = &*self.shared;
        let mut writer = shared.writer.lock();
        // Checked under the commit lock, which closing takes once after
        // setting the flag: a closed vbucket commits nothing more.
        shared.check_open()?;
        writer.recover_if_needed(shared)?;
        let mut vbstate = writer.vbstate.clone();
        vbstate.state = state;
        writer.commit_vbstate(vbstate)?;
        shared.publish(&writer);
        Ok(())
    }

    /// This vbucket's statistics.
    pub fn stats(&self) -> Result<VBucketStats> {
        let snapshot = self.snapshot();
        let counts = snapshot.inner().doc_counts()?;
        let (high_seqno, dirty_items) = {
            let f = self.shared.front.lock();
            (f.high_seqno, f.dirty.len() as u64)
        };
        let latencies = self.shared.commit_latency.lock();
        Ok(VBucketStats {
            vbid: self.shared.vbid,
            revision: snapshot.revision(),
            file_size: snapshot.inner().file().len()?,
            space_used: snapshot.inner().space_used()?,
            live_docs: counts.live,
            deleted_docs: counts.deleted,
            high_seqno,
            dirty_items,
            commits: self.latest_header().commits,
            flush: self.queue.stats(),
            commit_latency_during_compaction: latencies.during_compaction.clone(),
            commit_latency_otherwise: latencies.otherwise.clone(),
            node_cache: self
                .shared
                .options
                .node_cache
                .as_ref()
                .map(|cache| cache.stats()),
            compacted_size: self.shared.compacted_size.load(Ordering::Relaxed),
        })
    }
}
