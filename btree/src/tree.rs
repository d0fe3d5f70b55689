//! The copy-on-write B+tree: batch modification, lookups, folds, range
//! reduces and the bottom-up builder, generic over key order and reduce.

use crate::error::{Error, Result};
use crate::node::{Node, INTERIOR, LEAF};
use couchfile::{
    encode_kv_length, ChunkPos, Compressor, CouchFile, FileWriter, NodePointer, NodePointerRef,
};
use parking_lot::Mutex;
use std::any::TypeId;
use std::cmp::Ordering;
use std::ops::{Bound, ControlFlow};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};

/// A batch of at least this many actions is modified by two threads: at the
/// first nodes down from the root whose children take the batch in at least
/// [`PARALLEL_MODIFY_MIN_RUNS`] runs, two threads of the modify pool share
/// out those children's subtrees. Smaller batches do not pay for the
/// hand-over.
pub const PARALLEL_MODIFY_MIN_ACTIONS: usize = 256;

/// How many children of a node must take part of a batch for two threads to
/// share them out; with fewer, one of them could take most of the work.
pub const PARALLEL_MODIFY_MIN_RUNS: usize = 4;

/// What makes one tree differ from another: how keys sort and how a
/// subtree's reduce value is computed. Shared by the threads of a parallel
/// [`BTree::modify`], hence `Sync`.
pub trait TreeOps: Sync + 'static {
    /// Orders two keys.
    fn compare(&self, a: &[u8], b: &[u8]) -> Ordering;
    /// The reduce value of a leaf's entries.
    fn reduce(&self, entries: &mut dyn Iterator<Item = (&[u8], &[u8])>) -> Result<Vec<u8>>;
    /// The reduce value of an interior node from its children's reduces.
    fn rereduce(&self, reduces: &mut dyn Iterator<Item = &[u8]>) -> Result<Vec<u8>>;
}

/// Receives each fetched key with its old value (`None` if absent).
pub type FetchFn<'a> = dyn FnMut(&[u8], Option<&[u8]>) -> Result<()> + 'a;
/// Receives each (key, value) of a fold; `Break` stops the fold.
pub type EntryFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<ControlFlow<()>> + 'a;

/// Node size rules: couchstore's defaults are a 1279-byte threshold for both
/// kinds of node, nodes being cut at two thirds of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig {
    /// Uncompressed bytes of leaf entries beyond which a leaf is split.
    pub leaf_threshold: usize,
    /// Uncompressed bytes of interior entries beyond which it is split.
    pub interior_threshold: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            leaf_threshold: 1279,
            interior_threshold: 1279,
        }
    }
}

impl NodeConfig {
    /// The largest threshold accepted: a node must fit in a chunk with room
    /// to spare, and nothing near this size helps a B-tree.
    pub const MAX_THRESHOLD: usize = 16 << 20;

    /// Checks that both thresholds are between 1 and
    /// [`NodeConfig::MAX_THRESHOLD`].
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("leaf_threshold", self.leaf_threshold),
            ("interior_threshold", self.interior_threshold),
        ] {
            if !(1..=Self::MAX_THRESHOLD).contains(&value) {
                return Err(Error::InvalidArgument(format!(
                    "{name} {value} is out of range (1 to {})",
                    Self::MAX_THRESHOLD
                )));
            }
        }
        Ok(())
    }
}

