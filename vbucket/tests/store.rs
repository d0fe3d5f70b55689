#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The store and vbucket API on real files: writes, reads of unflushed and
//! flushed data, reopen, revisions at open, vbstate, statistics, and the
//! files' validity for couchtool and couchread.py.

mod support;

use std::ops::ControlFlow;
use std::time::Duration;
use support::{names, verify_file};
use vbucket::{
    revision_name, Document, Error, ItemMeta, Store, StoreConfig, VbucketState, DATATYPE_JSON,
};

const WAIT: Duration = Duration::from_secs(30);

fn config() -> StoreConfig {
    let mut c = StoreConfig::default();
    c.flusher.max_batch_items = 7;
    c
}

fn all_changes(vb: &vbucket::VBucket) -> Vec<Document> {
    let mut docs = Vec::new();
    vb.changes_since(0, &mut |d| {
        docs.push(d);
        ControlFlow::Continue(())
    })
    .unwrap();
    docs
}

#[test]
fn writes_read_back_before_and_after_flush_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(3).unwrap();
    let json = ItemMeta {
        flags: 0xdead_beef,
        exptime: 1_900_000_000,
        datatype: DATATYPE_JSON,
        ..ItemMeta::default()
    };
    let mut last = 0;
    for i in 0..100u32 {
        let key = format!("key-{:03}", i % 40);
        let m = vb
            .set(key.as_bytes(), format!("{{\"v\":{i}}}").as_bytes(), json)
            .unwrap();
        assert!(m.seqno > last, "seqnos increase");
        last = m.seqno;
        // Readable at once, flushed or not.
        let doc = vb.get(key.as_bytes()).unwrap().unwrap();
        assert_eq!(doc.value, format!("{{\"v\":{i}}}").as_bytes());
        assert_eq!((doc.seqno, doc.meta.flags), (m.seqno, 0xdead_beef));
    }
    let deleted = vb.delete(b"key-007", ItemMeta::default()).unwrap();
    assert_eq!(vb.get(b"key-007").unwrap(), None);
    assert!(
        vb.get_including_deleted(b"key-007")
            .unwrap()
            .unwrap()
            .deleted
    );
    assert_eq!(
        vb.wait_persisted(deleted.seqno, WAIT).unwrap(),
        deleted.seqno
    );
    assert_eq!(vb.high_seqno(), 101);

    let stats = vb.stats().unwrap();
    assert_eq!((stats.live_docs, stats.deleted_docs), (39, 1));
    assert_eq!(stats.flush.persisted_seqno, 101);
    assert!(stats.flush.batches_flushed >= 1);
    assert!(stats.file_size >= stats.space_used);
    store.close().unwrap();

    let store = Store::open(dir.path(), config()).unwrap();
    assert_eq!(store.vbuckets(), vec![3]);
    let vb = store.vbucket(3).unwrap();
    assert_eq!(vb.high_seqno(), 101);
    for i in 60..100u32 {
        let key = format!("key-{:03}", i % 40);
        let doc = vb.get(key.as_bytes()).unwrap();
        if key == "key-007" {
            assert_eq!(doc, None);
        } else {
            let doc = doc.unwrap();
            assert_eq!(doc.value, format!("{{\"v\":{i}}}").as_bytes());
            assert_eq!(doc.meta.datatype, DATATYPE_JSON);
            assert_eq!(doc.meta.exptime, 1_900_000_000);
        }
    }
    let changes = all_changes(&vb);
    assert_eq!(changes.len(), 40);
    assert!(changes.windows(2).all(|w| w[0].seqno < w[1].seqno));
    // Seqnos continue after a reopen.
    let m = vb.set(b"after", b"reopen", ItemMeta::default()).unwrap();
    assert_eq!(m.seqno, 102);
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    let vbstate = vb.snapshot().vbstate().unwrap().unwrap();
    assert_eq!(vbstate.persisted_seqno, 102);
    assert_eq!(vbstate.max_deleted_seqno, 101);
    assert_eq!(vbstate.failover_table.len(), 1);
    store.close().unwrap();
    verify_file(&dir.path().join("3.couch.1"));
}

