//! The copy phase reads the source's three trees: on a source whose trees
//! were forged (checksums valid, interior nodes repeating a child, out of
//! order, overlapping, pointing forward or at themselves) it must fail with
//! the B-tree layer's corrupt-node error instead of copying the same
//! documents again and again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::fuzzing::{base_image, forge, ForgedFile, Forgery, TreeKind, BASE_DOCS};
use btree::Snapshot;
use compactor::{copy_snapshot, CompactionConfig, Control, Error, NoHooks};
use couchfile::{CouchFile, FaultController, FaultyDirectory, FileWriter, MemBackend, OpenMode};
use std::sync::Arc;

fn snapshot(image: Vec<u8>) -> Snapshot {
    let file = CouchFile::new(Arc::new(MemBackend::from_bytes(image)), "0.couch.1").unwrap();
    Snapshot::open_latest(file, OpenMode::Normal).unwrap()
}

fn copy(source: &Snapshot) -> compactor::Result<u64> {
    let target = CouchFile::new(Arc::new(MemBackend::new()), "0.couch.2.compact").unwrap();
    let dir = FaultyDirectory::new(FaultController::new());
    let (_, stats) = copy_snapshot(
        source,
        FileWriter::create_without_header(target).unwrap(),
        &dir,
        "0.couch.2.compact",
        &CompactionConfig::default(),
        &mut NoHooks,
        &Control::new(),
    )?;
    Ok(stats.docs_copied)
}

fn assert_corrupt(result: compactor::Result<u64>, f: &ForgedFile, what: &str) {
    match result {
        Err(Error::Tree(btree::Error::CorruptNode { offset, detail, .. })) => assert!(
            offset == f.bad_node || detail.ends_with(&format!("(the node at {})", f.root)),
            "{what}: corrupt node at {offset} ({detail}), expected {}",
            f.bad_node
        ),
        other => panic!("{what}: expected a corrupt node, got {other:?}"),
    }
}

#[test]
fn the_copy_of_the_unforged_base_copies_every_document() {
    assert_eq!(
        copy(&snapshot(base_image().unwrap())).unwrap(),
        u64::from(BASE_DOCS)
    );
}

#[test]
fn the_copy_of_a_source_with_a_forged_tree_fails_at_the_bad_node() {
    let base = base_image().unwrap();
    // The copy walks the by-seq tree (documents) and the local tree; the
    // by-id tree of the source is not read.
    for tree in [TreeKind::BySeq, TreeKind::Local] {
        for forgery in Forgery::ALL {
            let f = forge(base.clone(), tree, forgery).unwrap();
            let result = copy(&snapshot(f.image.clone()));
            assert_corrupt(result, &f, &format!("{tree:?} {forgery:?}"));
        }
    }
}
