//! The copy-on-write B+tree: batch modification, lookups, folds, range
//! reduces and the bottom-up builder, generic over key order and reduce.

use crate::error::{Error, Result};
use crate::node::{Node, INTERIOR, LEAF};
use couchfile::{encode_kv_length, CouchFile, FileWriter, NodePointer, NodePointerRef};
use std::cmp::Ordering;
use std::ops::{Bound, ControlFlow};

/// What makes one tree differ from another: how keys sort and how a
/// subtree's reduce value is computed.
pub trait TreeOps {
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

/// One operation of a batch on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionOp<'a> {
    /// Report the current value (or its absence) through the callback.
    Fetch,
    /// Remove the key if present.
    Remove,
    /// Insert or replace the value.
    Insert(&'a [u8]),
    /// Report the current value, then insert or replace it.
    FetchInsert(&'a [u8]),
}

/// An action on a key. A batch is sorted by key with each key at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        w: &mut FileWriter,
        key: &[u8],
        value: &[u8],
    ) -> Result<()> {
        self.push_entry(ops, w, key, value.len(), |encoded| {
            encoded.extend_from_slice(value);
            Ok(())
        })
    }

    fn push_pointer<O: TreeOps + ?Sized>(
        &mut self,
        ops: &O,
        w: &mut FileWriter,
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
        w: &mut FileWriter,
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
    fn cut_if_full<O: TreeOps + ?Sized>(&mut self, ops: &O, w: &mut FileWriter) -> Result<()> {
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
    fn flush<O: TreeOps + ?Sized>(&mut self, ops: &O, w: &mut FileWriter, n: usize) -> Result<()> {
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
        let pos = w.append_cached_chunk(&self.encoded[..end])?;
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
        w: &mut FileWriter,
    ) -> Result<Vec<(Vec<u8>, NodePointer)>> {
        self.flush(ops, w, self.len())?;
        Ok(self.written)
    }
}

/// What modifying a subtree did.
enum Outcome {
    /// Nothing changed: the old pointer stands.
    Unchanged,
    /// The subtree was rewritten into these nodes (none if it became empty).
    Replaced(Vec<(Vec<u8>, NodePointer)>),
}

/// Decodes the pointer to a child of the interior node at `parent`. Children
/// are always written before their parent, so a pointer that is not below
/// the parent's offset is corrupt (and could loop forever).
fn child_pointer(file: &CouchFile, parent: u64, value: &[u8]) -> Result<NodePointer> {
    let child =
        NodePointer::decode_kp_value(value).map_err(|e| corrupt(file, parent, e.to_string()))?;
    if child.pointer >= parent {
        return Err(corrupt(
            file,
            parent,
            format!("child pointer {} is not before its parent", child.pointer),
        ));
    }
    Ok(child)
}

/// A B+tree in one file, described by its [`TreeOps`] and [`NodeConfig`].
/// The tree itself is a root pointer; operations take the root and return
/// the new one, never changing a node in place.
#[derive(Debug, Clone)]
pub struct BTree<O> {
    ops: O,
    config: NodeConfig,
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
        Self { ops, config }
    }

    /// The tree's key order and reduce.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The tree's node size rules.
    pub fn config(&self) -> NodeConfig {
        self.config
    }

    /// Checks that `actions` are sorted and unique.
    fn check_sorted(&self, actions: &[Action<'_>]) -> Result<()> {
        for (i, pair) in actions.windows(2).enumerate() {
            if self.ops.compare(pair[0].key, pair[1].key) != Ordering::Less {
                return Err(Error::UnsortedOrDuplicate {
                    key: String::from_utf8_lossy(pair[1].key).into_owned(),
                    index: i + 1,
                });
            }
        }
        Ok(())
    }

    /// Applies a sorted batch of actions in one pass and returns the new root
    /// (`None` for an empty tree). `fetched` is called, in key order, with
    /// the old value (or `None`) of every [`ActionOp::Fetch`] and
    /// [`ActionOp::FetchInsert`] key. Nodes that do not change are shared
    /// with the old tree; new ones are appended through `writer` and are
    /// readable through `writer.file()` once the writer has flushed.
    pub fn modify(
        &self,
        writer: &mut FileWriter,
        root: Option<&NodePointer>,
        actions: &[Action<'_>],
        fetched: &mut FetchFn<'_>,
    ) -> Result<Option<NodePointer>> {
        self.check_sorted(actions)?;
        if actions.is_empty() {
            return Ok(root.cloned());
        }
        // Old nodes are read through the file: make all of them readable.
        writer.flush()?;
        let file = writer.file().clone();
        let outcome = match root {
            Some(root) => self.modify_node(&file, writer, root, actions, fetched)?,
            None => self.modify_leaf(writer, None, actions, fetched)?,
        };
        match outcome {
            Outcome::Unchanged => Ok(root.cloned()),
            Outcome::Replaced(pointers) => self.finish_root(writer, pointers, false),
        }
    }

    /// Packs a level of pointers into interior nodes until one remains.
    fn finish_root(
        &self,
        writer: &mut FileWriter,
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

    fn modify_node(
        &self,
        file: &CouchFile,
        writer: &mut FileWriter,
        ptr: &NodePointer,
        actions: &[Action<'_>],
        fetched: &mut FetchFn<'_>,
    ) -> Result<Outcome> {
        let node = Node::read(file, ptr.pointer)?;
        if node.is_leaf {
            let outcome = self.modify_leaf(writer, Some(&node), actions, fetched)?;
            if matches!(outcome, Outcome::Replaced(_)) {
                file.forget_cached_chunk(ptr.pointer);
            }
            return Ok(outcome);
        }
        // Hand each child the run of actions up to its key; the last child
        // takes whatever is left.
        let mut results: Vec<(usize, Outcome)> = Vec::new();
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
            let child = child_pointer(file, ptr.pointer, node.value(i))?;
            let outcome = self.modify_node(file, writer, &child, &rest[..n], fetched)?;
            results.push((i, outcome));
            rest = &rest[n..];
        }
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

    fn modify_leaf(
        &self,
        writer: &mut FileWriter,
        node: Option<&Node>,
        actions: &[Action<'_>],
        fetched: &mut FetchFn<'_>,
    ) -> Result<Outcome> {
        let old: Vec<(&[u8], &[u8])> = node.map(|n| n.entries().collect()).unwrap_or_default();
        let mut merged: Vec<(&[u8], &[u8])> = Vec::with_capacity(old.len() + actions.len());
        let mut modified = false;
        let mut i = 0;
        for action in actions {
            while i < old.len() && self.ops.compare(old[i].0, action.key) == Ordering::Less {
                merged.push(old[i]);
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
                        merged.push((action.key, v));
                    }
                }
                ActionOp::Remove => modified |= current.is_some(),
                ActionOp::Insert(v) => {
                    merged.push((action.key, v));
                    modified = true;
                }
                ActionOp::FetchInsert(v) => {
                    fetched(action.key, current)?;
                    merged.push((action.key, v));
                    modified = true;
                }
            }
        }
        merged.extend_from_slice(&old[i..]);
        if !modified {
            return Ok(Outcome::Unchanged);
        }
        let mut out = Collector::new(true, false, &self.config);
        for (k, v) in merged {
            out.push(&self.ops, writer, k, v)?;
        }
        Ok(Outcome::Replaced(out.finish(&self.ops, writer)?))
    }

    /// Looks up sorted, unique `keys`; returns their values in the same order.
    pub fn lookup(
        &self,
        file: &CouchFile,
        root: Option<&NodePointer>,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let actions: Vec<Action<'_>> = keys
            .iter()
            .map(|&key| Action {
                key,
                op: ActionOp::Fetch,
            })
            .collect();
        self.check_sorted(&actions)?;
        let mut found = vec![None; keys.len()];
        if let Some(root) = root {
            self.lookup_node(file, root.pointer, keys, 0, &mut found)?;
        }
        Ok(found)
    }

    fn lookup_node(
        &self,
        file: &CouchFile,
        offset: u64,
        keys: &[&[u8]],
        first: usize,
        found: &mut [Option<Vec<u8>>],
    ) -> Result<()> {
        let node = Node::read(file, offset)?;
        let mut rest = keys;
        let mut index = first;
        if node.is_leaf {
            let mut i = 0;
            for key in rest {
                while i < node.len() && self.ops.compare(node.key(i), key) == Ordering::Less {
                    i += 1;
                }
                if i < node.len() && self.ops.compare(node.key(i), key) == Ordering::Equal {
                    found[index] = Some(node.value(i).to_vec());
                }
                index += 1;
            }
            return Ok(());
        }
        for i in 0..node.len() {
            let n = rest
                .iter()
                .take_while(|k| self.ops.compare(k, node.key(i)) != Ordering::Greater)
                .count();
            if n > 0 {
                let child = child_pointer(file, offset, node.value(i))?;
                self.lookup_node(file, child.pointer, &rest[..n], index, found)?;
                rest = &rest[n..];
                index += n;
            }
            if rest.is_empty() {
                break;
            }
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
            let _ = self.fold_node(file, root.pointer, start, end, f)?;
        }
        Ok(())
    }

    fn fold_node(
        &self,
        file: &CouchFile,
        offset: u64,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        f: &mut EntryFn<'_>,
    ) -> Result<ControlFlow<()>> {
        let node = Node::read(file, offset)?;
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
                let child = child_pointer(file, offset, node.value(i))?;
                if self
                    .fold_node(file, child.pointer, start, end, f)?
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
            self.reduce_node(file, root.pointer, start, end, &mut parts)?;
        }
        self.ops
            .rereduce(&mut parts.iter().map(|p: &Vec<u8>| p.as_slice()))
    }

    fn reduce_node(
        &self,
        file: &CouchFile,
        offset: u64,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        parts: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        let node = Node::read(file, offset)?;
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
            let child = child_pointer(file, offset, node.value(i))?;
            let starts_inside = match (start, lower) {
                (Bound::Unbounded, _) => true,
                (_, None) => false,
                (Bound::Included(s), Some(l)) => self.ops.compare(l, s) != Ordering::Less,
                (Bound::Excluded(s), Some(l)) => self.ops.compare(l, s) != Ordering::Less,
            };
            if starts_inside && !self.after_end(key, end) {
                parts.push(child.reduce);
            } else {
                self.reduce_node(file, child.pointer, start, end, parts)?;
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
    fn promote(&mut self, writer: &mut FileWriter, level: usize) -> Result<()> {
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
    use couchfile::{ChunkCache, MemBackend};
    use std::sync::Arc;

    #[test]
    fn a_modify_drops_the_nodes_it_replaces_from_the_cache() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let file = CouchFile::new(Arc::new(MemBackend::new()), "cached.couch")
            .unwrap()
            .with_cache(Arc::clone(&cache));
        let mut w = FileWriter::new(file).unwrap();
        let tree = BTree::new(
            Local,
            NodeConfig {
                leaf_threshold: 64,
                interior_threshold: 64,
            },
        );
        let keys: Vec<Vec<u8>> = (0..60u32)
            .map(|i| format!("k{i:03}").into_bytes())
            .collect();
        let inserts: Vec<Action<'_>> = keys
            .iter()
            .map(|key| Action {
                key,
                op: ActionOp::Insert(b"v1"),
            })
            .collect();
        let old = tree
            .modify(&mut w, None, &inserts, &mut |_, _| Ok(()))
            .unwrap()
            .unwrap();
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
        let new_root = Node::read(&file, new.pointer).unwrap();
        assert_eq!(cache.hits_and_misses(), (hits + 1, misses));
        let old_root = Node::read(&file, old.pointer).unwrap();
        assert_eq!(cache.hits_and_misses(), (hits + 1, misses + 1));
        assert!(!new_root.is_leaf, "the test wants a tree of several levels");

        // The last child, untouched by the change, is shared by both trees
        // and still cached.
        let last = new_root.len() - 1;
        assert_eq!(new_root.value(last), old_root.value(last));
        let shared = child_pointer(&file, new.pointer, new_root.value(last)).unwrap();
        Node::read(&file, shared.pointer).unwrap();
        assert_eq!(cache.hits_and_misses(), (hits + 2, misses + 1));
    }
}