#[test]
fn older_headers_keep_their_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let first = vb.set(b"k", b"one", ItemMeta::default()).unwrap();
    vb.wait_persisted(first.seqno, WAIT).unwrap();
    let old = vb.snapshot();
    let second = vb.set(b"k", b"two", ItemMeta::default()).unwrap();
    vb.wait_persisted(second.seqno, WAIT).unwrap();
    assert_eq!(old.get(b"k").unwrap().unwrap().value, b"one");
    assert_eq!(vb.snapshot().get(b"k").unwrap().unwrap().value, b"two");
    let again = vb.snapshot_at(old.header_offset()).unwrap();
    assert_eq!(again.get(b"k").unwrap().unwrap().value, b"one");
    let previous = vb.snapshot().previous().unwrap().unwrap();
    assert_eq!(previous.high_seqno(), first.seqno);
    // Not a header: a typed error.
    let err = vb.snapshot_at(1).unwrap_err();
    assert!(matches!(err, Error::Tree(_) | Error::File(_)), "{err:?}");
    let err = vb.snapshot_at(1 << 40).unwrap_err();
    assert!(
        matches!(err, Error::Tree(btree::Error::InvalidArgument(_))),
        "{err:?}"
    );
}

#[test]
fn newest_complete_revision_wins_and_leftovers_go() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), config()).unwrap();
        for vbid in [1, 2] {
            let vb = store.open_vbucket(vbid).unwrap();
            let m = vb
                .set(b"k", format!("vb{vbid}").as_bytes(), ItemMeta::default())
                .unwrap();
            vb.wait_persisted(m.seqno, WAIT).unwrap();
        }
        store.close().unwrap();
    }
    // vbucket 1: a later complete revision (as a compaction's rename leaves
    // before it unlinks the old one) and a .compact file. (An empty or
    // headerless newer revision is damage: tests/damaged.rs.)
    std::fs::copy(dir.path().join("1.couch.1"), dir.path().join("1.couch.4")).unwrap();
    std::fs::write(dir.path().join("1.couch.5.compact"), b"partial").unwrap();
    // vbucket 2: a stray .compact only; an unrelated file stays.
    std::fs::write(dir.path().join("2.couch.2.compact"), b"x").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();

    let store = Store::open(dir.path(), config()).unwrap();
    assert_eq!(names(dir.path()), ["1.couch.4", "2.couch.1", "notes.txt"]);
    let vb1 = store.vbucket(1).unwrap();
    assert_eq!(vb1.stats().unwrap().revision, 4);
    assert_eq!(vb1.get(b"k").unwrap().unwrap().value, b"vb1");
    // Writes go to the revision in use.
    let m = vb1.set(b"k2", b"v", ItemMeta::default()).unwrap();
    vb1.wait_persisted(m.seqno, WAIT).unwrap();
    store.close().unwrap();
    verify_file(&dir.path().join(revision_name(1, 4)));
}

/// A closed store in a new directory whose vbucket 0 holds `k` = `v`, in
/// `0.couch.1`.
fn store_with_one_document() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let m = vb.set(b"k", b"v", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    store.close().unwrap();
    dir
}

#[test]
fn files_named_otherwise_than_the_store_names_them_are_never_touched() {
    let dir = store_with_one_document();
    let data = std::fs::read(dir.path().join("0.couch.1")).unwrap();
    // Copies under names the store never gives (a leading zero, a suffix
    // glued to `.compact`): not its files, so neither opened nor removed,
    // by an open or by deleting the vbucket.
    let strays = [
        "00.couch.1",
        "0.couch.01",
        "1.couch.01",
        "0.couch.2.compactx",
    ];
    for name in strays {
        std::fs::write(dir.path().join(name), &data).unwrap();
    }
    let store = Store::open(dir.path(), config()).unwrap();
    assert_eq!(store.vbuckets(), [0]);
    assert_eq!(
        store.vbucket(0).unwrap().get(b"k").unwrap().unwrap().value,
        b"v"
    );
    store.delete_vbucket(0).unwrap();
    store.close().unwrap();
    let mut expected = strays.to_vec();
    expected.sort_unstable();
    assert_eq!(names(dir.path()), expected);
    for name in strays {
        assert!(
            std::fs::read(dir.path().join(name)).unwrap() == data,
            "{name}"
        );
    }
}

