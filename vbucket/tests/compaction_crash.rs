#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Crashes and I/O errors during a concurrent compaction, through
//! couchfile's fault injection.
//!
//! The workload: a store on a [`FaultyDirectory`] (one flusher thread,
//! small batches, quick retries, a short close timeout), a seeded prefill
//! of sets and deletes, then a compaction (zero lock budget, two unlocked
//! rounds, sort runs spilled, periodic syncs, small replay batches) whose
//! hook keeps the flusher busy: it flushes and waits for persistence at
//! `Copied` (with a vbstate change) and after each round, and enqueues
//! without waiting before the final round and under its lock; then more
//! flushes into the new revision and a close.
//!
//! Dry runs count the mutating I/Os (writes, syncs, creates, renames,
//! removes, directory syncs) of the compaction window, whose length varies
//! with the flusher's batching; then the workload is run once per crash
//! point in the window (and a little past the longest one), and the
//! directory a power cut would leave (no or all unsynced bytes; the synced
//! or the live names) is reopened:
//!
//! - the high seqno `H` is between the highest seqno reported persisted
//!   and the last accepted;
//! - the documents (by seq with tombstones, and by key) are exactly the
//!   workload's mutations up to `H`, the vbstate says `H` is persisted and
//!   holds the state changes made before it;
//! - exactly one revision file remains, no `.compact` file or sort run, and
//!   it passes `verify_snapshot`;
//! - a write after the reopen is persisted and survives another reopen.
//!
//! `compaction_crash_sweep_sample` (CI) tries a sample of the points;
//! `full_compaction_crash_sweep` (ignored; `cargo xtask crash`, which sets
//! `CRASH_SWEEP=full`) tries every one. Setting `CRASH_SWEEP=full` makes the
//! sample test do the full sweep too.
//!
//! ENOSPC and EIO injected on the compaction's writes, syncs, creates and
//! renames make `compact()` fail and remove its files, while the flusher
//! goes on; a second compaction succeeds once the faults are cleared. A
//! failed directory sync after the rename holds durability reports back
//! until a sync succeeds.

mod support;

