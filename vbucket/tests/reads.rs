#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Point reads: `get` and `get_many` with the node cache on and off, against
//! a model across compactions and reopenings; readers racing compaction and
//! reading on after the old revision is unlinked; the cache's bound; and
//! what a lookup allocates.

mod support;

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::Rng;
use vbucket::{
    CompactionOptions, Document, ItemMeta, Store, StoreConfig, VBucket, DEFAULT_NODE_CACHE_BYTES,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:05}").into_bytes()
}

fn value(i: u64, version: u64) -> Vec<u8> {
    // Compressible and not, short and long.
    let len = ((i * 37 + version * 101) % 700) as usize;
    (0..len)
        .map(|n| {
            if version.is_multiple_of(2) {
                b'a'
            } else {
                (n as u64 * 131 + i) as u8
            }
        })
        .collect()
}

fn config(cache_bytes: u64) -> StoreConfig {
    StoreConfig {
        node_cache_bytes: cache_bytes,
        ..StoreConfig::default()
    }
}

/// [`config`] reading with `pread` only, no memory map.
fn unmapped(cache_bytes: u64) -> StoreConfig {
    StoreConfig {
        mapped_reads: false,
        ..config(cache_bytes)
    }
}

/// Writes `key(i)` = `value(i, version)` for `keys`, and waits until they
/// are persisted.
fn write(vb: &VBucket, keys: impl Iterator<Item = u64>, version: u64) {
    let mut last = 0;
    for i in keys {
        last = vb
            .set(&key(i), &value(i, version), ItemMeta::default())
            .unwrap()
            .seqno;
    }
    vb.wait_persisted(last, TIMEOUT).unwrap();
}

