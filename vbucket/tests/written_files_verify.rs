//! Files written by random batches through `btree::Db` pass both checkers:
//! `couchtool verify` (this project's) and `couchread.py --verify` (the
//! independent Python reader in `shared/tools` beside the repository, skipped
//! with a message when it or `python3` is missing), at every header.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use btree::{Body, Db, DbOptions, DocUpdate, LocalUpdate, NodeConfig};
use couchfile::{CouchFile, FileBackend, OpenMode, RevMeta, CONTENT_META_COMPRESSED};
use proptest::prelude::*;
use std::sync::Arc;
use support::couchread_verify;
use vbucket::tool::{verify_with, OpenOptions};

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: u16,
        len: usize,
        compress: bool,
    },
    Delete {
        key: u16,
        with_body: bool,
    },
    Local {
        key: u8,
        remove: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u16..400, 0usize..3000, any::<bool>())
            .prop_map(|(key, len, compress)| Op::Set { key, len, compress }),
        2 => (0u16..400, any::<bool>()).prop_map(|(key, with_body)| Op::Delete { key, with_body }),
        1 => (0u8..4, any::<bool>()).prop_map(|(key, remove)| Op::Local { key, remove }),
    ]
}

fn apply(db: &mut Db, batch: &[Op], rev: u64) {
    let mut docs: Vec<DocUpdate> = Vec::new();
    let mut locals: Vec<LocalUpdate> = Vec::new();
    for op in batch {
        match *op {
            Op::Set { key, len, compress } => {
                let id = format!("key_{key:05}").into_bytes();
                docs.retain(|d| d.id != id);
                let body: Vec<u8> = format!("{{\"k\":{key},\"r\":{rev}}}")
                    .bytes()
                    .cycle()
                    .take(len)
                    .collect();
                docs.push(DocUpdate {
                    id,
                    seq: None,
                    rev_seq: rev,
                    rev_seq_above_stored: false,
                    rev_meta: RevMeta::new(rev, 0, u32::from(key), 1).encode(),
                    deleted: false,
                    content_meta: if compress { CONTENT_META_COMPRESSED } else { 0 },
                    body: Body::Plain(body),
                });
            }
            Op::Delete { key, with_body } => {
                let id = format!("key_{key:05}").into_bytes();
                docs.retain(|d| d.id != id);
                docs.push(DocUpdate {
                    id,
                    seq: None,
                    rev_seq: rev,
                    rev_seq_above_stored: false,
                    rev_meta: RevMeta::new(rev, 0, 0, 0).encode(),
                    deleted: true,
                    content_meta: 0,
                    body: if with_body {
                        Body::Plain(b"{\"xattr\":1}".to_vec())
                    } else {
                        Body::None
                    },
                });
            }
            Op::Local { key, remove } => {
                let id = format!("_local/doc{key}").into_bytes();
                locals.retain(|l| l.id != id);
                locals.push(LocalUpdate {
                    id,
                    value: (!remove).then(|| format!("{{\"rev\":{rev}}}").into_bytes()),
                });
            }
        }
    }
    db.save(&docs, &locals).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_batches_pass_couchtool_verify_and_couchread_at_every_header(
        batches in prop::collection::vec(prop::collection::vec(op(), 1..300), 1..5),
        small_nodes in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.couch.1");
        let options = DbOptions {
            nodes: if small_nodes {
                NodeConfig { leaf_threshold: 300, interior_threshold: 300 }
            } else {
                NodeConfig::default()
            },
            ..DbOptions::default()
        };
        let mut headers = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            // Reopen between batches, as a restarted process would.
            let file = CouchFile::new(Arc::new(FileBackend::open_or_create(&path).unwrap()), &path)
                .unwrap();
            let mut db = Db::open(file, &options).unwrap();
            apply(&mut db, batch, i as u64 + 1);
            headers.push(db.commit(1_700_000_000_000_000_000 + i as u64).unwrap());
        }
        for &offset in &headers {
            let report = verify_with(
                &path,
                &OpenOptions { mode: OpenMode::Normal, header_offset: Some(offset), as_of: None },
            )
            .unwrap();
            prop_assert!(report.problems.is_empty(), "couchtool verify at {}: {:?}", offset, report.problems);
            couchread_verify(&path, Some(offset));
        }
    }
}
