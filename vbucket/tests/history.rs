#![allow(clippy::unwrap_used, clippy::expect_used)]
//! History: the header chain as a history (`VBucket::history`), reads as of
//! a seqno or a time (`snapshot_as_of_seqno`, `snapshot_as_of_time`), and
//! rollback (`VBucket::rollback`) checked against a model of the accepted
//! mutations: to a middle seqno, to zero, below the purge seqno, across
//! headers with the same update seq, with unflushed mutations and their
//! waiters, racing the flusher, a compaction and `close_vbucket`, and
//! crashed at each of its I/Os.

mod support;

use couchfile::{
    Directory, FaultController, FaultKind, FaultRule, FaultyDirectory, NameTail, OpKind, TornTail,
};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{mpsc, Arc};
use std::time::{Duration, UNIX_EPOCH};
use support::{verify_file, Rng};
use vbucket::{
    CompactionOptions, CompactionPhase, Error, ItemMeta, ReadSnapshot, RollbackTo, Store,
    StoreConfig, VBucket, VbucketState,
};

const WAIT: Duration = Duration::from_secs(30);

/// A key's state in the model: its seqno and value (`None`: deleted).
type Model = BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>;

/// The mutations a vbucket accepted, in seqno order: (seqno, key, value).
#[derive(Debug, Default, Clone)]
struct Log(Vec<(u64, Vec<u8>, Option<Vec<u8>>)>);

impl Log {
    /// The state after every mutation up to `seqno`.
    fn at(&self, seqno: u64) -> Model {
        self.0
            .iter()
            .take_while(|(s, _, _)| *s <= seqno)
            .map(|(s, k, v)| (k.clone(), (*s, v.clone())))
            .collect()
    }

    /// Forgets the mutations above `seqno` (a rollback).
    fn truncate(&mut self, seqno: u64) {
        self.0.retain(|(s, _, _)| *s <= seqno);
    }
}

fn config() -> StoreConfig {
    let mut c = StoreConfig::default();
    c.flusher.max_batch_items = 5;
    c.nodes = btree::NodeConfig {
        leaf_threshold: 300,
        interior_threshold: 200,
    };
    c
}

/// `n` random sets and deletes over 20 keys, logged; the last seqno.
fn mutate(vb: &VBucket, rng: &mut Rng, log: &mut Log, n: usize) -> u64 {
    let mut last = vb.high_seqno();
    for _ in 0..n {
        let key = format!("k{:02}", rng.below(20)).into_bytes();
        if rng.below(5) == 0 {
            last = vb.delete(&key, ItemMeta::default()).unwrap().seqno;
            log.0.push((last, key, None));
        } else {
            let value = format!("v{}-{}", rng.next(), "x".repeat(rng.below(200) as usize));
            last = vb
                .set(&key, value.as_bytes(), ItemMeta::default())
                .unwrap()
                .seqno;
            log.0.push((last, key, Some(value.into_bytes())));
        }
    }
    last
}

/// Rounds of mutations, each persisted (so most rounds end in a header of
/// their own), with a state change (a commit of local documents only) every
/// third round.
fn build(vb: &VBucket, rng: &mut Rng, log: &mut Log, rounds: usize) {
    for round in 0..rounds {
        let n = 1 + rng.below(12) as usize;
        let last = mutate(vb, rng, log, n);
        vb.wait_persisted(last, WAIT).unwrap();
        if round % 3 == 2 {
            let state = if round % 2 == 0 {
                VbucketState::Replica
            } else {
                VbucketState::Active
            };
            vb.set_state(state).unwrap();
        }
    }
}

/// What `snapshot` lists (deletions included).
fn listing(snapshot: &ReadSnapshot) -> Model {
    let mut found = Model::new();
    snapshot
        .changes_since(0, &mut |doc| {
            let value = (!doc.deleted).then_some(doc.value);
            found.insert(doc.key, (doc.seqno, value));
            ControlFlow::Continue(())
        })
        .unwrap();
    found
}

/// The vbucket reads as `model` through point reads of every key in `log`.
fn assert_reads(vb: &VBucket, log: &Log, model: &Model, what: &str) {
    for (_, key, _) in &log.0 {
        let doc = vb.get_including_deleted(key).unwrap();
        let got = doc.map(|d| (d.seqno, (!d.deleted).then_some(d.value)));
        assert_eq!(
            got.as_ref(),
            model.get(key),
            "{what}: {}",
            String::from_utf8_lossy(key)
        );
    }
}

fn live(model: &Model) -> u64 {
    model.values().filter(|(_, v)| v.is_some()).count() as u64
}