use btree::Snapshot;
use couchfile::{
    CouchFile, Directory, FaultController, FaultKind, FaultRule, FaultyDirectory, NameTail, OpKind,
    OpenMode, TornTail,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{check_against_model, crash_config as config, shortest_and_longest, Accepted, Rng};
use vbucket::tool::verify_snapshot;
use vbucket::{
    CompactionConfig, CompactionHook, CompactionMode, CompactionOptions, CompactionPhase, ItemMeta,
    Store, VBucket, VbucketState, DATATYPE_JSON,
};

/// Keys of the workload: few, so that keys are often set again and deleted.
const KEYS: u64 = 64;
const SEED: u64 = 0x2545_f491_4f6c_dd1d;
/// How long a wait for persistence may take before the test gives up.
const WAIT: Duration = Duration::from_secs(30);
/// A wait that is expected to time out.
const SHORT: Duration = Duration::from_millis(100);
/// Crash points tried after the compaction returned (its first flushes
/// into the new revision).
const AFTER: u64 = 16;
/// Runs without a crash that measure the compaction window.
const DRY_RUNS: usize = 8;

/// The compaction of the workload: every code path that does I/O.
fn compaction_options(hook: Option<CompactionHook>) -> CompactionOptions {
    CompactionOptions {
        compactor: CompactionConfig {
            id_sort_memory: 512,
            sync_every_bytes: 16 << 10,
            replay_batch: 4,
            ..CompactionConfig::default()
        },
        mode: CompactionMode::Concurrent,
        max_rounds: 2,
        lock_budget: Duration::ZERO,
        history: None,
        hook,
    }
}

/// A vbstate change, committed after the header of update seq `seqno`;
/// `durable` when `set_state` returned Ok.
#[derive(Debug, Clone, Copy)]
struct StateChange {
    seqno: u64,
    state: VbucketState,
    durable: bool,
}

/// Writes to vbucket 0 and remembers what was accepted and reported
/// persisted; stops writing once it has seen the crash.
struct Writer {
    vb: VBucket,
    controller: FaultController,
    rng: Rng,
    accepted: Vec<Accepted>,
    persisted: u64,
    states: Vec<StateChange>,
    crashed: bool,
}

impl Writer {
    fn value(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0 => 0,
            1..=5 => self.rng.range(1, 100),
            6 | 7 => self.rng.range(100, 1500),
            _ => self.rng.range(3000, 14000),
        } as usize;
        let mut v = format!("{}:", self.accepted.len()).into_bytes();
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

    /// One random set or delete (not waited for).
    fn op(&mut self) {
        if self.crashed {
            return;
        }
        let k = self.rng.below(KEYS);
        let key = if k.is_multiple_of(5) {
            format!("key-{k:03}/{}", "x".repeat(150)).into_bytes()
        } else {
            format!("key-{k:03}").into_bytes()
        };
        let (result, value, meta) = if self.rng.below(5) == 0 {
            let meta = ItemMeta::default();
            (self.vb.delete(&key, meta), None, meta)
        } else {
            let meta = ItemMeta {
                flags: self.rng.next() as u32,
                datatype: if self.rng.below(2) == 0 {
                    DATATYPE_JSON
                } else {
                    0
                },
                ..ItemMeta::default()
            };
            let value = self.value();
            (self.vb.set(&key, &value, meta), Some(value), meta)
        };
        match result {
            Ok(m) => self.accepted.push(Accepted {
                seqno: m.seqno,
                key,
                value,
                cas: m.cas,
                flags: meta.flags,
                datatype: meta.datatype,
            }),
            Err(e) => {
                assert!(self.controller.has_crashed(), "a mutation failed: {e}");
                self.crashed = true;
            }
        }
    }

    fn burst(&mut self, n: usize) {
        for _ in 0..n {
            self.op();
        }
    }

    /// Waits for everything accepted to be persisted, in short waits so
    /// the crash is noticed at once.
    fn wait(&mut self) {
        let Some(last) = self.accepted.last().map(|a| a.seqno) else {
            return;
        };
        let start = Instant::now();
        while !self.crashed {
            match self.vb.wait_persisted(last, Duration::from_millis(2)) {
                Ok(p) => {
                    self.persisted = self.persisted.max(p);
                    return;
                }
                Err(e) if e.is_timeout() => {
                    self.crashed = self.controller.has_crashed();
                    assert!(
                        start.elapsed() < WAIT,
                        "seqno {last} not persisted without a crash"
                    );
                }
                Err(e) => panic!("wait_persisted: {e}"),
            }
        }
    }

    fn flush(&mut self, n: usize) {
        self.burst(n);
        self.wait();
    }

    /// Changes the vbucket state (everything accepted is persisted).
    fn set_state(&mut self, state: VbucketState) {
        if self.crashed {
            return;
        }
        let seqno = self.vb.latest_header().update_seq;
        let durable = match self.vb.set_state(state) {
            Ok(()) => true,
            Err(e) => {
                assert!(self.controller.has_crashed(), "set_state: {e}");
                self.crashed = true;
                false
            }
        };
        self.states.push(StateChange {
            seqno,
            state,
            durable,
        });
    }
}

/// What one run of the workload did.
struct Run {
    dir: Arc<FaultyDirectory>,
    accepted: Vec<Accepted>,
    persisted: u64,
    states: Vec<StateChange>,
    crashed: bool,
    /// Mutating I/Os before the compaction started and when it returned.
    window: (u64, u64),
    /// Mutating I/Os of the whole run.
    mutations: u64,
    /// `compact()` returned Ok.
    compacted: bool,
}

/// The hook: flushes at `Copied` (and changes the state) and after each
/// round, only enqueues before the final round and under its lock.
fn hook(w: &Arc<Mutex<Writer>>) -> CompactionHook {
    let w = Arc::clone(w);
    Arc::new(move |phase| {
        let mut w = w.lock().unwrap();
        match phase {
            CompactionPhase::Copied => {
                w.flush(10);
                w.set_state(VbucketState::Replica);
                w.flush(6);
            }
            CompactionPhase::RoundDone(n) => w.flush(9 - 2 * n),
            CompactionPhase::BeforeFinalRound | CompactionPhase::FinalRoundLocked => w.burst(5),
        }
    })
}

/// Runs the workload of `seed`, crashing at mutating I/O `crash_at` of the
/// compaction window (counted from the compaction's start).
fn run(seed: u64, crash_at: Option<u64>) -> Run {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller.clone()));
    let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut w = Writer {
        vb: vb.clone(),
        controller: controller.clone(),
        rng: Rng::new(seed),
        accepted: Vec::new(),
        persisted: 0,
        states: Vec::new(),
        crashed: false,
    };
    for _ in 0..20 {
        let n = w.rng.range(4, 14) as usize;
        w.flush(n);
    }
    assert!(!w.crashed);

    let start = controller.mutation_count();
    if let Some(n) = crash_at {
        controller.crash_at(n);
    }
    let w = Arc::new(Mutex::new(w));
    let opts = compaction_options(Some(hook(&w)));
    let compacted = vb.compact(&opts);
    drop(opts);
    let end = controller.mutation_count();
    match &compacted {
        Ok(report) => assert_eq!(report.rounds.len(), 3, "{report:?}"),
        Err(e) => assert!(controller.has_crashed(), "compaction failed: {e}"),
    }
    let mut w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    // Into the new revision.
    w.flush(8);
    w.flush(5);
    w.persisted = w.persisted.max(vb.persisted_seqno());
    let closed = store.close();
    if !controller.has_crashed() {
        closed.unwrap();
    }
    w.persisted = w.persisted.max(vb.persisted_seqno());
    let crashed = controller.has_crashed();
    assert!(crashed || !w.crashed);
    if crash_at.is_none() {
        assert!(!crashed);
        assert_eq!(w.persisted, w.accepted.last().unwrap().seqno);
    }
    Run {
        dir,
        accepted: w.accepted,
        persisted: w.persisted,
        states: w.states,
        crashed,
        window: (start, end),
        mutations: controller.mutation_count(),
        compacted: compacted.is_ok(),
    }
}

