//! The vbucket against a model, with concurrent writers and readers.
//!
//! A [`Store`] of two vbuckets on real files, flushed with small random batch
//! limits by one or two flusher threads. Two or three writer threads share
//! one key space (a key's vbucket is its index modulo 2) and apply generated
//! sets (values of 0 to ~3000 bytes), deletes and waits for persistence,
//! recording the seqno and CAS of every mutation. Every mutation carries its
//! writer and op index in its flags, so what a reader sees names the op that
//! wrote it. One or two reader threads meanwhile `get` keys and take
//! snapshots. Checked:
//!
//! - a reader only sees values that op wrote for that key, with the seqno and
//!   CAS the writer was given, and never an older seqno of a key after a
//!   newer one;
//! - a snapshot is a prefix: its `changes_since(0)` lists each key once, in
//!   seqno order, none above its high seqno, and is exactly the model of the
//!   mutations up to its high seqno; successive snapshots never go back;
//! - seqnos of a vbucket are 1, 2, 3, ... in the order mutations returned;
//! - after the writers: `get` of every key is the model (unflushed values
//!   included); after `wait_persisted`, the latest snapshot is the model,
//!   tombstones included; after close and reopen, again, and the vbstate
//!   agrees; every header of every file passes `tool::verify_snapshot`, and
//!   the latest passes `couchread.py --verify`; CAS stays ahead after reopen.
//!
//! `one_item_batches` runs the same checks on a fixed workload with
//! one-item batches, two flusher threads and a 4 KiB queue bound (writers
//! wait for room). `MODEL_DEBUG=1` prints, per case, the seqnos, commits,
//! mutations still unflushed when the writers finished and what the readers
//! checked.
//!
//! A deterministic test checks that older headers (`ReadSnapshot::previous`,
//! `VBucket::snapshot_at`) show the earlier values, before and after reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use btree::{NodeConfig, Snapshot};
use couchfile::{CouchFile, FileBackend, OpenMode};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::couchread_verify;
use vbucket::{
    Document, FlusherConfig, ItemMeta, ReadSnapshot, Store, StoreConfig, VBucket, Vbid,
    DATATYPE_JSON,
};

/// Keys shared by all writers; key `i` lives in vbucket `i % VBUCKETS`.
const KEYS: usize = 16;
const VBUCKETS: usize = 2;
/// Generous: a loaded machine must not turn into a spurious failure.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Snapshots a reader keeps for the prefix check after the writers finish.
const KEPT_SNAPSHOTS: usize = 40;

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:03}").into_bytes()
}

fn key_index(key: &[u8]) -> usize {
    std::str::from_utf8(key)
        .ok()
        .and_then(|s| s.strip_prefix("key-"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected key {:?}", String::from_utf8_lossy(key)))
}

fn vbid_of(key: usize) -> Vbid {
    (key % VBUCKETS) as Vbid
}

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: usize,
        len: usize,
        compressible: bool,
    },
    Delete {
        key: usize,
    },
    /// Wait until this writer's mutations so far are persisted.
    Wait,
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![1 => Just(0usize), 2 => 1usize..64, 4 => 64usize..3000];
    prop_oneof![
        14 => (0..KEYS, len, any::<bool>())
            .prop_map(|(key, len, compressible)| Op::Set { key, len, compressible }),
        4 => (0..KEYS).prop_map(|key| Op::Delete { key }),
        2 => Just(Op::Wait),
    ]
}

/// The flags that name op `idx` of writer `writer`.
fn flags(writer: usize, idx: usize) -> u32 {
    ((writer as u32) << 16) | idx as u32
}

fn unflags(flags: u32) -> (usize, usize) {
    ((flags >> 16) as usize, (flags & 0xffff) as usize)
}

/// The value op `idx` of writer `writer` sets: text or noise.
fn value(writer: usize, idx: usize, len: usize, compressible: bool) -> Vec<u8> {
    if compressible {
        format!("{{\"writer\":{writer},\"op\":{idx}}}")
            .bytes()
            .cycle()
            .take(len)
            .collect()
    } else {
        let mut s = (writer as u64) << 32 | idx as u64;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (s >> 56) as u8
            })
            .collect()
    }
}