/// `get` of every key and `get_many` of them all (in a scrambled order with
/// repeats and absent keys) agree with `model`.
fn check(vb: &VBucket, model: &BTreeMap<Vec<u8>, Vec<u8>>, universe: u64, what: &str) {
    let mut asked: Vec<Vec<u8>> = (0..universe).rev().map(key).collect();
    asked.extend((0..universe).step_by(3).map(key));
    asked.push(b"absent".to_vec());
    for k in &asked {
        let got = vb.get(k).unwrap().map(|d| d.value);
        assert_eq!(got.as_ref(), model.get(k), "{what}: get {k:?}");
    }
    let refs: Vec<&[u8]> = asked.iter().map(Vec::as_slice).collect();
    let many = vb.get_many(&refs).unwrap();
    assert_eq!(many.len(), asked.len());
    for (k, doc) in asked.iter().zip(&many) {
        let got = doc.as_ref().map(|d| &d.value);
        assert_eq!(got, model.get(k), "{what}: get_many {k:?}");
        if let Some(doc) = doc {
            assert_eq!(&doc.key, k, "{what}");
        }
    }
    if vb.stats().unwrap().dirty_items > 0 {
        return;
    }
    // Nothing unflushed: the latest snapshot reads the same.
    let snapshot = vb.snapshot();
    let from_snapshot = snapshot.get_many(&refs).unwrap();
    for (a, b) in many.iter().zip(&from_snapshot) {
        assert_eq!(
            a.as_ref().map(|d| (&d.key, &d.value, d.seqno)),
            b.as_ref().map(|d| (&d.key, &d.value, d.seqno)),
            "{what}"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Sets keys `from..from + n` to a new version.
    Set {
        from: u64,
        n: u64,
    },
    /// Deletes keys `from..from + n`.
    Delete {
        from: u64,
        n: u64,
    },
    /// Sets keys without waiting: `get` and `get_many` see them unflushed.
    SetUnflushed {
        from: u64,
        n: u64,
    },
    Compact,
    Reopen,
}

const UNIVERSE: u64 = 300;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..UNIVERSE, 1..120u64).prop_map(|(from, n)| Op::Set { from, n }),
        2 => (0..UNIVERSE, 1..60u64).prop_map(|(from, n)| Op::Delete { from, n }),
        1 => (0..UNIVERSE, 1..30u64).prop_map(|(from, n)| Op::SetUnflushed { from, n }),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

fn run_against_model(ops: &[Op], config: StoreConfig) {
    let cache_bytes = config.node_cache_bytes;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config.clone()).unwrap();
    let mut vb = store.open_vbucket(0).unwrap();
    let mut model = BTreeMap::new();
    for (step, op) in ops.iter().enumerate() {
        let version = step as u64 + 1;
        let keys = |from: u64, n: u64| from..(from + n).min(UNIVERSE);
        match op {
            Op::Set { from, n } => {
                write(&vb, keys(*from, *n), version);
                for i in keys(*from, *n) {
                    model.insert(key(i), value(i, version));
                }
            }
            Op::Delete { from, n } => {
                let mut last = 0;
                for i in keys(*from, *n) {
                    last = vb.delete(&key(i), ItemMeta::default()).unwrap().seqno;
                    model.remove(&key(i));
                }
                vb.wait_persisted(last, TIMEOUT).unwrap();
            }
            Op::SetUnflushed { from, n } => {
                for i in keys(*from, *n) {
                    vb.set(&key(i), &value(i, version), ItemMeta::default())
                        .unwrap();
                    model.insert(key(i), value(i, version));
                }
            }
            Op::Compact => {
                vb.compact(&CompactionOptions::default()).unwrap();
            }
            Op::Reopen => {
                drop(vb);
                store.close().unwrap();
                store = Store::open(dir.path(), config.clone()).unwrap();
                vb = store.open_vbucket(0).unwrap();
            }
        }
        check(&vb, &model, UNIVERSE, &format!("step {step} ({op:?})"));
    }
    if cache_bytes > 0 {
        let cache = store.stats().unwrap().node_cache.unwrap();
        assert!(cache.used <= cache.capacity, "{cache:?}");
    } else {
        assert!(store.stats().unwrap().node_cache.is_none());
    }
    drop(vb);
    store.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn get_and_get_many_agree_with_a_model_with_the_cache(ops in prop::collection::vec(op(), 1..14)) {
        run_against_model(&ops, config(DEFAULT_NODE_CACHE_BYTES));
    }

    #[test]
    fn get_and_get_many_agree_with_a_model_without_the_memory_map(ops in prop::collection::vec(op(), 1..14)) {
        run_against_model(&ops, unmapped(DEFAULT_NODE_CACHE_BYTES));
    }

    #[test]
    fn get_and_get_many_agree_with_a_model_without_the_cache(ops in prop::collection::vec(op(), 1..14)) {
        run_against_model(&ops, config(0));
    }

    #[test]
    fn get_and_get_many_agree_with_a_model_with_a_tiny_cache(ops in prop::collection::vec(op(), 1..14)) {
        // Always evicting: what a lookup finds must never depend on it.
        run_against_model(&ops, config(16 << 10));
    }
}

