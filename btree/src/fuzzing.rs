//! Entry points for the fuzz targets (`fuzz/` at the repository root): each
//! feeds arbitrary bytes to a decoder or reader and must never panic.
//!
//! Also the forger of corrupt trees whose checksums hold ([`forge`]), for
//! the tests of every crate that walks trees and for [`walk_forged_tree`].

use crate::node::Node;
use crate::{Body, ChangesFilter, Db, DbOptions, DocUpdate, Error, LocalUpdate, Result, Snapshot};
use couchfile::{
    encode_kv_length, CouchFile, DbHeader, FileWriter, MemBackend, NodePointer, OpenMode, RevMeta,
    CONTENT_META_COMPRESSED,
};
use std::ops::{Bound, ControlFlow};
use std::sync::{Arc, OnceLock};

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

/// One of the three trees of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    /// The by-sequence tree.
    BySeq,
    /// The by-id tree.
    ById,
    /// The local-documents tree.
    Local,
}

impl TreeKind {
    /// The three trees.
    pub const ALL: [TreeKind; 3] = [TreeKind::BySeq, TreeKind::ById, TreeKind::Local];

    /// The root of this tree in `header`.
    pub fn root(self, header: &DbHeader) -> Option<&NodePointer> {
        match self {
            TreeKind::BySeq => header.by_seq_root.as_ref(),
            TreeKind::ById => header.by_id_root.as_ref(),
            TreeKind::Local => header.local_root.as_ref(),
        }
    }

    fn root_mut(self, header: &mut DbHeader) -> &mut Option<NodePointer> {
        match self {
            TreeKind::BySeq => &mut header.by_seq_root,
            TreeKind::ById => &mut header.by_id_root,
            TreeKind::Local => &mut header.local_root,
        }
    }
}

/// How [`forge`] corrupts a tree: a new root, written with valid checksums
/// through the crate's own encoders, whose entries point at the children
/// `C0..Cm` (keys `K0..Km`) of the real root `R` in a way no writer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// `(K0, C0)` 1,000 times.
    RepeatedChild,
    /// Two levels of repeats: `(Ki, L)` for every key, all at one node `L`
    /// that holds `(K0, C0)` 1,000 times.
    RepeatedChildTwoLevels,
    /// The children in reverse order, each under its own key.
    ReversedChildren,
    /// The keys in order, the pointers in reverse (`Km` is `C0`'s key).
    ReversedPointers,
    /// `(K0, C0)`, then `(Km, R)`: the old root's keys overlap `C0`'s.
    OverlappingChildren,
    /// `(K0, C0)`, then a pointer past the forged node itself.
    ForwardPointer,
    /// `(K0, C0)`, then a pointer at the forged node itself.
    SelfPointer,
}

impl Forgery {
    /// Every forgery.
    pub const ALL: [Forgery; 7] = [
        Forgery::RepeatedChild,
        Forgery::RepeatedChildTwoLevels,
        Forgery::ReversedChildren,
        Forgery::ReversedPointers,
        Forgery::OverlappingChildren,
        Forgery::ForwardPointer,
        Forgery::SelfPointer,
    ];
}

/// A file image with a forged tree ([`forge`]).
#[derive(Debug, Clone)]
pub struct ForgedFile {
    /// The whole file, its last header pointing at the forged root.
    pub image: Vec<u8>,
    /// Offset of the node a walk must report as corrupt: the forged node
    /// whose keys or pointers are wrong, or the real node it puts where its
    /// keys do not belong.
    pub bad_node: u64,
    /// Offset of the forged root.
    pub root: u64,
    /// Offset of the last header (the one with the forged root).
    pub header: u64,
}

/// The entries `(key, pointer)` of an interior node.
fn children(file: &CouchFile, offset: u64) -> Result<Vec<(Vec<u8>, NodePointer)>> {
    let node = Node::read(file, offset)?;
    if node.is_leaf {
        return Ok(Vec::new());
    }
    node.entries()
        .map(|(key, value)| {
            let child = NodePointer::decode_kp_value(value).map_err(|e| Error::CorruptNode {
                path: file.path().to_path_buf(),
                offset,
                detail: e.to_string(),
            })?;
            Ok((key.to_vec(), child))
        })
        .collect()
}

