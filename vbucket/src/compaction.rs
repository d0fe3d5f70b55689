//! Compaction of a vbucket while its flusher keeps committing (design.md):
//! copy a snapshot at header H0 without the lock, catch up from the headers
//! the flusher publishes in unlocked rounds until the gap fits the lock-time
//! budget, then take the commit lock between two commits, replay what is
//! left (usually nothing: the unlocked rounds commit, and the last one runs
//! just before the lock is taken), rename the `.compact` file to the next
//! revision and switch to it.

use crate::error::{Error, Result};
use crate::files::{self, compact_name, revision_name};
use crate::history::{self, History};
use crate::vbucket::VBucket;
use btree::Db;
use compactor::{copy_snapshot, CompactionConfig, Control, CopyStats, Hooks, NoHooks};
use couchfile::{CouchFile, CrcKind, Directory, FileWriter, LocatedHeader};
use parking_lot::MutexGuard;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the flusher and a compaction share the vbucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompactionMode {
    /// The flusher keeps committing; it waits only for the final round.
    #[default]
    Concurrent,
    /// The old behaviour, for comparison: the commit lock is held for the
    /// whole compaction.
    Blocking,
}

/// Points in a compaction where a test hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionPhase {
    /// The snapshot at H0 is copied (no lock held).
    Copied,
    /// Unlocked catch-up round `n` (from 1) is done.
    RoundDone(usize),
    /// The unlocked rounds are over; the lock is about to be taken.
    BeforeFinalRound,
    /// The lock is held; the final round is about to run. A hook must not
    /// wait for a flush here: the flusher is blocked.
    FinalRoundLocked,
}

/// A callback run at each [`CompactionPhase`] (tests use it to flush
/// between and inside rounds).
pub type CompactionHook = Arc<dyn Fn(CompactionPhase) + Send + Sync>;

/// How many times the final round tries to slip in between two commits
/// before it waits for the lock like any other user. A flusher with pauses
/// lets it in at the first or second try (the bench's default workload: at
/// most one replay while waiting, in 228 compactions); one that commits
/// back to back never does, and each try costs a replay of a commit.
/// Measured with `bench peers` (a flusher committing 1,000 documents at a
/// time without a pause), 16 tries took 0.38 to 0.45 s of a 1.6 to 1.9 s
/// compaction and still ended waiting for the lock; 4 take 0.07 to 0.10 s,
/// with the lock held as long (13 to 30 ms either way; 2026-12-03, commit
/// d459eed; docs/performance.md has the history).
const MAX_LOCK_ATTEMPTS: usize = 4;

/// How long it waits for an in-flight commit to land between attempts.
const LOCK_RETRY_WAIT: Duration = Duration::from_millis(50);

/// How many bytes a node takes in the node cache for each byte it takes in
/// the file, about: decompressed, plus its entry index.
const CACHED_BYTES_PER_NODE_BYTE: u64 = 2;

/// Whether a compaction of a file at `header` puts the nodes it writes in
/// the node cache: only when its trees would take at most a quarter of the
/// cache. A small vbucket's new revision is then cached as it is written,
/// so its readers and its flusher find it warm after the switch; a large
/// one passes through, instead of pushing out what they use meanwhile
/// (PostgreSQL's large sequential scans use a small ring of buffers for the
/// same reason). Measured (2026-12-06): filling always, a 200,000-document
/// compaction in `bench peers` cost the flusher's concurrent commits 1,000
/// to 5,000 cache misses each and took 15-25% longer; never filling, the
/// workload runner's hit rate fell from 93.4% to 87.3% (its small vbuckets
/// were read cold after each switch).
fn warms_cache(header: &couchfile::DbHeader, cache: Option<&couchfile::ChunkCache>) -> bool {
    let Some(cache) = cache else {
        return false;
    };
    let tree_bytes: u64 = [&header.by_id_root, &header.by_seq_root]
        .into_iter()
        .flatten()
        .map(|root| root.subtree_size)
        .sum();
    tree_bytes.saturating_mul(CACHED_BYTES_PER_NODE_BYTE) <= cache.capacity() / 4
}