#[test]
fn every_header_of_the_history_reads_as_the_model_at_its_seqno() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(7);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 30);
    let history = vb.history().unwrap();
    assert_eq!(history, vb.snapshot().history().unwrap());
    assert_eq!(history[0].offset, vb.latest_header().offset);
    assert!(history.len() > 30, "{} headers", history.len());
    assert!(
        history
            .windows(2)
            .any(|w| w[0].update_seq == w[1].update_seq),
        "state changes commit headers with the same update seq"
    );
    for pair in history.windows(2) {
        assert!(pair[0].offset > pair[1].offset);
        assert!(pair[0].update_seq >= pair[1].update_seq);
        assert!(pair[0].timestamp >= pair[1].timestamp, "timestamps go back");
    }
    for entry in &history {
        let snapshot = vb.snapshot_at(entry.offset).unwrap();
        let model = log.at(entry.update_seq);
        assert_eq!(listing(&snapshot), model, "header {}", entry.offset);
        assert_eq!(entry.doc_count, live(&model));
        assert_eq!(
            entry.deleted_count,
            model.len() as u64 - live(&model),
            "header {}",
            entry.offset
        );
        // The file's first header, written when it was created, says 0.
        assert!(entry.timestamp.is_some_and(|t| t > 0) || entry.offset == 0);
    }
    // As of every seqno: the newest header at or below it.
    let high = vb.high_seqno();
    for seqno in 0..=high + 2 {
        let expected = history.iter().find(|e| e.update_seq <= seqno);
        match (vb.snapshot_as_of_seqno(seqno), expected) {
            (Ok(snapshot), Some(e)) => {
                assert_eq!(snapshot.header_offset(), e.offset, "as of {seqno}");
                assert_eq!(listing(&snapshot), log.at(e.update_seq), "as of {seqno}");
            }
            (Err(Error::NoHeaderAsOf { .. }), None) => {}
            (got, want) => panic!("as of {seqno}: {got:?}, expected {want:?}"),
        }
    }
    // As of each header's time, and between two.
    for (i, entry) in history.iter().enumerate() {
        let t = entry.timestamp.unwrap();
        let at = UNIX_EPOCH + Duration::from_nanos(t);
        let newest_at_t = history.iter().find(|e| e.timestamp <= Some(t)).unwrap();
        assert_eq!(
            vb.snapshot_as_of_time(at).unwrap().header_offset(),
            newest_at_t.offset
        );
        if i > 0 && history[i - 1].timestamp.unwrap() > t + 1 {
            let between = UNIX_EPOCH + Duration::from_nanos(t + 1);
            assert_eq!(
                vb.snapshot_as_of_time(between).unwrap().header_offset(),
                newest_at_t.offset
            );
        }
    }
    // Before the first commit: the empty header the file was created with.
    let first_commit = history[history.len() - 2].timestamp.unwrap();
    let before = vb
        .snapshot_as_of_time(UNIX_EPOCH + Duration::from_nanos(first_commit - 1))
        .unwrap();
    assert_eq!(before.header_offset(), 0);
    assert_eq!(listing(&before), Model::new());
    // A snapshot's own history starts at its header.
    let older = vb.snapshot_as_of_seqno(high / 2).unwrap();
    let its_history = older.history().unwrap();
    assert_eq!(its_history[0].offset, older.header_offset());
    assert_eq!(
        its_history.as_slice(),
        &history[history.len() - its_history.len()..]
    );
    store.close().unwrap();
}

/// A vbucket with history, a rollback to the middle of it: the result, the
/// reads, the seqnos, the vbstate and the history after it, and again after
/// a reopen; new writes continue from the seqno rolled back to.
#[test]
fn rollback_to_a_middle_seqno_reads_as_the_model_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(11);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 24);
    let before = vb.history().unwrap();
    let high = vb.high_seqno();
    let target = high / 2;
    let chosen = *before.iter().find(|e| e.update_seq <= target).unwrap();
    let vbstate_then = vb
        .snapshot_at(chosen.offset)
        .unwrap()
        .vbstate()
        .unwrap()
        .unwrap();

    assert_eq!(
        vb.rollback(target).unwrap(),
        RollbackTo::Seqno(chosen.update_seq)
    );
    let to = chosen.update_seq;
    log.truncate(to);
    let model = log.at(to);
    assert_eq!(vb.high_seqno(), to);
    assert_eq!(vb.persisted_seqno(), to);
    assert_eq!(vb.vbstate(), vbstate_then);
    assert_eq!(listing(&vb.snapshot()), model);
    assert_reads(&vb, &log, &model, "after the rollback");
    let after = vb.history().unwrap();
    assert_eq!(after[0].update_seq, to);
    assert!(after[0].offset > before[0].offset, "appended as the newest");
    // The history is the chosen header's, then the rollback's copy of it.
    let kept: Vec<_> = before
        .iter()
        .filter(|e| e.offset <= chosen.offset)
        .collect();
    assert_eq!(after.len(), kept.len() + 1);
    for (a, b) in after[1..].iter().zip(kept) {
        assert_eq!(a, b);
    }
    // New writes continue at to + 1.
    let last = mutate(&vb, &mut rng, &mut log, 10);
    assert_eq!(log.0[log.0.len() - 10].0, to + 1);
    vb.wait_persisted(last, WAIT).unwrap();
    let model = log.at(last);
    assert_eq!(listing(&vb.snapshot()), model);
    let path = dir
        .path()
        .join(vbucket::revision_name(0, vb.snapshot().revision()));
    store.close().unwrap();
    verify_file(&path);

    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    assert_eq!(vb.high_seqno(), last);
    assert_eq!(listing(&vb.snapshot()), model);
    assert_reads(&vb, &log, &model, "after a reopen");
    // As of the seqno rolled back to, the history reads the rolled-back state.
    assert_eq!(listing(&vb.snapshot_as_of_seqno(to).unwrap()), log.at(to));
    store.close().unwrap();
}

/// Rolling back twice, and to the same seqno again, and to a seqno above
/// everything: the last changes nothing on disk.
#[test]
fn rollbacks_in_a_row_and_to_the_latest_header() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(12);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 15);
    let high = vb.high_seqno();
    let RollbackTo::Seqno(first) = vb.rollback(high * 2 / 3).unwrap() else {
        panic!("rolled back to zero")
    };
    log.truncate(first);
    build(&vb, &mut rng, &mut log, 6);
    let RollbackTo::Seqno(second) = vb.rollback(first + 3).unwrap() else {
        panic!("rolled back to zero")
    };
    assert!(second >= first && second <= first + 3);
    log.truncate(second);
    assert_eq!(listing(&vb.snapshot()), log.at(second));
    let latest = vb.latest_header();
    assert_eq!(
        vb.rollback(u64::MAX >> 16).unwrap(),
        RollbackTo::Seqno(second)
    );
    assert_eq!(vb.latest_header().offset, latest.offset, "nothing appended");
    assert_eq!(vb.rollback(second).unwrap(), RollbackTo::Seqno(second));
    assert_reads(&vb, &log, &log.at(second), "after rollbacks");
    let path = dir.path().join(vbucket::revision_name(0, 1));
    store.close().unwrap();
    verify_file(&path);
}

