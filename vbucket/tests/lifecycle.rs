#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The vbucket lifecycle against hostile use: open, close and delete racing
//! writers and compaction lose no acknowledged write; handles that outlive
//! their vbucket or store write nothing more; bad metadata and
//! configurations get typed errors instead of wedging the flusher or
//! panicking; and automatic revisions keep growing across flushes,
//! reopens and compactions.

mod support;

use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::Rng;
use vbucket::{
    CompactionOptions, Error, ItemMeta, Store, StoreConfig, VbucketState, MAX_REV_SEQ, RESERVED_CAS,
};

const WAIT: Duration = Duration::from_secs(30);

fn config() -> StoreConfig {
    let mut c = StoreConfig::default();
    c.flusher.max_batch_items = 16;
    c
}

/// What a writer had acknowledged for one key: the version, and the
/// number of deletes of the vbucket completed before the write began.
#[derive(Debug, Clone, Copy)]
struct Acked {
    version: u64,
    deletes_before: u64,
}

/// Errors a writer may meet while the vbucket is closed or deleted under
/// it: the write was never acknowledged, so it may be lost.
fn is_lifecycle_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Closed(_) | Error::NoSuchVbucket(_) | Error::Flusher(flusher::Error::Closed { .. })
    )
}

/// One schedule: two writers, one thread closing, reopening and (when
/// `delete`) deleting vbucket 0, one opening it, one compacting it, for
/// `transitions` lifecycle steps with random pauses. Then the store is
/// closed and reopened, and every write acknowledged after the last delete
/// reads back at its acknowledged version or a later one.
fn race_lifecycle(seed: u64, transitions: usize, delete: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path(), config()).unwrap());
    store.open_vbucket(0).unwrap();
    let acked: Arc<Mutex<HashMap<String, Acked>>> = Arc::default();
    let deletes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for writer in 0..2u64 {
        let (store, acked, deletes, stop) = (
            Arc::clone(&store),
            Arc::clone(&acked),
            Arc::clone(&deletes),
            Arc::clone(&stop),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ ((writer + 1) * 0x9e37_79b9));
            let mut version = 0u64;
            while !stop.load(Ordering::SeqCst) {
                version += 1;
                let key = format!("w{writer}-k{}", rng.below(40));
                let deletes_before = deletes.load(Ordering::SeqCst);
                let written = store.open_vbucket(0).and_then(|vb| {
                    let m = vb.set(key.as_bytes(), &version.to_be_bytes(), ItemMeta::default())?;
                    vb.wait_persisted(m.seqno, WAIT)
                });
                match written {
                    Ok(_) => {
                        acked.lock().unwrap().insert(
                            key,
                            Acked {
                                version,
                                deletes_before,
                            },
                        );
                    }
                    Err(e) if is_lifecycle_error(&e) => {}
                    Err(e) => panic!("seed {seed:#x}: writer {writer}: {e}"),
                }
            }
        }));
    }
    {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x0be7);
            while !stop.load(Ordering::SeqCst) {
                store.open_vbucket(0).unwrap();
                std::thread::sleep(Duration::from_micros(rng.below(2000)));
            }
        }));
    }
    {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0xc0_3ac7);
            while !stop.load(Ordering::SeqCst) {
                if let Ok(vb) = store.vbucket(0) {
                    match vb.compact(&CompactionOptions::default()) {
                        Ok(_) | Err(Error::CompactionAborted(_) | Error::CompactionRunning(_)) => {}
                        Err(e) if is_lifecycle_error(&e) => {}
                        Err(e) => panic!("seed {seed:#x}: compaction: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_micros(rng.below(5000)));
            }
        }));
    }
    let mut rng = Rng::new(seed);
    for _ in 0..transitions {
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        if delete && rng.below(3) == 0 {
            store.delete_vbucket(0).unwrap();
            deletes.fetch_add(1, Ordering::SeqCst);
        } else {
            match store.close_vbucket(0) {
                Ok(()) | Err(Error::NoSuchVbucket(0)) => {}
                Err(e) => panic!("seed {seed:#x}: close: {e}"),
            }
        }
        if rng.below(2) == 0 {
            store.open_vbucket(0).unwrap();
        }
    }
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread.join().unwrap();
    }
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();

    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let last_delete = deletes.load(Ordering::SeqCst);
    let acked = acked.lock().unwrap();
    let mut checked = 0;
    for (key, a) in acked
        .iter()
        .filter(|(_, a)| a.deletes_before == last_delete)
    {
        let doc = vb.get(key.as_bytes()).unwrap().unwrap_or_else(|| {
            panic!(
                "seed {seed:#x}: {key} (version {}) acknowledged, then lost",
                a.version
            )
        });
        let version = u64::from_be_bytes(doc.value.try_into().unwrap());
        assert!(
            version >= a.version,
            "seed {seed:#x}: {key} reads version {version}, {} was acknowledged",
            a.version
        );
        checked += 1;
    }
    eprintln!(
        "seed {seed:#x}: {checked} acknowledged keys checked ({} acknowledged in all)",
        acked.len()
    );
    store.close().unwrap();
}