/// How a vbucket compaction runs.
#[derive(Clone)]
pub struct CompactionOptions {
    /// The copy and replay settings (purge policy, throttle, syncs, sort
    /// budget). Its `upgrade` is on by default, as kv_engine always passes
    /// couchstore's upgrade flag: the new revision is written at disk
    /// version 14 whatever the old one's. It syncs every
    /// [`DEFAULT_COMPACTION_SYNC_EVERY_BYTES`] by default, so that the
    /// flusher's commits never queue behind much of it, and its replays
    /// run on its own thread until the final round
    /// ([`CompactionConfig::parallel_replays`] off), as does its id sort
    /// ([`CompactionConfig::parallel_sort`] off).
    pub compactor: CompactionConfig,
    /// Concurrent (default) or blocking.
    pub mode: CompactionMode,
    /// Most unlocked catch-up rounds before the final one. The rounds stop
    /// sooner when one would replay as many documents as the round before
    /// it did (the writes outpace the replay, so more rounds would not
    /// shrink the gap).
    pub max_rounds: usize,
    /// The unlocked rounds stop once the remaining gap is estimated (from
    /// the rate of the last round) to replay within this time; the first
    /// round runs whenever there is a gap, to measure that rate.
    pub lock_budget: Duration,
    /// History to keep (`None`: only the latest header, as couchstore's
    /// compaction). With it, the new file keeps one header per
    /// [`History::granularity`] for the last [`History::max_age`], each
    /// listing what the source header it stands for lists, and the
    /// catch-up rounds keep the flusher's headers at the same granularity.
    /// Nothing a kept header sees is purged (the purge policy and the hooks
    /// apply only when no header is inside the window).
    pub history: Option<History>,
    /// Test hook.
    pub hook: Option<CompactionHook>,
}

/// How often a vbucket's compaction syncs its new file by default
/// ([`compactor::CompactionConfig::sync_every_bytes`]): every 4 MiB, where
/// the compactor alone syncs every 64 MiB. A sync makes the disk write
/// everything queued before it, so a flusher commit whose sync lands behind
/// a compaction's waits for the compaction's bytes too: with 64 MiB the
/// slowest commit while compacting took 122-147 ms in bench peers, with
/// 4 MiB 47-63 ms against a commit p99 of 20-25 ms, the compaction taking
/// as long (2026-12-06).
pub const DEFAULT_COMPACTION_SYNC_EVERY_BYTES: u64 = 4 << 20;

impl Default for CompactionOptions {
    fn default() -> Self {
        Self {
            compactor: CompactionConfig {
                sync_every_bytes: DEFAULT_COMPACTION_SYNC_EVERY_BYTES,
                // Until the lock is taken the flusher keeps committing: the
                // replays stay on the compaction's thread, leaving the
                // modify pool's threads to the flusher's commits (a
                // catch-up round of thousands of documents on them held a
                // commit up for the round's length). The locked round
                // replays on both.
                parallel_replays: false,
                // Nor does the copy sort its ids on both cores.
                parallel_sort: false,
                ..CompactionConfig::default()
            },
            mode: CompactionMode::Concurrent,
            max_rounds: 10,
            lock_budget: Duration::from_millis(2),
            history: None,
            hook: None,
        }
    }
}

impl fmt::Debug for CompactionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompactionOptions")
            .field("compactor", &self.compactor)
            .field("mode", &self.mode)
            .field("max_rounds", &self.max_rounds)
            .field("lock_budget", &self.lock_budget)
            .field("history", &self.history)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

/// One catch-up round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundStats {
    /// Documents replayed.
    pub docs: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// How long it took.
    pub duration: Duration,
    /// True for the final round, run under the lock.
    pub locked: bool,
}

