#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Concurrent compaction (MB-38428) while the flusher keeps committing.
//!
//! A seeded workload (sets of new keys, updates whose values shrink or grow a
//! lot, deletes, re-created keys, tombstones of keys never set, vbstate
//! changes) runs against a vbucket and is mirrored in a model: the newest
//! mutation of every key as the vbucket returned it right after the write.
//! The compaction hook writes at every phase: at `Copied` and after every
//! unlocked round it flushes and waits for persistence (so every round has
//! a gap to replay, local-document changes included), before the final
//! round and under its lock it only enqueues. Afterwards, and after a
//! reopen, the vbucket must hold exactly the model: every key by `get`, the
//! by-seq listing with its tombstones, the high seqno, the vbstate.
//!
//! Also: the flusher commits during the copy and the rounds and waits only
//! in the final round (the blocking mode stalls it for the whole
//! compaction); the purge seqno never goes backwards; closing, deleting or
//! cancelling a vbucket's compaction aborts it and leaves no file behind;
//! compacted files pass `verify_snapshot` and `couchread.py --verify`; a
//! tiny by-id sort budget (runs spilled) gives the same content; the final
//! round is not throttled (the flusher waits for it); deleting a vbucket
//! while its compaction renames its file leaves no file behind.

mod support;

use btree::NodeConfig;
use compactor::Hooks;
use couchfile::DocInfo;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::{names, verify_file, Rng};
use vbucket::{
    CompactionConfig, CompactionHook, CompactionMode, CompactionOptions, CompactionPhase,
    CompactionReport, Document, Error, FlusherConfig, ItemMeta, Mutation, PurgePolicy, RoundStats,
    Store, StoreConfig, VBucket, VbucketState, DATATYPE_JSON,
};

/// A wait that is expected to succeed.
const WAIT: Duration = Duration::from_secs(60);
/// A wait that is expected to time out (the flusher is blocked).
const SHORT: Duration = Duration::from_millis(100);

fn config() -> StoreConfig {
    StoreConfig {
        flusher: FlusherConfig {
            threads: 1,
            max_batch_items: 16,
            ..FlusherConfig::default()
        },
        // Small nodes: trees of several levels.
        nodes: NodeConfig {
            leaf_threshold: 600,
            interior_threshold: 300,
        },
        // A small node cache: recovery after failed commits and the
        // switch to a compacted file must never serve a stale node.
        node_cache_bytes: 1 << 20,
        ..StoreConfig::default()
    }
}

/// Documents replayed by `rounds` together.
fn docs(rounds: &[RoundStats]) -> u64 {
    rounds.iter().map(|r| r.docs).sum()
}

/// What the vbucket should hold.
#[derive(Debug, Clone, Default)]
struct Model {
    /// The newest mutation of every key, tombstones included.
    docs: BTreeMap<Vec<u8>, Document>,
    high_seqno: u64,
    state: VbucketState,
}

impl Model {
    fn by_seq(&self) -> Vec<Document> {
        let mut docs: Vec<Document> = self.docs.values().cloned().collect();
        docs.sort_by_key(|d| d.seqno);
        docs
    }

    fn counts(&self) -> (u64, u64) {
        let deleted = self.docs.values().filter(|d| d.deleted).count() as u64;
        (self.docs.len() as u64 - deleted, deleted)
    }
}

/// Writes to one vbucket and keeps the model in step.
struct Workload {
    vb: VBucket,
    rng: Rng,
    model: Model,
    keys: u64,
}

impl Workload {
    fn new(vb: VBucket, seed: u64, keys: u64) -> Self {
        let model = Model {
            state: vb.vbstate().state,
            ..Model::default()
        };
        Self {
            vb,
            rng: Rng::new(seed),
            model,
            keys,
        }
    }

    fn key(k: u64) -> Vec<u8> {
        // Some long keys, so the by-id tree has more levels.
        if k.is_multiple_of(7) {
            format!("key-{k:05}/{}", "long".repeat(40)).into_bytes()
        } else {
            format!("key-{k:05}").into_bytes()
        }
    }

    /// A value whose size jumps between classes (0 bytes to 20 KB), random
    /// or compressible.
    fn value(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0 => 0,
            1..=4 => self.rng.range(1, 64),
            5..=7 => self.rng.range(100, 1500),
            _ => self.rng.range(4000, 20000),
        } as usize;
        let mut v = format!("{}:", self.model.high_seqno + 1).into_bytes();
        if self.rng.below(2) == 0 {
            while v.len() < len {
                v.push(self.rng.next() as u8);
            }
        } else {
            let byte = b'a' + self.rng.below(26) as u8;
            v.resize(len.max(v.len()), byte);
        }
        v.truncate(len);
        v
    }

    /// Records the mutation just made as the vbucket reads it back.
    fn record(&mut self, key: &[u8], m: Mutation) -> u64 {
        let doc = self
            .vb
            .get_including_deleted(key)
            .unwrap()
            .expect("just written");
        assert_eq!((doc.seqno, doc.meta.cas), (m.seqno, m.cas));
        assert!(m.seqno > self.model.high_seqno);
        self.model.high_seqno = m.seqno;
        self.model.docs.insert(key.to_vec(), doc);
        m.seqno
    }

    fn set_value(&mut self, key: &[u8], value: &[u8]) -> u64 {
        let meta = ItemMeta {
            flags: self.rng.next() as u32,
            datatype: if self.rng.below(2) == 0 {
                DATATYPE_JSON
            } else {
                0
            },
            exptime: if self.rng.below(4) == 0 {
                4_000_000_000
            } else {
                0
            },
            ..ItemMeta::default()
        };
        let m = self.vb.set(key, value, meta).unwrap();
        let seqno = self.record(key, m);
        assert_eq!(self.model.docs[key].value, value);
        seqno
    }

    fn set(&mut self, key: &[u8]) -> u64 {
        let value = self.value();
        self.set_value(key, &value)
    }

    fn delete(&mut self, key: &[u8]) -> u64 {
        let m = self.vb.delete(key, ItemMeta::default()).unwrap();
        let seqno = self.record(key, m);
        assert!(self.model.docs[key].deleted);
        seqno
    }

    /// One random mutation.
    fn step(&mut self) -> u64 {
        let key = Self::key(self.rng.below(self.keys));
        let existing = self.model.docs.get(&key).map(|d| d.deleted);
        match (existing, self.rng.below(10)) {
            // Delete a live document.
            (Some(false), 0..=2) => self.delete(&key),
            // Delete a deleted one again.
            (Some(true), 0..=2) => self.delete(&key),
            // A tombstone for a key never set.
            (None, 0) => self.delete(&key),
            // New keys, updates, re-created keys.
            _ => self.set(&key),
        }
    }

    /// `n` random mutations, not waited for; returns the last seqno.
    fn mutate(&mut self, n: usize) -> u64 {
        for _ in 0..n {
            self.step();
        }
        self.model.high_seqno
    }

    /// `n` random mutations, then waits for them to be persisted.
    fn flush(&mut self, n: usize) {
        let last = self.mutate(n);
        self.vb.wait_persisted(last, WAIT).unwrap();
    }

    fn set_state(&mut self, state: VbucketState) {
        self.vb.set_state(state).unwrap();
        self.model.state = state;
    }

    fn wait_all(&self) {
        if self.model.high_seqno > 0 {
            self.vb.wait_persisted(self.model.high_seqno, WAIT).unwrap();
        }
    }
}