/// One operation of a batch on one key.
#[derive(Debug, Clone, Copy)]
pub enum ActionOp<'a> {
    /// Report the current value (or its absence) through the callback.
    Fetch,
    /// Remove the key if present.
    Remove,
    /// Insert or replace the value.
    Insert(&'a [u8]),
    /// Report the current value, then insert or replace it.
    FetchInsert(&'a [u8]),
    /// Report the current value, then insert or replace it with this value
    /// as the [`ValuePatch`] edits it given the current value: a value that
    /// depends on the one it replaces, found by the same walk.
    FetchInsertPatched(&'a [u8], ValuePatch),
}

/// Edits, in place, a value about to be inserted, given the value it
/// replaces (`None` when the key is new); the value's length cannot change.
/// A plain function, so that actions stay `Copy`.
pub type ValuePatch = fn(old: Option<&[u8]>, new: &mut [u8]) -> Result<()>;

/// An action on a key. A batch is sorted by key with each key at most once.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    /// The key.
    pub key: &'a [u8],
    /// What to do with it.
    pub op: ActionOp<'a>,
}

impl<'a> Action<'a> {
    /// Inserts `value` under `key`, or removes `key` when `value` is `None`.
    pub fn put_or_remove(key: &'a [u8], value: Option<&'a [u8]>) -> Self {
        let op = match value {
            Some(v) => ActionOp::Insert(v),
            None => ActionOp::Remove,
        };
        Self { key, op }
    }
}

/// Collects the entries of the nodes being written at one level and cuts them
/// into nodes as they fill (couchstore's `couchfile_modify_result`).
///
/// Entries are encoded as they arrive, straight into the bytes of the node
/// being collected, so a node is written without copying its entries again
/// and without an allocation per entry.
struct Collector {
    is_leaf: bool,
    compacting: bool,
    threshold: usize,
    /// The node being collected: its type byte, then each entry as
    /// `kvlen(5) key value`.
    encoded: Vec<u8>,
    /// Where each collected entry's key starts in `encoded`, with the key's
    /// and the value's lengths.
    spans: Vec<EntrySpan>,
    /// Pointers to the nodes written so far, with their last key.
    written: Vec<(Vec<u8>, NodePointer)>,
}

/// Where one entry lies in a [`Collector`]'s encoded node.
#[derive(Debug, Clone, Copy)]
struct EntrySpan {
    key_start: usize,
    key_len: usize,
    value_len: usize,
}

impl EntrySpan {
    fn end(&self) -> usize {
        self.key_start + self.key_len + self.value_len
    }
}

impl Collector {
    fn new(is_leaf: bool, compacting: bool, config: &NodeConfig) -> Self {
        let threshold = if is_leaf {
            config.leaf_threshold
        } else {
            config.interior_threshold
        };
        // A node is cut just past the threshold: room for that and one more
        // entry of typical size without growing.
        let mut encoded = Vec::with_capacity(threshold + threshold / 2);
        encoded.push(if is_leaf { LEAF } else { INTERIOR });
        Self {
            is_leaf,
            compacting,
            threshold,
            encoded,
            spans: Vec::new(),
            written: Vec::new(),
        }
    }

    fn quota(&self) -> usize {
        self.threshold * 2 / 3
    }

    /// Entries collected.
    fn len(&self) -> usize {
        self.spans.len()
    }

    /// Bytes of the collected entries, as couchstore counts a node's size.
    fn node_len(&self) -> usize {
        self.encoded.len() - 1
    }

    /// Key and value of collected entry `i`.
    fn entry(&self, i: usize) -> (&[u8], &[u8]) {
        let span = self.spans[i];
        let value_start = span.key_start + span.key_len;
        (
            &self.encoded[span.key_start..value_start],
            &self.encoded[value_start..span.end()],
        )
    }

    fn push<O: TreeOps + ?Sized>(
        &mut self,
        ops: &O,
        w: &mut dyn NodeSink,
        key: &[u8],
        value: &[u8],
    ) -> Result<()> {
        self.push_entry(ops, w, key, value.len(), |encoded| {
            encoded.extend_from_slice(value);
            Ok(())
        })
    }

    /// [`Collector::push`] of `value` as `patch` edits it, given `old`.
    fn push_patched<O: TreeOps + ?Sized>(
        &mut self,
        ops: &O,
        w: &mut dyn NodeSink,
        (key, value): (&[u8], &[u8]),
        (patch, old): (ValuePatch, Option<&[u8]>),
    ) -> Result<()> {
        self.push_entry(ops, w, key, value.len(), |encoded| {
            let start = encoded.len();
            encoded.extend_from_slice(value);
            patch(old, &mut encoded[start..])
        })
    }

    fn push_pointer<O: TreeOps + ?Sized>(
        &mut self,
        ops: &O,
        w: &mut dyn NodeSink,
        key: &[u8],
        pointer: &NodePointer,
    ) -> Result<()> {
        let value_len = 14 + pointer.reduce.len();
        self.push_entry(ops, w, key, value_len, |encoded| {
            Ok(pointer.encode_kp_value(encoded)?)
        })
    }

    /// Appends an entry whose value of `value_len` bytes `write_value`
    /// encodes in place, then cuts a node if the level is full.
    fn push_entry<O: TreeOps + ?Sized>(
        &mut self,
        ops: &O,
        w: &mut dyn NodeSink,
        key: &[u8],
        value_len: usize,
        write_value: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        self.encoded
            .extend_from_slice(&encode_kv_length(key.len(), value_len)?);
        let key_start = self.encoded.len();
        self.encoded.extend_from_slice(key);
        write_value(&mut self.encoded)?;
        self.spans.push(EntrySpan {
            key_start,
            key_len: key.len(),
            value_len,
        });
        self.cut_if_full(ops, w)
    }

    /// Writes a node if the entries collected are over the size rules.
    fn cut_if_full<O: TreeOps + ?Sized>(&mut self, ops: &O, w: &mut dyn NodeSink) -> Result<()> {
        if self.compacting {
            if self.node_len() > self.quota() && (self.is_leaf || self.len() > 1) {
                self.flush(ops, w, self.len())?;
            }
        } else if self.len() > 3 && self.node_len() > self.threshold {
            // Write the first entries up to two thirds of the threshold (an
            // interior node at least two), keep the rest for the next node.
            let quota = self.quota();
            // Entries 0..=i hold `span.end() - 1` bytes (after the type byte).
            let min_entries = if self.is_leaf { 1 } else { 2 };
            let n = self
                .spans
                .iter()
                .enumerate()
                .position(|(i, span)| span.end() > quota && i + 1 >= min_entries)
                .map_or(self.len(), |i| i + 1);
            self.flush(ops, w, n)?;
        }
        Ok(())
    }

    /// Writes the first `n` collected entries as one node.
    fn flush<O: TreeOps + ?Sized>(
        &mut self,
        ops: &O,
        w: &mut dyn NodeSink,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (reduce, children_size) = if self.is_leaf {
            (ops.reduce(&mut (0..n).map(|i| self.entry(i)))?, 0)
        } else {
            let children: Vec<NodePointerRef<'_>> = (0..n)
                .map(|i| NodePointerRef::decode_kp_value(self.entry(i).1))
                .collect::<couchfile::Result<_>>()?;
            (
                ops.rereduce(&mut children.iter().map(|c| c.reduce))?,
                children.iter().map(|c| c.subtree_size).sum(),
            )
        };
        let end = self.spans[n - 1].end();
        let pos = w.append_node(&self.encoded[..end], &self.spans[..n], TypeId::of::<O>())?;
        let last_key = self.entry(n - 1).0.to_vec();
        self.written.push((
            last_key,
            NodePointer {
                pointer: pos.offset,
                subtree_size: pos.disk_size + children_size,
                reduce,
            },
        ));
        // Keep the type byte and the entries after the node.
        self.encoded.drain(1..end);
        self.spans.drain(..n);
        for span in &mut self.spans {
            span.key_start -= end - 1;
        }
        Ok(())
    }

    /// Writes everything collected and returns the pointers of every node
    /// written.
    fn finish<O: TreeOps + ?Sized>(
        mut self,
        ops: &O,
        w: &mut dyn NodeSink,
    ) -> Result<Vec<(Vec<u8>, NodePointer)>> {
        self.flush(ops, w, self.len())?;
        Ok(self.written)
    }
}

/// Where a tree's new nodes go: a [`FileWriter`] of its own, or one shared
/// by the threads of a parallel [`BTree::modify`] ([`SharedWriter`]).
trait NodeSink: Send {
    /// Compresses `node` (encoded, its entries at `spans`), appends it as a
    /// chunk and puts it, decoded, in the file's chunk cache as a node of
    /// the tree ordered by `order`.
    fn append_node(&mut self, node: &[u8], spans: &[EntrySpan], order: TypeId) -> Result<ChunkPos>;
}

/// Puts the node just appended at `offset` in `file`'s chunk cache.
fn cache_written(file: &CouchFile, offset: u64, node: &[u8], spans: &[EntrySpan], order: TypeId) {
    file.cache_decoded(offset, || {
        let node = Node::written(
            node[0] == LEAF,
            node,
            spans
                .iter()
                .map(|span| (span.key_start, span.key_len, span.value_len)),
            order,
        );
        let weight = node.weight();
        (node, weight)
    });
}

impl NodeSink for FileWriter {
    fn append_node(&mut self, node: &[u8], spans: &[EntrySpan], order: TypeId) -> Result<ChunkPos> {
        let pos = self.append_compressed_chunk(node)?;
        cache_written(self.file(), pos.offset, node, spans, order);
        Ok(pos)
    }
}

/// One thread's access to a writer shared by the threads of a parallel
/// modify: it compresses its nodes itself and holds the lock only to
/// append them.
struct SharedWriter<'s, 'w> {
    writer: &'s Mutex<&'w mut FileWriter>,
    compressor: Compressor,
}

impl<'s, 'w> SharedWriter<'s, 'w> {
    fn new(writer: &'s Mutex<&'w mut FileWriter>) -> Self {
        Self {
            writer,
            compressor: Compressor::new(),
        }
    }
}

impl NodeSink for SharedWriter<'_, '_> {
    fn append_node(&mut self, node: &[u8], spans: &[EntrySpan], order: TypeId) -> Result<ChunkPos> {
        let compressed = self.compressor.compress(node);
        let (pos, file) = {
            let mut writer = self.writer.lock();
            (writer.append_chunk(compressed)?, writer.file().clone())
        };
        cache_written(&file, pos.offset, node, spans, order);
        Ok(pos)
    }
}

/// The threads that run the two halves of the parallel modifies, one per
/// core (at least two), started once and kept: a thread started for each
/// modify began its half 0.1 to 0.6 ms after the caller (bench peers,
/// 2026-12-06), a tenth of a by-id modify of 1,000 keys. `None` when no
/// thread could be started: the modifies then run on their callers' threads.
fn modify_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("btree-modify-{i}"))
            .build()
            .inspect_err(|e| tracing::debug!(error = %e, "no threads for parallel modifies"))
            .ok()
    })
    .as_ref()
}

/// A child of an interior node and the run of a batch's actions it takes.
struct ChildRun<'n, 'a> {
    /// The child's index in its parent.
    index: usize,
    child: NodePointer,
    /// The keys the child holds.
    range: KeyRange<'n>,
    actions: &'n [Action<'a>],
}

