//! A replay's saves modify the target on two threads or on the caller's
//! alone, as [`CompactionConfig::parallel_replays`] says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use btree::{Db, DbOptions};
use compactor::{replay, CompactionConfig, Control};
use couchfile::{CouchFile, FileWriter, LocatedHeader, MemBackend};
use std::sync::Arc;

/// A source whose second header rewrites 2,000 documents (a save large
/// enough to go parallel), and both headers.
fn source() -> (CouchFile, LocatedHeader, LocatedHeader) {
    let file = CouchFile::new(Arc::new(MemBackend::new()), "0.couch.1").unwrap();
    let mut db = Db::open(file, &DbOptions::default()).unwrap();
    let mut headers = Vec::new();
    for round in 0..2u64 {
        db.save(&common::overwrite_round(round), &[]).unwrap();
        db.commit(0).unwrap();
        headers.push(db.committed().clone());
    }
    let second = headers.pop().unwrap();
    let first = headers.pop().unwrap();
    (db.snapshot().file().clone(), first, second)
}

/// Replays the second header onto a copy of the first made by replaying it
/// onto an empty target; returns the target's bytes and whether its saves
/// were left parallel.
fn replayed(parallel_replays: bool) -> (Vec<u8>, bool) {
    let (source, first, second) = source();
    let backend = Arc::new(MemBackend::new());
    let target = CouchFile::new(backend.clone(), "0.couch.2.compact").unwrap();
    let empty = LocatedHeader {
        offset: 0,
        header: couchfile::DbHeader::new(couchfile::CURRENT_DISK_VERSION),
    };
    let mut db = Db::from_writer(
        FileWriter::create_without_header(target).unwrap(),
        empty.clone(),
        btree::NodeConfig::default(),
    );
    let config = CompactionConfig {
        parallel_replays,
        ..CompactionConfig::default()
    };
    replay(&source, &empty, &first, &mut db, &config, &Control::new()).unwrap();
    db.commit(0).unwrap();
    let stats = replay(&source, &first, &second, &mut db, &config, &Control::new()).unwrap();
    assert_eq!(stats.docs, 2_000);
    db.commit(0).unwrap();
    (backend.to_bytes(), db.parallel_modifies())
}

#[test]
fn a_replay_without_parallel_replays_modifies_on_one_thread() {
    let (once, parallel) = replayed(false);
    assert!(!parallel);
    // One thread appends every node in the same order each time; two
    // append them in whatever order they finish.
    let (again, _) = replayed(false);
    assert_eq!(once, again);
    let (_, parallel) = replayed(true);
    assert!(parallel);
}