/// Appends an interior node of `entries` (key, child pointer); returns its
/// pointer (subtree size and reduce copied from `like`).
fn append_interior(
    w: &mut FileWriter,
    entries: &[(&[u8], u64)],
    like: &NodePointer,
) -> Result<NodePointer> {
    let mut bytes = vec![crate::node::INTERIOR];
    for &(key, pointer) in entries {
        let child = NodePointer {
            pointer,
            subtree_size: like.subtree_size,
            reduce: like.reduce.clone(),
        };
        bytes.extend_from_slice(&encode_kv_length(key.len(), 14 + like.reduce.len())?);
        bytes.extend_from_slice(key);
        child.encode_kp_value(&mut bytes)?;
    }
    let pos = w.append_compressed_chunk(&bytes)?;
    Ok(NodePointer {
        pointer: pos.offset,
        subtree_size: like.subtree_size,
        reduce: like.reduce.clone(),
    })
}

/// Opens `image` for appending at its last header.
fn open_image(image: Vec<u8>) -> Result<(Db, Arc<MemBackend>)> {
    let backend = Arc::new(MemBackend::from_bytes(image));
    let file = CouchFile::new(backend.clone(), "forged.couch")?;
    let db = Db::open(file, &DbOptions::default())?;
    Ok((db, backend))
}

/// Commits `root` as the root of `tree` and returns the header's offset.
fn commit_root(db: &mut Db, tree: TreeKind, root: NodePointer) -> Result<u64> {
    *tree.root_mut(db.pending_mut()) = Some(root);
    let timestamp = db.committed().header.timestamp;
    db.commit(timestamp)
}

/// Appends to `image` (a valid file) a forged root for `tree` (see
/// [`Forgery`]) and a header pointing at it. The tree's root must be an
/// interior node with at least two children.
pub fn forge(image: Vec<u8>, tree: TreeKind, forgery: Forgery) -> Result<ForgedFile> {
    let (mut db, backend) = open_image(image)?;
    let file = db.snapshot().file().clone();
    let root = tree
        .root(&db.committed().header)
        .cloned()
        .ok_or_else(|| Error::InvalidArgument(format!("{tree:?}: empty tree")))?;
    let kids = children(&file, root.pointer)?;
    if kids.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "{tree:?}: the root is not an interior node of two children or more"
        )));
    }
    let (first_key, first) = (&kids[0].0[..], kids[0].1.pointer);
    let last_key = &kids[kids.len() - 1].0[..];
    let w = db.writer_mut();
    let (forged, bad_node) = match forgery {
        Forgery::RepeatedChild => {
            let node = append_interior(w, &vec![(first_key, first); 1000], &root)?;
            let bad = node.pointer;
            (node, bad)
        }
        Forgery::RepeatedChildTwoLevels => {
            let lower = append_interior(w, &vec![(first_key, first); 1000], &root)?;
            let entries: Vec<(&[u8], u64)> =
                kids.iter().map(|(k, _)| (&k[..], lower.pointer)).collect();
            (append_interior(w, &entries, &root)?, lower.pointer)
        }
        Forgery::ReversedChildren => {
            let entries: Vec<(&[u8], u64)> = kids
                .iter()
                .rev()
                .map(|(k, p)| (&k[..], p.pointer))
                .collect();
            let node = append_interior(w, &entries, &root)?;
            let bad = node.pointer;
            (node, bad)
        }
        Forgery::ReversedPointers => {
            let entries: Vec<(&[u8], u64)> = kids
                .iter()
                .zip(kids.iter().rev())
                .map(|((k, _), (_, p))| (&k[..], p.pointer))
                .collect();
            // The first child is now the last: its keys are above K0.
            let bad = kids[kids.len() - 1].1.pointer;
            (append_interior(w, &entries, &root)?, bad)
        }
        Forgery::OverlappingChildren => {
            let entries = [(first_key, first), (last_key, root.pointer)];
            (append_interior(w, &entries, &root)?, root.pointer)
        }
        Forgery::ForwardPointer | Forgery::SelfPointer => {
            let own = w.position();
            let target = if forgery == Forgery::SelfPointer {
                own
            } else {
                own + 4096
            };
            let entries = [(first_key, first), (last_key, target)];
            (append_interior(w, &entries, &root)?, own)
        }
    };
    let root = forged.pointer;
    let header = commit_root(&mut db, tree, forged)?;
    drop(db);
    Ok(ForgedFile {
        image: backend.to_bytes(),
        bad_node,
        root,
        header,
    })
}

/// The id of document `i` of [`base_image`].
pub fn base_doc_id(i: u32) -> Vec<u8> {
    format!("doc-{i:05}").into_bytes()
}

/// The id of local document `i` of [`base_image`].
pub fn base_local_id(i: u32) -> Vec<u8> {
    format!("_local/doc-{i:04}").into_bytes()
}

/// Documents in [`base_image`].
pub const BASE_DOCS: u32 = 3000;
/// Local documents in [`base_image`].
pub const BASE_LOCALS: u32 = 1000;

