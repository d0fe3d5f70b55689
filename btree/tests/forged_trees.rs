//! Walks of trees forged over a valid file (checksums valid, nodes written
//! by the crate's own encoders): interior nodes that repeat a child, point
//! at children out of order or overlapping, forward or at themselves. Every
//! walk must fail with `Error::CorruptNode` naming the bad node, instead of
//! reading the same subtrees again and again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::fuzzing::{
    base_doc_id, base_image, base_local_id, forge, walk_forged_tree, ForgedFile, Forgery, TreeKind,
    BASE_DOCS, BASE_LOCALS,
};
use btree::{ChangesFilter, Db, DbOptions, DocUpdate, Error, LocalUpdate, Snapshot};
use couchfile::{ChunkCache, CouchFile, MemBackend, OpenMode};
use proptest::prelude::*;
use std::ops::{Bound, ControlFlow};
use std::sync::{Arc, OnceLock};

fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| base_image().unwrap())
}

fn forged(tree: TreeKind, forgery: Forgery) -> ForgedFile {
    forge(base().to_vec(), tree, forgery).unwrap()
}

/// Asserts that `result` is a corrupt-node error at `f.bad_node`, or at a
/// real node that the forged root puts where its keys do not belong (the
/// walk meets that node first when it starts in the middle of the tree).
fn assert_corrupt<T: std::fmt::Debug>(result: btree::Result<T>, f: &ForgedFile, what: &str) {
    match result {
        Err(Error::CorruptNode { offset, detail, .. }) => assert!(
            offset == f.bad_node || detail.ends_with(&format!("(the node at {})", f.root)),
            "{what}: corrupt node at {offset} ({detail}), expected {} or a child of {}",
            f.bad_node,
            f.root
        ),
        other => panic!("{what}: expected a corrupt node, got {other:?}"),
    }
}

fn snapshot(image: &[u8]) -> Snapshot {
    let file = CouchFile::new(Arc::new(MemBackend::from_bytes(image.to_vec())), "f.couch").unwrap();
    Snapshot::open_latest(file, OpenMode::Normal).unwrap()
}

/// Asserts that `result` is the corrupt-node error of the node at `offset`,
/// and returns its detail.
fn assert_corrupt_at<T: std::fmt::Debug>(
    result: btree::Result<T>,
    offset: u64,
    what: &str,
) -> String {
    match result {
        Err(Error::CorruptNode {
            offset: at, detail, ..
        }) => {
            assert_eq!(at, offset, "{what}: {detail}");
            detail
        }
        other => panic!("{what}: expected a corrupt node at {offset}, got {other:?}"),
    }
}

/// A full walk of `tree` (as a dump does), counting what it gives.
fn full_walk(snap: &Snapshot, tree: TreeKind, seen: &mut usize) -> btree::Result<()> {
    match tree {
        TreeKind::BySeq => snap.changes_since(0, ChangesFilter::All, &mut |_| {
            *seen += 1;
            Ok(ControlFlow::Continue(()))
        }),
        TreeKind::ById => snap.docs_by_id(Bound::Unbounded, Bound::Unbounded, &mut |_| {
            *seen += 1;
            Ok(ControlFlow::Continue(()))
        }),
        TreeKind::Local => snap.local_docs(&mut |_, _| {
            *seen += 1;
            Ok(ControlFlow::Continue(()))
        }),
    }
}

#[test]
fn the_base_file_walks_in_full_without_error() {
    let snap = snapshot(base());
    for tree in TreeKind::ALL {
        let mut seen = 0;
        full_walk(&snap, tree, &mut seen).unwrap();
        let want = if tree == TreeKind::Local {
            BASE_LOCALS
        } else {
            BASE_DOCS
        };
        assert_eq!(seen, want as usize, "{tree:?}");
    }
}

#[test]
fn full_walks_of_every_forged_tree_fail_at_the_bad_node() {
    for tree in TreeKind::ALL {
        for forgery in Forgery::ALL {
            let f = forged(tree, forgery);
            let snap = snapshot(&f.image);
            assert_eq!(snap.offset(), f.header);
            let mut seen = 0;
            let what = format!("{tree:?} {forgery:?}");
            let detail = assert_corrupt_at(full_walk(&snap, tree, &mut seen), f.bad_node, &what);
            // At most the first child's entries came out before the error.
            assert!(seen < 1000, "{what}: {seen} entries before the error");
            let expected = match forgery {
                Forgery::RepeatedChild
                | Forgery::RepeatedChildTwoLevels
                | Forgery::ReversedChildren => "is not above key",
                Forgery::ReversedPointers => "is above its key in the parent",
                Forgery::OverlappingChildren => "is not above the previous key of its parent",
                Forgery::ForwardPointer | Forgery::SelfPointer => "is not before its parent",
            };
            assert!(detail.contains(expected), "{what}: {detail}");
        }
    }
}