/// A rollback to a seqno below the first header with a vbstate, and one
/// below the purge seqno, roll back "to zero" and change nothing.
#[test]
fn rollback_to_zero_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(13);
    let mut log = Log::default();
    // The first commit of a new vbucket is its vbstate at seqno 0, so
    // rolling back to 0 goes to that empty state.
    assert_eq!(vb.rollback(0).unwrap(), RollbackTo::Seqno(0));
    build(&vb, &mut rng, &mut log, 10);
    let high = vb.high_seqno();
    // Purge: delete keys, compact with their tombstones dropped.
    let mut last = 0;
    for i in 0..5 {
        let key = format!("k{i:02}").into_bytes();
        last = vb.delete(&key, ItemMeta::default()).unwrap().seqno;
        log.0.push((last, key, None));
    }
    vb.wait_persisted(last, WAIT).unwrap();
    let mut options = CompactionOptions::default();
    options.compactor.purge.drop_deletes = true;
    let report = vb.compact(&options).unwrap();
    assert!(report.purge_seq > high, "purge seq {}", report.purge_seq);
    let latest = vb.latest_header();
    assert_eq!(vb.rollback(report.purge_seq - 1).unwrap(), RollbackTo::Zero);
    assert_eq!(vb.latest_header(), latest, "nothing changed");
    assert_eq!(vb.high_seqno(), last);
    // After a compaction the file has one header: a seqno below it is zero.
    assert_eq!(vb.history().unwrap().len(), 1);
    assert_eq!(vb.rollback(1).unwrap(), RollbackTo::Zero);
    assert_eq!(vb.rollback(last).unwrap(), RollbackTo::Seqno(last));
    store.close().unwrap();
}

/// Headers with the same update seq (state changes): the rollback takes the
/// newest of them at or below the target, so the state is the last one set
/// at that seqno.
#[test]
fn rollback_across_headers_with_the_same_update_seq_takes_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(14);
    let mut log = Log::default();
    let first = mutate(&vb, &mut rng, &mut log, 8);
    vb.wait_persisted(first, WAIT).unwrap();
    vb.set_state(VbucketState::Replica).unwrap();
    vb.set_state(VbucketState::Pending).unwrap();
    vb.set_state(VbucketState::Replica).unwrap();
    vb.set_state(VbucketState::Dead).unwrap();
    let second = mutate(&vb, &mut rng, &mut log, 8);
    vb.wait_persisted(second, WAIT).unwrap();
    vb.set_state(VbucketState::Active).unwrap();
    let same: Vec<_> = vb
        .history()
        .unwrap()
        .into_iter()
        .filter(|e| e.update_seq == first)
        .collect();
    assert!(same.len() >= 5, "{same:?}");
    assert_eq!(vb.rollback(first).unwrap(), RollbackTo::Seqno(first));
    assert_eq!(vb.vbstate().state, VbucketState::Dead);
    assert_eq!(
        vb.snapshot().vbstate().unwrap().unwrap().state,
        VbucketState::Dead
    );
    assert_eq!(listing(&vb.snapshot()), log.at(first));
    // As-of reads pick the newest of equal headers too.
    assert_eq!(
        vb.snapshot_as_of_seqno(first).unwrap().header_offset(),
        vb.latest_header().offset
    );
    store.close().unwrap();
}

/// Unflushed mutations (the disk fails every sync, so nothing flushes)
/// are dropped by a rollback; waits for them, under way or registered as
/// callbacks, end with a rolled-back error; the batch the flusher keeps
/// retrying is never written once the disk recovers; new writes reuse the
/// seqnos and persist.
#[test]
fn a_rollback_drops_unflushed_mutations_and_fails_their_waiters() {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller.clone()));
    let mut config = config();
    config.flusher.retry_backoff_min = Duration::from_millis(1);
    config.flusher.retry_backoff_max = Duration::from_millis(2);
    config.flusher.close_timeout = Duration::from_millis(100);
    let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(15);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 6);
    let persisted = vb.persisted_seqno();
    controller.inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
    let mut unflushed = Log::default();
    let last = mutate(&vb, &mut rng, &mut unflushed, 20);
    let (tx, rx) = mpsc::channel();
    for seqno in [persisted + 1, last] {
        let tx = tx.clone();
        vb.on_persisted(seqno, move |r| tx.send((seqno, r)).unwrap());
    }
    let waiter = {
        let vb = vb.clone();
        std::thread::spawn(move || vb.wait_persisted(last, Duration::MAX))
    };
    assert_eq!(
        vb.get(&unflushed.0[0].1).unwrap().is_some(),
        unflushed.0[0].2.is_some()
    );
    // The latest header is the target: nothing to write, so the failing
    // disk does not matter.
    assert_eq!(vb.rollback(last).unwrap(), RollbackTo::Seqno(persisted));
    let e = waiter.join().unwrap().unwrap_err();
    assert!(e.is_rolled_back(), "{e}");
    // A wait or a callback that begins after the rollback, for a seqno it
    // removed, fails at once too.
    let e = vb.wait_persisted(last, Duration::MAX).unwrap_err();
    assert!(e.is_rolled_back(), "{e}");
    vb.on_persisted(last, move |r| tx.send((last, r)).unwrap());
    for _ in 0..3 {
        let (seqno, r) = rx.recv().unwrap();
        assert!(
            matches!(r, Err(flusher::Error::RolledBack { to, .. }) if to == persisted),
            "{seqno}: {r:?}"
        );
    }
    assert_eq!(vb.high_seqno(), persisted);
    assert_eq!(vb.persisted_seqno(), persisted);
    assert_reads(&vb, &unflushed, &log.at(persisted), "unflushed dropped");
    assert_eq!(vb.stats().unwrap().flush.queued_items, 0);
    controller.clear_faults();
    let again = mutate(&vb, &mut rng, &mut log, 7);
    assert_eq!(again, persisted + 7, "seqnos continue from the rollback");
    assert_eq!(vb.wait_persisted(again, WAIT).unwrap(), again);
    let model = log.at(again);
    assert_eq!(listing(&vb.snapshot()), model);
    assert_reads(&vb, &unflushed, &model, "after new writes");
    store.close().unwrap();
    // Nothing of the rolled-back batch reached the file.
    let store = Store::open_in(dir as Arc<dyn Directory>, StoreConfig::default()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    assert_eq!(listing(&vb.snapshot()), model);
    assert_eq!(vb.high_seqno(), again);
    store.close().unwrap();
}