#[test]
fn readers_race_compactions_and_read_on_after_the_old_file_is_unlinked() {
    for cache_bytes in [DEFAULT_NODE_CACHE_BYTES, 0] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config(cache_bytes)).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        const KEYS: u64 = 2_000;
        write(&vb, 0..KEYS, 1);
        // Overwritten, so compaction has garbage to drop.
        write(&vb, 0..KEYS, 2);
        let before = vb.snapshot();
        let first_revision = before.revision();

        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2u64)
            .map(|seed| {
                let vb = vb.clone();
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed + 1);
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) || reads < 1_000 {
                        let i = rng.below(KEYS);
                        let doc = vb.get(&key(i)).unwrap().expect("present");
                        assert_eq!(doc.value, value(i, 2), "key {i}");
                        let batch: Vec<Vec<u8>> = (0..8).map(|_| key(rng.below(KEYS))).collect();
                        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                        for (k, doc) in refs.iter().zip(vb.get_many(&refs).unwrap()) {
                            let doc = doc.expect("present");
                            assert_eq!(&doc.key[..], *k);
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for _ in 0..3 {
            vb.compact(&CompactionOptions::default()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() >= 1_000);
        }
        assert!(vb.snapshot().revision() > first_revision);
        let old_name = vbucket::revision_name(0, first_revision);
        assert!(
            !dir.path().join(&old_name).exists(),
            "compaction unlinked {old_name}"
        );
        // The snapshot of the first revision reads on from the unlinked file.
        for i in (0..KEYS).step_by(7) {
            let doc = before.get(&key(i)).unwrap().expect("present");
            assert_eq!(doc.value, value(i, 2), "key {i}");
        }
        let keys: Vec<Vec<u8>> = (0..KEYS).step_by(5).map(key).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let docs = before.get_many(&refs).unwrap();
        assert!(docs.iter().all(Option::is_some));
        drop(vb);
        store.close().unwrap();
    }
}

#[test]
fn the_cache_stays_within_its_bound_and_counts_what_it_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config(256 << 10)).unwrap();
    let vbs: Vec<VBucket> = (0..3).map(|v| store.open_vbucket(v).unwrap()).collect();
    for round in 0..4 {
        for vb in &vbs {
            write(vb, 0..3_000, round);
        }
        let cache = store.stats().unwrap().node_cache.unwrap();
        assert!(cache.used <= cache.capacity, "{cache:?}");
    }
    for vb in &vbs {
        for i in (0..3_000).step_by(11) {
            assert_eq!(vb.get(&key(i)).unwrap().unwrap().value, value(i, 3));
        }
    }
    let stats = store.stats().unwrap();
    let cache = stats.node_cache.unwrap();
    assert!(cache.used <= cache.capacity, "{cache:?}");
    assert!(cache.evictions > 0, "{cache:?}");
    assert!(cache.hits > 0 && cache.misses > 0, "{cache:?}");
    // Every vbucket reports the one cache they share.
    for vb in &stats.vbuckets {
        assert_eq!(vb.node_cache.unwrap().capacity, 256 << 10);
    }
    drop(vbs);
    store.close().unwrap();
}

/// A vbucket of 3,000 keys written three times, every key read once (so
/// the cache holds its paths), in a store with a cache of `cache_bytes`.
fn read_vbucket(dir: &std::path::Path, cache_bytes: u64) -> (Store, VBucket) {
    let store = Store::open(dir, config(cache_bytes)).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    for version in 0..3 {
        write(&vb, 0..3_000, version);
    }
    for i in 0..3_000 {
        vb.get(&key(i)).unwrap().unwrap();
    }
    (store, vb)
}

/// Every key of [`read_vbucket`] reads as its third version.
fn assert_reads_the_last_version(vb: &VBucket) {
    for i in 0..3_000 {
        assert_eq!(vb.get(&key(i)).unwrap().unwrap().value, value(i, 2));
    }
}

#[test]
fn a_compaction_too_large_for_the_cache_passes_through_it() {
    let dir = tempfile::tempdir().unwrap();
    // The vbucket's trees take more than a quarter of a 256 KiB cache.
    let (store, vb) = read_vbucket(dir.path(), 256 << 10);
    let before = store.stats().unwrap().node_cache.unwrap();
    vb.compact(&CompactionOptions::default()).unwrap();
    // The copy read every node of the old file and wrote every node of the
    // new one, and put none of them in: what the readers had cached stays.
    let after = store.stats().unwrap().node_cache.unwrap();
    assert_eq!((after.entries, after.used), (before.entries, before.used));
    assert_eq!(after.evictions, before.evictions);
    // The new revision's nodes are cached once read.
    assert_reads_the_last_version(&vb);
    let read = store.stats().unwrap().node_cache.unwrap();
    assert!(read.misses > after.misses, "{read:?}");
    drop(vb);
    store.close().unwrap();
}

