//! A store: many vbuckets in one data directory, served by one pool of
//! flusher threads.

use crate::compaction::{CompactionOptions, CompactionReport};
use crate::error::{Error, Result};
use crate::files::{self, DamagedFiles};
use crate::vbucket::{CommitObserver, VBucket, VBucketStats, VbOptions, VbTarget};
use btree::{DbOptions, NodeConfig};
use couchfile::{CacheStats, ChunkCache, DirLock, Directory, OpenMode, OsDirectory, Writeback};
use flusher::{FlushStats, Flusher, FlusherConfig, LatencyHistogram, Vbid};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// When the store compacts vbuckets on its own.
#[derive(Debug, Clone)]
pub struct AutoCompaction {
    /// Compact a vbucket once this fraction of its file is garbage:
    /// `(file size - space used) / file size`.
    pub fragmentation_threshold: f64,
    /// Files smaller than this are left alone.
    pub min_file_size: u64,
    /// Most compactions running at a time.
    pub max_concurrent: usize,
    /// How often the vbuckets are checked.
    pub check_interval: Duration,
    /// How each compaction runs.
    pub options: CompactionOptions,
}

impl Default for AutoCompaction {
    fn default() -> Self {
        Self {
            fragmentation_threshold: 0.5,
            min_file_size: 1 << 20,
            max_concurrent: 1,
            check_interval: Duration::from_millis(250),
            options: CompactionOptions::default(),
        }
    }
}

/// Compactions the store ran on its own, newest last (at most
/// [`MAX_KEPT_REPORTS`] are kept).
pub type CompactionLog = Vec<(Vbid, std::result::Result<CompactionReport, String>)>;

/// How many automatic compaction outcomes the store keeps.
pub const MAX_KEPT_REPORTS: usize = 1024;

/// Where a vbucket id stands. An id with no entry is closed: it may have
/// files, and nothing has them open. The three transient states belong to
/// the one thread running that transition; every other lifecycle call on
/// the id waits until it ends. `docs/design.md` ("Vbucket lifecycle and
/// directory ownership") draws the transitions.
#[derive(Debug)]
enum Lifecycle {
    /// Its files are being opened (or created).
    Opening,
    /// Open: mutations are accepted and flushed.
    Open(VBucket),
    /// Refusing mutations; its queue is being flushed and a running
    /// compaction waited for.
    Closing,
    /// Being closed, then its files removed.
    Deleting,
}

/// The lifecycle of every vbucket id of a store: the one place that says
/// which ids are open, and that no two transitions of one id overlap.
#[derive(Debug, Default)]
struct VbucketTable {
    states: Mutex<BTreeMap<Vbid, Lifecycle>>,
    /// Signalled whenever a transition ends.
    changed: Condvar,
}

/// A transition of one vbucket id under way: the id's state is transient
/// until it ends. Dropping it without [`Transition::finish`] (an error or a
/// panic on the way) makes the id closed again, so that no id is left in a
/// state that everyone waits on.
struct Transition<'a> {
    table: &'a VbucketTable,
    vbid: Vbid,
    done: bool,
}

impl Transition<'_> {
    /// Ends the transition with the vbucket open (`Some`) or closed.
    fn finish(mut self, open: Option<VBucket>) {
        self.done = true;
        self.table.set(self.vbid, open);
    }
}

impl Drop for Transition<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.table.set(self.vbid, None);
        }
    }
}

impl VbucketTable {
    /// The open vbucket `vbid`.
    fn get(&self, vbid: Vbid) -> Option<VBucket> {
        match self.states.lock().get(&vbid) {
            Some(Lifecycle::Open(vb)) => Some(vb.clone()),
            _ => None,
        }
    }