fn meta(writer: usize, idx: usize) -> ItemMeta {
    ItemMeta {
        flags: flags(writer, idx),
        datatype: if idx.is_multiple_of(2) {
            DATATYPE_JSON
        } else {
            0
        },
        ..ItemMeta::default()
    }
}

/// Checks that `doc` is what the op its flags name wrote (key, value,
/// deletion, datatype) and returns that op's (writer, idx).
fn check_doc(ops: &[Vec<Op>], doc: &Document) -> (usize, usize) {
    let (w, idx) = unflags(doc.meta.flags);
    let k = key_index(&doc.key);
    let op = ops
        .get(w)
        .and_then(|ops| ops.get(idx))
        .unwrap_or_else(|| panic!("{doc:?}: flags name no op"));
    match *op {
        Op::Set {
            key,
            len,
            compressible,
        } => {
            assert_eq!(key, k, "{doc:?}: op {w}/{idx} set another key");
            assert!(!doc.deleted, "{doc:?}: op {w}/{idx} was a set");
            assert!(
                doc.value == value(w, idx, len, compressible),
                "key {k}: value of {} bytes is not what op {w}/{idx} set",
                doc.value.len()
            );
        }
        Op::Delete { key } => {
            assert_eq!(key, k, "{doc:?}: op {w}/{idx} deleted another key");
            assert!(doc.deleted, "{doc:?}: op {w}/{idx} was a delete");
            assert!(doc.value.is_empty(), "{doc:?}: a tombstone with a value");
        }
        Op::Wait => panic!("{doc:?}: op {w}/{idx} was a wait"),
    }
    assert_eq!(doc.meta.datatype, meta(w, idx).datatype, "{doc:?}");
    (w, idx)
}

/// One mutation as the writer was told: its vbucket, seqno and CAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Done {
    vbid: Vbid,
    key: usize,
    deleted: bool,
    seqno: u64,
    cas: u64,
    writer: usize,
    idx: usize,
}

/// A document as a reader saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    vbid: Vbid,
    seqno: u64,
    cas: u64,
    writer: usize,
    idx: usize,
}

/// A snapshot as a reader saw it: key -> (seqno, writer, idx).
#[derive(Debug, Clone)]
struct SeenSnapshot {
    vbid: Vbid,
    high_seqno: u64,
    docs: BTreeMap<usize, (u64, usize, usize)>,
}

#[derive(Debug, Default)]
struct ReaderLog {
    seen: Vec<Seen>,
    snapshots: Vec<SeenSnapshot>,
    gets: u64,
    snapshots_taken: u64,
}

fn writer(vbs: &[VBucket], ops: &[Op], w: usize) -> Vec<Done> {
    let mut done = Vec::new();
    // This writer's newest mutation per vbucket: (seqno, key).
    let mut last: HashMap<Vbid, (u64, usize)> = HashMap::new();
    for (idx, op) in ops.iter().enumerate() {
        // Let the flusher and the readers in between mutations.
        std::thread::yield_now();
        match *op {
            Op::Set {
                key: k,
                len,
                compressible,
            } => {
                let vbid = vbid_of(k);
                let m = vbs[usize::from(vbid)]
                    .set(&key(k), &value(w, idx, len, compressible), meta(w, idx))
                    .unwrap();
                done.push(Done {
                    vbid,
                    key: k,
                    deleted: false,
                    seqno: m.seqno,
                    cas: m.cas,
                    writer: w,
                    idx,
                });
                last.insert(vbid, (m.seqno, k));
            }
            Op::Delete { key: k } => {
                let vbid = vbid_of(k);
                let m = vbs[usize::from(vbid)]
                    .delete(&key(k), meta(w, idx))
                    .unwrap();
                done.push(Done {
                    vbid,
                    key: k,
                    deleted: true,
                    seqno: m.seqno,
                    cas: m.cas,
                    writer: w,
                    idx,
                });
                last.insert(vbid, (m.seqno, k));
            }
            Op::Wait => {
                for (&vbid, &(seqno, k)) in &last {
                    let vb = &vbs[usize::from(vbid)];
                    let persisted = vb.wait_persisted(seqno, TIMEOUT).unwrap();
                    assert!(persisted >= seqno);
                    assert!(vb.persisted_seqno() >= seqno);
                    // Waiters are woken only after the header is published.
                    let snap = vb.snapshot();
                    assert!(
                        snap.high_seqno() >= seqno,
                        "vb {vbid}: persisted {seqno} but the latest header has {}",
                        snap.high_seqno()
                    );
                    let doc = snap
                        .get_including_deleted(&key(k))
                        .unwrap()
                        .expect("persisted");
                    assert!(doc.seqno >= seqno, "{doc:?} older than persisted {seqno}");
                }
            }
        }
    }
    done
}