/// How many schedules each race test runs (`LIFECYCLE_SCHEDULES`, default 3).
fn schedules() -> u64 {
    std::env::var("LIFECYCLE_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// The seed of the first schedule (`LIFECYCLE_SEED` replays one).
fn first_seed(default: u64) -> u64 {
    std::env::var("LIFECYCLE_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(default)
}

#[test]
fn open_racing_close_loses_no_acknowledged_write() {
    let seed = first_seed(0x11fe_c1c1e);
    for i in 0..schedules() {
        race_lifecycle(seed + i, 120, false);
    }
}

#[test]
fn open_racing_delete_loses_no_write_acknowledged_after_it() {
    let seed = first_seed(0xde1e7e);
    for i in 0..schedules() {
        race_lifecycle(seed + i, 120, true);
    }
}

#[test]
fn a_handle_of_a_closed_vbucket_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    let stale = store.open_vbucket(0).unwrap();
    let m = stale.set(b"k", b"v1", ItemMeta::default()).unwrap();
    stale.wait_persisted(m.seqno, WAIT).unwrap();
    store.close_vbucket(0).unwrap();
    let vb = store.open_vbucket(0).unwrap();

    let closed = |r: vbucket::Result<()>, what: &str| {
        assert!(matches!(r, Err(Error::Closed(0))), "{what}: {r:?}");
    };
    closed(stale.set_state(VbucketState::Replica), "set_state");
    closed(
        stale.set(b"k", b"stale", ItemMeta::default()).map(drop),
        "set",
    );
    closed(stale.delete(b"k", ItemMeta::default()).map(drop), "delete");
    closed(
        stale.compact(&CompactionOptions::default()).map(drop),
        "compact",
    );
    // It still reads what it committed.
    assert_eq!(stale.get(b"k").unwrap().unwrap().value, b"v1");

    // The new handle owns the file: its writes and compactions work.
    let m = vb.set(b"k", b"v2", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    vb.compact(&CompactionOptions::default()).unwrap();
    assert_eq!(vb.vbstate().state, VbucketState::Active);
    assert_eq!(vb.get(b"k").unwrap().unwrap().value, b"v2");
    store.close().unwrap();
}

#[test]
fn a_handle_that_outlives_its_store_commits_nothing() {
    for close in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), config()).unwrap();
        let stale = store.open_vbucket(0).unwrap();
        stale.set_state(VbucketState::Active).unwrap();
        if close {
            store.close().unwrap();
        } else {
            drop(store);
        }
        let store = Store::open(tmp.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        let r = stale.set_state(VbucketState::Replica);
        assert!(matches!(r, Err(Error::Closed(0))), "close {close}: {r:?}");
        let m = vb.set(b"k", b"new owner", ItemMeta::default()).unwrap();
        vb.wait_persisted(m.seqno, WAIT).unwrap();
        store.close().unwrap();

        let store = Store::open(tmp.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        assert_eq!(vb.vbstate().state, VbucketState::Active, "close {close}");
        assert_eq!(vb.get(b"k").unwrap().unwrap().value, b"new owner");
        store.close().unwrap();
    }
}

#[test]
fn metadata_the_format_cannot_hold_is_refused_and_the_vbucket_keeps_flushing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let r = vb.set(
        b"k",
        b"v",
        ItemMeta {
            rev_seq: 1 << 48,
            ..ItemMeta::default()
        },
    );
    assert!(
        matches!(
            r,
            Err(Error::InvalidMeta {
                field: "rev_seq",
                ..
            })
        ),
        "{r:?}"
    );
    let r = vb.delete(
        b"k",
        ItemMeta {
            cas: RESERVED_CAS,
            ..ItemMeta::default()
        },
    );
    assert!(
        matches!(r, Err(Error::InvalidMeta { field: "cas", .. })),
        "{r:?}"
    );
    // Nothing was queued: the next write persists at once.
    let m = vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    assert_eq!(m.seqno, 1);
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    store.close().unwrap();
}

#[test]
fn automatic_cas_never_repeats_after_a_cas_near_the_top() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let explicit = |cas| ItemMeta {
        cas,
        ..ItemMeta::default()
    };
    vb.set(b"a", b"v", explicit(RESERVED_CAS - 2)).unwrap();
    let next = vb.set(b"b", b"v", ItemMeta::default()).unwrap();
    assert_eq!(next.cas, RESERVED_CAS - 1);
    let r = vb.set(b"c", b"v", ItemMeta::default());
    assert!(matches!(r, Err(Error::CasExhausted(0))), "{r:?}");
    // An explicit CAS is still stored as given.
    let m = vb.set(b"c", b"v", explicit(7)).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    store.close().unwrap();
}