/// What a compaction did.
#[derive(Debug, Clone)]
pub struct CompactionReport {
    /// When it started.
    pub started: Instant,
    /// The revision compacted.
    pub revision_before: u64,
    /// The revision written.
    pub revision_after: u64,
    /// The copy of the snapshot at H0.
    pub copy: CopyStats,
    /// The catch-up rounds, the final (locked) one last.
    pub rounds: Vec<RoundStats>,
    /// Unlocked replays (each committed) run while taking the lock: of the
    /// small gap the unlocked rounds left, and of the commits that landed
    /// meanwhile. The lock is taken between two commits, once the new file
    /// has caught up with the latest.
    pub rounds_waiting_for_commit: Vec<RoundStats>,
    /// How long the commit lock was held.
    pub lock_held: Duration,
    /// How long the flusher waited for the lock during the compaction.
    pub flusher_waited: Duration,
    /// Total duration.
    pub duration: Duration,
    /// File size before.
    pub size_before: u64,
    /// File size after.
    pub size_after: u64,
    /// Purge seq of the new file.
    pub purge_seq: u64,
    /// Headers of the source kept in the new file by
    /// [`CompactionOptions::history`] (the copy's and one per header
    /// replayed from the oldest kept up to the latest, catch-up rounds
    /// included); 0 without history.
    pub history_headers: u64,
    /// Bytes the history cost: written by the replays from the oldest
    /// header kept up to the one the compaction started from (what a
    /// compaction without history would not have written).
    pub history_bytes: u64,
}

/// Removes the `.compact` file unless the compaction got as far as renaming it.
struct CompactFile<'a> {
    dir: &'a dyn Directory,
    name: String,
    armed: bool,
}

impl Drop for CompactFile<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.dir.remove(&self.name) {
                tracing::warn!(file = %self.name, error = %e, "cannot remove an aborted compaction's file");
            }
        }
    }
}

/// Holds a vbucket's compaction slot, for a compaction that runs or for
/// [`VBucket::exclude_compaction`]; frees it when dropped, also when a
/// panic unwinds through its holder, so that closing the vbucket (which
/// waits for the slot) never waits forever.
pub(crate) struct CompactionSlot<'a> {
    vb: &'a VBucket,
}