#[test]
fn a_vbucket_at_the_last_revision_number_refuses_to_compact_and_keeps_its_data() {
    let dir = store_with_one_document();
    let last = revision_name(0, u64::MAX);
    std::fs::rename(dir.path().join("0.couch.1"), dir.path().join(&last)).unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(vb.stats().unwrap().revision, u64::MAX);
    let r = vb.compact(&vbucket::CompactionOptions::default());
    assert!(matches!(r, Err(Error::RevisionsExhausted(0))), "{r:?}");
    // Still written to and read from the same file.
    let m = vb.set(b"k2", b"v2", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
    assert_eq!(vb.get(b"k").unwrap().unwrap().value, b"v");
    store.close().unwrap();
    assert_eq!(names(dir.path()), [last.as_str()]);
    verify_file(&dir.path().join(&last));
}

#[test]
fn new_vbucket_starts_at_revision_one_with_a_durable_vbstate() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(9).unwrap();
    assert_eq!(names(dir.path()), ["9.couch.1"]);
    let uuid = vb.vbstate().failover_table[0].id;
    vb.set_state(VbucketState::Replica).unwrap();
    store.close().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vbstate = store.vbucket(9).unwrap().vbstate();
    assert_eq!(vbstate.state, VbucketState::Replica);
    assert_eq!(vbstate.failover_table[0].id, uuid);
    verify_file(&dir.path().join("9.couch.1"));
}

#[test]
fn bad_input_gives_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    assert!(matches!(
        vb.set(b"", b"v", ItemMeta::default()),
        Err(Error::InvalidKey { len: 0, .. })
    ));
    assert!(matches!(
        vb.set(&[b'k'; 4096], b"v", ItemMeta::default()),
        Err(Error::InvalidKey { len: 4096, .. })
    ));
    assert!(matches!(
        vb.set(
            b"k",
            &vec![0; vbucket::MAX_VALUE_SIZE + 1],
            ItemMeta::default()
        ),
        Err(Error::ValueTooLarge { .. })
    ));
    assert!(matches!(store.vbucket(5), Err(Error::NoSuchVbucket(5))));
    store.close_vbucket(0).unwrap();
    assert!(matches!(
        vb.set(b"k", b"v", ItemMeta::default()),
        Err(Error::Closed(0) | Error::Flusher(flusher::Error::Closed { .. }))
    ));
    // A garbage file named like a revision is a typed error, not a panic.
    std::fs::write(dir.path().join("4.couch.1"), vec![7u8; 9000]).unwrap();
    assert!(store.open_vbucket(4).is_err());
    // An empty path names no directory: nothing is created, not even the
    // lock file in the current directory.
    let lock = std::path::Path::new(couchfile::LOCK_FILE_NAME);
    let locked_before = lock.exists();
    assert!(matches!(
        Store::open("", config()),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::InvalidInput
    ));
    assert_eq!(lock.exists(), locked_before);
}

#[test]
fn delete_vbucket_removes_its_files_and_stats_total() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    for vbid in 0..4 {
        let vb = store.open_vbucket(vbid).unwrap();
        for i in 0..10 {
            vb.set(format!("k{i}").as_bytes(), b"v", ItemMeta::default())
                .unwrap();
        }
        vb.wait_persisted(10, WAIT).unwrap();
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.vbuckets.len(), 4);
    assert_eq!(stats.total.live_docs, 40);
    assert_eq!(stats.total.flush.items_flushed, 40);
    store.delete_vbucket(2).unwrap();
    assert_eq!(store.vbuckets(), vec![0, 1, 3]);
    assert!(!names(dir.path()).iter().any(|n| n.starts_with("2.")));
}