/// The vbucket holds exactly `model` (after waiting for its persistence).
fn check(vb: &VBucket, model: &Model, what: &str) {
    if model.high_seqno > 0 {
        vb.wait_persisted(model.high_seqno, WAIT).unwrap();
    }
    assert_eq!(vb.high_seqno(), model.high_seqno, "{what}: high seqno");
    let snapshot = vb.snapshot();
    assert_eq!(
        snapshot.high_seqno(),
        model.high_seqno,
        "{what}: header seqno"
    );
    let mut found = Vec::new();
    snapshot
        .changes_since(0, &mut |doc| {
            found.push(doc);
            ControlFlow::Continue(())
        })
        .unwrap();
    let expected = model.by_seq();
    let keys = |docs: &[Document]| -> Vec<(u64, String)> {
        docs.iter()
            .map(|d| (d.seqno, String::from_utf8_lossy(&d.key).into_owned()))
            .collect()
    };
    assert_eq!(keys(&found), keys(&expected), "{what}: changes since 0");
    for (f, e) in found.iter().zip(&expected) {
        assert!(
            f == e,
            "{what}: {} (seqno {}) differs: {:?} vs {:?}",
            String::from_utf8_lossy(&e.key),
            e.seqno,
            (f.value.len(), f.deleted, f.meta),
            (e.value.len(), e.deleted, e.meta)
        );
    }
    for (key, doc) in &model.docs {
        let got = vb.get_including_deleted(key).unwrap();
        assert!(
            got.as_ref() == Some(doc),
            "{what}: get {}",
            String::from_utf8_lossy(key)
        );
        let live = vb.get(key).unwrap();
        assert_eq!(live.is_some(), !doc.deleted, "{what}");
        assert_eq!(
            snapshot.get_including_deleted(key).unwrap().as_ref(),
            Some(doc)
        );
    }
    assert_eq!(vb.get_including_deleted(b"never written").unwrap(), None);
    let on_disk = snapshot.vbstate().unwrap().expect("a vbstate");
    assert_eq!(on_disk, vb.vbstate(), "{what}: vbstate");
    assert_eq!(on_disk.state, model.state, "{what}: vbucket state");
    assert_eq!(on_disk.persisted_seqno, model.high_seqno, "{what}");
    let stats = vb.stats().unwrap();
    assert_eq!(
        (stats.live_docs, stats.deleted_docs),
        model.counts(),
        "{what}: document counts"
    );
    assert_eq!(stats.dirty_items, 0, "{what}");
}

/// Verifies every file of the store's directory.
fn verify_dir(dir: &Path) {
    for name in names(dir) {
        verify_file(&dir.join(name));
    }
}

/// Options with `lock_budget`, `max_rounds` and a hook.
fn options(
    mode: CompactionMode,
    lock_budget: Duration,
    max_rounds: usize,
    hook: Option<CompactionHook>,
) -> CompactionOptions {
    CompactionOptions {
        mode,
        lock_budget,
        max_rounds,
        hook,
        ..CompactionOptions::default()
    }
}

/// Prefills the workload: many flushes, overwrites and deletes, two state
/// changes.
fn prefill(w: &mut Workload, flushes: usize) {
    for i in 0..flushes {
        w.flush(40);
        if i == flushes / 2 {
            w.set_state(VbucketState::Replica);
        }
    }
    w.set_state(VbucketState::Active);
}

/// The hook of the busy compactions: flushes (waiting for persistence) at
/// `Copied` and after each unlocked round, state changes included; enqueues
/// without waiting before the final round and under its lock. Records the
/// phases seen, each with the number of keys changed since the copy's
/// header when it was reached.
fn busy_hook(
    w: &Arc<Mutex<Workload>>,
    mode: CompactionMode,
    phases: &Arc<Mutex<Vec<(CompactionPhase, usize)>>>,
) -> CompactionHook {
    let w = Arc::clone(w);
    let phases = Arc::clone(phases);
    let h0 = w.lock().unwrap().model.high_seqno;
    Arc::new(move |phase| {
        let mut w = w.lock().unwrap();
        let changed = w.model.docs.values().filter(|d| d.seqno > h0).count();
        phases.lock().unwrap().push((phase, changed));
        match (mode, phase) {
            // The lock is held: only enqueue.
            (CompactionMode::Blocking, _) | (_, CompactionPhase::FinalRoundLocked) => {
                w.mutate(30);
            }
            (_, CompactionPhase::Copied) => {
                w.flush(60);
                w.set_state(VbucketState::Pending);
                w.flush(30);
            }
            // Fewer each round, so that the rounds converge and only the
            // limit or the budget stops them.
            (_, CompactionPhase::RoundDone(n)) => {
                w.flush(50_usize.saturating_sub(10 * n).max(5));
                if n % 2 == 1 {
                    // A header with only a local-document change.
                    w.set_state(VbucketState::Replica);
                }
                w.flush(10);
            }
            (_, CompactionPhase::BeforeFinalRound) => {
                w.mutate(30);
                // Not under the lock yet: a committed state change the final
                // round must replay.
                w.set_state(VbucketState::Active);
                w.mutate(10);
            }
        }
    })
}