/// Checks one snapshot on its own and returns what it holds.
fn check_snapshot(ops: &[Vec<Op>], snap: &ReadSnapshot) -> SeenSnapshot {
    let high = snap.high_seqno();
    let mut docs = BTreeMap::new();
    let mut last_seqno = 0;
    snap.changes_since(0, &mut |doc| {
        assert!(
            doc.seqno <= high,
            "{doc:?} above the snapshot's high seqno {high}"
        );
        assert!(doc.seqno > last_seqno, "changes out of seqno order");
        last_seqno = doc.seqno;
        let (w, idx) = check_doc(ops, &doc);
        let k = key_index(&doc.key);
        assert_eq!(vbid_of(k), snap.vbid(), "{doc:?} in the wrong vbucket");
        let dup = docs.insert(k, (doc.seqno, w, idx));
        assert!(dup.is_none(), "key {k} listed twice");
        ControlFlow::Continue(())
    })
    .unwrap();
    SeenSnapshot {
        vbid: snap.vbid(),
        high_seqno: high,
        docs,
    }
}

fn reader(vbs: &[VBucket], ops: &[Vec<Op>], seed: u64, writing: &AtomicBool) -> ReaderLog {
    let mut log = ReaderLog::default();
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Per key: the newest seqno seen (0: never seen).
    let mut newest = [0u64; KEYS];
    let mut high = [0u64; VBUCKETS];
    let mut round = 0u64;
    while writing.load(Ordering::Acquire) || round < 50 {
        round += 1;
        let k = (next() % KEYS as u64) as usize;
        let vbid = vbid_of(k);
        let vb = &vbs[usize::from(vbid)];
        let doc = if round.is_multiple_of(3) {
            vb.get(&key(k)).unwrap()
        } else {
            let doc = vb.get_including_deleted(&key(k)).unwrap();
            assert!(
                doc.is_some() || newest[k] == 0,
                "key {k}: gone after seqno {} was seen",
                newest[k]
            );
            doc
        };
        log.gets += 1;
        if let Some(doc) = doc {
            assert_eq!(doc.key, key(k));
            let (writer, idx) = check_doc(ops, &doc);
            assert!(
                doc.seqno >= newest[k],
                "key {k}: seqno {} seen after {}",
                doc.seqno,
                newest[k]
            );
            newest[k] = doc.seqno;
            log.seen.push(Seen {
                vbid,
                seqno: doc.seqno,
                cas: doc.meta.cas,
                writer,
                idx,
            });
        }
        if round.is_multiple_of(8) {
            let v = (next() % VBUCKETS as u64) as usize;
            let snap = vbs[v].snapshot();
            let seen = check_snapshot(ops, &snap);
            assert!(
                seen.high_seqno >= high[v],
                "vb {v}: snapshot at {} after one at {}",
                seen.high_seqno,
                high[v]
            );
            high[v] = seen.high_seqno;
            // A point read of the snapshot agrees with its listing.
            let k = v + VBUCKETS * (next() % (KEYS / VBUCKETS) as u64) as usize;
            let got = snap.get_including_deleted(&key(k)).unwrap();
            assert_eq!(
                got.map(|d| d.seqno),
                seen.docs.get(&k).map(|&(s, _, _)| s),
                "vb {v}: get of key {k} disagrees with changes_since"
            );
            if round.is_multiple_of(32) {
                if let Some(prev) = snap.previous().unwrap() {
                    assert!(prev.high_seqno() <= seen.high_seqno);
                    assert!(prev.header_offset() < snap.header_offset());
                    check_snapshot(ops, &prev);
                }
            }
            log.snapshots_taken += 1;
            if log.snapshots.len() < KEPT_SNAPSHOTS {
                log.snapshots.push(seen);
            }
        }
        if round.is_multiple_of(64) {
            std::thread::yield_now();
        }
    }
    log
}
/// Every mutation of each vbucket by seqno, checking that the seqnos of a
/// vbucket are 1, 2, 3, ... and that CAS grows with the seqno.
fn by_seqno(done: &[Done]) -> Vec<BTreeMap<u64, Done>> {
    let mut by = vec![BTreeMap::new(); VBUCKETS];
    for d in done {
        let dup = by[usize::from(d.vbid)].insert(d.seqno, *d);
        assert!(
            dup.is_none(),
            "vb {}: seqno {} given twice",
            d.vbid,
            d.seqno
        );
    }
    for (v, muts) in by.iter().enumerate() {
        let seqnos: Vec<u64> = muts.keys().copied().collect();
        let expected: Vec<u64> = (1..=muts.len() as u64).collect();
        assert_eq!(seqnos, expected, "vb {v}: seqnos are not 1..=n");
        for pair in muts.values().collect::<Vec<_>>().windows(2) {
            assert!(
                pair[1].cas > pair[0].cas,
                "vb {v}: CAS went backwards: {:?} then {:?}",
                pair[0],
                pair[1]
            );
        }
    }
    by
}

