//! Files whose trees were forged (checksums valid, interior nodes written by
//! the project's own encoders that repeat a child, point out of order, at
//! overlapping ranges, forward or at themselves): opening a store on them,
//! reading a vbucket, and the couchtool listings and compaction must fail
//! with the B-tree layer's corrupt-node error instead of reading the same
//! subtrees again and again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::fuzzing::{base_doc_id, base_image, forge, ForgedFile, Forgery, TreeKind, BASE_DOCS};
use btree::{Db, DbOptions, LocalUpdate};
use couchfile::{CouchFile, Directory, FaultyDirectory, MemBackend};
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use vbucket::tool::{self, CompactOptions, OpenOptions};
use vbucket::{Error, Store, StoreConfig, VbState, VBSTATE_ID};

/// The btree crate's base file with a `_local/vbstate`, as a vbucket's.
fn vbucket_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let backend = Arc::new(MemBackend::from_bytes(base_image().unwrap()));
        let file = CouchFile::new(backend.clone(), "0.couch.1").unwrap();
        let mut db = Db::open(file, &DbOptions::default()).unwrap();
        let vbstate = LocalUpdate {
            id: VBSTATE_ID.to_vec(),
            value: Some(VbState::new_vbucket().to_json()),
        };
        db.save(&[], &[vbstate]).unwrap();
        db.commit(1_700_000_000_000_000_000).unwrap();
        drop(db);
        backend.to_bytes()
    })
}

fn forged(tree: TreeKind, forgery: Forgery) -> ForgedFile {
    forge(vbucket_image().to_vec(), tree, forgery).unwrap()
}

/// The B-tree error inside `e`, if it has one.
fn tree_error(e: &Error) -> Option<&btree::Error> {
    match e {
        Error::Tree(e) | Error::Compaction(compactor::Error::Tree(e)) => Some(e),
        _ => None,
    }
}

/// Asserts that `result` failed with a corrupt-node error at the forged
/// file's bad node (or at a real node the forged root put out of place).
fn assert_corrupt<T: std::fmt::Debug>(result: vbucket::Result<T>, f: &ForgedFile, what: &str) {
    let e = match result {
        Err(e) => e,
        Ok(v) => panic!("{what}: expected a corrupt node, got {v:?}"),
    };
    match tree_error(&e) {
        Some(btree::Error::CorruptNode { offset, detail, .. }) => assert!(
            *offset == f.bad_node || detail.ends_with(&format!("(the node at {})", f.root)),
            "{what}: corrupt node at {offset} ({detail}), expected {}",
            f.bad_node
        ),
        _ => panic!("{what}: expected a corrupt node, got {e}"),
    }
}

fn open_store(image: &[u8]) -> vbucket::Result<Store> {
    let dir = Arc::new(FaultyDirectory::from_files([(
        "0.couch.1".to_string(),
        image.to_vec(),
    )]));
    Store::open_in(dir as Arc<dyn Directory>, StoreConfig::default())
}

#[test]
fn a_store_opens_on_the_unforged_file_and_reads_every_document() {
    let store = open_store(vbucket_image()).unwrap();
    let vb = store.vbucket(0).unwrap();
    let mut n = 0;
    vb.changes_since(0, &mut |_| {
        n += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(n, BASE_DOCS);
    store.close().unwrap();
}

#[test]
fn opening_a_store_on_a_forged_local_tree_fails_at_the_bad_node() {
    for forgery in Forgery::ALL {
        let f = forged(TreeKind::Local, forgery);
        assert_corrupt(open_store(&f.image), &f, &format!("{forgery:?}"));
    }
}

#[test]
fn a_store_on_a_forged_by_seq_or_by_id_tree_fails_at_the_bad_node() {
    for forgery in Forgery::ALL {
        let what = format!("{forgery:?}");
        // Opening reads the vbstate only; the walks of the documents fail.
        let f = forged(TreeKind::BySeq, forgery);
        let store = open_store(&f.image).unwrap();
        let vb = store.vbucket(0).unwrap();
        let result = vb.changes_since(0, &mut |_| ControlFlow::Continue(()));
        assert_corrupt(result, &f, &format!("{what} changes_since"));
        drop(store);

        let f = forged(TreeKind::ById, forgery);
        let store = open_store(&f.image).unwrap();
        let vb = store.vbucket(0).unwrap();
        let results = [vb.get(&base_doc_id(0)), vb.get(&base_doc_id(BASE_DOCS - 1))];
        assert!(
            results.iter().any(Result::is_err),
            "{what}: no lookup met the forgery"
        );
        for result in results {
            if result.is_err() {
                assert_corrupt(result, &f, &format!("{what} get"));
            }
        }
        drop(store);
    }
}

#[test]
fn couchtool_dump_and_compact_of_forged_files_fail_at_the_bad_node() {
    let dir = tempfile::tempdir().unwrap();
    // dump and compact read the by-seq and the local trees.
    for tree in [TreeKind::BySeq, TreeKind::Local] {
        for forgery in Forgery::ALL {
            let what = format!("{tree:?} {forgery:?}");
            let f = forged(tree, forgery);
            let path = dir.path().join("0.couch.1");
            std::fs::write(&path, &f.image).unwrap();
            let options = OpenOptions::normal();
            let mut out = Vec::new();
            let result = tool::dump_jsonl(&path, &options, &mut out);
            assert_corrupt(result, &f, &format!("{what} dump --jsonl"));
            // No more lines than the file has documents and local docs.
            let lines = out.iter().filter(|&&b| b == b'\n').count();
            assert!(
                lines <= 1 + BASE_DOCS as usize + 1001,
                "{what}: {lines} lines"
            );
            let result = tool::dump_text(&path, &options, &mut Vec::new());
            assert_corrupt(result, &f, &format!("{what} dump"));

            let target = dir.path().join("0.couch.2");
            let _ = std::fs::remove_file(&target);
            let options = CompactOptions {
                open: options,
                ..CompactOptions::default()
            };
            let result = tool::compact(&path, &target, &options);
            assert_corrupt(result, &f, &format!("{what} compact"));
        }
    }
}

#[test]
fn couchtool_verify_reports_every_forged_tree() {
    let dir = tempfile::tempdir().unwrap();
    for tree in TreeKind::ALL {
        for forgery in Forgery::ALL {
            let f = forged(tree, forgery);
            let path = dir.path().join("0.couch.1");
            std::fs::write(&path, &f.image).unwrap();
            let report = tool::verify(&path).unwrap();
            assert!(!report.is_ok(), "{tree:?} {forgery:?}: {report}");
        }
    }
}