/// The vbucket states a header of update seq `high` may hold.
fn allowed_states(states: &[StateChange], high: u64) -> Vec<VbucketState> {
    let mut allowed = vec![VbucketState::Active];
    for s in states {
        if s.seqno < high || (s.seqno == high && s.durable) {
            // Every header above `s.seqno` was committed after the change;
            // a durable change is in the last header of its seqno.
            allowed = vec![s.state];
        } else if s.seqno == high {
            allowed.push(s.state);
        }
    }
    allowed
}

/// Checks vbucket `vb` against the run; returns its high seqno.
fn check_vbucket(vb: &VBucket, run: &Run, what: &str) -> u64 {
    let (high, _, vbstate) = check_against_model(vb, &run.accepted, run.persisted, what);
    let allowed = allowed_states(&run.states, high);
    assert!(
        allowed.contains(&vbstate.state),
        "{what}: state {:?} at {high}, expected one of {allowed:?} ({:?})",
        vbstate.state,
        run.states
    );
    high
}

/// The directory holds one revision of vbucket 0 and nothing else, which
/// passes verify; returns the revision.
fn check_files(dir: &FaultyDirectory, what: &str) -> u64 {
    let names = dir.list().unwrap();
    assert_eq!(names.len(), 1, "{what}: {names:?}");
    let name = &names[0];
    let rev = name
        .strip_prefix("0.couch.")
        .unwrap_or_else(|| panic!("{what}: {name}"));
    assert!(rev.bytes().all(|b| b.is_ascii_digit()), "{what}: {name}");
    let file = CouchFile::new(dir.open(name).unwrap(), dir.path().join(name)).unwrap();
    let snapshot = Snapshot::open_latest(file, OpenMode::Normal)
        .unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
    let report = verify_snapshot(&snapshot);
    assert!(report.is_ok(), "{what}: {name}: {:?}", report.problems);
    rev.parse().unwrap()
}