/// A child's subtree modified by one of the threads of a parallel modify.
struct RunDone {
    /// The child's index in its parent.
    index: usize,
    outcome: Outcome,
    /// What the modify fetched, for the caller's callback once all are done.
    fetches: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// What modifying a subtree did.
enum Outcome {
    /// Nothing changed: the old pointer stands.
    Unchanged,
    /// The subtree was rewritten into these nodes (none if it became empty).
    Replaced(Vec<(Vec<u8>, NodePointer)>),
}

/// The keys a node may hold, given by the entries above it on its path from
/// the root (see [`Node::check_keys`]).
#[derive(Debug, Clone, Copy, Default)]
struct KeyRange<'k> {
    /// The node's keys are above this: the parent's key of the child to its
    /// left, or the parent's own lower bound for a first child.
    low: Option<&'k [u8]>,
    /// The node's keys are at most this: its key in its parent.
    high: Option<&'k [u8]>,
    /// Offset of the parent (`None` for the root), for the error.
    parent: Option<u64>,
    /// Levels above the node (0 for the root).
    depth: u32,
}

impl<'k> KeyRange<'k> {
    /// The root's range: any key.
    const ROOT: KeyRange<'static> = KeyRange {
        low: None,
        high: None,
        parent: None,
        depth: 0,
    };

    /// The range of child `i` of `node`, a node of this range at `offset`.
    fn child(self, node: &'k Node, offset: u64, i: usize) -> Self {
        KeyRange {
            low: if i == 0 {
                self.low
            } else {
                Some(node.key(i - 1))
            },
            high: Some(node.key(i)),
            parent: Some(offset),
            depth: self.depth + 1,
        }
    }
}

/// A node reached by a walk down a tree, its keys checked against the
/// order of the tree and the range its path gives it ([`BTree::visit`]).
/// Its children are reached through [`Visited::child`], which checks that
/// each lies before it in the file and gives it its range.
///
/// Every walk (folds, range reduces, lookups, modifies) reads its nodes this
/// way, so on a corrupt file whose checksums hold it fails with
/// [`Error::CorruptNode`] instead of looping or reading a subtree again: a
/// child pointer below its parent rules out cycles, and as the children of
/// a node have disjoint ranges and no node is empty, no node can be reached
/// twice in one walk, so a walk reads each node of the file at most once.
struct Visited<'k> {
    offset: u64,
    node: Arc<Node>,
    range: KeyRange<'k>,
}

impl Visited<'_> {
    /// The pointer to child `i` (checked to lie before this node) and the
    /// range of keys the child may hold.
    fn child(&self, file: &CouchFile, i: usize) -> Result<(NodePointer, KeyRange<'_>)> {
        let (child, range) = self.child_ref(file, i)?;
        Ok((child.to_owned(), range))
    }

    /// [`Visited::child`] borrowing the pointer's reduce from the node
    /// (what a lookup uses: it allocates nothing).
    fn child_ref(&self, file: &CouchFile, i: usize) -> Result<(NodePointerRef<'_>, KeyRange<'_>)> {
        Ok((
            child_pointer(file, self.offset, self.node.value(i))?,
            self.range.child(&self.node, self.offset, i),
        ))
    }
}

/// Decodes the pointer to a child of the interior node at `parent`. Children
/// are always written before their parent, so a pointer that is not below
/// the parent's offset is corrupt (and could loop forever).
fn child_pointer<'v>(file: &CouchFile, parent: u64, value: &'v [u8]) -> Result<NodePointerRef<'v>> {
    let child =
        NodePointerRef::decode_kp_value(value).map_err(|e| corrupt(file, parent, e.to_string()))?;
    before_parent(file, parent, child.pointer)?;
    Ok(child)
}

/// [`child_pointer`]'s offset alone.
fn child_offset(file: &CouchFile, parent: u64, value: &[u8]) -> Result<u64> {
    let pointer =
        NodePointerRef::decode_pointer(value).map_err(|e| corrupt(file, parent, e.to_string()))?;
    before_parent(file, parent, pointer)?;
    Ok(pointer)
}

/// Fails a child pointer that is not below its parent's offset.
fn before_parent(file: &CouchFile, parent: u64, pointer: u64) -> Result<()> {
    if pointer >= parent {
        return Err(corrupt(
            file,
            parent,
            format!("child pointer {pointer} is not before its parent"),
        ));
    }
    Ok(())
}

/// Fails a walk that has gone deeper than [`MAX_DEPTH`] to reach the node
/// at `offset`.
fn check_depth(file: &CouchFile, offset: u64, range: &KeyRange<'_>) -> Result<()> {
    if range.depth > MAX_DEPTH {
        return Err(corrupt(
            file,
            offset,
            format!("a path from the root over {MAX_DEPTH} levels deep"),
        ));
    }
    Ok(())
}

/// Checks the keys of `node`, read at `offset`, against `range`
/// ([`Node::check_range`]), after asking for all of its memory at once
/// ([`Node::touch`]): the check and the search that follows then wait for
/// memory once.
fn check_node<O: TreeOps>(
    file: &CouchFile,
    offset: u64,
    range: &KeyRange<'_>,
    node: &Node,
    ops: &O,
) -> Result<()> {
    node.touch();
    node.check_range(ops, range.low, range.high).map_err(|e| {
        let detail = match range.parent {
            None => e.to_string(),
            Some(parent) => format!("{e} (the node at {parent})"),
        };
        corrupt(file, offset, detail)
    })
}

/// The deepest a walk goes below a root. An interior node has at least two
/// children, so a tree of 2^64 entries is 64 levels deep; a deeper path is a
/// forged chain of nodes, which would otherwise take a walk's recursion
/// through the whole stack.
const MAX_DEPTH: u32 = 96;

/// A B+tree in one file, described by its [`TreeOps`] and [`NodeConfig`].
/// The tree itself is a root pointer; operations take the root and return
/// the new one, never changing a node in place.
#[derive(Debug, Clone)]
pub struct BTree<O> {
    ops: O,
    config: NodeConfig,
    /// Whether a large modify may share its work with the modify pool
    /// ([`BTree::set_parallel_modifies`]).
    parallel: bool,
}

fn corrupt(file: &CouchFile, offset: u64, detail: impl Into<String>) -> Error {
    Error::CorruptNode {
        path: file.path().to_path_buf(),
        offset,
        detail: detail.into(),
    }
}

impl<O: TreeOps> BTree<O> {
    /// A tree with the given key order and reduce, and node size rules.
    pub fn new(ops: O, config: NodeConfig) -> Self {
        Self {
            ops,
            config,
            parallel: true,
        }
    }

    /// Whether [`BTree::modify`] shares a large batch with a second thread
    /// (the default) or keeps every batch on the caller's thread. Work in
    /// the background, such as a compaction's catch-up beside a flusher,
    /// turns it off: the pool's threads are shared by every tree, and a
    /// long modify on them delays the modifies of the trees that wait for
    /// them.
    pub fn set_parallel_modifies(&mut self, parallel: bool) {
        self.parallel = parallel;
    }

    /// Whether [`BTree::modify`] may share a large batch with a second
    /// thread ([`BTree::set_parallel_modifies`]).
    pub fn parallel_modifies(&self) -> bool {
        self.parallel
    }

    /// The tree's key order and reduce.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The tree's node size rules.
    pub fn config(&self) -> NodeConfig {
        self.config
    }

