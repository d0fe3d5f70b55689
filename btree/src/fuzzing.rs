//! Entry points for the fuzz targets (`fuzz/` at the repository root): each
//! feeds arbitrary bytes to a decoder or reader and must never panic.

use crate::node::Node;
use crate::{ChangesFilter, Snapshot};
use couchfile::{CouchFile, MemBackend, OpenMode};
use std::ops::{Bound, ControlFlow};
use std::sync::Arc;

/// Decodes `data` as an uncompressed node and walks its entries.
pub fn decode_node(data: &[u8]) {
    if let Ok(node) = Node::decode(data.to_vec()) {
        for (k, v) in node.entries() {
            std::hint::black_box((k, v));
        }
    }
}

/// Treats `data` as a file image: opens the last header (recovery mode) and
/// reads everything a snapshot can: changes, ids, bodies, local documents,
/// counts.
pub fn read_db(data: &[u8]) {
    let Ok(file) = CouchFile::new(
        Arc::new(MemBackend::from_bytes(data.to_vec())),
        "fuzz.couch",
    ) else {
        return;
    };
    let Ok(snap) = Snapshot::open_latest(file, OpenMode::Recovery) else {
        return;
    };
    let mut ids = Vec::new();
    let _ = snap.changes_since(0, ChangesFilter::All, &mut |info| {
        let _ = snap.read_body(&info);
        ids.push(info.id);
        Ok(if ids.len() > 10_000 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    });
    ids.sort();
    ids.dedup();
    let keys: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
    let _ = snap.doc_infos(&keys);
    let _ = snap.docs_by_id(Bound::Unbounded, Bound::Unbounded, &mut |_| {
        Ok(ControlFlow::Continue(()))
    });
    let _ = snap.local_docs(&mut |_, _| Ok(ControlFlow::Continue(())));
    let _ = snap.count_changes(0, u64::MAX);
    let _ = snap.doc_counts();
    let _ = snap.space_used();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_entry_points_survive_garbage_and_real_files() {
        decode_node(&[]);
        decode_node(&[1, 0xff, 0xff, 0xff, 0xff, 0xff]);
        read_db(&[]);
        read_db(&[1, 0, 0, 0, 9, 0, 0, 0, 0, 14]);
        // Real files, whole, cut and flipped.
        for image in couchfile::fuzzing::vector_images().unwrap() {
            read_db(&image);
        }
    }
}
