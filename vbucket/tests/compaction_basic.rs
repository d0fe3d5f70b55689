#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Compaction of a vbucket: content kept, file smaller, revision switched.

use std::time::Duration;
use vbucket::{CompactionOptions, ItemMeta, Store, StoreConfig};

#[test]
fn compaction_keeps_content_and_switches_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut last = 0;
    for round in 0..20 {
        for i in 0..200 {
            last = vb
                .set(
                    format!("k{i}").as_bytes(),
                    format!("v{round}-{i}").as_bytes(),
                    ItemMeta::default(),
                )
                .unwrap()
                .seqno;
        }
        vb.wait_persisted(last, Duration::from_secs(30)).unwrap();
    }
    vb.delete(b"k5", ItemMeta::default()).unwrap();
    let last = vb.set(b"k6", b"final", ItemMeta::default()).unwrap().seqno;
    vb.wait_persisted(last, Duration::from_secs(30)).unwrap();
    let before = vb.snapshot();
    let report = vb.compact(&CompactionOptions::default()).unwrap();
    assert_eq!((report.revision_before, report.revision_after), (1, 2));
    assert!(report.size_after < report.size_before / 4, "{report:?}");
    let after = vb.snapshot();
    assert_eq!(after.revision(), 2);
    assert_eq!(after.high_seqno(), before.high_seqno());
    assert_eq!(vb.get(b"k6").unwrap().unwrap().value, b"final");
    assert_eq!(vb.get(b"k5").unwrap(), None);
    assert_eq!(vb.get(b"k7").unwrap().unwrap().value, b"v19-7");
    // Old snapshot still readable after the old file was unlinked.
    assert_eq!(before.get(b"k6").unwrap().unwrap().value, b"final");
    // Writes continue in the new revision.
    let m = vb.set(b"k8", b"after", ItemMeta::default()).unwrap();
    vb.wait_persisted(m.seqno, Duration::from_secs(30)).unwrap();
    store.close().unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        // The store's lock file stays.
        .filter(|n| n != couchfile::LOCK_FILE_NAME)
        .collect();
    assert_eq!(names, ["0.couch.2"]);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(vb.get(b"k8").unwrap().unwrap().value, b"after");
    assert_eq!(vb.get(b"k6").unwrap().unwrap().value, b"final");
    assert!(vb.get_including_deleted(b"k5").unwrap().unwrap().deleted);
}

#[test]
fn auto_compaction_compacts_fragmented_vbuckets() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        auto_compaction: Some(vbucket::AutoCompaction {
            fragmentation_threshold: 0.5,
            min_file_size: 64 << 10,
            max_concurrent: 1,
            check_interval: Duration::from_millis(10),
            ..vbucket::AutoCompaction::default()
        }),
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let vbs: Vec<_> = (0..2).map(|v| store.open_vbucket(v).unwrap()).collect();
    let mut log = Vec::new();
    for round in 0..200 {
        for vb in &vbs {
            let mut last = 0;
            for i in 0..50 {
                last = vb
                    .set(
                        format!("k{i}").as_bytes(),
                        &[round as u8; 300],
                        ItemMeta::default(),
                    )
                    .unwrap()
                    .seqno;
            }
            vb.wait_persisted(last, Duration::from_secs(30)).unwrap();
        }
        log.extend(store.take_compaction_log());
        if log.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!log.is_empty(), "no automatic compaction ran");
    for (vbid, outcome) in &log {
        let report = outcome.as_ref().unwrap();
        assert!(
            report.size_after < report.size_before,
            "vb {vbid}: {report:?}"
        );
    }
    for vb in &vbs {
        for i in 0..50 {
            assert_eq!(
                vb.get(format!("k{i}").as_bytes())
                    .unwrap()
                    .unwrap()
                    .value
                    .len(),
                300
            );
        }
    }
    store.close().unwrap();
}