/// A compaction under the busy hook, checked against the model before and
/// after a reopen, then compacted once more; every file verified.
fn compaction_under_writes(
    mode: CompactionMode,
    lock_budget: Duration,
    max_rounds: usize,
    id_sort_memory: Option<usize>,
    seed: u64,
) -> CompactionReport {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, mut w) = fresh_vbucket(tmp.path(), seed, 400);
    prefill(&mut w, 40);
    check(&vb, &w.model, "before compaction");
    let before = vb.snapshot();
    let model_before = w.model.clone();

    let w = Arc::new(Mutex::new(w));
    let phases = Arc::new(Mutex::new(Vec::new()));
    let mut opts = options(
        mode,
        lock_budget,
        max_rounds,
        Some(busy_hook(&w, mode, &phases)),
    );
    if let Some(memory) = id_sort_memory {
        opts.compactor.id_sort_memory = memory;
    }
    let report = vb.compact(&opts).unwrap();
    drop(opts);
    let w = Arc::try_unwrap(w)
        .ok()
        .expect("the hook is gone")
        .into_inner()
        .unwrap();
    let what = format!("{mode:?}, lock budget {lock_budget:?}, {max_rounds} rounds, seed {seed}");

    // The phases and rounds.
    let (phases, changed): (Vec<CompactionPhase>, Vec<usize>) =
        phases.lock().unwrap().iter().copied().unzip();
    let unlocked = report.rounds.iter().filter(|r| !r.locked).count();
    let mut expected_phases = vec![CompactionPhase::Copied];
    if mode == CompactionMode::Concurrent {
        expected_phases.extend((1..=unlocked).map(CompactionPhase::RoundDone));
        expected_phases.push(CompactionPhase::BeforeFinalRound);
    }
    expected_phases.push(CompactionPhase::FinalRoundLocked);
    assert_eq!(phases, expected_phases, "{what}");
    assert_eq!(report.rounds.len(), unlocked + 1, "{what}: {report:?}");
    assert!(report.rounds.last().unwrap().locked, "{what}");
    assert!(report.rounds[..unlocked].iter().all(|r| r.docs > 0));
    match mode {
        CompactionMode::Blocking => assert_eq!(unlocked, 0, "{what}"),
        // Every round leaves a gap (the hook flushes): only the round limit
        // stops them when no gap fits a zero budget.
        _ if lock_budget.is_zero() => assert_eq!(unlocked, max_rounds, "{what}"),
        // A huge budget: one unlocked round (the first always runs, to
        // measure what a replayed document costs), then everything else in
        // the final round; together at least what was persisted before it
        // (as of `BeforeFinalRound`).
        _ => {
            assert_eq!(unlocked, 1, "{what}");
            let persisted = changed[phases.len() - 2] as u64;
            assert!(persisted > 0, "{what}");
            let replayed = docs(&report.rounds) + docs(&report.rounds_waiting_for_commit);
            assert!(replayed >= persisted, "{what}: {report:?}");
        }
    }
    assert_eq!((report.revision_before, report.revision_after), (1, 2));
    assert_eq!(report.purge_seq, 0, "{what}");
    assert_eq!(report.copy.docs_copied, model_before.docs.len() as u64);
    if let Some(memory) = id_sort_memory {
        assert!(
            report.copy.runs_spilled > 1,
            "{what}: sort budget {memory}: {report:?}"
        );
    }
    assert!(report.lock_held <= report.duration, "{what}");

    check(&vb, &w.model, &format!("{what}: after compaction"));
    assert_eq!(vb.snapshot().revision(), 2);
    // The snapshot taken before still reads the old file, unlinked.
    for (key, doc) in &model_before.docs {
        assert_eq!(
            before.get_including_deleted(key).unwrap().as_ref(),
            Some(doc)
        );
    }
    assert_eq!(names(tmp.path()), ["0.couch.2"], "{what}");
    drop(before);
    store.close().unwrap();
    verify_dir(tmp.path());

    // Reopened: the same, and a second compaction keeps it.
    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    check(&vb, &w.model, &format!("{what}: reopened"));
    let mut w = Workload {
        vb: vb.clone(),
        ..w
    };
    w.flush(50);
    let again = vb.compact(&CompactionOptions::default()).unwrap();
    assert_eq!((again.revision_before, again.revision_after), (2, 3));
    check(&vb, &w.model, &format!("{what}: compacted again"));
    store.close().unwrap();
    assert_eq!(names(tmp.path()), ["0.couch.3"], "{what}");
    verify_dir(tmp.path());
    let store = Store::open(tmp.path(), config()).unwrap();
    check(
        &store.vbucket(0).unwrap(),
        &w.model,
        &format!("{what}: reopened again"),
    );
    store.close().unwrap();
    eprintln!(
        "{what}: {} rounds ({:?}), copy {} docs, {} runs spilled, lock held {:?}, \
         flusher waited {:?}, {} -> {} bytes, in {:.1?}",
        report.rounds.len(),
        report.rounds.iter().map(|r| r.docs).collect::<Vec<_>>(),
        report.copy.docs_copied,
        report.copy.runs_spilled,
        report.lock_held,
        report.flusher_waited,
        report.size_before,
        report.size_after,
        started.elapsed()
    );
    report
}

// --- a. content under writes at every phase -------------------------------

/// A compaction under a zero lock budget (only the round limit, or rounds
/// that stop converging, end the unlocked rounds) whose hook runs `writes`
/// at every phase; checked against the model and verified. Returns the
/// documents each unlocked round replayed, the phases seen and the report.
fn rounds_under(
    seed: u64,
    max_rounds: usize,
    writes: impl Fn(&mut Workload, CompactionPhase) + Send + Sync + 'static,
) -> (Vec<u64>, Vec<CompactionPhase>, CompactionReport) {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, mut w) = fresh_vbucket(tmp.path(), seed, 400);
    prefill(&mut w, 10);
    let w = Arc::new(Mutex::new(w));
    let phases = Arc::new(Mutex::new(Vec::new()));
    let hook: CompactionHook = {
        let (w, phases) = (Arc::clone(&w), Arc::clone(&phases));
        Arc::new(move |phase| {
            phases.lock().unwrap().push(phase);
            writes(&mut w.lock().unwrap(), phase);
        })
    };
    let opts = options(
        CompactionMode::Concurrent,
        Duration::ZERO,
        max_rounds,
        Some(hook),
    );
    let report = vb.compact(&opts).unwrap();
    drop(opts);
    let w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    check(&vb, &w.model, &format!("seed {seed}: after the compaction"));
    store.close().unwrap();
    verify_dir(tmp.path());
    let unlocked = report
        .rounds
        .iter()
        .filter(|r| !r.locked)
        .map(|r| r.docs)
        .collect();
    let phases = phases.lock().unwrap().clone();
    (unlocked, phases, report)
}

/// Writes that outpace the replay (each round leaves a larger gap than the
/// one it replayed) stop the unlocked rounds at the first that would not
/// shrink the gap, long before the round limit; the final phase replays
/// the rest, and nothing is lost.
#[test]
fn unlocked_rounds_stop_when_the_writes_outpace_them() {
    use CompactionPhase::*;
    let (unlocked, phases, report) = rounds_under(0x5eed_0040, 8, |w, phase| match phase {
        Copied => w.flush(20),
        RoundDone(n) => w.flush(40 * (n + 1)),
        BeforeFinalRound | FinalRoundLocked => {}
    });
    // Round 1 replays the 20 mutations of `Copied`; the 80 after it leave a
    // larger gap, so round 2 does not run.
    assert_eq!(unlocked.len(), 1, "{report:?}");
    assert!(unlocked[0] > 0 && unlocked[0] <= 20, "{report:?}");
    assert_eq!(
        phases,
        [Copied, RoundDone(1), BeforeFinalRound, FinalRoundLocked]
    );
    let replayed_after =
        docs(&report.rounds_waiting_for_commit) + docs(&report.rounds[unlocked.len()..]);
    assert!(replayed_after > 60, "{report:?}");
}

/// A round that replays only a local document (a state change) says
/// nothing about whether the writes outpace the replay: the rounds after it
/// go on to the limit while their gaps shrink.
#[test]
fn a_round_of_only_local_documents_does_not_stop_the_rounds() {
    use CompactionPhase::*;
    let (unlocked, phases, report) = rounds_under(0x5eed_0041, 3, |w, phase| match phase {
        Copied => w.set_state(VbucketState::Replica),
        RoundDone(1) => w.flush(40),
        RoundDone(2) => w.flush(20),
        RoundDone(_) | BeforeFinalRound | FinalRoundLocked => {}
    });
    assert_eq!(unlocked.len(), 3, "{report:?}");
    assert_eq!(unlocked[0], 0, "{report:?}");
    assert!(unlocked[1] > unlocked[2] && unlocked[2] > 0, "{report:?}");
    assert_eq!(phases.last(), Some(&FinalRoundLocked));
}

#[test]
fn unlocked_rounds_under_writes_keep_every_change() {
    compaction_under_writes(
        CompactionMode::Concurrent,
        Duration::ZERO,
        4,
        None,
        0x5eed_0001,
    );
}

#[test]
fn huge_lock_budget_replays_everything_after_the_first_round_in_the_final_round() {
    compaction_under_writes(
        CompactionMode::Concurrent,
        Duration::from_secs(3600),
        10,
        None,
        0x5eed_0002,
    );
}