/// Reopens the crash image `torn`/`names` of the run and checks it; with
/// `write_on`, writes, reopens what was synced and checks that too. Returns
/// the revision the image holds.
fn check_image(run: &Run, torn: TornTail, names: NameTail, write_on: bool, what: &str) -> u64 {
    let what = format!("{what}, {torn:?}/{names:?}");
    let image = Arc::new(run.dir.crash_image(torn, names).unwrap());
    let store = Store::open_in(Arc::clone(&image) as Arc<dyn Directory>, config())
        .unwrap_or_else(|e| panic!("{what}: reopening: {e}"));
    let vb = store
        .vbucket(0)
        .unwrap_or_else(|e| panic!("{what}: vbucket 0: {e}"));
    let high = check_vbucket(&vb, run, &what);
    let revision = check_files(&image, &what);
    assert_eq!(vb.snapshot().revision(), revision, "{what}");
    if !write_on {
        store.close().unwrap();
        return revision;
    }
    let m = vb.set(b"after the crash", b"written on", ItemMeta::default());
    let m = m.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(m.seqno, high + 1, "{what}");
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    store.close().unwrap();
    let image = Arc::new(
        image
            .crash_image(TornTail::Nothing, NameTail::Synced)
            .unwrap(),
    );
    let store = Store::open_in(Arc::clone(&image) as Arc<dyn Directory>, config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(vb.high_seqno(), high + 1, "{what}: written on");
    let doc = vb.get(b"after the crash").unwrap().expect("written on");
    assert_eq!(doc.value, b"written on");
    assert_eq!(check_files(&image, &what), revision, "{what}");
    store.close().unwrap();
    revision
}

/// The crash images tried: none or all of the unsynced bytes (and in the
/// full sweep torn prefixes too), with the synced or the live names.
fn images(full: bool) -> Vec<(TornTail, NameTail)> {
    let mut torn = vec![TornTail::Nothing, TornTail::Everything];
    if full {
        torn.extend([1, 100, 4097, 20000].map(TornTail::Prefix));
    }
    torn.into_iter()
        .flat_map(|t| [(t, NameTail::Synced), (t, NameTail::Everything)])
        .collect()
}

/// The sample: the start of the compaction, its end (commit, rename,
/// directory sync, removal of the old revision) and the first flushes
/// after it, and an even spread of the rest. The end is where the shortest
/// of the dry runs' windows ended, and every other I/O up to where the
/// longest ended: the end of each run falls somewhere in between.
fn sample_points(shortest: u64, longest: u64) -> Vec<u64> {
    let mut points: Vec<u64> = (0..6).collect();
    points.extend(shortest.saturating_sub(12)..shortest + AFTER);
    points.extend((shortest + AFTER..longest + AFTER).step_by(2));
    let stride = (shortest / 30).max(1);
    points.extend((6..shortest).step_by(stride as usize));
    points.sort_unstable();
    points.dedup();
    points
}

fn full_from_env() -> bool {
    std::env::var("CRASH_SWEEP").is_ok_and(|v| v == "full")
}

fn sweep(full: bool) {
    let started = Instant::now();
    // The window's length varies with the flusher's batching (each extra
    // batch is a commit in the old file and a replay committed in the new
    // one): by about 8 I/Os a batch, from 133 to 199 I/Os in 80 runs. The
    // points are placed by the shortest and the longest of a few dry runs.
    let dry: Vec<Run> = (0..DRY_RUNS).map(|_| run(SEED, None)).collect();
    let (shortest, longest) = shortest_and_longest(dry.iter().map(|d| d.window.1 - d.window.0));
    assert!(
        (50..5000).contains(&shortest),
        "the compaction window takes {shortest} mutating I/Os"
    );
    for d in &dry {
        assert!(!d.crashed);
        let revision = check_image(d, TornTail::Nothing, NameTail::Synced, true, "no crash");
        assert_eq!(revision, 2);
    }
    let points: Vec<u64> = if full {
        (0..longest + longest / 16 + AFTER).collect()
    } else {
        sample_points(shortest, longest)
    };
    let variants = images(full);
    let (mut crashed, mut compacted, mut checked) = (0u64, 0u64, 0u64);
    // Images by the revision they hold.
    let mut revisions = BTreeMap::<u64, u64>::new();
    for &n in &points {
        let r = run(SEED, Some(n));
        crashed += u64::from(r.crashed);
        // A point inside the run's own window always crashes. (Not the
        // dry runs' shortest: the window varies with the batching, by more
        // than a batch from one run to the next.)
        let own = r.window.1 - r.window.0;
        assert!(
            r.crashed || n >= own,
            "no crash at I/O {n} of this run's window of {own}"
        );
        compacted += u64::from(r.compacted);
        let what =
            format!("crash at I/O {n} of the {shortest} to {longest} of the compaction window");
        for (i, &(torn, names)) in variants.iter().enumerate() {
            let write_on = full || i == n as usize % variants.len();
            let revision = check_image(&r, torn, names, write_on, &what);
            *revisions.entry(revision).or_default() += 1;
            checked += 1;
        }
    }
    // Crashes before the switch and after it.
    assert_eq!(revisions.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert!(compacted > 0 && compacted < points.len() as u64);
    // Every point inside its run's window crashed (checked above); the
    // ones past the end of a shorter run's flushes did not.
    assert!(crashed * 2 >= points.len() as u64, "{crashed} crashed");
    println!(
        "{} compaction crash sweep: window of {shortest} to {longest} mutating I/Os (of {}), {} \
         crash points ({crashed} crashed, {compacted} compactions returned Ok), {checked} crash \
         images checked (by revision: {revisions:?}) in {:.1?}",
        if full { "full" } else { "sample" },
        dry[0].mutations,
        points.len(),
        started.elapsed()
    );
}

#[test]
fn compaction_crash_sweep_sample() {
    sweep(full_from_env());
}

/// The full sweep: `cargo xtask crash`.
#[test]
#[ignore = "the full compaction crash sweep: run by `cargo xtask crash`"]
fn full_compaction_crash_sweep() {
    sweep(true);
}

// --- ENOSPC and EIO ---------------------------------------------------------

/// A store with vbucket 0 on a new fault-injecting directory, prefilled
/// (everything persisted).
fn prefilled(seed: u64) -> (Arc<FaultyDirectory>, Store, Writer) {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller.clone()));
    let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut w = Writer {
        vb,
        controller,
        rng: Rng::new(seed),
        accepted: Vec::new(),
        persisted: 0,
        states: Vec::new(),
        crashed: false,
    };
    for _ in 0..12 {
        let n = w.rng.range(4, 14) as usize;
        w.flush(n);
    }
    (dir, store, w)
}