/// A valid file written by [`Db`]: [`BASE_DOCS`] documents (every tenth
/// deleted) and [`BASE_LOCALS`] local documents, in batches of 500 and
/// default node sizes, so that each of the three trees has a root with
/// interior children (three levels by id and seq, two for local docs).
pub fn base_image() -> Result<Vec<u8>> {
    let backend = Arc::new(MemBackend::new());
    let file = CouchFile::new(backend.clone(), "base.couch")?;
    let mut db = Db::open(file, &DbOptions::default())?;
    for batch in 0..BASE_DOCS / 500 {
        let docs: Vec<DocUpdate> = (batch * 500..(batch + 1) * 500)
            .map(|i| DocUpdate {
                id: base_doc_id(i),
                seq: None,
                rev_seq: 1,
                rev_seq_above_stored: false,
                rev_meta: RevMeta::new(u64::from(i) + 1, 0, 0, 1).encode(),
                deleted: i % 10 == 9,
                content_meta: CONTENT_META_COMPRESSED,
                body: Body::Plain(format!("{{\"n\":{i}}}").into_bytes()),
            })
            .collect();
        let locals: Vec<LocalUpdate> = (0..BASE_LOCALS)
            .filter(|i| i % (BASE_DOCS / 500) == batch)
            .map(|i| LocalUpdate {
                id: base_local_id(i),
                value: Some(b"{}".to_vec()),
            })
            .collect();
        db.save(&docs, &locals)?;
        db.commit(1_700_000_000_000_000_000 + u64::from(batch))?;
    }
    drop(db);
    Ok(backend.to_bytes())
}

/// The file [`walk_forged_tree`] forges trees over, built once.
struct Base {
    image: Vec<u8>,
    /// For each tree of [`TreeKind::ALL`], the (last key, offset) of its
    /// root, the root's children and theirs.
    nodes: [Vec<(Vec<u8>, u64)>; 3],
    /// For each tree, how many keys it holds.
    keys: [usize; 3],
}

fn base() -> Option<&'static Base> {
    static BASE: OnceLock<Option<Base>> = OnceLock::new();
    BASE.get_or_init(|| build_base().ok()).as_ref()
}

fn build_base() -> Result<Base> {
    let image = base_image()?;
    let (db, _) = open_image(image.clone())?;
    let snap = db.snapshot();
    let file = snap.file();
    let mut nodes: [Vec<(Vec<u8>, u64)>; 3] = Default::default();
    let mut keys = [0; 3];
    for (i, tree) in TreeKind::ALL.into_iter().enumerate() {
        let Some(root) = tree.root(snap.header()) else {
            continue;
        };
        let kids = children(file, root.pointer)?;
        let mut level = Vec::new();
        for (key, child) in &kids {
            level.push((key.clone(), child.pointer));
            for (key, grandchild) in children(file, child.pointer)? {
                level.push((key, grandchild.pointer));
            }
        }
        if let Some((last, _)) = kids.last() {
            level.push((last.clone(), root.pointer));
        }
        nodes[i] = level;
        keys[i] = match tree {
            TreeKind::BySeq | TreeKind::ById => BASE_DOCS as usize,
            TreeKind::Local => BASE_LOCALS as usize,
        };
    }
    Ok(Base { image, nodes, keys })
}

/// Forges a tree over the nodes of [`base_image`] as `data` says and walks
/// it every way the crate can. `data[0]` picks the tree; the rest, cut at
/// each `0xff` into up to four levels, gives each forged interior node its
/// entries as byte pairs `(pointer, key)`: the pointer picks one of the real
/// nodes of the tree's top three levels or a node forged at a level below
/// (`0xfe`: the node itself, `0xfd`: past it), the key the last key of one
/// of them. The top level becomes the root. Whatever the forgery, a walk
/// must end with an error or with keys strictly ascending and no more of
/// them than the file holds; lookups, range reduces and a save must end.
pub fn walk_forged_tree(data: &[u8]) {
    let Some(base) = base() else {
        return;
    };
    let Some((&which, program)) = data.split_first() else {
        return;
    };
    let which = usize::from(which) % TreeKind::ALL.len();
    let _ = walk_forged(base, which, program);
}