/// The model of one vbucket after its mutations up to seqno `upto`: key ->
/// the newest of them.
fn model_at(muts: &BTreeMap<u64, Done>, upto: u64) -> BTreeMap<usize, Done> {
    muts.range(..=upto).map(|(_, d)| (d.key, *d)).collect()
}

/// `get` and `get_including_deleted` of every key of `vb` agree with `model`.
fn check_gets(ops: &[Vec<Op>], vb: &VBucket, model: &BTreeMap<usize, Done>) {
    for k in (0..KEYS).filter(|&k| vbid_of(k) == vb.vbid()) {
        let doc = vb.get_including_deleted(&key(k)).unwrap();
        let live = vb.get(&key(k)).unwrap();
        match model.get(&k) {
            None => {
                assert_eq!(doc, None, "key {k} was never written");
                assert_eq!(live, None, "key {k} was never written");
            }
            Some(d) => {
                let doc = doc.unwrap_or_else(|| panic!("key {k}: missing, expected {d:?}"));
                assert_eq!(
                    (doc.seqno, doc.meta.cas, doc.deleted),
                    (d.seqno, d.cas, d.deleted),
                    "key {k}"
                );
                assert_eq!(check_doc(ops, &doc), (d.writer, d.idx), "key {k}");
                if d.deleted {
                    assert_eq!(live, None, "key {k} is deleted");
                } else {
                    assert_eq!(live.as_ref(), Some(&doc), "key {k}");
                }
            }
        }
    }
}