impl Drop for CompactionSlot<'_> {
    fn drop(&mut self) {
        let shared = self.vb.shared();
        *shared.compaction.lock() = None;
        shared.compaction_ended.notify_all();
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn per_doc(duration: Duration, docs: u64) -> Duration {
    duration / u32::try_from(docs.max(1)).unwrap_or(u32::MAX)
}

impl VBucket {
    /// Compacts the vbucket into its next file revision (see the module
    /// documentation), keeping everything.
    pub fn compact(&self, options: &CompactionOptions) -> Result<CompactionReport> {
        self.compact_with_hooks(options, &mut NoHooks)
    }

    /// Compacts with `hooks` deciding about expired and filtered documents.
    pub fn compact_with_hooks(
        &self,
        options: &CompactionOptions,
        hooks: &mut dyn Hooks,
    ) -> Result<CompactionReport> {
        let shared = self.shared();
        let control = Control::new();
        {
            let mut running = shared.compaction.lock();
            // Checked under the compaction lock: closing sets the flag, then
            // takes this lock to cancel what runs and waits for it to end,
            // so no compaction of a closed vbucket starts after that.
            shared.check_open()?;
            if running.is_some() {
                return Err(Error::CompactionRunning(shared.vbid));
            }
            *running = Some(control.clone());
        }
        let slot = CompactionSlot { vb: self };
        let _span = tracing::info_span!("compaction", vbid = shared.vbid).entered();
        let result = match self.run_compaction(options, hooks, &control) {
            Err(Error::Compaction(compactor::Error::Cancelled)) => {
                Err(Error::CompactionAborted(shared.vbid))
            }
            other => other,
        };
        drop(slot);
        match &result {
            Ok(r) => tracing::info!(
                rounds = r.rounds.len(),
                lock_us = r.lock_held.as_micros() as u64,
                before = r.size_before,
                after = r.size_after,
                "compacted"
            ),
            Err(e) => tracing::warn!(error = %e, "compaction failed"),
        }
        result
    }

    /// Aborts a running compaction (its `.compact` file is removed before
    /// it ends), waits for it to end, and keeps the compaction slot until
    /// the returned guard is dropped: meanwhile [`VBucket::compact`] fails
    /// with [`Error::CompactionRunning`]. Closing the vbucket waits for the
    /// guard as for a compaction. Fails with [`Error::Closed`] once the
    /// vbucket is closed.
    pub(crate) fn exclude_compaction(&self) -> Result<CompactionSlot<'_>> {
        let shared = self.shared();
        let mut running = shared.compaction.lock();
        loop {
            shared.check_open()?;
            match running.as_ref() {
                Some(control) => {
                    tracing::info!("aborting the running compaction");
                    control.cancel();
                    shared.compaction_ended.wait(&mut running);
                }
                None => break,
            }
        }
        *running = Some(Control::new());
        Ok(CompactionSlot { vb: self })
    }

    /// The control of the running compaction, to cancel it or watch it.
    pub fn compaction_control(&self) -> Option<Control> {
        self.shared().compaction.lock().clone()
    }

    fn check_running(&self, control: &Control) -> Result<()> {
        if self.is_closed() || control.is_cancelled() {
            return Err(Error::CompactionAborted(self.vbid()));
        }
        Ok(())
    }

    fn run_compaction(
        &self,
        options: &CompactionOptions,
        hooks: &mut dyn Hooks,
        control: &Control,
    ) -> Result<CompactionReport> {
        let start = Instant::now();
        let shared = self.shared();
        let vbid = shared.vbid;
        let dir = &*shared.dir;
        let hook = |phase| {
            if let Some(h) = &options.hook {
                h(phase);
            }
        };
        let waited_before = shared.flusher_lock_wait_nanos.load(Ordering::Relaxed);
        let mut held = match options.mode {
            CompactionMode::Blocking => Some(shared.writer.lock()),
            CompactionMode::Concurrent => None,
        };
        let lock_start = Instant::now();
        // H0: the latest commit, noted under the lock.
        let (source, revision) = match &held {
            Some(w) => (w.db.snapshot(), w.revision),
            None => {
                let w = shared.writer.lock();
                (w.db.snapshot(), w.revision)
            }
        };
        // The compaction reads the whole source once: through the node
        // cache without filling it, so that the flusher's and the readers'
        // nodes stay cached meanwhile (the new file's are filled or not as
        // `warms_cache` says).
        let source = btree::Snapshot::new(
            source.file().with_cache_fill(false),
            source.located_header().clone(),
        );
        let size_before = source.file().len()?;
        // The history kept: the window fixed now, the headers from the
        // vbucket's index of the file.
        let history = options.history.map(|h| History {
            now: Some(h.now.unwrap_or_else(unix_nanos)),
            ..h
        });
        let plan = match &history {
            Some(h) => Some(self.with_history_index(
                revision,
                source.file(),
                source.located_header(),
                |index| Ok(history::plan(index, source.located_header(), h)),
            )?),
            None => None,
        };
        let new_revision = revision
            .checked_add(1)
            .ok_or(Error::RevisionsExhausted(vbid))?;
        let name = compact_name(vbid, new_revision);
        match dir.remove(&name) {
            Ok(()) => tracing::info!(file = %name, "removed an earlier attempt's file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir.path().join(&name), "remove", e)),
        }
        let backend = dir
            .create(&name)
            .map_err(|e| Error::io(dir.path().join(&name), "create", e))?;
        let mut compact_file = CompactFile {
            dir,
            name: name.clone(),
            armed: true,
        };
        let warm = warms_cache(source.header(), shared.options.node_cache.as_deref());
        let mut target = FileWriter::create_without_header(
            files::with_cache(
                CouchFile::new(backend, dir.path().join(&name))?,
                &shared.options,
            )
            .with_cache_fill(warm),
        )?;
        // Nothing opens the `.compact` file, and it is renamed only after a
        // commit: its commits sync once, so the locked round's does too.
        target.set_unpublished();
        let mut history_headers = 0;
        let mut history_bytes = 0;
        let (mut db, copy) = match &plan {
            Some((kept, true)) => {
                let (db, copy, replayed) = history::copy_keeping_history(
                    source.file(),
                    kept,
                    target,
                    dir,
                    &name,
                    &options.compactor,
                    control,
                )?;
                history_headers = 1 + replayed.headers;
                history_bytes = replayed.bytes_written;
                (db, copy)
            }
            _ => copy_snapshot(
                &source,
                target,
                dir,
                &name,
                &options.compactor,
                hooks,
                control,
            )?,
        };
        // With history, the rounds keep the flusher's headers at the same
        // granularity; without, one header per round.
        let keep_history = matches!(plan, Some((_, true)));
        hook(CompactionPhase::Copied);
        // One catch-up round: replays `from..to` of the source into the new
        // file and commits it (a header, synced). So when no flush lands
        // before the lock is taken, the locked round has neither a replay
        // nor a sync to do: the new file's last header already covers
        // everything, and the lock is held only for the rename and the
        // switch. Invariant: the new file's committed header covers `last`
        // whenever no round is in progress (the copy commits too).
        let round_headers = std::cell::Cell::new(0u64);
        let catch_up = |db: &mut Db,
                        from: &LocatedHeader,
                        to: &LocatedHeader,
                        config: &CompactionConfig,
                        locked: bool|
         -> Result<RoundStats> {
            let headers = match (&history, keep_history) {
                (Some(h), true) => {
                    self.with_history_index(revision, source.file(), to, |index| {
                        let between: Vec<LocatedHeader> = index
                            .headers()
                            .iter()
                            .filter(|x| x.offset > from.offset && x.offset <= to.offset)
                            .cloned()
                            .collect();
                        Ok(h.select(&between))
                    })?
                }
                _ => vec![to.clone()],
            };
            let stats =
                history::replay_headers(source.file(), db, from, &headers, config, control)?;
            if keep_history {
                round_headers.set(round_headers.get() + stats.headers);
            }
            Ok(RoundStats {
                docs: stats.docs,
                bytes_written: stats.bytes_written,
                duration: stats.duration,
                locked,
            })
        };
        let mut last = source.located_header().clone();
        let mut rounds = Vec::new();
        if held.is_none() {
            // The cost of replaying a document, once a round measured it:
            // the copy's cost per document says little about it (a bulk
            // build against a replay into the trees), so the first round
            // always runs when there is anything to catch up.
            let mut cost: Option<Duration> = None;
            for round in 1..=options.max_rounds {
                self.check_running(control)?;
                let (latest, _) = self.latest_located_header();
                if latest.offset == last.offset {
                    break;
                }
                let newer = btree::Snapshot::new(source.file().clone(), latest.clone());
                let gap =
                    newer.count_changes(last.header.update_seq + 1, latest.header.update_seq)?;
                if cost.is_some_and(|cost| {
                    cost * u32::try_from(gap).unwrap_or(u32::MAX) <= options.lock_budget
                }) {
                    break;
                }
                // The writes outpace the replay: another round would leave
                // as large a gap again. The tries to take the lock between
                // two commits deal with such a writer. (A round that
                // replayed only local documents says nothing about that.)
                if rounds
                    .last()
                    .is_some_and(|prev: &RoundStats| prev.docs > 0 && gap >= prev.docs)
                {
                    break;
                }
                let round_stats = catch_up(&mut db, &last, &latest, &options.compactor, false)?;
                cost = Some(per_doc(round_stats.duration, round_stats.docs));
                rounds.push(round_stats);
                last = latest;
                hook(CompactionPhase::RoundDone(round));
            }
            hook(CompactionPhase::BeforeFinalRound);
        }

        // The final round: the flusher waits from here until the switch.
        // Neither it nor the replays that wait for the lock are throttled:
        // the flusher is about to wait for them.
        let unthrottled = CompactionConfig {
            throttle_bytes_per_sec: None,
            ..options.compactor.clone()
        };
        let mut rounds_waiting_for_commit = Vec::new();
        let mut w = match held.take() {
            Some(w) => w,
            // Take the lock between two commits, and only once the new file
            // has caught up with the latest one: a commit that lands first
            // (in flight, or left by the unlocked rounds) is replayed and
            // committed without the lock, so the locked round usually has
            // nothing to do but the rename. After MAX_LOCK_ATTEMPTS tries
            // (a flusher that never pauses), the locked round replays what
            // is left, as the design's step 4 does.
            None => {
                let mut attempts = 0;
                loop {
                    self.check_running(control)?;
                    let (latest, seen) = self.latest_located_header();
                    if latest.offset != last.offset {
                        rounds_waiting_for_commit.push(catch_up(
                            &mut db,
                            &last,
                            &latest,
                            &unthrottled,
                            false,
                        )?);
                        last = latest;
                    }
                    attempts += 1;
                    if let Some(w) = shared.writer.try_lock() {
                        if w.db.committed().offset == last.offset || attempts > MAX_LOCK_ATTEMPTS {
                            break w;
                        }
                        // A commit landed since the replay: catch it up too.
                        continue;
                    }
                    if attempts > MAX_LOCK_ATTEMPTS {
                        break shared.writer.lock();
                    }
                    self.wait_for_header(seen.commits, LOCK_RETRY_WAIT);
                }
            }
        };
        let final_start = Instant::now();
        let lock_start = if options.mode == CompactionMode::Blocking {
            lock_start
        } else {
            final_start
        };
        hook(CompactionPhase::FinalRoundLocked);
        self.check_running(control)?;
        let latest = w.db.committed().clone();
        // The flusher waits for this round: it may use both threads.
        let locked = CompactionConfig {
            parallel_replays: true,
            ..unthrottled.clone()
        };
        let mut final_round = if latest.offset != last.offset {
            catch_up(&mut db, &last, &latest, &locked, true)?
        } else {
            // Nothing landed since the last round, whose header is synced.
            RoundStats {
                locked: true,
                ..RoundStats::default()
            }
        };
        let size_after = db.writer_mut().position();
        // Everything that can fail before the rename happens before it, so
        // that once the new revision has its name the switch cannot fail.
        let new_name = revision_name(vbid, new_revision);
        // The same file under its new name, its nodes cached from now on.
        let mut final_file = files::with_writeback(
            db.writer_mut()
                .file()
                .renamed(dir.path().join(&new_name))
                .with_cache_fill(true),
            &shared.options,
        );
        final_file.set_crc(CrcKind::for_version(db.committed().header.disk_version));
        let new_db = Db::from_writer(
            FileWriter::new(final_file)?,
            db.committed().clone(),
            shared.options.db.nodes,
        );
        dir.rename(&name, &new_name)
            .map_err(|e| Error::io(dir.path().join(&name), "rename", e))?;
        compact_file.armed = false;
        w.db = new_db;
        w.revision = new_revision;
        w.needs_recovery = false;
        // The rename is durable once the directory is synced: until then
        // the flusher syncs the directory before any commit it reports.
        // The sync itself runs after the lock is released.
        w.dir_sync_pending = true;
        shared.publish(&w);
        shared.compacted_size.store(size_after, Ordering::Relaxed);
        final_round.duration = final_start.elapsed();
        rounds.push(final_round);
        // Fairly: a flusher waiting for the lock gets it now, and adds its
        // wait to the counter before anyone else can take the lock.
        MutexGuard::unlock_fair(w);
        let lock_held = lock_start.elapsed();

        let old = revision_name(vbid, revision);
        let dir_synced = dir.sync();
        let waited = {
            // Taken after the flusher that was handed the lock, if any, so
            // its wait is in the counter.
            let mut w = shared.writer.lock();
            if dir_synced.is_ok() {
                w.dir_sync_pending = false;
            }
            shared.flusher_lock_wait_nanos.load(Ordering::Relaxed) - waited_before
        };
        match dir_synced {
            Ok(()) => {
                // Readers of the old revision keep their open handles. It
                // goes only once the rename is durable, so that a crash
                // cannot leave neither name.
                if let Err(e) = dir.remove(&old).and_then(|()| dir.sync()) {
                    tracing::warn!(file = %old, error = %e, "cannot remove the old revision; the next open will");
                }
            }
            Err(e) => {
                // The flusher syncs the directory before its next commit;
                // the next open removes the old revision.
                tracing::warn!(file = %old, error = %e, "directory sync after the rename failed");
            }
        }
        Ok(CompactionReport {
            started: start,
            revision_before: revision,
            revision_after: new_revision,
            purge_seq: copy.purge_seq.max(latest.header.purge_seq),
            copy,
            rounds,
            rounds_waiting_for_commit,
            lock_held,
            flusher_waited: Duration::from_nanos(waited),
            duration: start.elapsed(),
            size_before,
            size_after,
            history_headers: history_headers + round_headers.get(),
            history_bytes,
        })
    }
}