    /// The open vbuckets, by id.
    fn open(&self) -> Vec<VBucket> {
        self.states
            .lock()
            .values()
            .filter_map(|state| match state {
                Lifecycle::Open(vb) => Some(vb.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits until no transition of `vbid` runs.
    fn wait_settled(&self, states: &mut MutexGuard<'_, BTreeMap<Vbid, Lifecycle>>, vbid: Vbid) {
        while matches!(
            states.get(&vbid),
            Some(Lifecycle::Opening | Lifecycle::Closing | Lifecycle::Deleting)
        ) {
            self.changed.wait(states);
        }
    }

    /// Once no transition of `vbid` runs: the open vbucket, or else (it is
    /// closed) the transition that now opens it.
    fn open_or_begin_opening(&self, vbid: Vbid) -> Result<VBucket, Transition<'_>> {
        let mut states = self.states.lock();
        self.wait_settled(&mut states, vbid);
        if let Some(Lifecycle::Open(vb)) = states.get(&vbid) {
            return Ok(vb.clone());
        }
        states.insert(vbid, Lifecycle::Opening);
        Err(self.transition(vbid))
    }

    /// Once no transition of `vbid` runs: moves it into `state` (closing or
    /// deleting) and returns the transition that now owns it, with the
    /// vbucket if it was open.
    fn begin(&self, vbid: Vbid, state: Lifecycle) -> (Transition<'_>, Option<VBucket>) {
        let mut states = self.states.lock();
        self.wait_settled(&mut states, vbid);
        let was_open = match states.insert(vbid, state) {
            Some(Lifecycle::Open(vb)) => Some(vb),
            _ => None,
        };
        (self.transition(vbid), was_open)
    }

    fn transition(&self, vbid: Vbid) -> Transition<'_> {
        Transition {
            table: self,
            vbid,
            done: false,
        }
    }

    fn set(&self, vbid: Vbid, open: Option<VBucket>) {
        let mut states = self.states.lock();
        match open {
            Some(vb) => states.insert(vbid, Lifecycle::Open(vb)),
            None => states.remove(&vbid),
        };
        drop(states);
        self.changed.notify_all();
    }
}

/// The automatic compaction thread and the outcomes it collected.
#[derive(Debug, Default)]
struct AutoState {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Outcomes {
    log: Mutex<VecDeque<(Vbid, std::result::Result<CompactionReport, String>)>>,
}

impl Outcomes {
    fn push(&self, vbid: Vbid, outcome: Result<CompactionReport>) {
        let mut log = self.log.lock();
        if log.len() >= MAX_KEPT_REPORTS {
            log.pop_front();
        }
        log.push_back((vbid, outcome.map_err(|e| e.to_string())));
    }
}

/// The share of a vbucket's file that a compaction would reclaim: what its
/// latest header does not use. When compactions keep history, what the
/// last compaction wrote (the latest header's data and the history it
/// kept) counts as used: only what was appended since is garbage, so a
/// file whose history alone is larger than its data is not compacted
/// again and again.
fn fragmentation(stats: &crate::VBucketStats, keeps_history: bool) -> f64 {
    if stats.file_size == 0 {
        return 0.0;
    }
    let used = if keeps_history {
        stats.space_used.max(stats.compacted_size)
    } else {
        stats.space_used
    };
    stats.file_size.saturating_sub(used) as f64 / stats.file_size as f64
}

/// The automatic compaction loop: checks the vbuckets' fragmentation every
/// interval, and as soon as a compaction ends, and starts compactions, at
/// most `max_concurrent` at a time.
fn auto_compaction_loop(
    config: AutoCompaction,
    vbuckets: Arc<VbucketTable>,
    outcomes: Arc<Outcomes>,
    stop: crossbeam_channel::Receiver<()>,
) {
    let mut running: HashMap<Vbid, JoinHandle<()>> = HashMap::new();
    let (finished_tx, finished) = crossbeam_channel::unbounded::<Vbid>();
    loop {
        // A message or a disconnected sender on `stop` means stop.
        crossbeam_channel::select! {
            recv(stop) -> _ => break,
            recv(finished) -> vbid => {
                // Its thread is about to return: join it now, so the slot
                // is free for the next compaction at once.
                if let Some(thread) = vbid.ok().and_then(|vbid| running.remove(&vbid)) {
                    let _ = thread.join();
                }
            }
            default(config.check_interval) => {}
        }
        running.retain(|_, t| !t.is_finished());
        let free = config.max_concurrent.max(1).saturating_sub(running.len());
        if free == 0 {
            continue;
        }
        let candidates: Vec<VBucket> = vbuckets
            .open()
            .into_iter()
            .filter(|vb| !running.contains_key(&vb.vbid()))
            .collect();
        let keeps_history = config.options.history.is_some();
        let mut due: Vec<(f64, VBucket)> = candidates
            .into_iter()
            .filter_map(|vb| {
                let stats = vb.stats().ok()?;
                if stats.file_size < config.min_file_size || stats.file_size == 0 {
                    return None;
                }
                let fragmentation = fragmentation(&stats, keeps_history);
                (fragmentation >= config.fragmentation_threshold).then_some((fragmentation, vb))
            })
            .collect();
        due.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (fragmentation, vb) in due.into_iter().take(free) {
            let vbid = vb.vbid();
            tracing::info!(vbid, fragmentation, "starting an automatic compaction");
            let options = config.options.clone();
            let outcomes = Arc::clone(&outcomes);
            let finished = finished_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("compact-{vbid}"))
                .spawn(move || {
                    outcomes.push(vbid, vb.compact(&options));
                    // The loop may have stopped: nobody to tell, fine.
                    let _ = finished.send(vbid);
                });
            match spawned {
                Ok(thread) => {
                    running.insert(vbid, thread);
                }
                Err(e) => tracing::error!(vbid, error = %e, "cannot start a compaction thread"),
            }
        }
    }
    for (_, thread) in running {
        let _ = thread.join();
    }
}

/// The default of [`StoreConfig::background_sync_bytes`]: 256 KiB.
pub const DEFAULT_BACKGROUND_SYNC_BYTES: u64 = 256 * 1024;

/// The default of [`StoreConfig::node_cache_bytes`]: 32 MiB.
pub const DEFAULT_NODE_CACHE_BYTES: u64 = 32 << 20;

/// How a [`Store`] runs.
#[derive(Clone)]
pub struct StoreConfig {
    /// Flusher threads, batching, queue bounds and retries.
    pub flusher: FlusherConfig,
    /// Store bodies snappy-compressed.
    pub compress_bodies: bool,
    /// B-tree node sizes of the files written.
    pub nodes: NodeConfig,
    /// How to treat a corrupt last header when opening a vbucket
    /// ([`OpenMode::Recovery`] falls back to an older header).
    pub open_mode: OpenMode,
    /// Automatic compaction (`None`: only when asked, [`VBucket::compact`]).
    pub auto_compaction: Option<AutoCompaction>,
    /// Told of every flush-batch commit of every vbucket (metrics, charts).
    pub on_commit: Option<CommitObserver>,
    /// Bytes of decoded B-tree nodes kept in memory, shared by all the
    /// vbuckets' files; 0 turns the cache off. The default,
    /// [`DEFAULT_NODE_CACHE_BYTES`] (32 MiB), is what RocksDB's block cache
    /// and fjall's cache default to; it holds the by-id tree of about a
    /// million small documents. With a cache, a node is read from disk,
    /// checked, decompressed and indexed once rather than on each use, and
    /// a lookup searches it in place; the nodes a commit writes go in as
    /// they are written, and the ones it replaces go out. Nodes are cached
    /// per open file, so nothing is served for another file or revision.
    /// What it holds and how it served is in [`StoreStats::node_cache`] and
    /// [`VBucketStats::node_cache`].
    pub node_cache_bytes: u64,
    /// Whether the vbuckets' files are read in place through a read-only
    /// memory map (`true`, the default) or only with `pread`. A map saves a
    /// system call and a copy on every read; the price is that a disk
    /// failing to read a page kills the process (`SIGBUS`) instead of
    /// failing the read with an I/O error. Turn it off on media whose read
    /// errors the store should report and survive.
    pub mapped_reads: bool,
    /// A commit that has appended this many bytes has a background thread
    /// start syncing them while it goes on writing its trees, so that its
    /// own sync has less left to wait for; 0 turns this off. The default,
    /// [`DEFAULT_BACKGROUND_SYNC_BYTES`] (256 KiB), leaves small commits
    /// alone (an early sync would only add a device flush to theirs). The
    /// commit's own syncs are unchanged, and a failed background sync fails
    /// the commit. The threads, one per flusher thread, are the store's.
    pub background_sync_bytes: u64,
    /// What opening a vbucket does with a damaged revision file (one with
    /// no valid header that no crash can leave, or corrupt bytes where its
    /// last header is looked for): fail, keeping every file (the default),
    /// or move it aside and open without it.
    pub damaged_files: DamagedFiles,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("flusher", &self.flusher)
            .field("compress_bodies", &self.compress_bodies)
            .field("nodes", &self.nodes)
            .field("open_mode", &self.open_mode)
            .field("auto_compaction", &self.auto_compaction)
            .field("on_commit", &self.on_commit.as_ref().map(|_| "Fn"))
            .field("node_cache_bytes", &self.node_cache_bytes)
            .field("mapped_reads", &self.mapped_reads)
            .field("background_sync_bytes", &self.background_sync_bytes)
            .field("damaged_files", &self.damaged_files)
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            flusher: FlusherConfig::default(),
            compress_bodies: true,
            nodes: NodeConfig::default(),
            open_mode: OpenMode::Normal,
            auto_compaction: None,
            on_commit: None,
            node_cache_bytes: DEFAULT_NODE_CACHE_BYTES,
            mapped_reads: true,
            background_sync_bytes: DEFAULT_BACKGROUND_SYNC_BYTES,
            damaged_files: DamagedFiles::Fail,
        }
    }
}