/// The latest snapshot of `vb` is exactly `model`, tombstones included.
fn check_persisted(ops: &[Vec<Op>], vb: &VBucket, model: &BTreeMap<usize, Done>, high: u64) {
    let snap = vb.snapshot();
    assert_eq!(snap.high_seqno(), high, "vb {}", vb.vbid());
    let seen = check_snapshot(ops, &snap);
    let expected: BTreeMap<usize, (u64, usize, usize)> = model
        .iter()
        .map(|(&k, d)| (k, (d.seqno, d.writer, d.idx)))
        .collect();
    assert_eq!(seen.docs, expected, "vb {}: the latest header", vb.vbid());
    let mut tombstones = 0;
    let mut cas = HashMap::new();
    vb.changes_since(0, &mut |doc| {
        tombstones += u64::from(doc.deleted);
        cas.insert(key_index(&doc.key), doc.meta.cas);
        ControlFlow::Continue(())
    })
    .unwrap();
    for (k, d) in model {
        assert_eq!(cas.get(k), Some(&d.cas), "key {k}: CAS on disk");
    }
    let deleted = model.values().filter(|d| d.deleted).count() as u64;
    assert_eq!(tombstones, deleted, "vb {}: tombstones", vb.vbid());
    let stats = vb.stats().unwrap();
    assert_eq!(stats.deleted_docs, deleted, "{stats:?}");
    assert_eq!(stats.live_docs, model.len() as u64 - deleted, "{stats:?}");
    assert_eq!(stats.high_seqno, high, "{stats:?}");
    assert_eq!(stats.dirty_items, 0, "{stats:?}");
}

/// Every vbucket has one file, revision 1; every header of it passes
/// `verify_snapshot`, and with `couchread` the latest passes
/// `couchread.py --verify` too. Returns the headers of each file.
fn verify_files(dir: &Path, couchread: bool) -> Vec<usize> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        // The store's lock file stays.
        .filter(|n| n != couchfile::LOCK_FILE_NAME)
        .collect();
    names.sort();
    let expected: Vec<String> = (0..VBUCKETS)
        .map(|v| vbucket::revision_name(v as Vbid, 1))
        .collect();
    assert_eq!(names, expected);
    let mut headers = Vec::new();
    for name in &names {
        let path = dir.join(name);
        let backend = FileBackend::open_read_only(&path).unwrap();
        let file = CouchFile::new(Arc::new(backend), &path).unwrap();
        let mut snapshot = Snapshot::open_latest(file.clone(), OpenMode::Normal).unwrap();
        let mut count = 0;
        loop {
            let report = vbucket::tool::verify_snapshot(&snapshot);
            assert!(report.is_ok(), "{report}: {:?}", report.problems);
            count += 1;
            match file
                .previous_header(snapshot.located_header(), OpenMode::Normal)
                .unwrap()
            {
                Some(header) => {
                    assert!(header.header.update_seq <= snapshot.header().update_seq);
                    snapshot = Snapshot::new(file.clone(), header);
                }
                None => break,
            }
        }
        headers.push(count);
        if couchread {
            couchread_verify(&path, None);
        }
    }
    headers
}

#[derive(Debug, Clone)]
struct Case {
    threads: usize,
    max_batch_items: usize,
    max_batch_bytes: usize,
    max_queued_bytes: usize,
    compress_bodies: bool,
    small_nodes: bool,
    readers: usize,
    writers: Vec<Vec<Op>>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=2,
        1usize..=16,
        256usize..=16 << 10,
        8usize << 10..=128 << 10,
        any::<bool>(),
        any::<bool>(),
        1usize..=2,
        prop::collection::vec(prop::collection::vec(op(), 10..40), 2..=3),
    )
        .prop_map(
            |(
                threads,
                max_batch_items,
                max_batch_bytes,
                max_queued_bytes,
                compress_bodies,
                small_nodes,
                readers,
                writers,
            )| Case {
                threads,
                max_batch_items,
                max_batch_bytes,
                max_queued_bytes,
                compress_bodies,
                small_nodes,
                readers,
                writers,
            },
        )
}

fn store_config(case: &Case) -> StoreConfig {
    StoreConfig {
        flusher: FlusherConfig {
            threads: case.threads,
            max_batch_items: case.max_batch_items,
            max_batch_bytes: case.max_batch_bytes,
            max_queued_bytes: case.max_queued_bytes,
            backpressure_timeout: TIMEOUT,
            ..FlusherConfig::default()
        },
        compress_bodies: case.compress_bodies,
        nodes: if case.small_nodes {
            NodeConfig {
                leaf_threshold: 300,
                interior_threshold: 300,
            }
        } else {
            NodeConfig::default()
        },
        // Small nodes run with a tiny node cache (always evicting), the
        // defaults without one.
        node_cache_bytes: if case.small_nodes { 64 << 10 } else { 0 },
        ..StoreConfig::default()
    }
}