#[test]
fn blocking_mode_under_writes_keeps_every_change() {
    compaction_under_writes(
        CompactionMode::Blocking,
        Duration::ZERO,
        4,
        None,
        0x5eed_0003,
    );
}

// --- f. by-id sort runs spilled -------------------------------------------

#[test]
fn tiny_id_sort_memory_spills_runs_and_keeps_every_change() {
    compaction_under_writes(
        CompactionMode::Concurrent,
        Duration::ZERO,
        2,
        Some(2048),
        0x5eed_0004,
    );
}

// --- b. the flusher commits during the copy and the rounds ----------------

/// Compactor hooks that run `pause` when the copy reaches its `at`-th
/// document.
struct PauseCopy<F: FnMut()> {
    at: u64,
    seen: u64,
    pause: F,
}

impl<F: FnMut()> Hooks for PauseCopy<F> {
    fn keep(&mut self, _info: &DocInfo) -> bool {
        self.seen += 1;
        if self.seen == self.at {
            (self.pause)();
        }
        true
    }
}

/// Requests to the writer thread: flush this many batches of ten
/// mutations, each waited for, and answer with the commits they took.
type WriterRequests = mpsc::Sender<(usize, mpsc::Sender<u64>)>;

fn spawn_writer(w: Arc<Mutex<Workload>>) -> (WriterRequests, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<(usize, mpsc::Sender<u64>)>();
    let thread = std::thread::spawn(move || {
        for (batches, reply) in rx {
            let mut w = w.lock().unwrap();
            let before = w.vb.latest_header().commits;
            for _ in 0..batches {
                w.flush(10);
            }
            let commits = w.vb.latest_header().commits - before;
            reply.send(commits).unwrap();
        }
    });
    (tx, thread)
}

fn ask(requests: &WriterRequests, batches: usize) -> u64 {
    let (tx, rx) = mpsc::channel();
    requests.send((batches, tx)).unwrap();
    rx.recv().unwrap()
}

/// A vbucket of 3000 documents, for copies long enough to pause in.
/// A store in `tmp` with vbucket 0 open, and a workload on it over `keys`
/// keys.
fn fresh_vbucket(tmp: &Path, seed: u64, keys: u64) -> (Store, VBucket, Workload) {
    let store = Store::open(tmp, config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let w = Workload::new(vb.clone(), seed, keys);
    (store, vb, w)
}

fn big_vbucket(tmp: &Path, seed: u64) -> (Store, VBucket, Workload) {
    let (store, vb, mut w) = fresh_vbucket(tmp, seed, 3000);
    for i in 0..3000 {
        w.set_value(&Workload::key(i), &[b'v'; 200]);
    }
    w.flush(300);
    (store, vb, w)
}

#[test]
fn flusher_commits_during_the_copy_and_the_rounds_without_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, w) = big_vbucket(tmp.path(), 0x5eed_0010);
    let w = Arc::new(Mutex::new(w));
    let (requests, writer) = spawn_writer(Arc::clone(&w));
    let start = (vb.latest_header().commits, vb.stats().unwrap().flush);

    // Mid-copy: the writer thread flushes ten batches, each one persisted
    // while the copy waits here.
    let mut mid_copy = None;
    let mut pause = PauseCopy {
        at: 1000,
        seen: 0,
        pause: || {
            let progress = vb.compaction_control().expect("running").progress();
            assert!(progress.docs_done < progress.docs_total, "{progress:?}");
            let commits = ask(&requests, 10);
            assert!(commits >= 10);
            mid_copy = Some((progress, commits));
        },
    };
    let before_final = Arc::new(Mutex::new(None));
    let hook: CompactionHook = {
        let requests = Mutex::new(requests.clone());
        let vb = vb.clone();
        let before_final = Arc::clone(&before_final);
        Arc::new(move |phase| match phase {
            CompactionPhase::Copied | CompactionPhase::RoundDone(1) => {
                assert!(ask(&requests.lock().unwrap(), 10) >= 10);
            }
            CompactionPhase::BeforeFinalRound => {
                *before_final.lock().unwrap() =
                    Some((vb.latest_header().commits, vb.stats().unwrap().flush));
            }
            _ => {}
        })
    };
    let opts = options(CompactionMode::Concurrent, Duration::ZERO, 2, Some(hook));
    let report = vb.compact_with_hooks(&opts, &mut pause).unwrap();
    drop(opts);
    let (progress, commits) = mid_copy.expect("the copy paused");
    let (commits_before_final, flush_before_final) = before_final.lock().unwrap().take().unwrap();

    // Thirty batches were persisted between the start and the final round,
    // ten of them in the middle of the copy.
    assert!(commits_before_final - start.0 >= 30, "{report:?}");
    assert!(flush_before_final.batches_flushed - start.1.batches_flushed >= 30);
    assert!(flush_before_final.persisted_seqno > start.1.persisted_seqno);
    // Nothing was flushed during the final round, and the flusher never
    // waited for the lock before it.
    assert_eq!(report.flusher_waited, Duration::ZERO, "{report:?}");
    assert_eq!(report.rounds.len(), 3, "{report:?}");
    // Round 1 replays the mid-copy and `Copied` batches, round 2 those of
    // `RoundDone(1)` (200 and 100 mutations of 3000 keys).
    assert!(
        report.rounds[0].docs > 150 && report.rounds[1].docs > 75,
        "{report:?}"
    );
    assert_eq!(report.rounds[2].docs, 0, "{report:?}");

    drop(requests);
    writer.join().unwrap();
    let w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    check(&vb, &w.model, "after a compaction the flusher ran through");
    eprintln!(
        "concurrent: paused the copy at {progress:?} for {commits} commits; {} commits \
         between the start and the final round; flusher waited {:?}; lock held {:?}",
        commits_before_final - start.0,
        report.flusher_waited,
        report.lock_held
    );
    store.close().unwrap();
}

#[test]
fn blocking_mode_stalls_the_flusher_for_the_whole_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, w) = big_vbucket(tmp.path(), 0x5eed_0011);
    let w = Arc::new(Mutex::new(w));
    // Writes, then a wait for their persistence that must time out: the
    // compaction holds the commit lock, so the flusher cannot commit.
    let stalled = {
        let w = Arc::clone(&w);
        move |what: &str| {
            let mut w = w.lock().unwrap();
            let batches = w.vb.stats().unwrap().flush.batches_flushed;
            let persisted = w.vb.persisted_seqno();
            let last = w.mutate(10);
            let err = w.vb.wait_persisted(last, SHORT).unwrap_err();
            assert!(err.is_timeout(), "{what}: {err}");
            assert_eq!(w.vb.persisted_seqno(), persisted, "{what}");
            let stats = w.vb.stats().unwrap();
            assert_eq!(stats.flush.batches_flushed, batches, "{what}");
            // Readable meanwhile, from the dirty table.
            assert!(stats.dirty_items > 0, "{what}");
        }
    };
    let mut pause = PauseCopy {
        at: 1000,
        seen: 0,
        pause: {
            let stalled = stalled.clone();
            move || stalled("mid-copy")
        },
    };
    let hook: CompactionHook = {
        let stalled = stalled.clone();
        Arc::new(move |phase| stalled(&format!("{phase:?}")))
    };
    let opts = options(CompactionMode::Blocking, Duration::ZERO, 4, Some(hook));
    let report = vb.compact_with_hooks(&opts, &mut pause).unwrap();
    drop((opts, pause, stalled));
    // The lock was held through the three stalls, and the flusher waited
    // for it from the first (the report counts its wait, which ends when the
    // lock is handed to it).
    assert!(report.lock_held >= SHORT * 3, "{report:?}");
    assert!(report.flusher_waited >= SHORT * 2, "{report:?}");
    assert_eq!(report.rounds.len(), 1, "{report:?}");
    // Everything queued meanwhile goes into the new file.
    let w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    check(&vb, &w.model, "after a blocking compaction");
    assert_eq!(vb.snapshot().revision(), 2);
    eprintln!(
        "blocking: lock held {:?}, flusher waited {:?}",
        report.lock_held, report.flusher_waited
    );
    store.close().unwrap();
}