impl StoreConfig {
    /// Checks every value that must be in range for the store to work, so
    /// that a bad one fails [`Store::open`] with [`Error::InvalidConfig`]
    /// instead of a hang or a panic later.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        if let Err(e) = self.flusher.validate() {
            return invalid("flusher", e.to_string());
        }
        if let Err(e) = self.nodes.validate() {
            return invalid("nodes", e.to_string());
        }
        if let Some(auto) = &self.auto_compaction {
            if !(auto.fragmentation_threshold > 0.0 && auto.fragmentation_threshold <= 1.0) {
                return invalid(
                    "auto_compaction.fragmentation_threshold",
                    format!("{} is not in (0, 1]", auto.fragmentation_threshold),
                );
            }
            if auto.check_interval.is_zero() {
                return invalid(
                    "auto_compaction.check_interval",
                    "must be above zero".into(),
                );
            }
        }
        Ok(())
    }
}

/// Statistics of a store: per vbucket and in total.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// One entry per open vbucket, by id.
    pub vbuckets: Vec<VBucketStats>,
    /// The sums (seqnos: maxima; flush statistics merged).
    pub total: StoreTotals,
    /// The node cache the vbuckets share: capacity, bytes, hits, misses
    /// and evictions (`None` when the store runs without one).
    pub node_cache: Option<CacheStats>,
}