/// What `w` did, for the checks of a crash run.
fn as_run(w: &Writer, dir: &Arc<FaultyDirectory>) -> Run {
    Run {
        dir: Arc::clone(dir),
        accepted: w.accepted.clone(),
        persisted: w.persisted,
        states: w.states.clone(),
        crashed: false,
        window: (0, 0),
        mutations: 0,
        compacted: true,
    }
}

/// The live names of `dir`, sorted.
fn live_names(dir: &FaultyDirectory) -> Vec<String> {
    let mut names = dir.list().unwrap();
    names.sort();
    names
}

/// The operating-system error code of a fault.
fn errno(kind: FaultKind) -> i32 {
    match kind {
        FaultKind::NoSpace => 28,
        FaultKind::Eio => 5,
    }
}

/// After a compaction failed on an injected fault: its files are gone, the
/// flusher goes on, and once the faults are cleared a second compaction
/// succeeds; the result survives a power cut.
fn after_a_failed_compaction(dir: &Arc<FaultyDirectory>, store: Store, mut w: Writer, what: &str) {
    assert_eq!(live_names(dir), ["0.couch.1"], "{what}: files left");
    w.controller.clear_faults();
    w.flush(6);
    assert!(!w.crashed);
    let last = w.accepted.last().unwrap().seqno;
    assert_eq!(w.persisted, last, "{what}");
    check_vbucket(&w.vb, &as_run(&w, dir), what);
    let w = Arc::new(Mutex::new(w));
    let report = {
        let vb = w.lock().unwrap().vb.clone();
        vb.compact(&compaction_options(Some(hook(&w))))
            .unwrap_or_else(|e| panic!("{what}: the second compaction: {e}"))
    };
    let mut w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
    assert_eq!((report.revision_before, report.revision_after), (1, 2));
    w.flush(4);
    assert!(!w.crashed);
    assert_eq!(live_names(dir), ["0.couch.2"], "{what}");
    check_vbucket(&w.vb, &as_run(&w, dir), what);
    let run = as_run(&w, dir);
    store.close().unwrap();
    for (torn, names) in [
        (TornTail::Nothing, NameTail::Synced),
        (TornTail::Everything, NameTail::Everything),
    ] {
        let revision = check_image(&run, torn, names, false, what);
        assert_eq!(revision, 2, "{what}");
    }
}

/// ENOSPC or EIO on the n-th write, sync, create or rename of a compaction
/// (nothing else writes meanwhile; the same compaction every time), for
/// every n until the compaction does not reach it: `compact()` fails with
/// the error, and [`after_a_failed_compaction`] holds.
#[test]
fn io_errors_fail_the_compaction_and_remove_its_files() {
    for (op, kind) in [
        (OpKind::Write, FaultKind::NoSpace),
        (OpKind::Sync, FaultKind::Eio),
        (OpKind::Create, FaultKind::NoSpace),
        (OpKind::Rename, FaultKind::Eio),
    ] {
        for skip in 0..1000 {
            let what = format!("{kind:?} on {op:?} #{skip}");
            let (dir, store, w) = prefilled(SEED);
            let injected = w.controller.injected_count();
            w.controller.inject(FaultRule {
                op: Some(op),
                kind,
                skip,
                times: Some(1),
            });
            let result = w.vb.compact(&compaction_options(None));
            let fired = w.controller.injected_count() > injected;
            assert_eq!(fired, result.is_err(), "{what}: {result:?}");
            let Err(e) = result else {
                // Past the compaction's last such operation: every earlier
                // one failed the compaction.
                assert!(skip > 0, "{what}");
                eprintln!("{kind:?} on {op:?}: {skip} failed compactions, none at #{skip}");
                store.close().unwrap();
                break;
            };
            let message = e.to_string();
            assert!(
                message.contains(&format!("os error {}", errno(kind))),
                "{what}: {message}"
            );
            after_a_failed_compaction(&dir, store, w, &what);
        }
    }
}