#[test]
fn throttled_copy_lets_a_free_running_writer_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, w) = big_vbucket(tmp.path(), 0x5eed_0012);
    let w = Arc::new(Mutex::new(w));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let batches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (w, done, batches) = (Arc::clone(&w), Arc::clone(&done), Arc::clone(&batches));
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            let mut mid_copy = 0;
            while !done.load(SeqCst) {
                let mut w = w.lock().unwrap();
                w.flush(5);
                let copying = w.vb.compaction_control().is_some_and(|c| {
                    let p = c.progress();
                    p.docs_done < p.docs_total
                });
                mid_copy += u64::from(copying);
                batches.fetch_add(1, SeqCst);
            }
            mid_copy
        })
    };
    let start = vb.latest_header().commits;
    let before_final = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hook: CompactionHook = {
        let (vb, batches, before_final) =
            (vb.clone(), Arc::clone(&batches), Arc::clone(&before_final));
        Arc::new(move |phase| {
            use std::sync::atomic::Ordering::SeqCst;
            if phase == CompactionPhase::BeforeFinalRound {
                // However slow the writer thread is, it gets a few batches in
                // before the final round.
                let deadline = Instant::now() + WAIT;
                let first = batches.load(SeqCst);
                while batches.load(SeqCst) < first + 3 {
                    assert!(Instant::now() < deadline, "the writer thread is stuck");
                    std::thread::sleep(Duration::from_millis(1));
                }
                before_final.store(vb.latest_header().commits, SeqCst);
            }
        })
    };
    let mut opts = options(CompactionMode::Concurrent, Duration::ZERO, 3, Some(hook));
    // About a quarter of a second of copying.
    opts.compactor.throttle_bytes_per_sec = Some(2 << 20);
    let report = vb.compact(&opts).unwrap();
    drop(opts);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mid_copy = writer.join().unwrap();
    let commits = before_final.load(std::sync::atomic::Ordering::SeqCst) - start;
    assert!(commits >= 3, "{report:?}");
    let w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    check(&vb, &w.model, "after a throttled compaction");
    eprintln!(
        "throttled: {commits} commits before the final round ({mid_copy} batches finished \
         mid-copy), copy took {:?}, rounds {:?}, flusher waited {:?}",
        report.copy.duration,
        report.rounds.iter().map(|r| r.docs).collect::<Vec<_>>(),
        report.flusher_waited
    );
    store.close().unwrap();
}

// --- c. the purge seqno never goes backwards ------------------------------

fn purge_seq(vb: &VBucket) -> u64 {
    vb.snapshot().inner().header().purge_seq
}

fn purging(purge: PurgePolicy, hook: Option<CompactionHook>) -> CompactionOptions {
    CompactionOptions {
        compactor: CompactionConfig {
            purge,
            ..CompactionConfig::default()
        },
        hook,
        ..CompactionOptions::default()
    }
}

#[test]
fn purge_seq_never_goes_backwards() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, mut w) = fresh_vbucket(tmp.path(), 0x5eed_0020, 100);
    let key = |i: u64| Workload::key(i);
    for i in 0..60 {
        w.set(&key(i));
    }
    // Tombstones of keys 0..40, in order.
    let tombs: Vec<u64> = (0..40).map(|i| w.delete(&key(i))).collect();
    for i in 40..60 {
        w.set(&key(i));
    }
    w.wait_all();
    assert_eq!(purge_seq(&vb), 0);
    let w = Arc::new(Mutex::new(w));
    // Writes during each compaction (tombstones included): replayed, never
    // purged.
    let hook = |first: u64| -> CompactionHook {
        let w = Arc::clone(&w);
        Arc::new(move |phase| {
            let mut w = w.lock().unwrap();
            match phase {
                CompactionPhase::Copied => {
                    w.delete(&key(first));
                    w.set(&key(first + 1));
                    w.wait_all();
                }
                CompactionPhase::FinalRoundLocked => {
                    w.delete(&key(first + 2));
                }
                _ => {}
            }
        })
    };
    let model = |w: &Arc<Mutex<Workload>>| w.lock().unwrap().model.clone();
    let forget = |w: &Arc<Mutex<Workload>>, f: &dyn Fn(&Document) -> bool| {
        w.lock().unwrap().model.docs.retain(|_, d| !f(d));
    };

    // 1. Tombstones below the 20th go.
    let report = vb
        .compact(&purging(
            PurgePolicy {
                purge_before_seq: tombs[20],
                ..PurgePolicy::default()
            },
            Some(hook(40)),
        ))
        .unwrap();
    assert_eq!(report.copy.tombstones_purged, 20, "{report:?}");
    assert_eq!(report.purge_seq, tombs[19]);
    assert_eq!(purge_seq(&vb), tombs[19]);
    forget(&w, &|d| d.deleted && d.seqno < tombs[20]);
    check(&vb, &model(&w), "purged below the 20th tombstone");
    for i in 0..20 {
        assert_eq!(vb.get_including_deleted(&key(i)).unwrap(), None);
    }
    for i in 20..40 {
        assert!(vb.get_including_deleted(&key(i)).unwrap().unwrap().deleted);
    }

    // 2. A smaller purge seqno, then none at all: nothing goes, and the
    // purge seq stays.
    for (i, purge) in [
        PurgePolicy {
            purge_before_seq: tombs[5],
            ..PurgePolicy::default()
        },
        PurgePolicy::default(),
    ]
    .into_iter()
    .enumerate()
    {
        let report = vb
            .compact(&purging(purge, Some(hook(43 + 3 * i as u64))))
            .unwrap();
        assert_eq!(report.copy.tombstones_purged, 0, "{report:?}");
        assert_eq!(report.purge_seq, tombs[19], "{report:?}");
        assert_eq!(purge_seq(&vb), tombs[19]);
        check(&vb, &model(&w), &format!("compaction {i} purging nothing"));
    }

    // 3. Every tombstone at the start goes; those written during the
    // compaction stay. The purge seq is the highest tombstone purged.
    let h0_tombs: Vec<u64> = model(&w)
        .docs
        .values()
        .filter(|d| d.deleted)
        .map(|d| d.seqno)
        .collect();
    let highest = *h0_tombs.iter().max().unwrap();
    assert!(highest > tombs[39]);
    let report = vb
        .compact(&purging(
            PurgePolicy {
                drop_deletes: true,
                ..PurgePolicy::default()
            },
            Some(hook(50)),
        ))
        .unwrap();
    assert_eq!(report.copy.tombstones_purged, h0_tombs.len() as u64);
    assert_eq!(report.purge_seq, highest);
    assert_eq!(purge_seq(&vb), highest);
    forget(&w, &|d| d.deleted && d.seqno <= highest);
    let m = model(&w);
    check(&vb, &m, "all tombstones purged");
    // The tombstones written during it were kept.
    assert_eq!(m.counts().1, 2, "{:?}", m.counts());

    // 4. A re-created purged key, a reopen, one more compaction without a
    // policy: the purge seq stays.
    {
        let mut w = w.lock().unwrap();
        w.set(&key(0));
        w.wait_all();
    }
    store.close().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(purge_seq(&vb), highest);
    check(&vb, &model(&w), "reopened");
    let report = vb.compact(&CompactionOptions::default()).unwrap();
    assert_eq!(report.purge_seq, highest);
    assert_eq!(purge_seq(&vb), highest);
    check(&vb, &model(&w), "compacted after the reopen");
    store.close().unwrap();
    verify_dir(tmp.path());
}

