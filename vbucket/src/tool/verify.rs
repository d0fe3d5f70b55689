//! `couchtool verify`: walks the three trees of one header and checks
//! everything that can be checked without trusting the file.

use super::{describe, describe_btree, hex, open_or_error, printable, OpenOptions, Result};
use btree::node::Node;
use btree::{ById, BySeq, Local, Snapshot, TreeOps};
use couchfile::{decompress, CouchFile, DocInfo, NodePointer};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Deepest tree walked; couchstore's trees of any size are far shallower,
/// so deeper means corrupt (and the walk must not run out of stack).
const MAX_DEPTH: usize = 64;

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Offset of the chunk (node, body or header) where it was found.
    pub offset: u64,
    /// What is wrong.
    pub message: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The file checked.
    pub path: PathBuf,
    /// Offset of the header whose trees were walked.
    pub header_offset: u64,
    /// The header's update_seq.
    pub update_seq: u64,
    /// Node chunks read (of the three trees).
    pub nodes: u64,
    /// Leaf entries of the by-id tree.
    pub by_id_entries: u64,
    /// Leaf entries of the by-seq tree.
    pub by_seq_entries: u64,
    /// Local documents.
    pub local_entries: u64,
    /// Body chunks read.
    pub bodies: u64,
    /// Everything found wrong, in the order found.
    pub problems: Vec<Problem>,
}

impl Report {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Writes one line per problem (`FILE: offset N: what`), then the
    /// one-line summary.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        for p in &self.problems {
            writeln!(
                out,
                "{}: offset {}: {}",
                self.path.display(),
                p.offset,
                p.message
            )?;
        }
        writeln!(out, "{self}")
    }
}

/// The one-line summary.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            write!(f, "OK")?;
        } else {
            write!(f, "FAILED ({} problems)", self.problems.len())?;
        }
        write!(
            f,
            ": {}: header at {} (update_seq {}): {} nodes, {} by-id and {} by-seq entries, {} local docs, {} bodies checked",
            self.path.display(),
            self.header_offset,
            self.update_seq,
            self.nodes,
            self.by_id_entries,
            self.by_seq_entries,
            self.local_entries,
            self.bodies
        )
    }
}

/// Checks the latest header of `path` (normal open): see [`verify_snapshot`].
/// An `Err` only when the file cannot be opened at all; everything found
/// wrong after that is in the report.
pub fn verify(path: &Path) -> Result<Report> {
    verify_with(path, &OpenOptions::default())
}

/// Checks the header of `path` that `options` open at: see
/// [`verify_snapshot`].
pub fn verify_with(path: &Path, options: &OpenOptions) -> Result<Report> {
    let snapshot = open_or_error(path, options)?;
    Ok(verify_snapshot(&snapshot))
}