#[test]
fn a_compaction_that_fits_the_cache_leaves_the_new_revision_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (store, vb) = read_vbucket(dir.path(), DEFAULT_NODE_CACHE_BYTES);
    vb.compact(&CompactionOptions::default()).unwrap();
    let after = store.stats().unwrap().node_cache.unwrap();
    // Every read of the new revision is served by the cache.
    assert_reads_the_last_version(&vb);
    let read = store.stats().unwrap().node_cache.unwrap();
    assert_eq!(read.misses, after.misses, "{read:?}");
    assert!(read.hits > after.hits, "{read:?}");
    drop(vb);
    store.close().unwrap();
}

#[test]
fn a_get_from_the_file_allocates_only_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    write(&vb, 0..500, 1);
    let snapshot = vb.snapshot();
    // Warm: every node on the paths is in the cache.
    for i in 0..500 {
        vb.get(&key(i)).unwrap().unwrap();
    }
    for i in (0..500).step_by(17) {
        let k = key(i);
        let mut doc: Option<Document> = None;
        let info = allocation_counter::measure(|| {
            doc = vb.get(&k).unwrap();
        });
        let doc = doc.unwrap();
        // The key and the value: nothing else. A body whose payload crosses
        // a block boundary is first copied out of the file's map into one
        // buffer, without the boundary's marker byte (a boundary inside the
        // chunk's 8-byte prefix, or at its start, does not split the
        // payload).
        let (bp, size) = snapshot
            .inner()
            .with_doc_info(&k, |info| (info.bp, info.physical_size))
            .unwrap()
            .unwrap();
        let payload_start = bp + couchfile::block::physical_len(bp, 8);
        let payload_len = size - 8;
        let crosses = couchfile::block::physical_len(payload_start, payload_len) != payload_len;
        let expected = 2 + u64::from(crosses);
        assert_eq!(info.count_total, expected, "get of key {i}: {info:?}");
        let mut from_snapshot: Option<Document> = None;
        let info = allocation_counter::measure(|| {
            from_snapshot = snapshot.get(&k).unwrap();
        });
        assert_eq!(from_snapshot.as_ref(), Some(&doc));
        assert_eq!(
            info.count_total, expected,
            "snapshot get of key {i}: {info:?}"
        );
        // The lookup alone, and a key that is absent: nothing at all.
        let info = allocation_counter::measure(|| {
            let seqno = snapshot.inner().with_doc_info(&k, |info| info.db_seq);
            assert_eq!(seqno.unwrap(), Some(doc.seqno));
            assert!(vb.get(b"absent").unwrap().is_none());
        });
        assert_eq!(info.count_total, 0, "{info:?}");
    }
    drop(vb);
    store.close().unwrap();
}

#[test]
fn get_many_takes_any_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    assert!(vb.get_many(&[]).unwrap().is_empty());
    write(&vb, 0..10, 1);
    let long = vec![b'x'; 70_000];
    let keys: Vec<&[u8]> = vec![b"", &long, b"key-00003", b"key-00003", b"\xff\xff"];
    let docs = vb.get_many(&keys).unwrap();
    let found: Vec<bool> = docs.iter().map(Option::is_some).collect();
    assert_eq!(found, [false, false, true, true, false]);
    assert!(vb.get(&long).unwrap().is_none());
    assert!(vb.get(b"").unwrap().is_none());
    // A deleted key reads as absent, and as a deletion when asked.
    let seqno = vb.delete(b"key-00004", ItemMeta::default()).unwrap().seqno;
    vb.wait_persisted(seqno, TIMEOUT).unwrap();
    let keys: Vec<&[u8]> = vec![b"key-00004"];
    assert!(vb.get_many(&keys).unwrap()[0].is_none());
    let deleted = vb.get_many_including_deleted(&keys).unwrap()[0]
        .clone()
        .unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.seqno, seqno);
    drop(vb);
    store.close().unwrap();
}