    /// Reads the node at `offset`, reached by a walk that gives it the keys
    /// of `range`, and checks its keys ([`Visited`]).
    fn visit<'k>(&self, file: &CouchFile, offset: u64, range: KeyRange<'k>) -> Result<Visited<'k>> {
        check_depth(file, offset, &range)?;
        let node = Node::read_ordered(file, offset, &self.ops)?;
        self.checked_visit(file, offset, range, node)
    }

    /// The visit of `node`, read at `offset`, once its keys are checked
    /// against `range`.
    fn checked_visit<'k>(
        &self,
        file: &CouchFile,
        offset: u64,
        range: KeyRange<'k>,
        node: Arc<Node>,
    ) -> Result<Visited<'k>> {
        check_node(file, offset, &range, &node, &self.ops)?;
        Ok(Visited {
            offset,
            node,
            range,
        })
    }

    /// [`BTree::visit`] of child `i` of `parent` ([`BTree::child_node`]).
    fn visit_child<'p>(
        &self,
        file: &CouchFile,
        parent: &'p Visited<'_>,
        i: usize,
    ) -> Result<Visited<'p>> {
        let (child, range) = parent.child_ref(file, i)?;
        let node = self.child_node(file, &parent.node, i, child.pointer, &range)?;
        Ok(Visited {
            offset: child.pointer,
            node,
            range,
        })
    }

    /// Child `i` of `parent`, stored at `offset`, checked against `range`
    /// (its range in `parent`): through the parent's link to it
    /// ([`Node::link_child`]) when an earlier walk set one, else read
    /// through the file's chunk cache and linked. A walk of cached nodes
    /// then looks only the root up in the cache. The child's range is
    /// checked as on every visit. (A point read's time was a fifth in the
    /// cache's lookups, a few cache misses a level, 2026-12-06.)
    fn child_node(
        &self,
        file: &CouchFile,
        parent: &Node,
        i: usize,
        offset: u64,
        range: &KeyRange<'_>,
    ) -> Result<Arc<Node>> {
        check_depth(file, offset, range)?;
        // Links are set and followed only by walks of the order the
        // parent's keys were checked under: a forged file can share a node
        // between trees of two orders.
        let own_order = Some(TypeId::of::<O>());
        let links = parent.ascending_under() == own_order;
        if let Some(node) = links.then(|| parent.linked_child(i)).flatten() {
            if node.ascending_under() == own_order {
                if i > 0 {
                    // Its range is its parent's keys i - 1 and i whatever
                    // the path, and it was checked against them before it
                    // was linked here.
                    node.touch();
                } else {
                    // The low end is the parent's own, which the path gives.
                    check_node(file, offset, range, &node, &self.ops)?;
                }
                return Ok(node);
            }
        }
        let node = Node::read_ordered(file, offset, &self.ops)?;
        check_node(file, offset, range, &node, &self.ops)?;
        // Only a child the cache holds: a link to one nobody holds would
        // be dead at once.
        if links && file.fills_cache() {
            parent.link_child(i, &node);
        }
        Ok(node)
    }

    /// Checks that `keys` are sorted and unique.
    fn check_sorted<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) -> Result<()> {
        let mut keys = keys.into_iter();
        let Some(mut previous) = keys.next() else {
            return Ok(());
        };
        for (i, key) in keys.enumerate() {
            if self.ops.compare(previous, key) != Ordering::Less {
                return Err(Error::UnsortedOrDuplicate {
                    key: String::from_utf8_lossy(key).into_owned(),
                    index: i + 1,
                });
            }
            previous = key;
        }
        Ok(())
    }

    /// Applies a sorted batch of actions in one pass and returns the new root
    /// (`None` for an empty tree). `fetched` is called, in key order, with
    /// the old value (or `None`) of every [`ActionOp::Fetch`] and
    /// [`ActionOp::FetchInsert`] key. Nodes that do not change are shared
    /// with the old tree; new ones are appended through `writer` and are
    /// readable through `writer.file()` once the writer has flushed.
    ///
    /// A batch of at least [`PARALLEL_MODIFY_MIN_ACTIONS`] actions is shared
    /// out (unless [`BTree::set_parallel_modifies`] turned it off) between
    /// two threads of a pool kept for the purpose (the caller waits for
    /// both); the two append their nodes to `writer` as they finish them,
    /// so nodes land in the file in no fixed order. `fetched`
    /// is then called only once both are done, still in key order and from
    /// the calling thread.
    pub fn modify(
        &self,
        writer: &mut FileWriter,
        root: Option<&NodePointer>,
        actions: &[Action<'_>],
        fetched: &mut FetchFn<'_>,
    ) -> Result<Option<NodePointer>> {
        self.check_sorted(actions.iter().map(|a| a.key))?;
        if actions.is_empty() {
            return Ok(root.cloned());
        }
        // Old nodes are read through the file: make all of them readable.
        writer.flush()?;
        let file = writer.file().clone();
        let outcome = match root {
            None => self.modify_leaf(writer, None, actions, fetched)?,
            Some(root) if self.parallel && actions.len() >= PARALLEL_MODIFY_MIN_ACTIONS => {
                let shared = Mutex::new(&mut *writer);
                let mut sink = SharedWriter::new(&shared);
                let root = (root, KeyRange::ROOT);
                self.modify_node(&file, &mut sink, root, actions, fetched, Some(&shared))?
            }
            Some(root) => {
                let root = (root, KeyRange::ROOT);
                self.modify_node(&file, writer, root, actions, fetched, None)?
            }
        };
        match outcome {
            Outcome::Unchanged => Ok(root.cloned()),
            Outcome::Replaced(pointers) => self.finish_root(writer, pointers, false),
        }
    }

    /// Packs a level of pointers into interior nodes until one remains.
    fn finish_root(
        &self,
        writer: &mut dyn NodeSink,
        mut pointers: Vec<(Vec<u8>, NodePointer)>,
        compacting: bool,
    ) -> Result<Option<NodePointer>> {
        while pointers.len() > 1 {
            let mut level = Collector::new(false, compacting, &self.config);
            for (key, p) in &pointers {
                level.push_pointer(&self.ops, writer, key, p)?;
            }
            pointers = level.finish(&self.ops, writer)?;
        }
        Ok(pointers.pop().map(|(_, p)| p))
    }

    /// Rewrites the subtree at `ptr` (whose keys lie in its range) with
    /// `actions`. With `split` (the writer behind `writer`, shared), the
    /// first nodes whose children take the actions in at least
    /// [`PARALLEL_MODIFY_MIN_RUNS`] runs share those out between two threads.
    fn modify_node(
        &self,
        file: &CouchFile,
        writer: &mut dyn NodeSink,
        (ptr, range): (&NodePointer, KeyRange<'_>),
        actions: &[Action<'_>],
        fetched: &mut FetchFn<'_>,
        split: Option<&Mutex<&mut FileWriter>>,
    ) -> Result<Outcome> {
        let visited = self.visit(file, ptr.pointer, range)?;
        let node = &visited.node;
        if node.is_leaf {
            let outcome = self.modify_leaf(writer, Some(node), actions, fetched)?;
            if matches!(outcome, Outcome::Replaced(_)) {
                file.forget_cached_chunk(ptr.pointer);
            }
            return Ok(outcome);
        }
        // Hand each child the run of actions up to its key; the last child
        // takes whatever is left.
        let mut runs: Vec<ChildRun<'_, '_>> = Vec::new();
        let mut rest = actions;
        for i in 0..node.len() {
            if rest.is_empty() {
                break;
            }
            let last = i + 1 == node.len();
            let n = if last {
                rest.len()
            } else {
                rest.iter()
                    .take_while(|a| self.ops.compare(a.key, node.key(i)) != Ordering::Greater)
                    .count()
            };
            if n == 0 {
                continue;
            }
            let (child, range) = visited.child(file, i)?;
            runs.push(ChildRun {
                index: i,
                child,
                range,
                actions: &rest[..n],
            });
            rest = &rest[n..];
        }
        let results = match split {
            Some(shared) if runs.len() >= PARALLEL_MODIFY_MIN_RUNS => {
                self.modify_children_on_two_threads(file, writer, shared, &runs, fetched)?
            }
            // Too few runs to share out evenly: each child may do so.
            _ => self.modify_children(file, writer, &runs, fetched, split)?,
        };
        if results.iter().all(|(_, o)| matches!(o, Outcome::Unchanged)) {
            return Ok(Outcome::Unchanged);
        }
        let mut out = Collector::new(false, false, &self.config);
        let mut results = results.into_iter().peekable();
        for i in 0..node.len() {
            match results.next_if(|(j, _)| *j == i) {
                Some((_, Outcome::Replaced(pointers))) => {
                    for (key, p) in &pointers {
                        out.push_pointer(&self.ops, writer, key, p)?;
                    }
                }
                _ => out.push(&self.ops, writer, node.key(i), node.value(i))?,
            }
        }
        file.forget_cached_chunk(ptr.pointer);
        Ok(Outcome::Replaced(out.finish(&self.ops, writer)?))
    }

    /// Modifies the children of `runs` one after the other.
    fn modify_children(
        &self,
        file: &CouchFile,
        writer: &mut dyn NodeSink,
        runs: &[ChildRun<'_, '_>],
        fetched: &mut FetchFn<'_>,
        split: Option<&Mutex<&mut FileWriter>>,
    ) -> Result<Vec<(usize, Outcome)>> {
        runs.iter()
            .map(|run| {
                let child = (&run.child, run.range);
                let outcome = self.modify_node(file, writer, child, run.actions, fetched, split)?;
                Ok((run.index, outcome))
            })
            .collect()
    }

    /// Modifies the children of `runs` on two threads of the modify pool
    /// (this one alone if the pool has no threads), each taking the next
    /// run not yet taken (runs cost unevenly:
    /// a run of appends at the right edge rewrites a few nodes, a run of
    /// scattered updates one leaf per action). Both append to the `shared`
    /// writer. Fetches are kept per run and reported in run order once both
    /// are done, so `fetched` still sees keys in order, from the caller.
    fn modify_children_on_two_threads(
        &self,
        file: &CouchFile,
        writer: &mut dyn NodeSink,
        shared: &Mutex<&mut FileWriter>,
        runs: &[ChildRun<'_, '_>],
        fetched: &mut FetchFn<'_>,
    ) -> Result<Vec<(usize, Outcome)>> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let take_runs = |sink: &mut dyn NodeSink| -> Result<Vec<RunDone>> {
            let mut done = Vec::new();
            while !failed.load(AtomicOrdering::Relaxed) {
                let Some(run) = runs.get(next.fetch_add(1, AtomicOrdering::Relaxed)) else {
                    break;
                };
                let mut fetches = Vec::new();
                let outcome = self
                    .modify_node(
                        file,
                        sink,
                        (&run.child, run.range),
                        run.actions,
                        &mut |key, old| {
                            fetches.push((key.to_vec(), old.map(<[u8]>::to_vec)));
                            Ok(())
                        },
                        None,
                    )
                    .inspect_err(|_| failed.store(true, AtomicOrdering::Relaxed))?;
                done.push(RunDone {
                    index: run.index,
                    outcome,
                    fetches,
                });
            }
            Ok(done)
        };
        let span = tracing::Span::current();
        let (mine, theirs) = match modify_pool() {
            Some(pool) => pool.join(
                || take_runs(writer),
                || {
                    let _span = span.enter();
                    take_runs(&mut SharedWriter::new(shared))
                },
            ),
            // Without a pool (no thread to be had), this thread takes every
            // run.
            None => (take_runs(writer), Ok(Vec::new())),
        };
        let mut done = mine?;
        done.extend(theirs?);
        done.sort_by_key(|d| d.index);
        done.into_iter()
            .map(|d| {
                for (key, old) in &d.fetches {
                    fetched(key, old.as_deref())?;
                }
                Ok((d.index, d.outcome))
            })
            .collect()
    }

    fn modify_leaf(
        &self,
        writer: &mut dyn NodeSink,
        node: Option<&Node>,
        actions: &[Action<'_>],
        fetched: &mut FetchFn<'_>,
    ) -> Result<Outcome> {
        let old: Vec<(&[u8], &[u8])> = node.map(|n| n.entries().collect()).unwrap_or_default();
        // Each entry of the new leaf, with the patch of its value and the
        // value it replaces, if patched.
        type Merged<'v> = ((&'v [u8], &'v [u8]), Option<(ValuePatch, Option<&'v [u8]>)>);
        let mut merged: Vec<Merged<'_>> = Vec::with_capacity(old.len() + actions.len());
        let mut modified = false;
        let mut i = 0;
        for action in actions {
            while i < old.len() && self.ops.compare(old[i].0, action.key) == Ordering::Less {
                merged.push((old[i], None));
                i += 1;
            }
            let current = (i < old.len()
                && self.ops.compare(old[i].0, action.key) == Ordering::Equal)
                .then(|| old[i].1);
            if current.is_some() {
                i += 1;
            }
            match action.op {
                ActionOp::Fetch => {
                    fetched(action.key, current)?;
                    if let Some(v) = current {
                        merged.push(((action.key, v), None));
                    }
                }
                ActionOp::Remove => modified |= current.is_some(),
                ActionOp::Insert(v) => {
                    merged.push(((action.key, v), None));
                    modified = true;
                }
                ActionOp::FetchInsert(v) => {
                    fetched(action.key, current)?;
                    merged.push(((action.key, v), None));
                    modified = true;
                }
                ActionOp::FetchInsertPatched(v, patch) => {
                    fetched(action.key, current)?;
                    merged.push(((action.key, v), Some((patch, current))));
                    modified = true;
                }
            }
        }
        merged.extend(old[i..].iter().map(|&entry| (entry, None)));
        if !modified {
            return Ok(Outcome::Unchanged);
        }
        let mut out = Collector::new(true, false, &self.config);
        for (entry, patch) in merged {
            match patch {
                None => out.push(&self.ops, writer, entry.0, entry.1)?,
                Some(patch) => out.push_patched(&self.ops, writer, entry, patch)?,
            }
        }
        Ok(Outcome::Replaced(out.finish(&self.ops, writer)?))
    }

    /// Looks up one key and hands its value, if present, to `f`: a binary
    /// search down the path, which allocates nothing (the nodes come from
    /// the file's chunk cache, if it has one).
    pub fn lookup_one<R>(
        &self,
        file: &CouchFile,
        root: Option<&NodePointer>,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        match root {
            Some(root) => {
                let node = self.root_node(file, root.pointer)?;
                self.lookup_one_from(file, root.pointer, node, key, f)
            }
            None => Ok(None),
        }
    }

    /// The root node stored at `offset`, read and checked as every walk
    /// reads it: what [`BTree::lookup_one_from`] starts from, for a reader
    /// that keeps it across lookups.
    pub(crate) fn root_node(&self, file: &CouchFile, offset: u64) -> Result<Arc<Node>> {
        Ok(self.visit(file, offset, KeyRange::ROOT)?.node)
    }

    /// [`BTree::lookup_one`] from the root `root`, read at `offset` by
    /// [`BTree::root_node`]. A loop that keeps only the node it is at and
    /// the one that holds the low end of its range, rather than a
    /// [`Visited`] a level, and decodes only each child's offset: a point
    /// read's walk is most of its instructions.
    pub(crate) fn lookup_one_from<R>(
        &self,
        file: &CouchFile,
        mut offset: u64,
        root: Arc<Node>,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        let mut node = root;
        let mut depth = 0;
        // The node whose key `i` is the low end of `node`'s range, if any.
        let mut low: Option<(Arc<Node>, usize)> = None;
        loop {
            // The first entry whose key is not below `key`: in a leaf, the
            // key itself if present; in an interior node, the child that
            // may hold it (a child's key is its last key).
            let i = node.partition_point(|k| self.ops.compare(k, key) == Ordering::Less);
            if i == node.len() {
                return Ok(None);
            }
            if node.is_leaf {
                return Ok((self.ops.compare(node.key(i), key) == Ordering::Equal)
                    .then(|| f(node.value(i))));
            }
            let pointer = child_offset(file, offset, node.value(i))?;
            depth += 1;
            let child = {
                let range = KeyRange {
                    low: match i {
                        0 => low.as_ref().map(|(holder, j)| holder.key(*j)),
                        _ => Some(node.key(i - 1)),
                    },
                    high: Some(node.key(i)),
                    parent: Some(offset),
                    depth,
                };
                self.child_node(file, &node, i, pointer, &range)?
            };
            if i > 0 {
                low = Some((node, i - 1));
            }
            node = child;
            offset = pointer;
        }
    }

    /// Looks up sorted, unique `keys`; returns their values in the same order.
    pub fn lookup(
        &self,
        file: &CouchFile,
        root: Option<&NodePointer>,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let root = match root {
            Some(root) => Some((root.pointer, self.root_node(file, root.pointer)?)),
            None => None,
        };
        let mut found = vec![None; keys.len()];
        self.lookup_each_from(file, root, keys, &mut |index, value| {
            found[index] = Some(value.to_vec());
            Ok(())
        })?;
        Ok(found)
    }

    /// Looks up sorted, unique `keys` from the root node read at the offset
    /// it is paired with (by [`BTree::root_node`]), if the tree has one, and
    /// hands `found` the index in `keys` and the value of each key present,
    /// in key order, borrowed from its leaf: one walk, which visits each
    /// node the keys' paths share once.
    pub(crate) fn lookup_each_from(
        &self,
        file: &CouchFile,
        root: Option<(u64, Arc<Node>)>,
        keys: &[&[u8]],
        found: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.check_sorted(keys.iter().copied())?;
        let Some((offset, node)) = root else {
            return Ok(());
        };
        // The root was checked against the whole range of keys, which
        // bounds nothing, when it was read.
        let visited = Visited {
            offset,
            node,
            range: KeyRange::ROOT,
        };
        self.lookup_node(file, visited, keys, 0, found)
    }

    fn lookup_node(
        &self,
        file: &CouchFile,
        visited: Visited<'_>,
        keys: &[&[u8]],
        first: usize,
        found: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let node = &visited.node;
        let mut rest = keys;
        let mut index = first;
        if node.is_leaf {
            // Each key's place, searched after the one before it.
            let mut i = 0;
            for key in rest {
                i += node.partition_point_from(i, |k| self.ops.compare(k, key) == Ordering::Less);
                if i < node.len() && self.ops.compare(node.key(i), key) == Ordering::Equal {
                    found(index, node.value(i))?;
                }
                index += 1;
            }
            return Ok(());
        }
        let mut i = 0;
        while !rest.is_empty() {
            // The child that may hold the next key, then the run of keys it
            // may hold (up to its key, its last).
            i += node.partition_point_from(i, |k| self.ops.compare(k, rest[0]) == Ordering::Less);
            if i == node.len() {
                break;
            }
            let n = rest.partition_point(|k| self.ops.compare(k, node.key(i)) != Ordering::Greater);
            let child = self.visit_child(file, &visited, i)?;
            self.lookup_node(file, child, &rest[..n], index, found)?;
            rest = &rest[n..];
            index += n;
            i += 1;
        }
        Ok(())
    }

    fn before_start(&self, key: &[u8], start: Bound<&[u8]>) -> bool {
        match start {
            Bound::Unbounded => false,
            Bound::Included(s) => self.ops.compare(key, s) == Ordering::Less,
            Bound::Excluded(s) => self.ops.compare(key, s) != Ordering::Greater,
        }
    }

    fn after_end(&self, key: &[u8], end: Bound<&[u8]>) -> bool {
        match end {
            Bound::Unbounded => false,
            Bound::Included(e) => self.ops.compare(key, e) == Ordering::Greater,
            Bound::Excluded(e) => self.ops.compare(key, e) != Ordering::Less,
        }
    }

    /// Calls `f` on every entry with a key between `start` and `end`, in key
    /// order, until it returns `Break`. Subtrees wholly before `start` are
    /// not read, nor anything after `end`.
    pub fn fold(
        &self,
        file: &CouchFile,
        root: Option<&NodePointer>,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        f: &mut EntryFn<'_>,
    ) -> Result<()> {
        if let Some(root) = root {
            // Break here means "stopped by f or past the end": either way, done.
            let _ = self.fold_node(file, root.pointer, KeyRange::ROOT, start, end, f)?;
        }
        Ok(())
    }

    fn fold_node(
        &self,
        file: &CouchFile,
        offset: u64,
        range: KeyRange<'_>,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        f: &mut EntryFn<'_>,
    ) -> Result<ControlFlow<()>> {
        let visited = self.visit(file, offset, range)?;
        let node = &visited.node;
        for i in 0..node.len() {
            let key = node.key(i);
            if node.is_leaf {
                if self.before_start(key, start) {
                    continue;
                }
                if self.after_end(key, end) {
                    return Ok(ControlFlow::Break(()));
                }
                if f(key, node.value(i))?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            } else {
                // Child i holds keys up to `key`: skip it if all are before start.
                if self.before_start(key, start) {
                    continue;
                }
                let (child, range) = visited.child_ref(file, i)?;
                if self
                    .fold_node(file, child.pointer, range, start, end, f)?
                    .is_break()
                {
                    return Ok(ControlFlow::Break(()));
                }
                if !self.after_end(key, end) {
                    continue;
                }
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// The reduce value of the entries with keys in `[start, end]`, using the
    /// stored reduces of subtrees that lie wholly inside the range, so only
    /// the nodes along the two edges are read.
    pub fn reduce_range(
        &self,
        file: &CouchFile,
        root: Option<&NodePointer>,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> Result<Vec<u8>> {
        let mut parts = Vec::new();
        if let Some(root) = root {
            if start == Bound::Unbounded && end == Bound::Unbounded {
                return Ok(root.reduce.clone());
            }
            self.reduce_node(file, root.pointer, KeyRange::ROOT, start, end, &mut parts)?;
        }
        self.ops
            .rereduce(&mut parts.iter().map(|p: &Vec<u8>| p.as_slice()))
    }

    fn reduce_node(
        &self,
        file: &CouchFile,
        offset: u64,
        range: KeyRange<'_>,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        parts: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        let visited = self.visit(file, offset, range)?;
        let node = &visited.node;
        if node.is_leaf {
            let mut inside = node
                .entries()
                .filter(|(k, _)| !self.before_start(k, start) && !self.after_end(k, end));
            parts.push(self.ops.reduce(&mut inside)?);
            return Ok(());
        }
        let mut lower: Option<&[u8]> = None; // keys of child i are > lower
        for i in 0..node.len() {
            let key = node.key(i);
            if self.before_start(key, start) {
                lower = Some(key);
                continue;
            }
            let (child, range) = visited.child(file, i)?;
            let starts_inside = match (start, lower) {
                (Bound::Unbounded, _) => true,
                (_, None) => false,
                (Bound::Included(s), Some(l)) => self.ops.compare(l, s) != Ordering::Less,
                (Bound::Excluded(s), Some(l)) => self.ops.compare(l, s) != Ordering::Less,
            };
            if starts_inside && !self.after_end(key, end) {
                parts.push(child.reduce);
            } else {
                self.reduce_node(file, child.pointer, range, start, end, parts)?;
            }
            if self.after_end(key, end) {
                break;
            }
            lower = Some(key);
        }
        Ok(())
    }

    /// A builder writing a new tree bottom-up from entries pushed in key order.
    pub fn builder(&self) -> Builder<'_, O> {
        Builder {
            tree: self,
            levels: vec![Collector::new(true, true, &self.config)],
            last_key: None,
        }
    }
}

/// Writes a tree from sorted input, filling nodes to two thirds of the
/// threshold as couchstore's compactor does. Made by [`BTree::builder`].
pub struct Builder<'t, O> {
    tree: &'t BTree<O>,
    /// Level 0 collects leaf entries; level n+1 the pointers of level n.
    levels: Vec<Collector>,
    last_key: Option<Vec<u8>>,
}

impl<O: TreeOps> Builder<'_, O> {
    /// Adds an entry; keys must be strictly ascending.
    pub fn push(&mut self, writer: &mut FileWriter, key: &[u8], value: &[u8]) -> Result<()> {
        if let Some(last) = &self.last_key {
            if self.tree.ops.compare(last, key) != Ordering::Less {
                return Err(Error::UnsortedOrDuplicate {
                    key: String::from_utf8_lossy(key).into_owned(),
                    index: 0,
                });
            }
        }
        let last = self.last_key.get_or_insert_with(Vec::new);
        last.clear();
        last.extend_from_slice(key);
        self.levels[0].push(&self.tree.ops, writer, key, value)?;
        self.promote(writer, 0)
    }

    /// Moves the pointers of nodes written at `level` up one level.
    fn promote(&mut self, writer: &mut dyn NodeSink, level: usize) -> Result<()> {
        if self.levels[level].written.is_empty() {
            return Ok(());
        }
        let written = std::mem::take(&mut self.levels[level].written);
        if self.levels.len() == level + 1 {
            self.levels
                .push(Collector::new(false, true, &self.tree.config));
        }
        for (key, p) in &written {
            self.levels[level + 1].push_pointer(&self.tree.ops, writer, key, p)?;
        }
        self.promote(writer, level + 1)
    }

    /// Writes what is left and returns the root (`None` if nothing was pushed).
    pub fn finish(mut self, writer: &mut FileWriter) -> Result<Option<NodePointer>> {
        let mut level = 0;
        while level < self.levels.len() {
            let n = self.levels[level].len();
            self.levels[level].flush(&self.tree.ops, writer, n)?;
            let is_top = level + 1 == self.levels.len();
            if is_top {
                let written = std::mem::take(&mut self.levels[level].written);
                return self.tree.finish_root(writer, written, true);
            }
            self.promote(writer, level)?;
            level += 1;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::node::Node;
    use crate::Local;
    use couchfile::{
        ChunkCache, FaultController, FaultKind, FaultRule, FaultyBackend, MemBackend, OpKind,
    };
    use std::sync::Arc;

    /// A tree of `n` keys `k00000`, `k00001`... (value `v1`) in nodes of
    /// `threshold` bytes, written through `w`; its root and keys.
    fn local_tree(
        w: &mut FileWriter,
        threshold: usize,
        n: u32,
    ) -> (BTree<Local>, NodePointer, Vec<Vec<u8>>) {
        let tree = BTree::new(
            Local,
            NodeConfig {
                leaf_threshold: threshold,
                interior_threshold: threshold,
            },
        );
        let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("k{i:05}").into_bytes()).collect();
        let inserts: Vec<Action<'_>> = keys
            .iter()
            .map(|key| Action {
                key,
                op: ActionOp::Insert(b"v1"),
            })
            .collect();
        let root = tree
            .modify(w, None, &inserts, &mut |_, _| Ok(()))
            .unwrap()
            .unwrap();
        (tree, root, keys)
    }

    /// A tree of 4,000 keys in small nodes on a fault-injecting backend, and
    /// a batch rewriting every other key: large enough to be shared out
    /// between two threads.
    fn large_tree_and_batch() -> (
        BTree<Local>,
        FileWriter,
        FaultController,
        NodePointer,
        Vec<Vec<u8>>,
    ) {
        let faults = FaultController::new();
        let backend = FaultyBackend::new(MemBackend::new(), faults.clone());
        let file = CouchFile::new(Arc::new(backend), "faulty.couch").unwrap();
        let mut w = FileWriter::create_without_header(file).unwrap();
        let (tree, root, keys) = local_tree(&mut w, 128, 4000);
        w.flush().unwrap();
        let batch = keys.iter().step_by(2).cloned().collect();
        (tree, w, faults, root, batch)
    }

    fn fetch_inserts(keys: &[Vec<u8>]) -> Vec<Action<'_>> {
        assert!(keys.len() >= PARALLEL_MODIFY_MIN_ACTIONS);
        keys.iter()
            .map(|key| Action {
                key,
                op: ActionOp::FetchInsert(b"v2"),
            })
            .collect()
    }

    #[test]
    fn a_modify_on_two_threads_reports_fetches_in_key_order() {
        let (tree, mut w, _, root, batch) = large_tree_and_batch();
        let mut fetched = Vec::new();
        let new = tree
            .modify(
                &mut w,
                Some(&root),
                &fetch_inserts(&batch),
                &mut |key, old| {
                    fetched.push((key.to_vec(), old.map(<[u8]>::to_vec)));
                    Ok(())
                },
            )
            .unwrap()
            .unwrap();
        let want: Vec<_> = batch
            .iter()
            .map(|k| (k.clone(), Some(b"v1".to_vec())))
            .collect();
        assert_eq!(fetched, want);
        w.flush().unwrap();
        let mut entries = Vec::new();
        tree.fold(
            w.file(),
            Some(&new),
            Bound::Unbounded,
            Bound::Unbounded,
            &mut |k, v| {
                entries.push((k.to_vec(), v.to_vec()));
                Ok(ControlFlow::Continue(()))
            },
        )
        .unwrap();
        assert_eq!(entries.len(), 4000);
        for (i, (key, value)) in entries.iter().enumerate() {
            assert_eq!(key, &format!("k{i:05}").into_bytes());
            let want: &[u8] = if i % 2 == 0 { b"v2" } else { b"v1" };
            assert_eq!(value, want, "key {i}");
        }
    }

    #[test]
    fn a_modify_with_parallel_modifies_off_does_not_wait_for_the_pools_threads() {
        let (mut tree, mut w, _, root, batch) = large_tree_and_batch();
        tree.set_parallel_modifies(false);
        let pool = modify_pool().expect("the modify pool starts in tests");
        // Every thread of the pool busy until the gate opens, as a long
        // modify of another tree would keep them.
        let threads = pool.current_num_threads();
        let gate = std::sync::RwLock::new(());
        let closed = gate.write().unwrap();
        let started = std::sync::Barrier::new(threads + 1);
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        pool.in_place_scope(|scope| {
            for _ in 0..threads {
                let (gate, started) = (&gate, &started);
                scope.spawn(move |_| {
                    started.wait();
                    drop(gate.read());
                });
            }
            started.wait();
            std::thread::scope(|s| {
                s.spawn(|| {
                    let actions = fetch_inserts(&batch);
                    let result = tree.modify(&mut w, Some(&root), &actions, &mut |_, _| Ok(()));
                    let _ = done.send(result.map(|r| r.is_some()));
                });
                let outcome = finished.recv_timeout(std::time::Duration::from_secs(30));
                drop(closed);
                assert!(
                    matches!(outcome, Ok(Ok(true))),
                    "the modify waited for the busy pool: {outcome:?}"
                );
            });
        });
    }

    #[test]
    fn a_modify_on_two_threads_returns_callback_read_and_write_errors() {
        let (tree, mut w, faults, root, batch) = large_tree_and_batch();
        let actions = fetch_inserts(&batch);

        // A fetch callback's error, from the last key (fetched by whichever
        // thread took the last run).
        let last = batch.last().unwrap().clone();
        let err = tree
            .modify(&mut w, Some(&root), &actions, &mut |key, _| {
                if key == last {
                    return Err(Error::InvalidArgument("refused".into()));
                }
                Ok(())
            })
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m == "refused"),
            "{err}"
        );

        // Reads failing in both threads.
        faults.inject(FaultRule::always(OpKind::Read, FaultKind::Eio));
        let err = tree
            .modify(&mut w, Some(&root), &actions, &mut |_, _| Ok(()))
            .unwrap_err();
        assert!(err.to_string().contains("Input/output error"), "{err}");
        faults.clear_faults();

        // Writes failing: values that do not compress, so that the shared
        // writer fills its buffer and writes during the modify.
        let noise: Vec<u8> = (0u32..1500)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let big: Vec<Action<'_>> = batch
            .iter()
            .map(|key| Action {
                key,
                op: ActionOp::Insert(&noise),
            })
            .collect();
        faults.inject(FaultRule::always(OpKind::Write, FaultKind::NoSpace));
        let err = tree
            .modify(&mut w, Some(&root), &big, &mut |_, _| Ok(()))
            .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
    }

    /// A writer on a new in-memory file with a chunk cache of `capacity`
    /// bytes, and the cache.
    fn cached_writer(capacity: u64) -> (Arc<ChunkCache>, FileWriter) {
        let cache = Arc::new(ChunkCache::new(capacity));
        let file = CouchFile::new(Arc::new(MemBackend::new()), "cached.couch")
            .unwrap()
            .with_cache(Arc::clone(&cache));
        (cache, FileWriter::new(file).unwrap())
    }

    #[test]
    fn lookups_reach_linked_children_without_the_cache_and_find_evicted_ones_again() {
        for capacity in [1 << 20, 4 << 10] {
            let (cache, mut w) = cached_writer(capacity);
            let (tree, root, keys) = local_tree(&mut w, 64, 600);
            w.flush().unwrap();
            let file = w.file().clone();
            let get = |key: &[u8]| {
                tree.lookup_one(&file, Some(&root), key, |v| v.to_vec())
                    .unwrap()
            };
            let all: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            for round in 0..2 {
                let (hits, misses) = cache.hits_and_misses();
                for key in &keys {
                    assert_eq!(get(key).as_deref(), Some(&b"v1"[..]));
                }
                assert_eq!(get(b"k99999"), None);
                let (h, m) = cache.hits_and_misses();
                if capacity == 1 << 20 && round == 1 {
                    // Every node is cached and linked from its parent:
                    // each lookup looks only the root up.
                    assert_eq!((h - hits, m - misses), (keys.len() as u64 + 1, 0));
                }
                let many = tree.lookup(&file, Some(&root), &all).unwrap();
                assert!(many.iter().all(|v| v.as_deref() == Some(&b"v1"[..])));
                let stats = cache.stats();
                assert!(stats.used <= stats.capacity, "{stats:?}");
            }
            if capacity < 1 << 20 {
                // Too small for the tree: children were evicted under
                // their links and read again.
                assert!(cache.stats().evictions > 0);
            }
        }
    }

    #[test]
    fn children_are_linked_only_through_a_handle_that_fills_the_cache_and_again_once_evicted() {
        let (cache, mut w) = cached_writer(1 << 20);
        let (tree, root, keys) = local_tree(&mut w, 64, 600);
        w.flush().unwrap();
        let file = w.file().clone();
        let mut below_root = Vec::new();
        let mut pending = vec![root.pointer];
        while let Some(offset) = pending.pop() {
            let node = Node::read(&file, offset).unwrap();
            if offset != root.pointer {
                below_root.push(offset);
            }
            if !node.is_leaf {
                for i in 0..node.len() {
                    pending.push(child_pointer(&file, offset, node.value(i)).unwrap().pointer);
                }
            }
        }
        // Every node but the root leaves the cache (and memory: nothing
        // else holds them).
        let evict = || {
            for &offset in &below_root {
                file.forget_cached_chunk(offset);
            }
        };
        evict();
        let round = |file: &CouchFile| {
            let before = cache.hits_and_misses();
            for key in &keys {
                let value = tree.lookup_one(file, Some(&root), key, |v| v.to_vec());
                assert_eq!(value.unwrap().as_deref(), Some(&b"v1"[..]));
            }
            let after = cache.hits_and_misses();
            (after.0 - before.0, after.1 - before.1)
        };
        // Read, not cached, not linked (a link to a node nobody holds
        // would be dead at once).
        round(&file.with_cache_fill(false));
        assert_eq!(cache.len(), 1);
        round(&file);
        // Every child linked by the filling handle: only roots looked up.
        assert_eq!(round(&file), (keys.len() as u64, 0));
        // Evicted under their links: read again, and linked again.
        evict();
        let (_, misses) = round(&file);
        assert_eq!(misses as usize, below_root.len());
        assert_eq!(round(&file), (keys.len() as u64, 0));
    }

    #[test]
    fn a_modify_drops_the_nodes_it_replaces_from_the_cache() {
        let (cache, mut w) = cached_writer(1 << 20);
        let (tree, old, keys) = local_tree(&mut w, 64, 60);
        let change = [Action {
            key: &keys[0],
            op: ActionOp::Insert(b"v2"),
        }];
        let new = tree
            .modify(&mut w, Some(&old), &change, &mut |_, _| Ok(()))
            .unwrap()
            .unwrap();
        w.flush().unwrap();
        let file = w.file().clone();
        let (hits, misses) = cache.hits_and_misses();

        // The new root is cached as written; the old one was dropped when
        // the change replaced it, and is read from the file again.
        let read = |offset| Node::read_ordered(&file, offset, tree.ops()).unwrap();
        let new_root = read(new.pointer);
        assert_eq!(cache.hits_and_misses(), (hits + 1, misses));
        let old_root = read(old.pointer);
        assert_eq!(cache.hits_and_misses(), (hits + 1, misses + 1));
        assert!(!new_root.is_leaf, "the test wants a tree of several levels");

        // The last child, untouched by the change, is shared by both trees
        // and still cached.
        let last = new_root.len() - 1;
        assert_eq!(new_root.value(last), old_root.value(last));
        let shared = child_pointer(&file, new.pointer, new_root.value(last)).unwrap();
        read(shared.pointer);
        assert_eq!(cache.hits_and_misses(), (hits + 2, misses + 1));
    }
}