/// Walks the by-id, by-seq and local trees of the header `snapshot` reads and
/// checks: every node chunk's checksum and its decoding; that keys ascend
/// strictly within and across nodes and lie within the bounds their parents'
/// keys set; every pointer's subtree size (8 + the node chunk's stored
/// payload length + the children's subtree sizes) and reduce value
/// (recomputed with the tree's [`TreeOps`]); that children precede their
/// parent and no node is reached twice; every body chunk's checksum (and its
/// decompression where `content_meta & 0x80`); that the by-id and by-seq
/// trees hold the same documents; and that the header's update_seq is at
/// least the highest seq.
pub fn verify_snapshot(snapshot: &Snapshot) -> Report {
    let file = snapshot.file();
    let header = snapshot.header();
    let mut w = Walker {
        file,
        nodes: 0,
        problems: Vec::new(),
        visited: HashSet::new(),
        last_key: None,
    };
    let mut report = Report {
        path: file.path().to_path_buf(),
        header_offset: snapshot.offset(),
        update_seq: header.update_seq,
        ..Report::default()
    };

    // by-id: DocInfos by seq, with the leaf they came from.
    let mut by_id: HashMap<u64, (DocInfo, u64)> = HashMap::new();
    w.walk_tree(
        "by-id",
        &ById,
        header.by_id_root.as_ref(),
        &mut |leaf, key, value| {
            report.by_id_entries += 1;
            let info = DocInfo::decode_by_id(key, value)
                .map_err(|e| format!("by-id entry {}: {e}", printable(key)))?;
            if let Some((other, at)) = by_id.insert(info.db_seq, (info, leaf)) {
                return Err(format!(
                    "by-id entries {} (leaf at {at}) and {} have the same seq {}",
                    printable(&other.id),
                    printable(key),
                    other.db_seq
                ));
            }
            Ok(())
        },
    );

    let mut by_seq: Vec<(DocInfo, u64)> = Vec::new();
    w.walk_tree(
        "by-seq",
        &BySeq,
        header.by_seq_root.as_ref(),
        &mut |leaf, key, value| {
            report.by_seq_entries += 1;
            let info = DocInfo::decode_by_seq(key, value)
                .map_err(|e| format!("by-seq entry {}: {e}", hex(key)))?;
            by_seq.push((info, leaf));
            Ok(())
        },
    );

    w.walk_tree(
        "local",
        &Local,
        header.local_root.as_ref(),
        &mut |_, _, _| {
            report.local_entries += 1;
            Ok(())
        },
    );
    report.nodes = w.nodes;
    let mut problems = w.problems;

    // Bodies.
    for (info, _) in &by_seq {
        if info.bp == 0 {
            continue;
        }
        report.bodies += 1;
        let checked = file.read_chunk(info.bp).and_then(|stored| {
            if info.is_compressed() {
                decompress(&stored).map(drop)
            } else {
                Ok(())
            }
        });
        if let Err(e) = checked {
            problems.push(Problem {
                offset: info.bp,
                message: format!(
                    "body of seq {} (id {}): {}: {}",
                    info.db_seq,
                    printable(&info.id),
                    e.couchstore_name(),
                    describe(&e)
                ),
            });
        }
    }

    // The same documents in both trees.
    for (info, leaf) in &by_seq {
        match by_id.remove(&info.db_seq) {
            None => problems.push(Problem {
                offset: *leaf,
                message: format!(
                    "by-seq entry seq {} (id {}) has no by-id entry with that seq",
                    info.db_seq,
                    printable(&info.id)
                ),
            }),
            Some((other, other_leaf)) if other != *info => problems.push(Problem {
                offset: *leaf,
                message: format!(
                    "by-seq entry seq {} differs from the by-id entry (leaf at {other_leaf}): by-seq {:?}, by-id {:?}",
                    info.db_seq, info, other
                ),
            }),
            Some(_) => {}
        }
    }
    let mut orphans: Vec<(DocInfo, u64)> = by_id.into_values().collect();
    orphans.sort_by_key(|(info, _)| info.db_seq);
    for (info, leaf) in orphans {
        problems.push(Problem {
            offset: leaf,
            message: format!(
                "by-id entry {} (seq {}) has no by-seq entry",
                printable(&info.id),
                info.db_seq
            ),
        });
    }

    // The header's update_seq covers every seq.
    if let Some(max) = by_seq.iter().map(|(info, _)| info.db_seq).max() {
        if max > header.update_seq {
            problems.push(Problem {
                offset: snapshot.offset(),
                message: format!(
                    "header update_seq {} is below the highest seq {max}",
                    header.update_seq
                ),
            });
        }
    }
    report.problems = problems;
    report
}

/// Receives each leaf entry: (leaf offset, key, value); an `Err` is a problem
/// at the leaf.
type LeafFn<'a> = dyn FnMut(u64, &[u8], &[u8]) -> Result<(), String> + 'a;

struct Walker<'f> {
    file: &'f CouchFile,
    nodes: u64,
    problems: Vec<Problem>,
    /// Node offsets already read in this header's trees.
    visited: HashSet<u64>,
    /// The last leaf key of the tree being walked.
    last_key: Option<Vec<u8>>,
}

/// Where a pointer was read: the header or an interior node.
#[derive(Clone, Copy)]
enum Source {
    Header,
    Node(u64),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Header => write!(f, "the header's root"),
            Source::Node(at) => write!(f, "the pointer in node {at}"),
        }
    }
}