fn open_vbuckets(store: &Store) -> Vec<VBucket> {
    (0..VBUCKETS)
        .map(|v| store.open_vbucket(v as Vbid).unwrap())
        .collect()
}

fn run(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(case);
    let store = Store::open(dir.path(), config.clone()).unwrap();
    let vbs = open_vbuckets(&store);
    let ops = &case.writers;

    let writing = AtomicBool::new(true);
    let (written, logs) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..case.readers)
            .map(|r| {
                let (vbs, writing) = (&vbs, &writing);
                s.spawn(move || reader(vbs, ops, 0x9E37_79B9 * (r as u64 + 1), writing))
            })
            .collect();
        let writers: Vec<_> = ops
            .iter()
            .enumerate()
            .map(|(w, ops)| {
                let vbs = &vbs;
                s.spawn(move || writer(vbs, ops, w))
            })
            .collect();
        // Join every writer before stopping the readers, panicking or not.
        let written: Vec<_> = writers.into_iter().map(|h| h.join()).collect();
        writing.store(false, Ordering::Release);
        let logs: Vec<_> = readers.into_iter().map(|h| h.join()).collect();
        (written, logs)
    });
    let done: Vec<Done> = written.into_iter().flat_map(|w| w.unwrap()).collect();
    let logs: Vec<ReaderLog> = logs.into_iter().map(|l| l.unwrap()).collect();

    let by = by_seqno(&done);
    let highs: Vec<u64> = by.iter().map(|m| m.len() as u64).collect();
    let models: Vec<BTreeMap<usize, Done>> = by.iter().map(|m| model_at(m, u64::MAX)).collect();
    for (v, vb) in vbs.iter().enumerate() {
        assert_eq!(vb.high_seqno(), highs[v], "vb {v}");
    }

    // What the readers saw is what the writers were told.
    for log in &logs {
        assert!(log.gets >= 50 && log.snapshots_taken >= 6, "{log:?}");
        for seen in &log.seen {
            let d = by[usize::from(seen.vbid)]
                .get(&seen.seqno)
                .unwrap_or_else(|| panic!("{seen:?}: no such mutation"));
            assert_eq!(
                (d.writer, d.idx, d.cas),
                (seen.writer, seen.idx, seen.cas),
                "{seen:?}"
            );
        }
        for snap in &log.snapshots {
            let expected: BTreeMap<usize, (u64, usize, usize)> =
                model_at(&by[usize::from(snap.vbid)], snap.high_seqno)
                    .into_iter()
                    .map(|(k, d)| (k, (d.seqno, d.writer, d.idx)))
                    .collect();
            assert_eq!(
                snap.docs, expected,
                "vb {}: the snapshot at {} is not the prefix",
                snap.vbid, snap.high_seqno
            );
        }
    }

    if std::env::var_os("MODEL_DEBUG").is_some() {
        let dirty: Vec<u64> = vbs
            .iter()
            .map(|vb| vb.stats().unwrap().dirty_items)
            .collect();
        let commits: Vec<u64> = vbs.iter().map(|vb| vb.stats().unwrap().commits).collect();
        let seen: usize = logs.iter().map(|l| l.seen.len()).sum();
        let snaps: u64 = logs.iter().map(|l| l.snapshots_taken).sum();
        let gets: u64 = logs.iter().map(|l| l.gets).sum();
        eprintln!("highs {highs:?} dirty {dirty:?} commits {commits:?} gets {gets} seen {seen} snaps {snaps} threads {} batch {} {}", case.threads, case.max_batch_items, case.max_batch_bytes);
    }
    // Unflushed mutations included.
    for (v, vb) in vbs.iter().enumerate() {
        check_gets(ops, vb, &models[v]);
    }
    for (v, vb) in vbs.iter().enumerate() {
        assert_eq!(vb.wait_persisted(highs[v], TIMEOUT).unwrap(), highs[v]);
        check_gets(ops, vb, &models[v]);
        check_persisted(ops, vb, &models[v], highs[v]);
    }
    drop(vbs);
    store.close().unwrap();
    verify_files(dir.path(), false);

    let store = Store::open(dir.path(), config).unwrap();
    assert_eq!(store.vbuckets(), (0..VBUCKETS as Vbid).collect::<Vec<_>>());
    let vbs = open_vbuckets(&store);
    for (v, vb) in vbs.iter().enumerate() {
        assert_eq!(vb.high_seqno(), highs[v], "vb {v}");
        assert_eq!(vb.persisted_seqno(), highs[v], "vb {v}");
        check_gets(ops, vb, &models[v]);
        check_persisted(ops, vb, &models[v], highs[v]);
        let vbstate = vb.vbstate();
        assert_eq!(vbstate.persisted_seqno, highs[v], "{vbstate:?}");
        let last_cas = by[v].values().last().map_or(0, |d| d.cas);
        assert_eq!(vbstate.max_cas, last_cas, "{vbstate:?}");
        let max_delete = by[v].values().filter(|d| d.deleted).map(|d| d.seqno).max();
        let max_tombstone = models[v]
            .values()
            .filter(|d| d.deleted)
            .map(|d| d.seqno)
            .max();
        assert!(
            max_tombstone.unwrap_or(0) <= vbstate.max_deleted_seqno
                && vbstate.max_deleted_seqno <= max_delete.unwrap_or(0),
            "{vbstate:?}: tombstones up to {max_tombstone:?}, deletes up to {max_delete:?}"
        );
        // Seqnos and CAS carry on from the persisted ones.
        let m = vb.set(b"after-reopen", b"x", ItemMeta::default()).unwrap();
        assert_eq!(m.seqno, highs[v] + 1);
        assert!(m.cas > last_cas);
        vb.wait_persisted(m.seqno, TIMEOUT).unwrap();
    }
    drop(vbs);
    store.close().unwrap();
    verify_files(dir.path(), true);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 14,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn concurrent_writers_and_readers_match_the_model(case in case()) {
        run(&case);
    }
}