/// Totals over a store's vbuckets.
#[derive(Debug, Clone, Default)]
pub struct StoreTotals {
    /// Sum of file sizes.
    pub file_size: u64,
    /// Sum of the space the latest headers use.
    pub space_used: u64,
    /// Live documents.
    pub live_docs: u64,
    /// Deletions.
    pub deleted_docs: u64,
    /// Mutations not yet persisted.
    pub dirty_items: u64,
    /// Headers committed.
    pub commits: u64,
    /// The flusher's statistics, merged.
    pub flush: FlushStats,
    /// Flush-batch commit latency while a compaction ran, merged.
    pub commit_latency_during_compaction: LatencyHistogram,
    /// Flush-batch commit latency otherwise, merged.
    pub commit_latency_otherwise: LatencyHistogram,
}

/// Many vbuckets in one directory, each in its own `<vbid>.couch.<rev>`
/// file, flushed by a shared pool of flusher threads. Dropping the store
/// flushes what is queued; [`Store::close`] does too and reports failures.
#[derive(Debug)]
pub struct Store {
    dir: Arc<dyn Directory>,
    config: StoreConfig,
    /// The node cache every vbucket's files share (`None` when configured
    /// to 0 bytes).
    node_cache: Option<Arc<ChunkCache>>,
    /// The background syncs of the vbuckets' writers, if on.
    writeback: Option<Writeback>,
    vbuckets: Arc<VbucketTable>,
    auto: Mutex<AutoState>,
    outcomes: Arc<Outcomes>,
    // Declared after the vbucket handles: dropped after them.
    flusher: Flusher<VbTarget>,
    /// The data directory's exclusive lock, taken before anything else and
    /// released last, once the flusher threads have stopped (by a store
    /// dropped on its own flusher thread, once that thread ends).
    dir_lock: Option<DirLock>,
}