/// A writer keeps writing while rollbacks happen: every mutation accepted
/// after a rollback (its seqno restarts from the rollback's) persists, every
/// one before it above the target is gone, and the file stays valid.
#[test]
fn rollback_racing_the_flusher_loses_only_what_it_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(16);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 10);
    for round in 0..4u64 {
        let writer = {
            let vb = vb.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + round);
                let mut written = Log::default();
                for _ in 0..300 {
                    mutate(&vb, &mut rng, &mut written, 1);
                }
                written
            })
        };
        // Roll back to somewhere in what is persisted by now.
        let target = vb.persisted_seqno() * 3 / 4;
        let to = match vb.rollback(target).unwrap() {
            RollbackTo::Seqno(to) => to,
            RollbackTo::Zero => panic!("zero"),
        };
        let written = writer.join().unwrap();
        // The writer's seqnos restart at to + 1 after the rollback, unless
        // the rollback came before its first write or after its last.
        let restart = written
            .0
            .windows(2)
            .position(|w| w[1].0 <= w[0].0)
            .map(|i| i + 1);
        let after = match restart {
            Some(i) => &written.0[i..],
            None if written.0[0].0 == to + 1 => &written.0[..],
            None => &written.0[written.0.len()..],
        };
        assert!(after.first().is_none_or(|m| m.0 == to + 1), "round {round}");
        log.truncate(to);
        log.0.extend_from_slice(after);
        let high = vb.high_seqno();
        assert_eq!(
            high,
            log.0.last().map_or(to, |m| m.0).max(to),
            "round {round}"
        );
        vb.wait_persisted(high, WAIT).unwrap();
        let model = log.at(high);
        assert_eq!(listing(&vb.snapshot()), model, "round {round}");
        assert_reads(&vb, &log, &model, "racing the flusher");
    }
    let path = dir.path().join(vbucket::revision_name(0, 1));
    store.close().unwrap();
    verify_file(&path);
}

/// A rollback during a compaction aborts it (its `.compact` file goes), then
/// rolls back; the vbucket stays on its revision.
#[test]
fn rollback_aborts_a_running_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(17);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 12);
    let (copied_tx, copied_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(parking_lot::Mutex::new(go_rx));
    let options = CompactionOptions {
        hook: Some(Arc::new(move |phase| {
            if phase == CompactionPhase::Copied {
                copied_tx.send(()).unwrap();
                go_rx.lock().recv().unwrap();
            }
        })),
        ..CompactionOptions::default()
    };
    let compaction = {
        let vb = vb.clone();
        std::thread::spawn(move || vb.compact(&options))
    };
    copied_rx.recv().unwrap();
    assert!(support::names(dir.path())
        .iter()
        .any(|n| n.ends_with(".compact")));
    let control = vb.compaction_control().unwrap();
    let target = vb.high_seqno() / 2;
    let rollback = {
        let vb = vb.clone();
        std::thread::spawn(move || vb.rollback(target))
    };
    // The rollback cancels the compaction, then waits for it to end.
    while !control.is_cancelled() {
        std::thread::yield_now();
    }
    go_tx.send(()).unwrap();
    let compacted = compaction.join().unwrap();
    assert!(
        matches!(compacted, Err(Error::CompactionAborted(0))),
        "{compacted:?}"
    );
    let RollbackTo::Seqno(to) = rollback.join().unwrap().unwrap() else {
        panic!("zero")
    };
    assert!(to <= target);
    assert_eq!(
        support::names(dir.path()),
        vec![vbucket::revision_name(0, 1)]
    );
    assert_eq!(listing(&vb.snapshot()), log.at(to));
    // Compaction works again afterwards and keeps the rolled-back state.
    vb.compact(&CompactionOptions::default()).unwrap();
    assert_eq!(listing(&vb.snapshot()), log.at(to));
    store.close().unwrap();
}