impl Walker<'_> {
    fn problem(&mut self, offset: u64, message: String) {
        self.problems.push(Problem { offset, message });
    }

    fn walk_tree<O: TreeOps>(
        &mut self,
        tree: &'static str,
        ops: &O,
        root: Option<&NodePointer>,
        leaf: &mut LeafFn<'_>,
    ) {
        self.last_key = None;
        if let Some(root) = root {
            self.walk(tree, ops, root, Source::Header, 0, None, None, leaf);
        }
    }

    /// Checks the subtree `ptr` points at, whose keys must be above `low`
    /// and at most `high`.
    #[allow(clippy::too_many_arguments)]
    fn walk<O: TreeOps>(
        &mut self,
        tree: &'static str,
        ops: &O,
        ptr: &NodePointer,
        from: Source,
        depth: usize,
        low: Option<&[u8]>,
        high: Option<&[u8]>,
        leaf: &mut LeafFn<'_>,
    ) {
        let at = ptr.pointer;
        if depth > MAX_DEPTH {
            self.problem(
                at,
                format!("{tree} node: the tree is deeper than {MAX_DEPTH} levels"),
            );
            return;
        }
        if !self.visited.insert(at) {
            self.problem(
                at,
                format!("{tree} node: reached a second time (from {from})"),
            );
            return;
        }
        let stored = match self.file.read_chunk(at) {
            Ok(stored) => stored,
            Err(e) => {
                self.problem(at, format!("{tree} node: {}", describe(&e)));
                return;
            }
        };
        self.nodes += 1;
        let node = match decompress(&stored)
            .map_err(|e| describe(&e))
            .and_then(Node::decode)
        {
            Ok(node) => node,
            Err(e) => {
                self.problem(at, format!("{tree} node: cannot decode: {e}"));
                return;
            }
        };

        // Key order within the node and against the parent's bounds: the
        // check every walk of the btree crate makes.
        if let Err(bad) = node.check_keys(ops, low, high) {
            let key = hex(node.key(bad.index()));
            self.problem(at, format!("{tree} node: {bad} ({key})"));
        }

        let mut size = Some(8 + stored.len() as u64);
        let reduce = if node.is_leaf {
            let first = node.key(0);
            if let Some(last) = &self.last_key {
                if ops.compare(last, first).is_ge() {
                    self.problem(
                        at,
                        format!(
                            "{tree} leaf: first key {} is not above the last key of the leaf before",
                            hex(first)
                        ),
                    );
                }
            }
            self.last_key = Some(node.key(node.len() - 1).to_vec());
            for (key, value) in node.entries() {
                if let Err(message) = leaf(at, key, value) {
                    self.problem(at, format!("{tree} leaf: {message}"));
                }
            }
            ops.reduce(&mut node.entries())
        } else {
            let mut reduces = Vec::with_capacity(node.len());
            let mut lower = low;
            for i in 0..node.len() {
                let key = node.key(i);
                match NodePointer::decode_kp_value(node.value(i)) {
                    Ok(child) => {
                        size = size.map(|s| s.saturating_add(child.subtree_size));
                        if child.pointer >= at {
                            self.problem(
                                at,
                                format!(
                                    "{tree} node: child {i} at {} is not before its parent",
                                    child.pointer
                                ),
                            );
                        } else {
                            self.walk(
                                tree,
                                ops,
                                &child,
                                Source::Node(at),
                                depth + 1,
                                lower,
                                Some(key),
                                leaf,
                            );
                        }
                        reduces.push(child.reduce);
                    }
                    Err(e) => {
                        self.problem(at, format!("{tree} node: child {i}: {}", describe(&e)));
                        size = None;
                    }
                }
                lower = Some(key);
            }
            if size.is_some() {
                ops.rereduce(&mut reduces.iter().map(Vec::as_slice))
            } else {
                // A child pointer is unreadable: nothing to compare with.
                return;
            }
        };

        if let Some(size) = size {
            if size != ptr.subtree_size {
                self.problem(
                    at,
                    format!(
                        "{tree} node: {from} says subtree size {}, the node and its children add up to {size}",
                        ptr.subtree_size
                    ),
                );
            }
        }
        match reduce {
            Ok(reduce) if reduce != ptr.reduce => self.problem(
                at,
                format!(
                    "{tree} node: {from} says reduce {}, recomputed {}",
                    hex(&ptr.reduce),
                    hex(&reduce)
                ),
            ),
            Ok(_) => {}
            Err(e) => self.problem(
                at,
                format!(
                    "{tree} node: cannot compute the reduce: {}",
                    describe_btree(&e)
                ),
            ),
        }
    }
}
