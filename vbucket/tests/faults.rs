//! A store on a disk that fails: ENOSPC and EIO injected through couchfile's
//! [`FaultyDirectory`] while the flusher commits.
//!
//! A failing commit keeps its batch queued: waits for persistence time out,
//! the vbucket's statistics count the failures and keep the last error, and
//! once the fault clears the same mutations become persisted without the
//! writer sending them again, and survive a reopen. A failure of the
//! recovery that follows a failed commit (reopening the file) is retried
//! too. With a tiny queue bound, writers get a temporarily-full error and
//! the memory queued stays bounded. Closing a store whose commits keep
//! failing reports the mutations it could not flush, and nothing reported
//! persisted is lost. An I/O error while opening the store fails the open
//! without removing or rewriting any file, and a later open finds it all.
//! A commit to a file removed underneath the store (or whose whole data
//! directory was deleted) still syncs, but is never reported persisted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use couchfile::{
    Directory, FaultController, FaultKind, FaultRule, FaultyDirectory, NameTail, OpKind, TornTail,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vbucket::{Error, FlusherConfig, ItemMeta, Store, StoreConfig, VBucket};

/// A wait that is expected to time out while commits fail.
const SHORT: Duration = Duration::from_millis(150);
/// A wait that is expected to succeed.
const LONG: Duration = Duration::from_secs(30);

fn config() -> StoreConfig {
    StoreConfig {
        flusher: FlusherConfig {
            threads: 1,
            max_batch_items: 8,
            retry_backoff_min: Duration::from_millis(1),
            retry_backoff_max: Duration::from_millis(4),
            close_timeout: Duration::from_millis(100),
            backpressure_timeout: Duration::from_millis(20),
            ..FlusherConfig::default()
        },
        ..StoreConfig::default()
    }
}

/// A store with vbucket 0 on a new fault-injecting directory.
fn setup(config: StoreConfig) -> (Arc<FaultyDirectory>, FaultController, Store, VBucket) {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller.clone()));
    let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    (dir, controller, store, vb)
}

/// What the vbucket should hold: key -> value.
type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Sets `key-<i>` for every `i` in `keys` to a value tagged `tag`; returns
/// the last seqno.
fn write(vb: &VBucket, model: &mut Model, keys: std::ops::Range<u32>, tag: &str) -> u64 {
    let mut last = 0;
    for i in keys {
        let key = format!("key-{i:04}").into_bytes();
        let value = format!("{tag} {i} {}", "v".repeat(i as usize % 300)).into_bytes();
        last = vb.set(&key, &value, ItemMeta::default()).unwrap().seqno;
        model.insert(key, value);
    }
    last
}