/// A deterministic case with every knob at its most stressful: one-item
/// batches, two flusher threads, three writers, two readers.
#[test]
fn one_item_batches() {
    let writers = (0..3)
        .map(|w| {
            (0..30)
                .map(|i| match (i + w) % 7 {
                    0 => Op::Delete {
                        key: (i * 5) % KEYS,
                    },
                    3 => Op::Wait,
                    _ => Op::Set {
                        key: (i * 3 + w) % KEYS,
                        len: (i * 97) % 3000,
                        compressible: i % 2 == 0,
                    },
                })
                .collect()
        })
        .collect();
    run(&Case {
        threads: 2,
        max_batch_items: 1,
        max_batch_bytes: 1,
        max_queued_bytes: 4 << 10,
        compress_bodies: true,
        small_nodes: true,
        readers: 2,
        writers,
    });
}

fn value_of(snap: &ReadSnapshot, k: &[u8]) -> Option<Vec<u8>> {
    snap.get(k).unwrap().map(|d| d.value)
}

#[test]
fn older_headers_show_earlier_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    // A new vbucket commits its vbstate at once: a header at seqno 0.
    let s0 = vb.snapshot();
    assert_eq!(s0.high_seqno(), 0);
    assert_eq!(value_of(&s0, b"a"), None);

    let m1 = vb.set(b"a", b"v1", ItemMeta::default()).unwrap();
    vb.wait_persisted(m1.seqno, TIMEOUT).unwrap();
    let s1 = vb.snapshot();
    assert_eq!(s1.high_seqno(), m1.seqno);

    let m2 = vb.set(b"a", b"v2", ItemMeta::default()).unwrap();
    let m3 = vb.set(b"b", b"w1", ItemMeta::default()).unwrap();
    vb.wait_persisted(m3.seqno, TIMEOUT).unwrap();
    let s2 = vb.snapshot();
    assert_eq!(s2.high_seqno(), m3.seqno);

    let m4 = vb.delete(b"a", ItemMeta::default()).unwrap();
    vb.wait_persisted(m4.seqno, TIMEOUT).unwrap();
    let s3 = vb.snapshot();
    assert_eq!(s3.high_seqno(), m4.seqno);

    // An unflushed mutation is visible to get() but to no snapshot.
    let m5 = vb.set(b"b", b"w2", ItemMeta::default()).unwrap();
    assert_eq!(vb.get(b"b").unwrap().unwrap().value, b"w2");

    // Held snapshots keep reading their header.
    let expect = |snap: &ReadSnapshot, a: Option<&[u8]>, b: Option<&[u8]>| {
        assert_eq!(
            value_of(snap, b"a").as_deref(),
            a,
            "a at {}",
            snap.high_seqno()
        );
        assert_eq!(
            value_of(snap, b"b").as_deref(),
            b,
            "b at {}",
            snap.high_seqno()
        );
    };
    let expected = |high: u64| -> (Option<&[u8]>, Option<&[u8]>) {
        match high {
            0 => (None, None),
            h if h < m2.seqno => (Some(b"v1"), None),
            // The flusher may have committed a=v2 before b was set.
            h if h < m3.seqno => (Some(b"v2"), None),
            h if h < m4.seqno => (Some(b"v2"), Some(b"w1")),
            h if h < m5.seqno => (None, Some(b"w1")),
            _ => (None, Some(b"w2")),
        }
    };
    for snap in [&s0, &s1, &s2, &s3] {
        let (a, b) = expected(snap.high_seqno());
        expect(snap, a, b);
    }
    let tombstone = s3.get_including_deleted(b"a").unwrap().unwrap();
    assert!(tombstone.deleted && tombstone.value.is_empty());
    assert_eq!(tombstone.seqno, m4.seqno);
    assert!(s2
        .get_including_deleted(b"a")
        .unwrap()
        .is_some_and(|d| !d.deleted));

    // snapshot_at opens the same headers again.
    for snap in [&s0, &s1, &s2, &s3] {
        let again = vb.snapshot_at(snap.header_offset()).unwrap();
        assert_eq!(again.high_seqno(), snap.high_seqno());
        let (a, b) = expected(snap.high_seqno());
        expect(&again, a, b);
    }
    assert!(vb.snapshot_at(u64::MAX).is_err());

    vb.wait_persisted(m5.seqno, TIMEOUT).unwrap();
    // Walking back from the latest passes every header, newest first, each
    // showing the values of its time, down to the file's first one.
    let walk = |latest: ReadSnapshot| -> Vec<u64> {
        let mut offsets = Vec::new();
        let mut snap = Some(latest);
        let mut last_high = u64::MAX;
        while let Some(s) = snap {
            assert!(s.high_seqno() <= last_high);
            last_high = s.high_seqno();
            let (a, b) = expected(s.high_seqno());
            expect(&s, a, b);
            offsets.push(s.header_offset());
            snap = s.previous().unwrap();
        }
        assert_eq!(last_high, 0);
        offsets
    };
    let offsets = walk(vb.snapshot());
    for snap in [&s0, &s1, &s2, &s3] {
        assert!(offsets.contains(&snap.header_offset()));
    }
    // Below the vbstate header, the empty header a new file starts with.
    assert_eq!(offsets.last(), Some(&0));
    assert!(vb.snapshot_at(0).unwrap().vbstate().unwrap().is_none());
    assert!(s0.vbstate().unwrap().is_some());

    drop(vb);
    store.close().unwrap();
    // Snapshots hold their file open: still readable after the close.
    expect(&s1, Some(b"v1"), None);

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let vb = store.vbucket(0).unwrap();
    assert_eq!(walk(vb.snapshot()), offsets);
    let again = vb.snapshot_at(s2.header_offset()).unwrap();
    expect(&again, Some(b"v2"), Some(b"w1"));
    assert_eq!(vb.get(b"b").unwrap().unwrap().value, b"w2");
    assert_eq!(vb.get(b"a").unwrap(), None);
    drop(vb);
    store.close().unwrap();
}