/// The same faults, until cleared, injected while the flusher commits
/// during the compaction (after the hook's first flush at `Copied`, with
/// more writes queued): the compaction fails, its files go, and the queued
/// writes are persisted once the faults are cleared.
#[test]
fn io_errors_while_the_flusher_commits_fail_the_compaction_cleanly() {
    for (op, kind) in [
        (OpKind::Write, FaultKind::NoSpace),
        (OpKind::Write, FaultKind::Eio),
        (OpKind::Sync, FaultKind::Eio),
        (OpKind::Rename, FaultKind::NoSpace),
    ] {
        let what = format!("{kind:?} on every {op:?}");
        let (dir, store, w) = prefilled(SEED);
        let controller = w.controller.clone();
        let vb = w.vb.clone();
        let w = Arc::new(Mutex::new(w));
        let fault_hook: CompactionHook = {
            let w = Arc::clone(&w);
            Arc::new(move |phase| {
                let mut w = w.lock().unwrap();
                match phase {
                    CompactionPhase::Copied => {
                        w.flush(10);
                        w.burst(6);
                        w.controller.inject(FaultRule::always(op, kind));
                    }
                    _ => w.burst(3),
                }
            })
        };
        let result = vb.compact(&compaction_options(Some(fault_hook)));
        let e = result.expect_err(&what);
        assert!(
            e.to_string().contains(&format!("os error {}", errno(kind))),
            "{what}: {e}"
        );
        let mut w = Arc::try_unwrap(w).ok().unwrap().into_inner().unwrap();
        assert_eq!(live_names(&dir), ["0.couch.1"], "{what}: files left");
        if op != OpKind::Rename {
            // Commits fail too while the fault lasts: nothing more is
            // reported persisted.
            w.burst(1);
            let last = w.accepted.last().unwrap().seqno;
            let err = vb.wait_persisted(last, SHORT).unwrap_err();
            assert!(err.is_timeout(), "{what}: {err}");
            assert!(w.persisted < last);
        }
        // The queued writes are persisted once the faults clear (and
        // `after_a_failed_compaction` checks all of them).
        controller.clear_faults();
        w.wait();
        after_a_failed_compaction(&dir, store, w, &what);
    }
}

/// The directory sync after the rename fails: the compaction has switched
/// (it cannot fail once the new revision has its name), but a power cut
/// now would bring the old revision back, so nothing may be reported
/// persisted until a directory sync succeeds.
#[test]
fn a_failed_directory_sync_after_the_rename_holds_durability_back() {
    let (dir, store, mut w) = prefilled(SEED);
    w.controller
        .inject(FaultRule::always(OpKind::SyncDir, FaultKind::Eio));
    let report = w.vb.compact(&compaction_options(None)).unwrap();
    assert_eq!(report.revision_after, 2);
    // The old revision stays until the rename is known durable (the next
    // open removes it).
    assert_eq!(live_names(&dir), ["0.couch.1", "0.couch.2"]);
    // The old revision comes back after a power cut, the new one if the
    // names reached the disk: both hold everything persisted.
    let run = as_run(&w, &dir);
    assert_eq!(
        check_image(
            &run,
            TornTail::Nothing,
            NameTail::Synced,
            false,
            "synced names"
        ),
        1
    );
    assert_eq!(
        check_image(
            &run,
            TornTail::Everything,
            NameTail::Everything,
            false,
            "live names"
        ),
        2
    );
    // A write is not reported persisted while the directory cannot be synced.
    w.burst(3);
    let last = w.accepted.last().unwrap().seqno;
    let err = w.vb.wait_persisted(last, SHORT).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let run = as_run(&w, &dir);
    assert_eq!(
        check_image(
            &run,
            TornTail::Everything,
            NameTail::Synced,
            false,
            "held back"
        ),
        1
    );
    w.controller.clear_faults();
    w.wait();
    assert_eq!(w.persisted, last);
    let run = as_run(&w, &dir);
    assert_eq!(
        check_image(
            &run,
            TornTail::Nothing,
            NameTail::Synced,
            true,
            "synced at last"
        ),
        2
    );
    store.close().unwrap();
}