/// The vbucket holds exactly `model`, on disk (changes since 0) and by key.
fn assert_holds(vb: &VBucket, model: &Model, what: &str) {
    let mut on_disk = Model::new();
    vb.changes_since(0, &mut |doc| {
        assert!(!doc.deleted, "{what}");
        on_disk.insert(doc.key, doc.value);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(on_disk.len(), model.len(), "{what}: documents on disk");
    assert!(on_disk == *model, "{what}: documents on disk differ");
    for (key, value) in model {
        let doc = vb.get(key).unwrap().expect("a document");
        assert_eq!(&doc.value, value, "{what}");
    }
}

/// Reopens what a power cut now would leave of `dir` (only what was synced)
/// and checks that vbucket 0 holds `model` up to `high_seqno`.
fn reopen_synced(dir: &FaultyDirectory, model: &Model, high_seqno: u64, what: &str) {
    for (torn, names) in [
        (TornTail::Nothing, NameTail::Synced),
        (TornTail::Everything, NameTail::Everything),
    ] {
        let image = Arc::new(dir.crash_image(torn, names).unwrap());
        let store = Store::open_in(image as Arc<dyn Directory>, config()).unwrap();
        let vb = store.vbucket(0).unwrap();
        assert_eq!(vb.snapshot().high_seqno(), high_seqno, "{what}, {torn:?}");
        assert_holds(&vb, model, &format!("{what}, reopened ({torn:?})"));
        store.close().unwrap();
    }
}

/// Commits fail with `rule` while a batch is queued; the failures show in
/// the statistics, the batch persists once the fault is cleared, and it
/// survives a reopen.
fn fails_until_cleared(rule: FaultRule, message: &str) {
    let what = format!("{rule:?}");
    let (dir, controller, store, vb) = setup(config());
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..10, "before");
    vb.wait_persisted(before, LONG).unwrap();

    controller.inject(rule);
    let last = write(&vb, &mut model, 5..30, "during");
    let err = vb.wait_persisted(last, SHORT).unwrap_err();
    assert!(err.is_timeout(), "{what}: {err}");
    let stats = vb.stats().unwrap();
    assert!(stats.flush.commit_failures > 0, "{what}: {stats:?}");
    let error = stats.flush.last_error.clone().expect("a last error");
    assert!(error.contains(message), "{what}: last error {error:?}");
    assert_eq!(stats.flush.persisted_seqno, before, "{what}");
    assert_eq!(vb.persisted_seqno(), before, "{what}");
    assert!(stats.dirty_items > 0, "{what}");
    // Unflushed writes are readable meanwhile.
    for (key, value) in &model {
        assert_eq!(&vb.get(key).unwrap().unwrap().value, value, "{what}");
    }
    // Still failing a little later: the retries go on.
    std::thread::sleep(Duration::from_millis(30));
    let later = vb.stats().unwrap();
    assert!(
        later.flush.commit_failures > stats.flush.commit_failures,
        "{what}: retries continue"
    );

    controller.clear_faults();
    // The writer sends nothing again: the queued batch is retried.
    assert_eq!(vb.wait_persisted(last, LONG).unwrap(), last, "{what}");
    let stats = vb.stats().unwrap();
    assert!(stats.flush.retries > 0, "{what}");
    assert_eq!(stats.dirty_items, 0, "{what}");
    assert_eq!(vb.snapshot().high_seqno(), last, "{what}");
    assert_holds(&vb, &model, &what);
    store.close().unwrap();
    reopen_synced(&dir, &model, last, &what);
}

#[test]
fn enospc_on_write_until_cleared() {
    fails_until_cleared(
        FaultRule::always(OpKind::Write, FaultKind::NoSpace),
        "No space left on device",
    );
}

#[test]
fn enospc_on_the_second_write_of_a_commit_until_cleared() {
    // The commit's data is written, then the header's write fails.
    fails_until_cleared(
        FaultRule {
            op: Some(OpKind::Write),
            kind: FaultKind::NoSpace,
            skip: 1,
            times: None,
        },
        "No space left on device",
    );
}

#[test]
fn eio_on_sync_until_cleared() {
    fails_until_cleared(
        FaultRule::always(OpKind::Sync, FaultKind::Eio),
        "Input/output error",
    );
}

#[test]
fn eio_on_the_second_sync_of_a_commit_until_cleared() {
    // The header's block byte is written after the first sync; the second
    // sync fails: recovery finds that header, never made durable, and the
    // batch is committed again on top of it.
    fails_until_cleared(
        FaultRule {
            op: Some(OpKind::Sync),
            kind: FaultKind::Eio,
            skip: 1,
            times: None,
        },
        "Input/output error",
    );
}

#[test]
fn enospc_a_few_times_heals_by_itself() {
    let (dir, controller, store, vb) = setup(config());
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..10, "before");
    vb.wait_persisted(before, LONG).unwrap();
    controller.inject(FaultRule {
        op: Some(OpKind::Write),
        kind: FaultKind::NoSpace,
        skip: 0,
        times: Some(3),
    });
    let last = write(&vb, &mut model, 0..5, "during");
    assert_eq!(vb.wait_persisted(last, LONG).unwrap(), last);
    let stats = vb.stats().unwrap();
    // Each attempt fails at its first write: three failures, three retries.
    assert_eq!(stats.flush.commit_failures, 3, "{stats:?}");
    assert_eq!(stats.flush.retries, 3, "{stats:?}");
    assert!(stats
        .flush
        .last_error
        .unwrap()
        .contains("No space left on device"));
    assert_eq!(controller.injected_count(), 3);
    assert_holds(&vb, &model, "healed");
    store.close().unwrap();
    reopen_synced(&dir, &model, last, "healed");
}