fn walk_forged(base: &Base, which: usize, program: &[u8]) -> Result<()> {
    let tree = TreeKind::ALL[which];
    let (mut db, _) = open_image(base.image.clone())?;
    let Some(like) = tree.root(&db.committed().header).cloned() else {
        return Ok(());
    };
    let mut nodes = base.nodes[which].clone();
    if nodes.is_empty() {
        return Ok(());
    }
    let mut root = None;
    for level in program.split(|&b| b == 0xff).take(4) {
        if level.is_empty() {
            continue;
        }
        let w = db.writer_mut();
        let own = w.position();
        let entries: Vec<(&[u8], u64)> = level
            .chunks(2)
            .map(|pair| {
                let (pick, key) = (pair[0], pair.get(1).copied().unwrap_or(pair[0]));
                let pointer = match pick {
                    0xfe => own,
                    0xfd => own + 1,
                    _ => nodes[usize::from(pick) % nodes.len()].1,
                };
                (&nodes[usize::from(key) % nodes.len()].0[..], pointer)
            })
            .collect();
        let last_key = entries.last().map(|(k, _)| k.to_vec()).unwrap_or_default();
        let node = append_interior(w, &entries, &like)?;
        nodes.push((last_key, node.pointer));
        root = Some(node);
    }
    let Some(root) = root else {
        return Ok(());
    };
    commit_root(&mut db, tree, root)?;
    let snap = db.snapshot();

    // The walk of the forged tree: an error, or ascending keys, no more
    // than the tree holds.
    let mut seen = 0usize;
    let mut last: Option<Vec<u8>> = None;
    let mut check = |key: &[u8]| {
        seen += 1;
        assert!(
            seen <= base.keys[which],
            "a walk gave more keys than the file holds"
        );
        if let Some(last) = &last {
            assert!(last.as_slice() < key, "a walk gave keys out of order");
        }
        last = Some(key.to_vec());
    };
    let _ = match tree {
        TreeKind::BySeq => snap.changes_since(0, ChangesFilter::All, &mut |info| {
            check(&couchfile::encode_seq_key(info.db_seq)?);
            Ok(ControlFlow::Continue(()))
        }),
        TreeKind::ById => snap.docs_by_id(Bound::Unbounded, Bound::Unbounded, &mut |info| {
            check(&info.id);
            Ok(ControlFlow::Continue(()))
        }),
        TreeKind::Local => snap.local_docs(&mut |id, _| {
            check(id);
            Ok(ControlFlow::Continue(()))
        }),
    };

    // Point lookups, range reduces, a range fold and a save end too.
    let mut ids: Vec<Vec<u8>> = (0..BASE_DOCS).step_by(97).map(base_doc_id).collect();
    ids.push(b"zzz".to_vec());
    let id_refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
    let _ = snap.doc_infos(&id_refs);
    let _ = snap.doc_info_by_seq(u64::from(BASE_DOCS / 2));
    let _ = snap.local_doc(&base_local_id(BASE_LOCALS / 3));
    let _ = snap.count_changes(100, 2000);
    let _ = snap.changes_since(u64::from(BASE_DOCS / 2), ChangesFilter::All, &mut |_| {
        Ok(ControlFlow::Continue(()))
    });
    let start = base_doc_id(BASE_DOCS / 3);
    let end = base_doc_id(BASE_DOCS / 2);
    let _ = snap.docs_by_id(Bound::Included(&start), Bound::Excluded(&end), &mut |_| {
        Ok(ControlFlow::Continue(()))
    });
    let doc = DocUpdate {
        id: base_doc_id(BASE_DOCS / 4),
        seq: None,
        rev_seq: 2,
        rev_seq_above_stored: false,
        rev_meta: RevMeta::new(1, 0, 0, 1).encode(),
        deleted: false,
        content_meta: 0,
        body: Body::Plain(b"{}".to_vec()),
    };
    let local = LocalUpdate {
        id: base_local_id(BASE_LOCALS / 4),
        value: None,
    };
    let _ = db.save(&[doc], &[local]);
    Ok(())
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
        walk_forged_tree(&[]);
        walk_forged_tree(&[1, 0, 0, 0, 0, 0xff, 0xfe, 0xfe]);
    }

    #[test]
    fn the_base_of_walk_forged_tree_has_nodes_below_the_root_of_every_tree() {
        let base = base().unwrap();
        for (i, tree) in TreeKind::ALL.into_iter().enumerate() {
            // The root, at least two children and some of theirs.
            assert!(base.nodes[i].len() > 3, "{tree:?}: {}", base.nodes[i].len());
            assert!(base.keys[i] > 0, "{tree:?}");
        }
    }

    #[test]
    fn forge_refuses_a_tree_whose_root_is_a_leaf() {
        let image = base_image().unwrap();
        let (mut db, backend) = open_image(image).unwrap();
        let local = LocalUpdate {
            id: b"_local/only".to_vec(),
            value: Some(b"{}".to_vec()),
        };
        *db.pending_mut() = DbHeader {
            local_root: None,
            ..db.pending().clone()
        };
        db.save(&[], &[local]).unwrap();
        db.commit(0).unwrap();
        drop(db);
        let result = forge(backend.to_bytes(), TreeKind::Local, Forgery::RepeatedChild);
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{result:?}"
        );
    }
}