/// Rollback racing `close_vbucket`: it either happened (and is on disk after
/// a reopen) or failed with `Closed` (and nothing changed).
#[test]
fn rollback_racing_close_vbucket_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(18);
    let mut log = Log::default();
    {
        let store = Store::open(dir.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        build(&vb, &mut rng, &mut log, 20);
        store.close().unwrap();
    }
    let store = Store::open(dir.path(), config()).unwrap();
    for round in 0..6 {
        let vb = store.open_vbucket(0).unwrap();
        let high = vb.high_seqno();
        let target = high - 1 - round;
        let rollback = {
            let vb = vb.clone();
            std::thread::spawn(move || vb.rollback(target))
        };
        store.close_vbucket(0).unwrap();
        let result = rollback.join().unwrap();
        let vb = store.open_vbucket(0).unwrap();
        match result {
            Ok(RollbackTo::Seqno(to)) => {
                assert_eq!(vb.high_seqno(), to, "round {round}");
                log.truncate(to);
            }
            Err(Error::Closed(0)) => assert_eq!(vb.high_seqno(), high, "round {round}"),
            other => panic!("round {round}: {other:?}"),
        }
        let high = vb.high_seqno();
        assert_eq!(listing(&vb.snapshot()), log.at(high), "round {round}");
    }
    store.close().unwrap();
}

/// A crash at each I/O of a rollback (a header written, synced, marked and
/// synced again): every image a power cut could leave opens either before
/// the rollback or after it, never in between.
#[test]
fn rollback_crash_sweep() {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller));
    let mut rng = Rng::new(19);
    let mut log = Log::default();
    {
        let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        build(&vb, &mut rng, &mut log, 12);
        store.close().unwrap();
    }
    let base = dir
        .crash_image(TornTail::Everything, NameTail::Everything)
        .unwrap();
    let high = log.0.last().unwrap().0;
    let target = high / 2;
    let mut expected_to = None;
    let mut points = 0;
    for crash_at in 0.. {
        let run = Arc::new(
            base.crash_image(TornTail::Everything, NameTail::Everything)
                .unwrap(),
        );
        let store = Store::open_in(Arc::clone(&run) as Arc<dyn Directory>, config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        run.controller().crash_at(crash_at);
        let result = vb.rollback(target);
        let crashed = run.controller().has_crashed();
        if let Ok(RollbackTo::Seqno(to)) = result {
            expected_to = Some(to);
        }
        drop(vb);
        drop(store);
        let mut torn = vec![TornTail::Nothing, TornTail::Everything];
        torn.extend([1, 100, 4097].map(TornTail::Prefix));
        for t in torn {
            for names in [NameTail::Synced, NameTail::Everything] {
                let image = Arc::new(run.crash_image(t, names).unwrap());
                let store = Store::open_in(image as Arc<dyn Directory>, config()).unwrap();
                let vb = store.open_vbucket(0).unwrap();
                let h = vb.high_seqno();
                assert!(
                    h == high || h <= target,
                    "crash at {crash_at} ({t:?}, {names:?}): high seqno {h}"
                );
                assert_eq!(listing(&vb.snapshot()), log.at(h), "crash at {crash_at}");
                assert_eq!(vb.vbstate().persisted_seqno, h, "crash at {crash_at}");
                if !crashed {
                    assert!(h <= target, "a rollback that returned is durable");
                }
                store.close().unwrap();
            }
        }
        points += 1;
        if !crashed {
            break;
        }
    }
    assert!(points >= 4, "{points} crash points");
    assert!(expected_to.is_some_and(|to| to <= target));
}

/// The listing lines of `couchtool dump --jsonl` without the header line
/// (whose offset and timestamp differ between a header and its copy).
fn docs_of_listing(listing: &[u8]) -> Vec<String> {
    String::from_utf8(listing.to_vec())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("{\"type\":\"header\""))
        .map(str::to_owned)
        .collect()
}

fn dump(path: &std::path::Path, options: &vbucket::tool::OpenOptions) -> Vec<u8> {
    let mut out = Vec::new();
    let outcome = vbucket::tool::dump_jsonl(path, options, &mut out).unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    out
}