/// Looks up the first and the last document of the forged by-id tree of
/// `f` in `snap`: each lookup finds the right document or fails at the bad
/// node, and every forgery puts a bad node on the path of one of them at
/// least.
fn assert_id_lookups_right_or_corrupt(snap: &Snapshot, f: &ForgedFile, what: &str) {
    let mut failed = 0;
    for key in [base_doc_id(0), base_doc_id(BASE_DOCS - 1)] {
        match snap.doc_info(&key) {
            Ok(Some(info)) => assert_eq!(info.id, key, "{what}"),
            result => {
                assert_corrupt(result, f, what);
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "{what}: no lookup met the forgery");
}

/// The real tree's nodes, read and checked first, are cached and shared
/// with the forged tree's walks: whatever a cached node keeps from a check
/// must not let a forged root's walk skip its own.
#[test]
fn forged_trees_fail_at_the_bad_node_after_the_real_tree_was_walked_through_the_cache() {
    for tree in TreeKind::ALL {
        for forgery in Forgery::ALL {
            let what = format!("{tree:?} {forgery:?}");
            let f = forged(tree, forgery);
            let cache = Arc::new(ChunkCache::new(64 << 20));
            let file = CouchFile::new(Arc::new(MemBackend::from_bytes(f.image.clone())), "f.couch")
                .unwrap()
                .with_cache(cache);
            let forged = Snapshot::open_latest(file.clone(), OpenMode::Normal).unwrap();
            let real_header = forged.header().prev_header_pos.expect("a previous header");
            let real = Snapshot::open_at(file, real_header).unwrap();
            for _ in 0..2 {
                full_walk(&real, tree, &mut 0).unwrap();
                assert_corrupt_at(full_walk(&forged, tree, &mut 0), f.bad_node, &what);
            }
            if tree == TreeKind::ById {
                let last = base_doc_id(BASE_DOCS - 1);
                assert_eq!(real.doc_info(&last).unwrap().unwrap().id, last);
                assert_id_lookups_right_or_corrupt(&forged, &f, &what);
            }
        }
    }
}

#[test]
fn changes_since_and_id_range_scans_of_forged_trees_fail_at_the_bad_node() {
    for forgery in Forgery::ALL {
        let seq = forged(TreeKind::BySeq, forgery);
        let snap = snapshot(&seq.image);
        for since in [1, 1500, 2999] {
            let result = snap.changes_since(since, ChangesFilter::NoDeletes, &mut |_| {
                Ok(ControlFlow::Continue(()))
            });
            assert_corrupt(result, &seq, &format!("{forgery:?} since {since}"));
        }

        let id = forged(TreeKind::ById, forgery);
        let snap = snapshot(&id.image);
        let start = base_doc_id(2000);
        let end = base_doc_id(2999);
        let result = snap.docs_by_id(Bound::Included(&start), Bound::Included(&end), &mut |_| {
            Ok(ControlFlow::Continue(()))
        });
        assert_corrupt(result, &id, &format!("{forgery:?} id range"));
    }
}

#[test]
fn point_lookups_in_forged_trees_find_the_right_document_or_fail_at_the_bad_node() {
    for forgery in Forgery::ALL {
        let what = format!("{forgery:?}");
        let id = forged(TreeKind::ById, forgery);
        assert_id_lookups_right_or_corrupt(&snapshot(&id.image), &id, &what);

        let local = forged(TreeKind::Local, forgery);
        let snap = snapshot(&local.image);
        let mut failed = 0;
        for key in [base_local_id(0), base_local_id(BASE_LOCALS - 1)] {
            match snap.local_doc(&key) {
                Ok(Some(value)) => assert_eq!(value, b"{}", "{what}"),
                result => {
                    assert_corrupt(result, &local, &what);
                    failed += 1;
                }
            }
        }
        assert!(failed > 0, "{what}: no local lookup met the forgery");
    }
}

#[test]
fn a_save_into_a_forged_tree_fails_at_the_bad_node() {
    for forgery in Forgery::ALL {
        let f = forged(TreeKind::ById, forgery);
        let file =
            CouchFile::new(Arc::new(MemBackend::from_bytes(f.image.clone())), "f.couch").unwrap();
        let mut db = Db::open(file, &DbOptions::default()).unwrap();
        // One update in the first child's range and one in the last's.
        let docs: Vec<DocUpdate> = [0, BASE_DOCS - 1]
            .into_iter()
            .map(|i| DocUpdate {
                id: base_doc_id(i),
                seq: None,
                rev_seq: 2,
                rev_seq_above_stored: false,
                rev_meta: couchfile::RevMeta::new(9, 0, 0, 1).encode(),
                deleted: false,
                content_meta: 0,
                body: btree::Body::Plain(b"{}".to_vec()),
            })
            .collect();
        let local = LocalUpdate {
            id: b"_local/x".to_vec(),
            value: Some(b"{}".to_vec()),
        };
        let result = db.save(&docs, &[local]);
        assert_corrupt(result, &f, &format!("{forgery:?}"));
    }
}

#[test]
fn range_reduces_over_forged_trees_end() {
    for forgery in Forgery::ALL {
        let f = forged(TreeKind::BySeq, forgery);
        let snap = snapshot(&f.image);
        // Stored reduces stand in for whole subtrees: only the edges are
        // read, so some forgeries go unseen, but none loops.
        let _ = snap.count_changes(10, 2990);
        let _ = snap.count_changes(0, u64::MAX);
        let starts_in_a_real_first_child = matches!(
            forgery,
            Forgery::OverlappingChildren | Forgery::ForwardPointer | Forgery::SelfPointer
        );
        let low = snap.count_changes(10, 20);
        if starts_in_a_real_first_child {
            assert_eq!(low.unwrap(), 11, "{forgery:?}");
        } else {
            assert_corrupt(low, &f, &format!("{forgery:?}"));
        }
    }
}

#[test]
fn walk_forged_tree_survives_the_forgeries_of_the_tests() {
    walk_forged_tree(&[]);
    walk_forged_tree(&[0]);
    for tree in 0..3u8 {
        // A child repeated, at one and at two levels.
        let mut data = vec![tree];
        data.extend(std::iter::repeat_n([0u8, 0], 500).flatten());
        walk_forged_tree(&data);
        data.push(0xff);
        data.extend(std::iter::repeat_n([0xfcu8, 0], 500).flatten());
        walk_forged_tree(&data);
        // Out of order, forward, at itself, at the root.
        walk_forged_tree(&[tree, 5, 5, 3, 3, 1, 1]);
        walk_forged_tree(&[tree, 0, 0, 0xfd, 9]);
        walk_forged_tree(&[tree, 0, 0, 0xfe, 9]);
        walk_forged_tree(&[tree, 0, 0, 0xfc, 0xfc]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Forged trees of repeated and out-of-order pointers: every walk ends,
    /// with an error or with ascending keys no more than the file holds
    /// (`walk_forged_tree` asserts it).
    #[test]
    fn walks_of_random_forged_trees_end_in_order_or_in_error(
        tree in 0u8..3,
        levels in proptest::collection::vec(
            proptest::collection::vec((any::<u8>(), any::<u8>()), 1..200),
            1..4,
        ),
    ) {
        let mut data = vec![tree];
        for (i, level) in levels.iter().enumerate() {
            if i > 0 {
                data.push(0xff);
            }
            for &(pointer, key) in level {
                data.push(if pointer == 0xff { 0xfc } else { pointer });
                data.push(if key == 0xff { 0 } else { key });
            }
        }
        walk_forged_tree(&data);
    }
}

/// A by-id "tree" whose one path runs through `depth` interior nodes of one
/// entry each down to a leaf holding `k`.
fn chain(depth: usize) -> Snapshot {
    use btree::node::{INTERIOR, LEAF};
    use couchfile::{encode_kv_length, DbHeader, DocInfo, FileWriter, NodePointer};
    let file = CouchFile::new(Arc::new(MemBackend::new()), "deep.couch").unwrap();
    let (mut w, first) = FileWriter::create(file.clone(), &DbHeader::new(14)).unwrap();
    let node = |kind: u8, value: &[u8]| {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&encode_kv_length(1, value.len()).unwrap());
        bytes.push(b'k');
        bytes.extend_from_slice(value);
        bytes
    };
    let info = DocInfo {
        id: b"k".to_vec(),
        db_seq: 1,
        rev_seq: 1,
        ..DocInfo::default()
    };
    let leaf = node(LEAF, &info.encode_by_id_value().unwrap());
    let reduce = btree::IdReduce {
        live: 1,
        ..btree::IdReduce::default()
    }
    .encode();
    let mut pointer = NodePointer {
        pointer: w.append_compressed_chunk(&leaf).unwrap().offset,
        subtree_size: 0,
        reduce: reduce.clone(),
    };
    for _ in 0..depth {
        let mut value = Vec::new();
        pointer.encode_kp_value(&mut value).unwrap();
        pointer = NodePointer {
            pointer: w
                .append_compressed_chunk(&node(INTERIOR, &value))
                .unwrap()
                .offset,
            subtree_size: 0,
            reduce: reduce.clone(),
        };
    }
    let mut header = DbHeader::new(14);
    header.update_seq = 1;
    header.by_id_root = Some(pointer);
    header.prev_header_pos = Some(first);
    w.commit(&header).unwrap();
    Snapshot::open_latest(w.file().clone(), OpenMode::Normal).unwrap()
}

#[test]
fn a_path_deeper_than_any_real_tree_is_a_corrupt_node_not_a_stack_overflow() {
    // Shallow enough: found.
    let shallow = chain(40);
    assert_eq!(shallow.doc_info(b"k").unwrap().unwrap().db_seq, 1);
    // 20,000 levels would overflow a test thread's stack without the bound.
    let deep = chain(20_000);
    let e = deep.doc_info(b"k").unwrap_err();
    assert!(matches!(e, Error::CorruptNode { .. }), "{e}");
    assert!(e.to_string().contains("levels deep"), "{e}");
    assert!(deep.doc_infos(&[b"k"]).is_err());
    let walk = deep.docs_by_id(Bound::Unbounded, Bound::Unbounded, &mut |_| {
        Ok(ControlFlow::Continue(()))
    });
    assert!(matches!(walk, Err(Error::CorruptNode { .. })), "{walk:?}");
}