#[test]
fn automatic_rev_seq_stops_at_the_largest_the_format_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let m = vb
        .set(
            b"k",
            b"v",
            ItemMeta {
                rev_seq: MAX_REV_SEQ,
                ..ItemMeta::default()
            },
        )
        .unwrap();
    // Dirty, then flushed: the automatic revision after it stays at the top.
    assert_eq!(vb.get(b"k").unwrap().unwrap().meta.rev_seq, MAX_REV_SEQ);
    vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    assert_eq!(vb.get(b"k").unwrap().unwrap().meta.rev_seq, MAX_REV_SEQ);
    vb.wait_persisted(m.seqno + 1, WAIT).unwrap();
    let m = vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    assert_eq!(vb.get(b"k").unwrap().unwrap().meta.rev_seq, MAX_REV_SEQ);
    store.close().unwrap();
}

#[test]
fn huge_timeouts_mean_wait_as_long_as_it_takes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.flusher.backpressure_timeout = Duration::MAX;
    cfg.flusher.close_timeout = Duration::MAX;
    cfg.flusher.retry_backoff_max = Duration::MAX;
    cfg.flusher.gather_max = Duration::MAX;
    let store = Store::open(tmp.path(), cfg).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let commits = vb.latest_header().commits;
    let m = vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    assert!(vb.wait_persisted(m.seqno, Duration::MAX).unwrap() >= m.seqno);
    assert!(vb.wait_for_header(commits, Duration::MAX).commits > commits);
    store.close().unwrap();
}