impl Store {
    /// Opens the store in the directory `path` (created if missing) and
    /// every vbucket that has files there. The store owns the directory
    /// until it is closed or dropped: while it is open, another open of
    /// the directory, in this process or another, fails with
    /// [`Error::DirectoryLocked`] (see [`Directory::lock`]; the lock file
    /// is [`couchfile::LOCK_FILE_NAME`]).
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        let path = path.as_ref();
        let dir = OsDirectory::new(path)
            .map_err(|e| Error::io(path, "open directory", e))?
            .with_mapped_reads(config.mapped_reads);
        Self::open_in(Arc::new(dir), config)
    }

    /// Opens the store on any [`Directory`] (an in-memory, fault-injecting
    /// one in tests) and every vbucket that has files there, once it holds
    /// the directory's lock ([`Error::DirectoryLocked`] if another store
    /// has it).
    pub fn open_in(dir: Arc<dyn Directory>, config: StoreConfig) -> Result<Self> {
        let _span = tracing::info_span!("open_store", dir = %dir.path().display()).entered();
        config.validate()?;
        // Before any file is read or removed.
        let dir_lock = dir.lock().map_err(Error::from_lock)?;
        let store = Self {
            dir_lock: Some(dir_lock),
            flusher: Flusher::new(config.flusher.clone())?,
            node_cache: (config.node_cache_bytes > 0)
                .then(|| Arc::new(ChunkCache::new(config.node_cache_bytes))),
            writeback: match config.background_sync_bytes {
                0 => None,
                bytes => Some(
                    Writeback::new(config.flusher.threads, bytes)
                        .map_err(|e| Error::io(dir.path(), "start the writeback threads", e))?,
                ),
            },
            dir,
            config,
            vbuckets: Arc::new(VbucketTable::default()),
            auto: Mutex::new(AutoState::default()),
            outcomes: Arc::new(Outcomes::default()),
        };
        for vbid in files::vbids_in(&*store.dir)? {
            store.open_vbucket(vbid)?;
        }
        if let Some(auto) = store.config.auto_compaction.clone() {
            let (stop, stop_rx) = crossbeam_channel::bounded(1);
            let vbuckets = Arc::clone(&store.vbuckets);
            let outcomes = Arc::clone(&store.outcomes);
            let thread = std::thread::Builder::new()
                .name("auto-compaction".into())
                .spawn(move || auto_compaction_loop(auto, vbuckets, outcomes, stop_rx))
                .map_err(|e| Error::io(store.dir.path(), "start the auto-compaction thread", e))?;
            *store.auto.lock() = AutoState {
                stop: Some(stop),
                thread: Some(thread),
            };
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.dir
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The node cache the vbuckets' files share (`None` when configured to
    /// 0 bytes), for its size and hit counts.
    pub fn node_cache(&self) -> Option<&Arc<ChunkCache>> {
        self.node_cache.as_ref()
    }

    fn vb_options(&self) -> VbOptions {
        VbOptions {
            db: DbOptions {
                mode: self.config.open_mode,
                nodes: self.config.nodes,
                ..DbOptions::default()
            },
            node_cache: self.node_cache.clone(),
            writeback: self.writeback.clone(),
            compress_bodies: self.config.compress_bodies,
            write_timeout: self.config.flusher.backpressure_timeout,
            damaged_files: self.config.damaged_files,
        }
    }

    /// Vbucket `vbid`, opened from its newest complete revision, or created
    /// at revision 1 when it has no file yet. Returns the open one if it is
    /// open already. If the id is being opened, closed or deleted by another
    /// thread, waits for that to end first.
    pub fn open_vbucket(&self, vbid: Vbid) -> Result<VBucket> {
        let transition = match self.vbuckets.open_or_begin_opening(vbid) {
            Ok(vb) => return Ok(vb),
            Err(transition) => transition,
        };
        let vb = VBucket::open(
            Arc::clone(&self.dir),
            vbid,
            self.vb_options(),
            self.config.on_commit.clone(),
            &self.flusher,
        )?;
        transition.finish(Some(vb.clone()));
        Ok(vb)
    }

    /// The open vbucket `vbid`.
    pub fn vbucket(&self, vbid: Vbid) -> Result<VBucket> {
        self.vbuckets.get(vbid).ok_or(Error::NoSuchVbucket(vbid))
    }

    /// The ids of the open vbuckets, ascending.
    pub fn vbuckets(&self) -> Vec<Vbid> {
        self.vbuckets.open().iter().map(VBucket::vbid).collect()
    }

    /// Closes vbucket `vbid`: further mutations, commits and compactions
    /// through any of its handles are refused, what is queued is flushed,
    /// a running compaction is cancelled and waited for, and its flusher
    /// queue is removed. Handles still held read what it committed. If the id is
    /// being opened, closed or deleted by another thread, waits for that to
    /// end first.
    pub fn close_vbucket(&self, vbid: Vbid) -> Result<()> {
        self.refuse_on_flusher_thread(&[vbid])?;
        match self.vbuckets.begin(vbid, Lifecycle::Closing) {
            (transition, Some(vb)) => {
                let closed = self.shut_down_one(vb);
                transition.finish(None);
                closed
            }
            (_, None) => Err(Error::NoSuchVbucket(vbid)),
        }
    }

    /// Closes vbucket `vbid` if it is open, and removes its files (also when
    /// it was not open). If the id is being opened, closed or deleted by
    /// another thread, waits for that to end first. Mutations it could not
    /// flush are gone with it.
    pub fn delete_vbucket(&self, vbid: Vbid) -> Result<()> {
        self.refuse_on_flusher_thread(&[vbid])?;
        let (transition, was_open) = self.vbuckets.begin(vbid, Lifecycle::Deleting);
        if let Some(vb) = was_open {
            match self.shut_down_one(vb) {
                Ok(()) | Err(Error::Unflushed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let names = self
            .dir
            .list()
            .map_err(|e| Error::io(self.dir.path(), "list", e))?;
        for name in names {
            if files::parse_name(&name).is_some_and(|(v, _)| v == vbid) {
                match self.dir.remove(&name) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io(self.dir.path().join(&name), "remove", e));
                    }
                    _ => {}
                }
            }
        }
        self.dir
            .sync()
            .map_err(|e| Error::io(self.dir.path(), "sync directory", e))?;
        transition.finish(None);
        Ok(())
    }

    /// Fails, changing nothing, on the flusher thread that serves one of
    /// `vbids` (in a persistence callback): closing it would wait for that
    /// thread, so for ever.
    fn refuse_on_flusher_thread(&self, vbids: &[Vbid]) -> Result<()> {
        match vbids
            .iter()
            .find(|&&vbid| self.flusher.serves_on_this_thread(vbid))
        {
            Some(&vbid) => Err(flusher::Error::RemoveOnFlusherThread(vbid).into()),
            None => Ok(()),
        }
    }

    /// [`Store::shut_down`] of one vbucket.
    fn shut_down_one(&self, vb: VBucket) -> Result<()> {
        self.shut_down(&[vb]).pop().map_or(Ok(()), |(_, r)| r)
    }

    /// Closes the vbuckets `vbs` (already taken out of the open state):
    /// refuses their mutations, commits and compactions, flushes their
    /// queues with one deadline for all, waits for their compactions to
    /// end and for any commit still holding a commit lock. Returns each
    /// one's outcome.
    fn shut_down(&self, vbs: &[VBucket]) -> Vec<(Vbid, Result<()>)> {
        for vb in vbs {
            vb.close_front();
        }
        let vbids: Vec<Vbid> = vbs.iter().map(VBucket::vbid).collect();
        let removed = self.flusher.remove_all(&vbids);
        vbs.iter()
            .zip(removed)
            .map(|(vb, (vbid, removed))| {
                // Cancelled above; once it has ended nothing renames or
                // removes the vbucket's files any more.
                vb.wait_for_compaction_end();
                // A set_state that passed its closed check before the flag
                // was set commits under the lock: let it finish.
                drop(vb.shared().writer.lock());
                let outcome = match removed {
                    Ok(r) if r.unflushed_items > 0 => Err(Error::Unflushed {
                        vbid,
                        items: r.unflushed_items,
                    }),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                (vbid, outcome)
            })
            .collect()
    }

    /// Statistics of every open vbucket and their totals.
    pub fn stats(&self) -> Result<StoreStats> {
        let vbuckets = self.vbuckets.open();
        let mut stats = StoreStats::default();
        for vb in vbuckets {
            let s = vb.stats()?;
            let t = &mut stats.total;
            t.file_size += s.file_size;
            t.space_used += s.space_used;
            t.live_docs += s.live_docs;
            t.deleted_docs += s.deleted_docs;
            t.dirty_items += s.dirty_items;
            t.commits += s.commits;
            t.flush.merge(&s.flush);
            t.commit_latency_during_compaction
                .merge(&s.commit_latency_during_compaction);
            t.commit_latency_otherwise
                .merge(&s.commit_latency_otherwise);
            stats.vbuckets.push(s);
        }
        stats.node_cache = self.node_cache.as_ref().map(|cache| cache.stats());
        Ok(stats)
    }

    /// The outcomes of the automatic compactions so far (and forgets them).
    pub fn take_compaction_log(&self) -> CompactionLog {
        self.outcomes.log.lock().drain(..).collect()
    }

    /// Stops starting automatic compactions (those running go on).
    fn stop_auto_compaction(&self) -> Option<JoinHandle<()>> {
        let mut auto = self.auto.lock();
        auto.stop.take();
        auto.thread.take()
    }

    /// Closes every vbucket, all together, as [`Store::close_vbucket`] does
    /// one (the flusher's close timeout is one deadline for all of them),
    /// and stops automatic compaction. Returns the first error.
    fn close_all(&self) -> Result<()> {
        self.refuse_on_flusher_thread(&self.vbuckets())?;
        let mut transitions = Vec::new();
        let mut vbs = Vec::new();
        for vbid in self.vbuckets() {
            let (transition, was_open) = self.vbuckets.begin(vbid, Lifecycle::Closing);
            if let Some(vb) = was_open {
                transitions.push(transition);
                vbs.push(vb);
            }
        }
        // Closing the vbuckets cancels the compactions the loop runs, so
        // joining it does not wait for a whole copy.
        let auto = self.stop_auto_compaction();
        let outcomes = self.shut_down(&vbs);
        if let Some(thread) = auto {
            let _ = thread.join();
        }
        for transition in transitions {
            transition.finish(None);
        }
        let mut first_error = None;
        for (vbid, outcome) in outcomes {
            if let Err(e) = outcome {
                tracing::error!(vbid, error = %e, "closing a vbucket failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Closes every vbucket (flushing their queues; a running compaction
    /// is cancelled) and the flusher threads. Returns the first error; every
    /// vbucket is closed regardless, and the handles still held refuse
    /// to write.
    pub fn close(self) -> Result<()> {
        self.close_all()
        // Drop finds nothing left to close.
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // As close, reporting failures only in the log: handles that outlive
        // the store must not write into files a new owner may open.
        let _ = self.close_all();
        // Dropped by a persistence callback holding the last handle: the
        // flusher thread it runs on cannot be waited for here, and may
        // still commit after this returns. That thread keeps the
        // directory's lock until it ends, so that no other store opens the
        // directory meanwhile.
        if let Some(lock) = self.dir_lock.take() {
            match self.flusher.keep_until_own_thread_ends(lock) {
                Ok(()) => tracing::warn!(
                    dir = %self.dir.path().display(),
                    "store dropped on its own flusher thread: its directory stays locked until that thread ends"
                ),
                // Not on a flusher thread: released once the flusher's
                // threads are joined (the fields' order).
                Err(lock) => self.dir_lock = Some(lock),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fragmentation;
    use crate::VBucketStats;

    #[test]
    fn with_history_what_the_last_compaction_wrote_is_not_garbage() {
        let stats = VBucketStats {
            file_size: 1000,
            space_used: 200,
            compacted_size: 700,
            ..VBucketStats::default()
        };
        assert!((fragmentation(&stats, false) - 0.8).abs() < 1e-9);
        assert!((fragmentation(&stats, true) - 0.3).abs() < 1e-9);
        let fresh = VBucketStats {
            compacted_size: 1000,
            ..stats
        };
        assert_eq!(fragmentation(&fresh, true), 0.0);
        assert_eq!(fragmentation(&VBucketStats::default(), true), 0.0);
    }
}
