//! The writeback thread ([`CompactionConfig::writeback_every_bytes`]) only
//! syncs early: the file written is the same byte for byte, and a failed
//! sync of that thread fails the copy even when the commit's own syncs
//! would succeed (a failed `fdatasync` is not reported to the next one).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use btree::{Db, DbOptions, Snapshot};
use compactor::{copy_snapshot, CompactionConfig, Control, NoHooks};
use couchfile::{
    CouchFile, FaultController, FaultKind, FaultRule, FaultyBackend, FaultyDirectory, FileWriter,
    MemBackend, OpKind,
};
use std::sync::Arc;

fn source() -> Snapshot {
    let file = CouchFile::new(Arc::new(MemBackend::new()), "0.couch.1").unwrap();
    let mut db = Db::open(file, &DbOptions::default()).unwrap();
    for round in 0..3u64 {
        db.save(&common::overwrite_round(round), &[]).unwrap();
        db.commit(0).unwrap();
    }
    db.snapshot()
}

fn copy(
    source: &Snapshot,
    backend: Arc<dyn couchfile::Backend>,
    writeback: u64,
) -> compactor::Result<u64> {
    let target = CouchFile::new(backend, "0.couch.2.compact").unwrap();
    let dir = FaultyDirectory::new(FaultController::new());
    let config = CompactionConfig {
        sync_every_bytes: 0,
        writeback_every_bytes: writeback,
        ..CompactionConfig::default()
    };
    let (_, stats) = copy_snapshot(
        source,
        FileWriter::create_without_header(target).unwrap(),
        &dir,
        "0.couch.2.compact",
        &config,
        &mut NoHooks,
        &Control::new(),
    )?;
    Ok(stats.docs_copied)
}

#[test]
fn a_copy_with_writeback_writes_the_same_bytes() {
    let source = source();
    let without = Arc::new(MemBackend::new());
    let with = Arc::new(MemBackend::new());
    assert_eq!(copy(&source, without.clone(), 0).unwrap(), 2_000);
    assert_eq!(copy(&source, with.clone(), 4096).unwrap(), 2_000);
    assert_eq!(without.to_bytes(), with.to_bytes());
}

#[test]
fn a_failed_writeback_sync_fails_the_copy() {
    let source = source();
    let faults = FaultController::new();
    // Only the first sync fails: the commit's syncs would succeed.
    faults.inject(FaultRule::once(OpKind::Sync, FaultKind::Eio));
    let backend = Arc::new(FaultyBackend::new(MemBackend::new(), faults.clone()));
    let result = copy(&source, backend, 4096);
    assert!(result.is_err(), "the copy succeeded: {result:?}");
    assert_eq!(faults.injected_count(), 1);
}