// --- d. closing, deleting or cancelling aborts ----------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    Close,
    Delete,
    Cancel,
}

/// The most unlocked rounds of [`abort_compaction`].
const MAX_ROUNDS: usize = 3;

/// No compaction file (`.compact`, sort runs) in `dir`.
fn assert_no_compaction_files(dir: &Path, what: &str) {
    let files = names(dir);
    assert!(
        files.iter().all(|n| !n.contains(".compact")),
        "{what}: {files:?}"
    );
}

/// Runs `how` from the hook at `at` (closing and deleting from another
/// thread) in a compaction whose hook flushes at the other unlocked phases;
/// the compaction must fail with `CompactionAborted` and leave no file.
fn abort_compaction(how: Abort, at: CompactionPhase, mode: CompactionMode) {
    let what = format!("{how:?} at {at:?} ({mode:?})");
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path(), config()).unwrap());
    let vb = store.open_vbucket(0).unwrap();
    let mut w = Workload::new(vb.clone(), 0x5eed_0030, 200);
    prefill(&mut w, 8);
    let w = Arc::new(Mutex::new(w));
    let closer: Arc<Mutex<Option<JoinHandle<vbucket::Result<()>>>>> = Arc::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook: CompactionHook = {
        let (w, store, vb) = (Arc::clone(&w), Arc::clone(&store), vb.clone());
        let (closer, seen) = (Arc::clone(&closer), Arc::clone(&seen));
        Arc::new(move |phase| {
            seen.lock().unwrap().push(phase);
            let mut w = w.lock().unwrap();
            let lock_held =
                mode == CompactionMode::Blocking || phase == CompactionPhase::FinalRoundLocked;
            if phase != at {
                if !lock_held {
                    // More rounds, each replaying less than the one before.
                    let round = match phase {
                        CompactionPhase::RoundDone(n) => n,
                        _ => 0,
                    };
                    w.flush(40_usize.saturating_sub(10 * round).max(5));
                }
                return;
            }
            // Queued when the compaction is aborted: a close flushes them.
            w.mutate(20);
            let control = vb.compaction_control().expect("running");
            if how == Abort::Cancel {
                control.cancel();
                return;
            }
            let store = Arc::clone(&store);
            let thread = std::thread::spawn(move || match how {
                Abort::Close => store.close_vbucket(0),
                _ => store.delete_vbucket(0),
            });
            // Closing waits for the compaction to end (and, with the lock
            // held, its flush waits for the commit lock): wait only until
            // the close cancelled it.
            let deadline = Instant::now() + WAIT;
            while !control.is_cancelled() {
                assert!(Instant::now() < deadline, "the close is stuck");
                std::thread::sleep(Duration::from_millis(1));
            }
            *closer.lock().unwrap() = Some(thread);
        })
    };
    let opts = options(mode, Duration::ZERO, MAX_ROUNDS, Some(hook));
    let result = vb.compact(&opts);
    drop(opts);
    assert!(
        matches!(result, Err(Error::CompactionAborted(0))),
        "{what}: {result:?}"
    );
    assert!(vb.compaction_control().is_none(), "{what}");
    if let Some(thread) = closer.lock().unwrap().take() {
        thread.join().unwrap().unwrap();
    }
    // It stopped at its next check: the next round, the first try to take
    // the lock (concurrent), or under the lock (blocking).
    let seen = seen.lock().unwrap().clone();
    let i = seen.iter().position(|p| *p == at).expect("reached");
    let expected_after: &[CompactionPhase] = match (mode, at) {
        (CompactionMode::Blocking, CompactionPhase::Copied) => &[CompactionPhase::FinalRoundLocked],
        (_, CompactionPhase::RoundDone(MAX_ROUNDS)) => &[CompactionPhase::BeforeFinalRound],
        _ => &[],
    };
    assert_eq!(&seen[i + 1..], expected_after, "{what}: {seen:?}");
    assert_no_compaction_files(tmp.path(), &what);
    let mut w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    let store = Arc::try_unwrap(store).ok().unwrap();
    match how {
        Abort::Cancel => {
            // The vbucket goes on: same content, writes, a compaction.
            assert_eq!(names(tmp.path()), ["0.couch.1"], "{what}");
            check(&vb, &w.model, &format!("{what}: after the cancel"));
            w.flush(20);
            let report = vb.compact(&CompactionOptions::default()).unwrap();
            assert_eq!(report.revision_after, 2);
            check(&vb, &w.model, &format!("{what}: compacted after"));
            store.close().unwrap();
        }
        Abort::Close => {
            assert_eq!(names(tmp.path()), ["0.couch.1"], "{what}");
            assert!(vb.set(b"late", b"x", ItemMeta::default()).is_err());
            // The handle still reads what the close flushed.
            check(&vb, &w.model, &format!("{what}: closed"));
            assert!(store.vbuckets().is_empty());
            store.close().unwrap();
        }
        Abort::Delete => {
            assert_eq!(names(tmp.path()), Vec::<String>::new(), "{what}");
            store.close().unwrap();
            let store = Store::open(tmp.path(), config()).unwrap();
            assert!(store.vbuckets().is_empty(), "{what}");
            let vb = store.open_vbucket(0).unwrap();
            assert_eq!(vb.high_seqno(), 0, "{what}");
            assert_eq!(vb.get(&Workload::key(1)).unwrap(), None);
            store.close().unwrap();
            return;
        }
    }
    let store = Store::open(tmp.path(), config()).unwrap();
    check(
        &store.vbucket(0).unwrap(),
        &w.model,
        &format!("{what}: reopened"),
    );
    store.close().unwrap();
}

#[test]
fn cancel_from_the_hook_aborts_at_every_phase() {
    use CompactionPhase::*;
    for at in [
        Copied,
        RoundDone(1),
        RoundDone(3),
        BeforeFinalRound,
        FinalRoundLocked,
    ] {
        abort_compaction(Abort::Cancel, at, CompactionMode::Concurrent);
    }
    for at in [Copied, FinalRoundLocked] {
        abort_compaction(Abort::Cancel, at, CompactionMode::Blocking);
    }
}

#[test]
fn closing_the_vbucket_aborts_its_compaction() {
    use CompactionPhase::*;
    for at in [Copied, RoundDone(2), BeforeFinalRound, FinalRoundLocked] {
        abort_compaction(Abort::Close, at, CompactionMode::Concurrent);
    }
    abort_compaction(Abort::Close, Copied, CompactionMode::Blocking);
}