/// couchtool: `dump --as-of-seq` and `--as-of-time` list the header the
/// history gives; `rollback --to-seq` appends it, after which the latest
/// listing is the source's listing at that header, and the file passes
/// `couchread.py --verify`; a seqno below every header is "to zero".
#[test]
fn couchtool_dumps_as_of_a_point_and_rolls_back() {
    use vbucket::tool::{self, AsOf, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(20);
    let mut log = Log::default();
    let history = {
        let store = Store::open(dir.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        build(&vb, &mut rng, &mut log, 15);
        let history = vb.history().unwrap();
        store.close().unwrap();
        history
    };
    let path = dir.path().join(vbucket::revision_name(0, 1));
    let high = history[0].update_seq;
    for seqno in [1, high / 3, high / 2, high] {
        let expected = history.iter().find(|e| e.update_seq <= seqno).unwrap();
        let at = dump(&path, &OpenOptions::at(expected.offset));
        assert_eq!(dump(&path, &OpenOptions::as_of(AsOf::Seqno(seqno))), at);
        let t = expected.timestamp.unwrap();
        let newest_at_t = history.iter().find(|e| e.timestamp <= Some(t)).unwrap();
        assert_eq!(
            dump(&path, &OpenOptions::as_of(AsOf::Time(t))),
            dump(&path, &OpenOptions::at(newest_at_t.offset))
        );
    }
    let target = high / 2;
    let chosen = history.iter().find(|e| e.update_seq <= target).unwrap();
    let before = dump(&path, &OpenOptions::at(chosen.offset));
    let summary = tool::rollback(&path, target).unwrap();
    assert_eq!(summary.to, RollbackTo::Seqno(chosen.update_seq));
    assert_eq!(summary.source_header, Some(chosen.offset));
    assert!(summary
        .to_string()
        .contains(&format!("to seqno {}", chosen.update_seq)));
    let after = dump(&path, &OpenOptions::normal());
    assert_eq!(docs_of_listing(&after), docs_of_listing(&before));
    verify_file(&path);
    // The store opens it rolled back.
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    assert_eq!(vb.high_seqno(), chosen.update_seq);
    assert_eq!(listing(&vb.snapshot()), log.at(chosen.update_seq));
    store.close().unwrap();
    // The binary: the empty creation header has update seq 0, so only a
    // purge makes zero; a plain rollback prints the seqno.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_couchtool"))
        .args(["rollback", path.to_str().unwrap(), "--to-seq", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("rolled back") && text.contains("to seqno"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_couchtool"))
        .args([
            "dump",
            "--jsonl",
            "--as-of-seq",
            "2",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    verify_file(&path);
}

/// couchtool rollback below the purge seqno is "to zero" and leaves the
/// file as it was, byte for byte.
#[test]
fn couchtool_rollback_below_the_purge_seqno_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(21);
    let mut log = Log::default();
    let purge_seq = {
        let store = Store::open(dir.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        build(&vb, &mut rng, &mut log, 5);
        let m = vb.delete(b"k00", ItemMeta::default()).unwrap();
        vb.wait_persisted(m.seqno, WAIT).unwrap();
        let mut options = CompactionOptions::default();
        options.compactor.purge.drop_deletes = true;
        let report = vb.compact(&options).unwrap();
        store.close().unwrap();
        report.purge_seq
    };
    let path = dir.path().join(vbucket::revision_name(0, 2));
    let bytes = std::fs::read(&path).unwrap();
    let summary = vbucket::tool::rollback(&path, purge_seq - 1).unwrap();
    assert_eq!(summary.to, RollbackTo::Zero);
    assert!(summary.to_string().contains("to zero"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn couchtool_rollback_of_a_file_without_a_header_fails_and_leaves_it() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [("empty.couch", vec![]), ("zeros.couch", vec![0u8; 100])] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let e = vbucket::tool::rollback(&path, 5).unwrap_err();
        assert!(e.to_string().contains("no valid header"), "{name}: {e}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}");
    }
}

/// The headers `history` keeps of `entries` (newest first, as `history()`
/// lists them), computed here from the rule: for the window
/// `[now - age, now]`, the newest header of each period of `granularity`
/// nanoseconds (aligned to the epoch), and the newest header always.
fn expected_kept(
    entries: &[vbucket::HistoryEntry],
    now: u64,
    age: u64,
    granularity: u64,
) -> Vec<vbucket::HistoryEntry> {
    let start = now.saturating_sub(age);
    let mut kept: Vec<vbucket::HistoryEntry> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let t = e.timestamp.unwrap();
        let newest_of_period =
            i == 0 || entries[i - 1].timestamp.unwrap() / granularity != t / granularity;
        if i == 0 || (t >= start && newest_of_period) {
            kept.push(*e);
        }
    }
    kept
}

/// `couchtool compact --history-age --history-granularity --now` on a file
/// with many headers: the new file has exactly the headers the rule keeps,
/// each listing what its source header lists (same update seq, purge seq
/// and timestamp), and every header passes `couchread.py --verify`;
/// tombstones a kept header sees are kept although deletes are dropped.
#[test]
fn couchtool_compact_with_history_keeps_one_header_per_period() {
    use vbucket::tool::{self, CompactOptions, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(22);
    let mut log = Log::default();
    {
        let store = Store::open(dir.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        build(&vb, &mut rng, &mut log, 60);
        store.close().unwrap();
    }
    let src = dir.path().join(vbucket::revision_name(0, 1));
    let source = {
        let snapshot = btree::Snapshot::open_latest(
            couchfile::CouchFile::open_read_only(&src).unwrap(),
            couchfile::OpenMode::Normal,
        )
        .unwrap();
        let store_snapshot = tool::open(&src, &OpenOptions::normal()).unwrap();
        assert_eq!(snapshot.offset(), store_snapshot.offset());
        let store = Store::open(dir.path(), config()).unwrap();
        let history = store.open_vbucket(0).unwrap().history().unwrap();
        store.close().unwrap();
        history
    };
    // Leave out the creation header (timestamp 0) from the window.
    let newest = source[0].timestamp.unwrap();
    let oldest = source[source.len() - 2].timestamp.unwrap();
    let span = newest - oldest;
    let (age, granularity) = (span * 2 / 3, (span / 10).max(1));
    let expected = expected_kept(&source, newest, age, granularity);
    assert!(
        expected.len() >= 2 && expected.len() < source.len() / 2,
        "{}",
        expected.len()
    );
    let dst = dir.path().join("out.couch");
    let options = CompactOptions {
        drop_deletes: true,
        history: Some(vbucket::History {
            max_age: Duration::from_nanos(age),
            granularity: Duration::from_nanos(granularity),
            now: Some(newest),
        }),
        ..CompactOptions::default()
    };
    let summary = tool::compact(&src, &dst, &options).unwrap();
    assert_eq!(summary.headers, expected.len() as u64);
    let out = btree::Snapshot::open_latest(
        couchfile::CouchFile::open_read_only(&dst).unwrap(),
        couchfile::OpenMode::Normal,
    )
    .unwrap();
    let out_history = vbucket::ReadSnapshot::history_of(&out).unwrap();
    assert_eq!(out_history.len(), expected.len());
    for (got, want) in out_history.iter().zip(&expected) {
        assert_eq!(
            (
                got.update_seq,
                got.purge_seq,
                got.timestamp,
                got.doc_count,
                got.deleted_count
            ),
            (
                want.update_seq,
                want.purge_seq,
                want.timestamp,
                want.doc_count,
                want.deleted_count
            )
        );
        assert_eq!(
            docs_of_listing(&dump(&dst, &OpenOptions::at(got.offset))),
            docs_of_listing(&dump(&src, &OpenOptions::at(want.offset))),
            "header {} for source header {}",
            got.offset,
            want.offset
        );
        support::couchread_verify(&dst, Some(got.offset));
    }
    // The binary, with durations and --now.
    let dst2 = dir.path().join("out2.couch");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_couchtool"))
        .args(["compact", "--drop-deletes"])
        .args(["--history-age", &format!("{age}ns")])
        .args(["--history-granularity", &format!("{granularity}ns")])
        .args(["--now", &newest.to_string()])
        .arg(&src)
        .arg(&dst2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(&dst2).unwrap().len(),
        std::fs::read(&dst).unwrap().len()
    );
    // Without history: one header, tombstones dropped.
    let dst3 = dir.path().join("out3.couch");
    let plain = tool::compact(
        &src,
        &dst3,
        &CompactOptions {
            drop_deletes: true,
            ..CompactOptions::default()
        },
    )
    .unwrap();
    assert_eq!(plain.headers, 1);
    assert!(plain.size_after < summary.size_after);
}

/// Compactions with history while a writer keeps the flusher committing:
/// every header of the final file lists exactly the model at its update
/// seq (nothing lost or purged, deletes dropped or not), and a last
/// compaction without concurrent writes keeps exactly one header per period
/// of what it found. A rollback then goes back to a kept header.
#[test]
fn concurrent_compactions_with_history_keep_every_header_as_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = Rng::new(23);
    let mut log = Log::default();
    build(&vb, &mut rng, &mut log, 10);
    let history = vbucket::History {
        max_age: Duration::from_secs(3600),
        granularity: Duration::from_micros(300),
        now: None,
    };
    let mut options = CompactionOptions {
        history: Some(history),
        ..CompactionOptions::default()
    };
    options.compactor.purge.drop_deletes = true;
    let writer = {
        let vb = vb.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::new(24);
            let mut written = Log::default();
            for _ in 0..60 {
                let n = 1 + rng.below(8) as usize;
                let last = mutate(&vb, &mut rng, &mut written, n);
                vb.wait_persisted(last, WAIT).unwrap();
            }
            written
        })
    };
    let mut compactions = 0;
    while !writer.is_finished() || compactions < 3 {
        let report = vb.compact(&options).unwrap();
        assert!(report.history_headers >= 1);
        compactions += 1;
    }
    log.0.extend(writer.join().unwrap().0);
    let check = |what: &str| {
        let entries = vb.history().unwrap();
        for e in &entries {
            let snapshot = vb.snapshot_at(e.offset).unwrap();
            assert_eq!(
                listing(&snapshot),
                log.at(e.update_seq),
                "{what}: header {} (update seq {})",
                e.offset,
                e.update_seq
            );
        }
        entries
    };
    let before = check("after concurrent compactions");
    let now = before[0].timestamp.unwrap();
    let report = vb
        .compact(&CompactionOptions {
            history: Some(vbucket::History {
                now: Some(now),
                ..history
            }),
            ..options.clone()
        })
        .unwrap();
    let after = check("after a last compaction");
    let expected = expected_kept(&before, now, 3600 * 1_000_000_000, 300_000);
    assert_eq!(
        after
            .iter()
            .map(|e| (e.update_seq, e.timestamp))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|e| (e.update_seq, e.timestamp))
            .collect::<Vec<_>>()
    );
    assert_eq!(report.history_headers, expected.len() as u64);
    let path = dir
        .path()
        .join(vbucket::revision_name(0, vb.snapshot().revision()));
    // Roll back to a kept header in the middle.
    let middle = after[after.len() / 2];
    assert_eq!(
        vb.rollback(middle.update_seq).unwrap(),
        RollbackTo::Seqno(middle.update_seq)
    );
    assert_eq!(listing(&vb.snapshot()), log.at(middle.update_seq));
    store.close().unwrap();
    verify_file(&path);
    for e in [after[0], after[after.len() / 2], after[after.len() - 1]] {
        support::couchread_verify(&path, Some(e.offset));
    }
}

/// A crash at each I/O of a compaction keeping history: every image opens
/// on the old revision or the new one, with every header of its history
/// listing the model at its update seq, no `.compact` file left, and the
/// new revision (once it is there) holding exactly the headers kept.
#[test]
fn history_compaction_crash_sweep() {
    let dir = Arc::new(FaultyDirectory::new(FaultController::new()));
    let mut rng = Rng::new(25);
    let mut log = Log::default();
    let (source, now) = {
        let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        build(&vb, &mut rng, &mut log, 30);
        let history = vb.history().unwrap();
        store.close().unwrap();
        let now = history[0].timestamp.unwrap();
        (history, now)
    };
    let span = now - source[source.len() - 2].timestamp.unwrap();
    let history = vbucket::History {
        max_age: Duration::from_nanos(span / 2),
        granularity: Duration::from_nanos((span / 8).max(1)),
        now: Some(now),
    };
    let expected = expected_kept(&source, now, span / 2, (span / 8).max(1));
    let kept: Vec<_> = expected
        .iter()
        .map(|e| (e.update_seq, e.timestamp))
        .collect();
    let mut options = CompactionOptions {
        history: Some(history),
        ..CompactionOptions::default()
    };
    options.compactor.purge.drop_deletes = true;
    let base = dir
        .crash_image(TornTail::Everything, NameTail::Everything)
        .unwrap();
    let high = log.0.last().unwrap().0;
    let mut points = 0;
    for crash_at in 0.. {
        let run = Arc::new(
            base.crash_image(TornTail::Everything, NameTail::Everything)
                .unwrap(),
        );
        let store = Store::open_in(Arc::clone(&run) as Arc<dyn Directory>, config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        run.controller().crash_at(crash_at);
        let result = vb.compact(&options);
        let crashed = run.controller().has_crashed();
        // A crash after the rename (the directory sync, the unlink of the
        // old revision) leaves a compaction that returned Ok.
        assert!(result.is_ok() || crashed, "crash at {crash_at}: {result:?}");
        drop(vb);
        drop(store);
        for t in [
            TornTail::Nothing,
            TornTail::Everything,
            TornTail::Prefix(4097),
        ] {
            for names in [NameTail::Synced, NameTail::Everything] {
                let what = format!("crash at {crash_at} ({t:?}, {names:?})");
                let image = Arc::new(run.crash_image(t, names).unwrap());
                let store =
                    Store::open_in(Arc::clone(&image) as Arc<dyn Directory>, config()).unwrap();
                let vb = store.open_vbucket(0).unwrap();
                assert_eq!(vb.high_seqno(), high, "{what}");
                let revision = vb.snapshot().revision();
                assert_eq!(
                    image
                        .list()
                        .unwrap()
                        .into_iter()
                        .filter(|n| n.starts_with("0."))
                        .collect::<Vec<_>>(),
                    vec![vbucket::revision_name(0, revision)],
                    "{what}"
                );
                let entries = vb.history().unwrap();
                if revision == 2 {
                    assert_eq!(
                        entries
                            .iter()
                            .map(|e| (e.update_seq, e.timestamp))
                            .collect::<Vec<_>>(),
                        kept,
                        "{what}"
                    );
                } else {
                    assert_eq!(entries.len(), source.len(), "{what}");
                }
                for e in &entries {
                    assert_eq!(
                        listing(&vb.snapshot_at(e.offset).unwrap()),
                        log.at(e.update_seq),
                        "{what}: header {}",
                        e.offset
                    );
                }
                if !crashed {
                    assert_eq!(revision, 2, "{what}: a compaction that returned is durable");
                }
                store.close().unwrap();
            }
        }
        points += 1;
        if !crashed {
            break;
        }
    }
    // The copy's commit, one per header replayed, the rename and the
    // directory syncs: the number depends on the headers kept.
    assert!(kept.len() >= 2, "history kept: {kept:?}");
    assert!(points > 4 * kept.len(), "{points} crash points");
}

/// The catch-up rounds keep the flusher's headers at the history's
/// granularity: headers committed during the copy (each its own period at a
/// 1 ns granularity) are all in the new file, each listing the model at its
/// update seq; with one period for everything, the round keeps only its
/// latest.
#[test]
fn catch_up_rounds_keep_the_flushers_headers_at_the_granularity() {
    for (granularity, expect_all) in [
        (Duration::from_nanos(1), true),
        // One period (aligned to the epoch) for every timestamp until 2070.
        (Duration::from_secs(100 * 365 * 86_400), false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        let log = Arc::new(parking_lot::Mutex::new(Log::default()));
        let mut rng = Rng::new(26);
        build(&vb, &mut rng, &mut log.lock(), 5);
        let during: Arc<parking_lot::Mutex<Vec<u64>>> = Arc::default();
        let commits_during = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hook = {
            let (vb, log, during) = (vb.clone(), Arc::clone(&log), Arc::clone(&during));
            let commits_during = Arc::clone(&commits_during);
            let rng = parking_lot::Mutex::new(Rng::new(27));
            Arc::new(move |phase| {
                if phase == CompactionPhase::Copied {
                    // Commits while the copy's file waits for its rounds
                    // (five waits; the flusher may split a wait's batch).
                    let first = vb.latest_header().commits;
                    for _ in 0..5 {
                        let last = mutate(&vb, &mut rng.lock(), &mut log.lock(), 3);
                        vb.wait_persisted(last, WAIT).unwrap();
                        during.lock().push(vb.latest_header().update_seq);
                    }
                    let n = vb.latest_header().commits - first;
                    commits_during.store(n, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        let options = CompactionOptions {
            history: Some(vbucket::History {
                max_age: Duration::from_secs(3600),
                granularity,
                now: None,
            }),
            // One unlocked round takes everything the hook committed.
            lock_budget: Duration::from_secs(3600),
            hook: Some(hook),
            ..CompactionOptions::default()
        };
        let before = vb.history().unwrap();
        let report = vb.compact(&options).unwrap();
        let after = vb.history().unwrap();
        let log = log.lock();
        for e in &after {
            assert_eq!(
                listing(&vb.snapshot_at(e.offset).unwrap()),
                log.at(e.update_seq)
            );
        }
        let seqs: Vec<u64> = after.iter().map(|e| e.update_seq).collect();
        let during = during.lock();
        if expect_all {
            for s in during.iter() {
                assert!(
                    seqs.contains(s),
                    "the flusher's header at {s} is kept: {seqs:?}"
                );
            }
            let n = commits_during.load(std::sync::atomic::Ordering::SeqCst) as usize;
            assert!(n >= during.len());
            assert_eq!(
                after.len(),
                before.len() - 1 + n,
                "every header but the empty first"
            );
        } else {
            // Everything is one period: the copy's header and the round's.
            assert_eq!(seqs, vec![*during.last().unwrap(), before[0].update_seq]);
        }
        assert_eq!(report.history_headers, after.len() as u64);
        store.close().unwrap();
    }
}