/// A commit fails once on sync; then the recovery that must follow (reopen
/// the file at its last valid header) fails on `recovery_op` until cleared.
fn recovery_fails_until_cleared(recovery_op: OpKind, message: &str) {
    let what = format!("recovery failing on {recovery_op:?}");
    let (dir, controller, store, vb) = setup(config());
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..10, "before");
    vb.wait_persisted(before, LONG).unwrap();

    controller.inject(FaultRule::once(OpKind::Sync, FaultKind::Eio));
    controller.inject(FaultRule::always(recovery_op, FaultKind::Eio));
    let last = write(&vb, &mut model, 3..20, "during");
    let err = vb.wait_persisted(last, SHORT).unwrap_err();
    assert!(err.is_timeout(), "{what}: {err}");
    // One injected sync failure, then failed recoveries.
    assert!(controller.injected_count() > 2, "{what}");
    let failing = controller.injected_count();
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        controller.injected_count() > failing,
        "{what}: recovery is retried"
    );

    controller.clear_faults();
    assert_eq!(vb.wait_persisted(last, LONG).unwrap(), last, "{what}");
    let stats = vb.stats().unwrap();
    // The first failure is the sync; later ones are the recovery's.
    assert!(stats.flush.commit_failures > 1, "{what}: {stats:?}");
    let error = stats.flush.last_error.clone().unwrap();
    assert!(
        error.contains(message) && error.contains("Input/output error"),
        "{what}: last error {error:?}"
    );
    assert_holds(&vb, &model, &what);
    store.close().unwrap();
    reopen_synced(&dir, &model, last, &what);
}

#[test]
fn eio_on_open_while_recovering_is_retried() {
    recovery_fails_until_cleared(OpKind::Open, "open");
}

#[test]
fn eio_on_read_while_recovering_is_retried() {
    recovery_fails_until_cleared(OpKind::Read, "read");
}

#[test]
fn backpressure_bounds_the_queue_while_commits_fail() {
    const BOUND: usize = 8 << 10;
    const VALUE: usize = 500;
    let mut config = config();
    config.flusher.max_queued_bytes = BOUND;
    let (dir, controller, store, vb) = setup(config);
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..3, "before");
    vb.wait_persisted(before, LONG).unwrap();

    controller.inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
    let value = vec![b'q'; VALUE];
    let mut accepted = 0u32;
    let err = loop {
        let key = format!("full-{accepted:04}").into_bytes();
        match vb.set(&key, &value, ItemMeta::default()) {
            Ok(_) => {
                model.insert(key, value.clone());
                accepted += 1;
                assert!(accepted < 1000, "no backpressure");
            }
            Err(e) => break e,
        }
    };
    assert!(err.is_temporarily_full(), "{err}");
    // The bound is checked before each enqueue: at most one item over it.
    let one_item = "full-0000".len() + VALUE + 256;
    let stats = vb.stats().unwrap();
    assert!(stats.flush.queued_bytes as usize >= BOUND, "{stats:?}");
    assert!(
        stats.flush.queued_bytes as usize <= BOUND + one_item,
        "{} bytes queued, bound {BOUND}",
        stats.flush.queued_bytes
    );
    assert_eq!(stats.flush.queued_items, u64::from(accepted));
    assert!(stats.flush.commit_failures > 0);
    // Writers keep being refused, and the queue does not grow.
    for _ in 0..5 {
        let e = vb.set(b"refused", b"x", ItemMeta::default()).unwrap_err();
        assert!(e.is_temporarily_full(), "{e}");
    }
    assert_eq!(
        vb.stats().unwrap().flush.queued_bytes,
        stats.flush.queued_bytes
    );
    assert_eq!(vb.persisted_seqno(), before);

    controller.clear_faults();
    // Room comes back as the queued batches are committed.
    let deadline = Instant::now() + LONG;
    let last = loop {
        match vb.set(b"after", b"cleared", ItemMeta::default()) {
            Ok(m) => break m.seqno,
            Err(e) if e.is_temporarily_full() && Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    };
    model.insert(b"after".to_vec(), b"cleared".to_vec());
    assert_eq!(last, before + u64::from(accepted) + 1);
    vb.wait_persisted(last, LONG).unwrap();
    assert_eq!(vb.stats().unwrap().flush.queued_bytes, 0);
    assert_holds(&vb, &model, "after backpressure");
    store.close().unwrap();
    reopen_synced(&dir, &model, last, "after backpressure");
}