#[test]
fn configurations_that_cannot_work_fail_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    type Change = Box<dyn Fn(&mut StoreConfig)>;
    let cases: Vec<(&str, Change)> = vec![
        ("nodes", Box::new(|c| c.nodes.leaf_threshold = usize::MAX)),
        (
            "nodes",
            Box::new(|c| c.nodes.interior_threshold = usize::MAX),
        ),
        ("nodes", Box::new(|c| c.nodes.leaf_threshold = 0)),
        ("flusher", Box::new(|c| c.flusher.max_queued_bytes = 0)),
        ("flusher", Box::new(|c| c.flusher.max_batch_bytes = 0)),
        ("flusher", Box::new(|c| c.flusher.max_batch_items = 0)),
        (
            "auto_compaction.fragmentation_threshold",
            Box::new(|c| {
                c.auto_compaction = Some(vbucket::AutoCompaction {
                    fragmentation_threshold: f64::NAN,
                    ..Default::default()
                })
            }),
        ),
        (
            "auto_compaction.check_interval",
            Box::new(|c| {
                c.auto_compaction = Some(vbucket::AutoCompaction {
                    check_interval: Duration::ZERO,
                    ..Default::default()
                })
            }),
        ),
    ];
    for (field, change) in cases {
        let mut cfg = config();
        change(&mut cfg);
        let r = Store::open(tmp.path(), cfg);
        assert!(
            matches!(&r, Err(Error::InvalidConfig { field: f, .. }) if *f == field),
            "{field}: {r:?}"
        );
    }
    // Nothing was created.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn automatic_rev_seq_grows_across_flushes_reopens_and_compactions() {
    let tmp = tempfile::tempdir().unwrap();
    let auto = ItemMeta::default();
    let set_and_persist = |store: &Store, meta: ItemMeta| -> u64 {
        let vb = store.open_vbucket(0).unwrap();
        let m = vb.set(b"k", b"v", meta).unwrap();
        vb.wait_persisted(m.seqno, WAIT).unwrap();
        vb.get(b"k").unwrap().unwrap().meta.rev_seq
    };
    let store = Store::open(tmp.path(), config()).unwrap();
    assert_eq!(set_and_persist(&store, auto), 1);
    // Flushed, so no longer dirty: the revision comes from the file.
    assert_eq!(set_and_persist(&store, auto), 2);
    let given = ItemMeta {
        rev_seq: 5,
        ..ItemMeta::default()
    };
    assert_eq!(set_and_persist(&store, given), 5);
    assert_eq!(set_and_persist(&store, auto), 6);
    store.close().unwrap();
    let store = Store::open(tmp.path(), config()).unwrap();
    assert_eq!(set_and_persist(&store, auto), 7);
    store
        .open_vbucket(0)
        .unwrap()
        .compact(&CompactionOptions::default())
        .unwrap();
    assert_eq!(set_and_persist(&store, auto), 8);
    // A deletion continues the count, and so does the set after it.
    let vb = store.open_vbucket(0).unwrap();
    let m = vb.delete(b"k", auto).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    assert_eq!(
        vb.get_including_deleted(b"k")
            .unwrap()
            .unwrap()
            .meta
            .rev_seq,
        9
    );
    assert_eq!(set_and_persist(&store, auto), 10);
    store.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any mix of explicit and automatic CAS and rev_seq values, near the
    /// edges included: no panic; an automatic CAS is above every CAS before
    /// it; an automatic rev_seq is one above the key's last, or stays at
    /// the top; anything refused is refused with a typed error.
    #[test]
    fn metadata_edges_never_wrap_repeat_or_panic(
        ops in proptest::collection::vec(
            (0u8..3, prop_oneof![
                Just(0u64), Just(1), Just(u64::MAX), Just(u64::MAX - 1), Just(u64::MAX - 0x1_0000),
                Just(MAX_REV_SEQ), Just(MAX_REV_SEQ + 1), Just(MAX_REV_SEQ - 1), any::<u64>(),
            ], prop_oneof![
                Just(0u64), Just(MAX_REV_SEQ), Just(MAX_REV_SEQ - 1), Just(MAX_REV_SEQ + 1),
                Just(u64::MAX), 1u64..10,
            ]),
            1..40,
        )
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        let mut max_cas = 0u64;
        let mut last_rev: HashMap<u8, u64> = HashMap::new();
        let mut last_seqno = 0;
        for (key, cas, rev_seq) in ops {
            let meta = ItemMeta { cas, rev_seq, ..ItemMeta::default() };
            let k = [b'k', key];
            match vb.set(&k, b"v", meta) {
                Ok(m) => {
                    prop_assert!(cas != RESERVED_CAS && rev_seq <= MAX_REV_SEQ);
                    if cas == 0 {
                        prop_assert!(m.cas > max_cas, "automatic CAS {} after {}", m.cas, max_cas);
                    } else {
                        prop_assert_eq!(m.cas, cas);
                    }
                    max_cas = max_cas.max(m.cas);
                    let rev = vb.get(&k).unwrap().unwrap().meta.rev_seq;
                    let expected = match rev_seq {
                        0 => (last_rev.get(&key).copied().unwrap_or(0) + 1).min(MAX_REV_SEQ),
                        given => given,
                    };
                    prop_assert_eq!(rev, expected);
                    last_rev.insert(key, rev);
                    last_seqno = m.seqno;
                }
                Err(Error::InvalidMeta { .. }) => {
                    prop_assert!(cas == RESERVED_CAS || rev_seq > MAX_REV_SEQ);
                }
                Err(Error::CasExhausted(_)) => {
                    prop_assert!(cas == 0 && max_cas >= RESERVED_CAS - 1);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
        if last_seqno > 0 {
            vb.wait_persisted(last_seqno, WAIT).unwrap();
        }
        store.close().unwrap();
    }
}

#[test]
fn closing_ends_a_wait_for_a_header_without_a_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path(), config()).unwrap());
    let vb = store.open_vbucket(0).unwrap();
    let commits = vb.latest_header().commits;
    let waiter = {
        let vb = vb.clone();
        std::thread::spawn(move || vb.wait_for_header(commits, Duration::MAX))
    };
    store.close_vbucket(0).unwrap();
    // Nothing was committed meanwhile: the wait ended because of the close.
    assert_eq!(waiter.join().unwrap().commits, commits);
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();
}