#[test]
fn deleting_the_vbucket_aborts_its_compaction() {
    use CompactionPhase::*;
    for at in [Copied, RoundDone(1), BeforeFinalRound, FinalRoundLocked] {
        abort_compaction(Abort::Delete, at, CompactionMode::Concurrent);
    }
    abort_compaction(Abort::Delete, Copied, CompactionMode::Blocking);
}

/// Cancelling or closing in the middle of the copy, with sort runs spilled:
/// the runs go with the `.compact` file.
#[test]
fn aborting_mid_copy_removes_the_sort_runs() {
    for how in [Abort::Cancel, Abort::Close] {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path(), config()).unwrap());
        let (vb, w) = {
            let vb = store.open_vbucket(0).unwrap();
            let mut w = Workload::new(vb.clone(), 0x5eed_0031, 3000);
            for i in 0..3000 {
                w.set_value(&Workload::key(i), &[b'v'; 100]);
            }
            w.wait_all();
            (vb, w)
        };
        let mut closer = None;
        let mut pause = PauseCopy {
            at: 1500,
            seen: 0,
            pause: || {
                let files = names(tmp.path());
                let runs = files.iter().filter(|n| n.contains(".compact.run")).count();
                assert!(runs > 2, "{files:?}");
                let control = vb.compaction_control().unwrap();
                match how {
                    Abort::Cancel => control.cancel(),
                    _ => {
                        // Closing waits for the compaction to end: wait only
                        // until it has cancelled it.
                        let store = Arc::clone(&store);
                        closer = Some(std::thread::spawn(move || store.close_vbucket(0)));
                        while !control.is_cancelled() {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            },
        };
        let mut opts = CompactionOptions::default();
        opts.compactor.id_sort_memory = 4096;
        let result = vb.compact_with_hooks(&opts, &mut pause);
        if let Some(closer) = closer {
            closer.join().unwrap().unwrap();
        }
        assert!(
            matches!(result, Err(Error::CompactionAborted(0))),
            "{how:?}: {result:?}"
        );
        assert_no_compaction_files(tmp.path(), &format!("{how:?}"));
        assert_eq!(names(tmp.path()), ["0.couch.1"]);
        check(&vb, &w.model, &format!("{how:?} mid-copy"));
        Arc::try_unwrap(store).ok().unwrap().close().unwrap();
    }
}

// --- e. compacted files pass verify and couchread.py ----------------------

#[test]
fn compacted_files_pass_verify_and_couchread() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.compress_bodies = false;
    let store = Store::open(tmp.path(), cfg).unwrap();
    let vb = store.open_vbucket(5).unwrap();
    let mut w = Workload::new(vb.clone(), 0x5eed_0040, 300);
    let w = {
        prefill(&mut w, 20);
        Arc::new(Mutex::new(w))
    };
    let phases = Arc::new(Mutex::new(Vec::new()));
    let small_sort = |mut o: CompactionOptions| {
        o.compactor.id_sort_memory = 1024;
        o.compactor.sync_every_bytes = 64 << 10;
        o.compactor.replay_batch = 7;
        o
    };
    let variants: Vec<(&str, CompactionOptions)> = vec![
        (
            "rounds",
            options(
                CompactionMode::Concurrent,
                Duration::ZERO,
                3,
                Some(busy_hook(&w, CompactionMode::Concurrent, &phases)),
            ),
        ),
        (
            "drop deletes",
            purging(
                PurgePolicy {
                    drop_deletes: true,
                    ..PurgePolicy::default()
                },
                Some(busy_hook(&w, CompactionMode::Concurrent, &phases)),
            ),
        ),
        (
            "small sort budget, small replay batches",
            small_sort(options(
                CompactionMode::Concurrent,
                Duration::ZERO,
                2,
                Some(busy_hook(&w, CompactionMode::Concurrent, &phases)),
            )),
        ),
        (
            "blocking",
            options(
                CompactionMode::Blocking,
                Duration::ZERO,
                2,
                Some(busy_hook(&w, CompactionMode::Blocking, &phases)),
            ),
        ),
        ("plain", CompactionOptions::default()),
    ];
    for (i, (name, opts)) in variants.into_iter().enumerate() {
        let report = vb.compact(&opts).unwrap();
        drop(opts);
        let mut w = w.lock().unwrap();
        if name == "drop deletes" {
            let purge_seq = report.purge_seq;
            w.model
                .docs
                .retain(|_, d| !(d.deleted && d.seqno <= purge_seq));
        }
        check(&vb, &w.model, name);
        let rev = 2 + i as u64;
        assert_eq!(vb.snapshot().revision(), rev);
        // Nothing is writing now: the live file can be read.
        assert_eq!(
            names(tmp.path()),
            [vbucket::revision_name(5, rev)],
            "{name}"
        );
        verify_dir(tmp.path());
    }
    store.close().unwrap();
    verify_dir(tmp.path());
}

// --- the final round and the commit lock ----------------------------------

/// A hook that, just before the final round, sets keys 0 to 19 to `value`
/// and waits until they are persisted.
fn persist_20_before_final_round(w: &Arc<Mutex<Workload>>, value: &[u8]) -> CompactionHook {
    let (w, value) = (Arc::clone(w), value.to_vec());
    Arc::new(move |phase| {
        if phase == CompactionPhase::BeforeFinalRound {
            let mut w = w.lock().unwrap();
            for i in 0..20 {
                w.set_value(&Workload::key(i), &value);
            }
            w.wait_all();
        }
    })
}

/// The final round runs under the commit lock, and the replays just before
/// it decide when the lock is taken, so throttling them would stall the
/// flusher for bytes/rate. The copy of a vbucket of tombstones
/// (no bodies) writes nothing the throttle counts; the bodies persisted
/// just before the final round must then replay at full speed even at one
/// byte per second (a throttled replay would take hours: a watchdog cancels
/// the compaction after a minute).
#[test]
fn the_final_round_is_not_throttled() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, mut w) = fresh_vbucket(tmp.path(), 0x5eed_0050, 100);
    for i in 0..100 {
        w.delete(&Workload::key(i));
    }
    w.wait_all();
    let w = Arc::new(Mutex::new(w));
    let hook = persist_20_before_final_round(&w, &[b'b'; 300]);
    let mut opts = options(
        CompactionMode::Concurrent,
        Duration::from_secs(3600),
        4,
        Some(hook),
    );
    opts.compactor.throttle_bytes_per_sec = Some(1);
    let (done, done_rx) = mpsc::channel::<()>();
    let watchdog = {
        let vb = vb.clone();
        std::thread::spawn(move || {
            if done_rx.recv_timeout(WAIT).is_err() {
                if let Some(control) = vb.compaction_control() {
                    control.cancel();
                }
            }
        })
    };
    let result = vb.compact(&opts);
    drop((opts, done));
    watchdog.join().unwrap();
    let report = result.expect("the final round was throttled");
    // No unlocked round: the 20 documents were replayed while taking the
    // lock, or under it, unthrottled either way.
    assert_eq!(report.rounds.len(), 1, "{report:?}");
    let replayed = docs(&report.rounds_waiting_for_commit) + docs(&report.rounds);
    assert_eq!(replayed, 20, "{report:?}");
    let w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    check(&vb, &w.model, "after an unthrottled final round");
    store.close().unwrap();
}

