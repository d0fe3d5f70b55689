//! Crash tests of a `Db` commit whose batch is large enough for
//! `BTree::modify` to share it out between two threads (its nodes then reach
//! the file in no fixed order). The commit is crashed at every one of its
//! mutating I/Os through the fault-injecting backend, and every crash image
//! (nothing, torn prefixes, or everything of the unsynced writes surviving)
//! must open at the previous header or at the new one and read exactly the
//! documents of that header, by id and by seq, with their bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::{Body, ChangesFilter, Db, DbOptions, DocUpdate, Snapshot, PARALLEL_MODIFY_MIN_ACTIONS};
use couchfile::{CouchFile, FaultController, FaultyBackend, MemBackend, OpenMode, TornTail};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

/// Documents of the base commit.
const BASE_DOCS: u32 = 3000;

/// The seq and body (`None` for a deletion) of a document.
type Saved = (u64, Option<Vec<u8>>);
/// Every document by id.
type Model = BTreeMap<Vec<u8>, Saved>;

fn id(i: u32) -> Vec<u8> {
    format!("doc-{i:05}").into_bytes()
}

fn body(i: u32, round: u32) -> Vec<u8> {
    format!(
        "{{\"doc\":{i},\"round\":{round},\"pad\":\"{}\"}}",
        "x".repeat((i % 50) as usize)
    )
    .into_bytes()
}

fn doc(i: u32, round: u32, deleted: bool) -> DocUpdate {
    DocUpdate {
        id: id(i),
        seq: None,
        rev_seq: u64::from(round) + 1,
        rev_seq_above_stored: false,
        rev_meta: couchfile::RevMeta::new(1, 0, 0, 1).encode(),
        deleted,
        content_meta: 0,
        body: if deleted {
            Body::None
        } else {
            Body::Plain(body(i, round))
        },
    }
}

/// Saves `docs` into `model` as `Db::save` numbered them.
fn apply(model: &mut Model, docs: &[DocUpdate], seqs: &[u64]) {
    for (d, &seq) in docs.iter().zip(seqs) {
        let body = match &d.body {
            Body::Plain(b) => Some(b.clone()),
            _ => None,
        };
        model.insert(d.id.clone(), (seq, body));
    }
}

/// The batch crashed: updates every third document, deletes every
/// seventh, adds 300 new ones.
fn crash_batch() -> Vec<DocUpdate> {
    let mut docs: Vec<DocUpdate> = (0..BASE_DOCS)
        .filter(|i| i % 3 == 0 || i % 7 == 0)
        .map(|i| doc(i, 1, i % 7 == 0))
        .collect();
    docs.extend((BASE_DOCS..BASE_DOCS + 300).map(|i| doc(i, 1, false)));
    assert!(docs.len() >= 4 * PARALLEL_MODIFY_MIN_ACTIONS);
    docs
}

/// A file with the base commit on a fault-injecting backend, and its model.
fn base() -> (Arc<FaultyBackend<MemBackend>>, FaultController, Db, Model) {
    let faults = FaultController::new();
    let backend = Arc::new(FaultyBackend::new(MemBackend::new(), faults.clone()));
    let file = CouchFile::new(backend.clone(), "crash.couch").unwrap();
    let mut db = Db::open(file, &DbOptions::default()).unwrap();
    let docs: Vec<DocUpdate> = (0..BASE_DOCS).map(|i| doc(i, 0, false)).collect();
    let seqs = db.save(&docs, &[]).unwrap();
    db.commit(1).unwrap();
    let mut model = Model::new();
    apply(&mut model, &docs, &seqs);
    (backend, faults, db, model)
}

/// Reads every document of `snapshot`, by seq and by id, and checks both
/// against `model`; false if the first document by seq already differs.
fn reads_as(snapshot: &Snapshot, model: &Model) -> bool {
    let mut by_seq = Vec::new();
    snapshot
        .changes_since(0, ChangesFilter::All, &mut |info| {
            by_seq.push(info);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
    let mut want: Vec<(&Vec<u8>, &Saved)> = model.iter().collect();
    want.sort_by_key(|(_, (seq, _))| *seq);
    if by_seq.len() != want.len() {
        return false;
    }
    for (info, (id, (seq, body))) in by_seq.iter().zip(&want) {
        assert_eq!((&info.id, info.db_seq), (*id, *seq), "by-seq entry");
        assert_eq!(info.deleted, body.is_none(), "deleted flag of {id:?}");
        assert_eq!(&snapshot.read_body(info).unwrap(), body, "body of {id:?}");
        let by_id = snapshot.doc_info(id).unwrap().expect("by-id entry");
        assert_eq!(by_id.db_seq, *seq, "by-id seq of {id:?}");
    }
    true
}

#[test]
fn a_crash_at_any_io_of_a_two_thread_commit_opens_at_the_previous_or_the_new_header() {
    // The dry run: what the commit writes, and in how many mutating I/Os.
    let (_, faults, mut db, old) = base();
    let batch = crash_batch();
    let before = faults.mutation_count();
    let seqs = db.save(&batch, &[]).unwrap();
    db.commit(2).unwrap();
    let count = faults.mutation_count() - before;
    let mut new = old.clone();
    apply(&mut new, &batch, &seqs);
    assert!(count >= 4, "a commit is at least 2 writes and 2 syncs");

    let (mut opened_old, mut opened_new) = (0, 0);
    for point in 0..count {
        let (backend, faults, mut db, _) = base();
        faults.crash_at(point);
        let saved = db.save(&batch, &[]);
        let committed = saved.and_then(|_| db.commit(2));
        assert!(
            committed.is_err(),
            "crash point {point}: the commit succeeded"
        );
        assert!(faults.has_crashed());
        for torn in [
            TornTail::Nothing,
            TornTail::Prefix(1),
            TornTail::Prefix(4097),
            TornTail::Prefix(100_000),
            TornTail::Everything,
        ] {
            let image = backend.crash_image(torn).unwrap();
            let file =
                CouchFile::new(Arc::new(MemBackend::from_bytes(image)), "crash.couch").unwrap();
            for mode in [OpenMode::Normal, OpenMode::Recovery] {
                let snapshot = Snapshot::open_latest(file.clone(), mode).unwrap();
                let what = format!("crash point {point}, {torn:?}, {mode:?}");
                match snapshot.header().update_seq {
                    s if s == u64::from(BASE_DOCS) => {
                        assert!(reads_as(&snapshot, &old), "{what}: not the base");
                        opened_old += 1;
                    }
                    s if s == u64::from(BASE_DOCS) + batch.len() as u64 => {
                        assert!(reads_as(&snapshot, &new), "{what}: not the new commit");
                        opened_new += 1;
                    }
                    s => panic!("{what}: opened at update seq {s}"),
                }
            }
        }
    }
    // Both outcomes occur: a crash before the header is written keeps the
    // base; once it is written, an image where it survived has the new one.
    assert!(
        opened_old > 0 && opened_new > 0,
        "{opened_old} {opened_new}"
    );
}