#[test]
fn closing_while_commits_fail_reports_unflushed_and_loses_nothing_persisted() {
    let (dir, controller, store, vb) = setup(config());
    let mut persisted = Model::new();
    let before = write(&vb, &mut persisted, 0..20, "persisted");
    assert_eq!(vb.wait_persisted(before, LONG).unwrap(), before);

    controller.inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
    let mut unflushed = persisted.clone();
    let last = write(&vb, &mut unflushed, 10..25, "never persisted");
    assert!(vb.wait_persisted(last, SHORT).unwrap_err().is_timeout());
    let started = Instant::now();
    match store.close() {
        Err(Error::Unflushed { vbid: 0, items }) => {
            assert_eq!(items, 15, "every mutation after the fault");
        }
        other => panic!("closing while commits fail: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(vb.persisted_seqno(), before);
    assert!(vb.wait_persisted(last, SHORT).is_err());

    // A power cut now: what was persisted is there, the rest is not.
    reopen_synced(&dir, &persisted, before, "closed while failing");
    // The same directory, once the disk works again.
    controller.clear_faults();
    let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(vb.snapshot().high_seqno(), before);
    assert_holds(&vb, &persisted, "reopened after the fault cleared");
    // It writes on above the persisted seqno.
    let mut model = persisted;
    let next = write(&vb, &mut model, 0..3, "again");
    assert_eq!(next, before + 3);
    vb.wait_persisted(next, LONG).unwrap();
    store.close().unwrap();
    reopen_synced(&dir, &model, next, "written on");
}

#[test]
fn eio_while_opening_the_store_fails_the_open_and_removes_nothing() {
    let (dir, controller, store, vb) = setup(config());
    let mut model = Model::new();
    let last = write(&vb, &mut model, 0..40, "persisted");
    vb.wait_persisted(last, LONG).unwrap();
    store.close().unwrap();
    let mut names = dir.list().unwrap();
    names.sort();
    let bytes: Vec<Vec<u8>> = names.iter().map(|n| dir.file_bytes(n).unwrap()).collect();
    for op in [OpKind::List, OpKind::Open, OpKind::Len, OpKind::Read] {
        controller.inject(FaultRule::always(op, FaultKind::Eio));
        let opened = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config());
        assert!(opened.is_err(), "{op:?}: the open must fail");
        controller.clear_faults();
        // The failed open removed and rewrote nothing.
        let mut now = dir.list().unwrap();
        now.sort();
        assert_eq!(now, names, "{op:?}");
        for (name, before) in names.iter().zip(&bytes) {
            assert!(dir.file_bytes(name).unwrap() == *before, "{op:?}: {name}");
        }
    }
    // Once the disk works, the open is retried and finds everything.
    let store = Store::open_in(Arc::clone(&dir) as Arc<dyn Directory>, config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(vb.snapshot().high_seqno(), last);
    assert_holds(&vb, &model, "reopened after failed opens");
    store.close().unwrap();
}

/// [`config`] with retries far apart: a test sees the first failure of a
/// commit (the later ones fail to reopen the file by its name).
fn config_retrying_late() -> StoreConfig {
    let mut config = config();
    config.flusher.retry_backoff_min = Duration::from_secs(3600);
    config.flusher.retry_backoff_max = Duration::from_secs(3600);
    config
}

/// Nothing written after `before` is reported persisted: the commit fails,
/// and its error says the file lost its name.
fn nothing_more_persists(vb: &VBucket, before: u64, last: u64, what: &str) {
    let deadline = Instant::now() + LONG;
    while vb.stats().unwrap().flush.commit_failures == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = vb.wait_persisted(last, SHORT).unwrap_err();
    assert!(err.is_timeout(), "{what}: {err}");
    let stats = vb.stats().unwrap();
    assert_eq!(stats.flush.commit_failures, 1, "{what}: {stats:?}");
    assert_eq!(stats.flush.persisted_seqno, before, "{what}");
    assert_eq!(vb.persisted_seqno(), before, "{what}");
    let error = stats.flush.last_error.expect("the commit's error");
    assert!(
        error.contains("0.couch.1: the file was removed from its directory"),
        "{what}: {error}"
    );
}

/// A revision file removed underneath the store: its commits still sync
/// (the inode lives on), but none is reported persisted.
#[test]
fn commits_to_a_removed_file_are_never_acknowledged() {
    let (dir, _controller, store, vb) = setup(config_retrying_late());
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..10, "before");
    vb.wait_persisted(before, LONG).unwrap();
    dir.remove("0.couch.1").unwrap();
    let last = write(&vb, &mut model, 10..20, "after the removal");
    nothing_more_persists(&vb, before, last, "file removed");
    assert!(store.close().is_err(), "the queued mutations are unflushed");
}

/// The whole data directory deleted (`rm -rf`) under a store on disk: no
/// write is acknowledged after that.
#[test]
fn a_deleted_data_directory_acknowledges_no_more_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data");
    let store = Store::open(&path, config_retrying_late()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..10, "before");
    vb.wait_persisted(before, LONG).unwrap();
    std::fs::remove_dir_all(&path).unwrap();
    let last = write(&vb, &mut model, 10..20, "after rm -rf");
    nothing_more_persists(&vb, before, last, "directory deleted");
    assert!(store.close().is_err(), "the queued mutations are unflushed");
}

#[test]
fn a_failed_background_sync_fails_its_commit_which_is_retried() {
    // Every flush of the writer asks for a background sync.
    let (dir, controller, store, vb) = setup(StoreConfig {
        background_sync_bytes: 1,
        ..config()
    });
    let mut model = Model::new();
    let before = write(&vb, &mut model, 0..10, "before");
    vb.wait_persisted(before, LONG).unwrap();
    let failures_before = vb.stats().unwrap().flush.commit_failures;
    // The next sync is a background one (the commit's own sync waits for
    // it first): it fails, the commit's own would succeed.
    controller.inject(FaultRule::once(OpKind::Sync, FaultKind::Eio));
    let last = write(&vb, &mut model, 5..30, "during");
    assert_eq!(vb.wait_persisted(last, LONG).unwrap(), last);
    let stats = vb.stats().unwrap();
    assert_eq!(controller.injected_count(), 1);
    assert_eq!(
        stats.flush.commit_failures,
        failures_before + 1,
        "{stats:?}"
    );
    assert!(stats
        .flush
        .last_error
        .unwrap()
        .contains("Input/output error"));
    assert_holds(&vb, &model, "after the failed background sync");
    store.close().unwrap();
    reopen_synced(&dir, &model, last, "after the failed background sync");
}