/// Commits that land after the unlocked rounds are replayed, and the new
/// file committed, before the lock is taken: with no flush in between, the
/// locked round replays nothing and only renames and switches.
#[test]
fn a_gap_left_by_the_rounds_is_replayed_before_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, vb, mut w) = fresh_vbucket(tmp.path(), 0x5eed_0051, 100);
    prefill(&mut w, 2);
    let w = Arc::new(Mutex::new(w));
    let hook = persist_20_before_final_round(&w, &[b'c'; 100]);
    // A budget of an hour: the unlocked rounds leave any gap to the lock.
    let opts = options(
        CompactionMode::Concurrent,
        Duration::from_secs(3600),
        4,
        Some(hook),
    );
    let report = vb.compact(&opts).unwrap();
    drop(opts);
    assert_eq!(docs(&report.rounds_waiting_for_commit), 20, "{report:?}");
    let locked = report.rounds.last().expect("a final round");
    assert!(locked.locked, "{report:?}");
    assert_eq!(locked.docs, 0, "{report:?}");
    assert_eq!(locked.bytes_written, 0, "{report:?}");
    let w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    check(
        &vb,
        &w.model,
        "after a compaction whose locked round was empty",
    );
    drop(vb);
    store.close().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    check(
        &vb,
        &w.model,
        "reopened after a compaction whose locked round was empty",
    );
    store.close().unwrap();
}

/// A real directory that makes a compaction's rename meet a concurrent
/// `delete_vbucket` at its worst: the rename of a `.compact` file tells a
/// channel, then waits (two seconds at most) until the directory has been
/// listed; a removal of a `.compact` file waits until a rename in progress
/// is done.
#[derive(Debug)]
struct GateDirectory {
    inner: couchfile::OsDirectory,
    gate: Mutex<Gate>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    on_rename: Option<mpsc::Sender<()>>,
    renaming: bool,
    listed: bool,
}

impl GateDirectory {
    fn wait_while(&self, limit: Duration, blocked: impl Fn(&Gate) -> bool) {
        let deadline = Instant::now() + limit;
        let mut gate = self.gate.lock().unwrap();
        while blocked(&gate) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            gate = self.changed.wait_timeout(gate, deadline - now).unwrap().0;
        }
    }

    fn update(&self, f: impl FnOnce(&mut Gate)) {
        f(&mut self.gate.lock().unwrap());
        self.changed.notify_all();
    }
}

impl couchfile::Directory for GateDirectory {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn list(&self) -> std::io::Result<Vec<String>> {
        let names = self.inner.list()?;
        self.update(|g| g.listed |= g.renaming);
        Ok(names)
    }

    fn open(&self, name: &str) -> std::io::Result<Arc<dyn couchfile::Backend>> {
        self.inner.open(name)
    }

    fn create(&self, name: &str) -> std::io::Result<Arc<dyn couchfile::Backend>> {
        self.inner.create(name)
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        if name.ends_with(".compact") {
            self.wait_while(WAIT, |g| g.renaming);
        }
        self.inner.remove(name)
    }

    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        let tell = if from.ends_with(".compact") {
            self.gate.lock().unwrap().on_rename.take()
        } else {
            None
        };
        let Some(tell) = tell else {
            return self.inner.rename(from, to);
        };
        self.update(|g| g.renaming = true);
        let _ = tell.send(());
        self.wait_while(Duration::from_secs(2), |g| !g.listed);
        let renamed = self.inner.rename(from, to);
        self.update(|g| g.renaming = false);
        renamed
    }

    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }

    fn lock(&self) -> couchfile::Result<couchfile::DirLock> {
        self.inner.lock()
    }
}

/// `delete_vbucket` while a compaction of the vbucket is past its last
/// check (its final round, renaming): the compaction may finish or fail,
/// but the deletion succeeds and no file of the vbucket survives it, not
/// even the revision the compaction renamed into place.
#[test]
fn deleting_a_vbucket_during_the_rename_of_its_compaction_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Arc::new(GateDirectory {
        inner: couchfile::OsDirectory::new(tmp.path()).unwrap(),
        gate: Mutex::new(Gate::default()),
        changed: std::sync::Condvar::new(),
    });
    let (tell, told) = mpsc::channel();
    dir.gate.lock().unwrap().on_rename = Some(tell);
    let store = Arc::new(
        Store::open_in(Arc::clone(&dir) as Arc<dyn couchfile::Directory>, config()).unwrap(),
    );
    let vb = store.open_vbucket(0).unwrap();
    let mut w = Workload::new(vb.clone(), 0x5eed_0060, 100);
    prefill(&mut w, 5);
    let deleter = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || told.recv().ok().map(|()| store.delete_vbucket(0)))
    };
    let compacted = vb.compact(&CompactionOptions::default());
    // If the rename was never reached, the deleter gives up.
    dir.gate.lock().unwrap().on_rename = None;
    let deleted = deleter.join().unwrap().expect("the rename was reached");
    eprintln!("compaction: {compacted:?}");
    deleted.unwrap();
    assert_eq!(names(tmp.path()), Vec::<String>::new());
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    assert!(store.vbuckets().is_empty());
    store.close().unwrap();
}

/// Hooks whose decision panics, as a caller's may.
struct PanickingHooks;

impl Hooks for PanickingHooks {
    fn keep(&mut self, _info: &DocInfo) -> bool {
        panic!("a hook that panics");
    }
}

#[test]
fn a_compaction_whose_callbacks_panic_leaves_the_vbucket_usable_and_closable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut last = 0;
    for i in 0..200u32 {
        last = vb
            .set(format!("k{i:03}").as_bytes(), b"v", ItemMeta::default())
            .unwrap()
            .seqno;
    }
    vb.wait_persisted(last, WAIT).unwrap();
    let panicking_at = |at: CompactionPhase| -> CompactionHook {
        Arc::new(move |phase| {
            if phase == at {
                panic!("a phase hook that panics at {phase:?}");
            }
        })
    };
    let attempts: Vec<Box<dyn Fn() -> vbucket::Result<CompactionReport>>> = vec![
        Box::new(|| vb.compact_with_hooks(&CompactionOptions::default(), &mut PanickingHooks)),
        Box::new(|| {
            vb.compact(&CompactionOptions {
                hook: Some(panicking_at(CompactionPhase::BeforeFinalRound)),
                ..CompactionOptions::default()
            })
        }),
        // With the commit lock held.
        Box::new(|| {
            vb.compact(&CompactionOptions {
                hook: Some(panicking_at(CompactionPhase::FinalRoundLocked)),
                ..CompactionOptions::default()
            })
        }),
    ];
    for (i, attempt) in attempts.iter().enumerate() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(attempt));
        assert!(r.is_err(), "attempt {i} did not panic");
        // The slot is free, the flusher commits, a next compaction runs.
        let m = vb
            .set(format!("after{i}").as_bytes(), b"v", ItemMeta::default())
            .unwrap();
        vb.wait_persisted(m.seqno, WAIT).unwrap();
    }
    assert_eq!(
        vb.compact(&CompactionOptions::default())
            .unwrap()
            .revision_after,
        2
    );
    store.close().unwrap();
    assert_eq!(names(dir.path()), ["0.couch.2"]);
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(vb.get(b"k199").unwrap().unwrap().value, b"v");
    assert_eq!(vb.get(b"after2").unwrap().unwrap().value, b"v");
    store.close().unwrap();
}