/// A persistence callback runs on the flusher thread: there, waiting for a
/// seqno of its vbucket, or closing or deleting it, would wait for that
/// thread itself. Each gets a typed error at once and changes nothing; a
/// callback that drops the last handle on the store returns, and the
/// directory stays locked rather than open to a second owner while that
/// thread may still commit, and is unlocked once the thread ends.
#[test]
fn persistence_callbacks_that_wait_or_close_get_errors_not_deadlocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), config()).unwrap());
    let vb = store.open_vbucket(0).unwrap();
    let first = vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    let (report, reported) = std::sync::mpsc::channel();
    {
        let (store, vb) = (Arc::clone(&store), vb.clone());
        vb.clone().on_persisted(first.seqno, move |persisted| {
            persisted.unwrap();
            let next = vb.set(b"k2", b"v2", ItemMeta::default()).unwrap();
            let waited = vb.wait_persisted(next.seqno, WAIT);
            let closed = store.close_vbucket(0);
            let deleted = store.delete_vbucket(0);
            report.send((waited, closed, deleted)).unwrap();
        });
    }
    let (waited, closed, deleted) = reported.recv_timeout(WAIT).unwrap();
    assert!(
        matches!(
            waited,
            Err(Error::Flusher(flusher::Error::WaitOnFlusherThread {
                vbid: 0,
                ..
            }))
        ),
        "{waited:?}"
    );
    for r in [closed, deleted] {
        assert!(
            matches!(
                r,
                Err(Error::Flusher(flusher::Error::RemoveOnFlusherThread(0)))
            ),
            "{r:?}"
        );
    }
    // Nothing changed: the vbucket is open and persists.
    let m = vb.set(b"k3", b"v3", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    assert_eq!(vb.get(b"k2").unwrap().unwrap().value, b"v2");

    // A callback that ends up holding the last handle on the store.
    let (go, go_on) = std::sync::mpsc::channel::<()>();
    let (dropped, was_dropped) = std::sync::mpsc::channel();
    let last = vb.set(b"k4", b"v4", ItemMeta::default()).unwrap();
    {
        let store = Arc::clone(&store);
        let path = dir.path().to_path_buf();
        vb.on_persisted(last.seqno, move |persisted| {
            persisted.unwrap();
            go_on.recv_timeout(WAIT).unwrap();
            assert_eq!(Arc::strong_count(&store), 1);
            drop(store);
            // The callback's thread has not ended: still locked.
            let reopened = Store::open(&path, config()).map(drop);
            dropped.send(reopened).unwrap();
        });
    }
    drop(store);
    drop(vb);
    go.send(()).unwrap();
    let reopened = was_dropped.recv_timeout(WAIT).unwrap();
    assert!(
        matches!(reopened, Err(Error::DirectoryLocked { .. })),
        "{reopened:?}"
    );
    // Unlocked once the thread has ended, with what it persisted.
    let deadline = std::time::Instant::now() + WAIT;
    let store = loop {
        match Store::open(dir.path(), config()) {
            Ok(store) => break store,
            Err(Error::DirectoryLocked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let vb = store.open_vbucket(0).unwrap();
    assert_eq!(vb.get(b"k4").unwrap().unwrap().value, b"v4");
    drop(vb);
    store.close().unwrap();
}

/// A persistence callback that fills its own vbucket's queue gets
/// "temporarily full" at once, even with no bound on the wait for room: the
/// room would only come from the thread it runs on.
#[test]
fn a_persistence_callback_filling_its_queue_is_told_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config();
    c.flusher.max_queued_bytes = 64 << 10;
    c.flusher.backpressure_timeout = Duration::MAX;
    let store = Store::open(dir.path(), c).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let first = vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    let (report, reported) = std::sync::mpsc::channel();
    {
        let vb = vb.clone();
        vb.clone().on_persisted(first.seqno, move |_| {
            let value = vec![7u8; 16 << 10];
            let outcome = (0..100)
                .map(|i| vb.set(format!("big{i}").as_bytes(), &value, ItemMeta::default()))
                .find(Result::is_err);
            report.send(outcome).unwrap();
        });
    }
    let outcome = reported.recv_timeout(WAIT).unwrap();
    assert!(
        matches!(
            outcome,
            Some(Err(Error::Flusher(flusher::Error::TemporarilyFull {
                vbid: 0,
                ..
            })))
        ),
        "{outcome:?}"
    );
    // What was queued persists once the callback has returned.
    let m = vb.set(b"after", b"v", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    assert!(vb.get(b"big0").unwrap().is_some());
    store.close().unwrap();
}
