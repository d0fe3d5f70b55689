//! The node format: one snappy-compressed chunk holding a type byte
//! (1 = leaf, 0 = interior) and entries `kvlen(5) key value`.

use crate::error::{Error, Result};
use crate::tree::TreeOps;
use couchfile::{decode_kv_length, CouchFile};
use parking_lot::Mutex;
use std::any::TypeId;
use std::fmt;
use std::sync::{Arc, Weak};

/// Type byte of a leaf (key-value) node.
pub const LEAF: u8 = 1;
/// Type byte of an interior (key-pointer) node.
pub const INTERIOR: u8 = 0;

/// A decoded node: its bytes and where each entry's key and value lie, so
/// a lookup binary-searches it without parsing it again. What the file's
/// chunk cache holds for a node.
#[derive(Debug)]
pub struct Node {
    /// True for a leaf.
    pub is_leaf: bool,
    bytes: Vec<u8>,
    /// (key start, key length, value length) of each entry.
    spans: Vec<(u32, u16, u32)>,
    /// An interior node's children as walks through it found them (see
    /// [`Node::link_child`]); empty for a leaf.
    children: Box<[Mutex<Weak<Node>>]>,
    /// The tree order (the [`TypeId`] of its [`TreeOps`]) the keys were
    /// found strictly ascending under, once checked or when written by
    /// this process.
    ascending_under: Option<TypeId>,
}

/// Bytes a node's index costs per entry, for the cache's weight.
const SPAN_BYTES: u64 = std::mem::size_of::<(u32, u16, u32)>() as u64;

/// Bytes an interior node's link to a child costs at most, for the cache's
/// weight: the link, and the allocation of a child it outlives.
const LINK_BYTES: u64 = (std::mem::size_of::<Mutex<Weak<Node>>>()
    + std::mem::size_of::<Node>()
    + 2 * std::mem::size_of::<usize>()) as u64;

/// The child links of a new node: one unset link per entry of an interior
/// node, none for a leaf.
fn no_links(is_leaf: bool, entries: usize) -> Box<[Mutex<Weak<Node>>]> {
    if is_leaf {
        Box::default()
    } else {
        (0..entries).map(|_| Mutex::new(Weak::new())).collect()
    }
}

impl Node {
    /// Reads and decodes the node stored at `offset`, bypassing the file's
    /// chunk cache and checking nothing beyond its encoding (for tools and
    /// tests that look at a node as it is stored).
    pub fn read(file: &CouchFile, offset: u64) -> Result<Self> {
        let bytes = file.read_compressed_chunk(offset)?;
        Self::decode(bytes).map_err(|detail| corrupt(file, offset, detail))
    }

    /// The node at `offset` of a tree ordered by `ops`, through the file's
    /// chunk cache: decoded and checked to hold strictly ascending keys
    /// once, when first read; after that a lookup in the cache, with no
    /// allocation.
    pub fn read_ordered<O: TreeOps + ?Sized>(
        file: &CouchFile,
        offset: u64,
        ops: &O,
    ) -> Result<Arc<Self>> {
        let order = TypeId::of::<O>();
        let node = file.read_decoded(offset, |bytes| -> Result<(Node, u64)> {
            let mut node = Self::decode(bytes).map_err(|detail| corrupt(file, offset, detail))?;
            node.check_ascending(ops)
                .map_err(|e| corrupt(file, offset, e.to_string()))?;
            node.ascending_under = Some(order);
            let weight = node.weight();
            Ok((node, weight))
        })?;
        if node.ascending_under != Some(order) {
            // Cached for a tree of another order (only a forged file shares
            // a node between trees): checked for this one each time.
            node.check_ascending(ops)
                .map_err(|e| corrupt(file, offset, e.to_string()))?;
        }
        Ok(node)
    }

    /// A node this process has just encoded into `bytes`, whose entries lie
    /// at `spans` (key start, key length, value length), in ascending order
    /// of the tree `order`: what a writer puts in the chunk cache.
    pub(crate) fn written(
        is_leaf: bool,
        bytes: &[u8],
        spans: impl Iterator<Item = (usize, usize, usize)>,
        order: TypeId,
    ) -> Self {
        // Within a chunk's 2^28 bytes, and keys and values within their
        // 12- and 28-bit lengths: every field fits.
        let spans: Vec<_> = spans
            .map(|(start, klen, vlen)| (start as u32, klen as u16, vlen as u32))
            .collect();
        Self {
            is_leaf,
            bytes: bytes.to_vec(),
            children: no_links(is_leaf, spans.len()),
            spans,
            ascending_under: Some(order),
        }
    }

    /// The bytes the node takes in memory, as a cache weighs it: its bytes,
    /// its index and, for an interior node, a link per child and what a
    /// link keeps of a child that has left the cache (its `Arc`'s
    /// allocation, not the node's contents).
    pub fn weight(&self) -> u64 {
        self.bytes.len() as u64
            + self.spans.len() as u64 * SPAN_BYTES
            + self.children.len() as u64 * LINK_BYTES
    }

    /// Child `i` of this interior node as a walk linked it
    /// ([`Node::link_child`]), if it is still in memory.
    pub(crate) fn linked_child(&self, i: usize) -> Option<Arc<Node>> {
        self.children.get(i)?.lock().upgrade()
    }

    /// Links `child`, read and checked through the file's chunk cache, as
    /// child `i` of this interior node, for later walks to go to it
    /// without the cache's lookup. A link holds the child weakly: a child
    /// the cache evicts is freed, and the walk that next reads it through
    /// the cache links it again.
    pub(crate) fn link_child(&self, i: usize, child: &Arc<Node>) {
        if let Some(slot) = self.children.get(i) {
            *slot.lock() = Arc::downgrade(child);
        }
    }

    /// The tree order (the [`TypeId`] of its [`TreeOps`]) the keys were
    /// found ascending under, if any.
    pub(crate) fn ascending_under(&self) -> Option<TypeId> {
        self.ascending_under
    }

    /// Decodes node bytes (already decompressed).
    pub fn decode(bytes: Vec<u8>) -> std::result::Result<Self, String> {
        let is_leaf = match bytes.first() {
            Some(&LEAF) => true,
            Some(&INTERIOR) => false,
            Some(t) => return Err(format!("node type byte {t}")),
            None => return Err("empty node".into()),
        };
        let mut spans = Vec::new();
        let mut pos = 1usize;
        while pos < bytes.len() {
            let (klen, vlen) = decode_kv_length(&bytes[pos..])
                .map_err(|_| "truncated entry length".to_string())?;
            let key_start = pos + 5;
            let end = key_start + klen + vlen;
            if end > bytes.len() {
                return Err(format!(
                    "entry at byte {pos} runs past the node ({end} > {})",
                    bytes.len()
                ));
            }
            // klen <= 4095 and vlen <= 2^28 by the 5-byte packing; key_start
            // fits u32 because a node is at most a 2^28-byte chunk.
            spans.push((key_start as u32, klen as u16, vlen as u32));
            pos = end;
        }
        if spans.is_empty() {
            return Err("node without entries".into());
        }
        // The cache weighs the index by its entries: it takes no more.
        spans.shrink_to_fit();
        Ok(Self {
            is_leaf,
            bytes,
            children: no_links(is_leaf, spans.len()),
            spans,
            ascending_under: None,
        })
    }

    /// Asks for every cache line a search of the node touches (its index
    /// and its bytes) at once: loads that depend on nothing, so that a
    /// node that is not in the processor's caches is fetched in one wait
    /// rather than one dependent miss after another as the binary search
    /// reaches each line. (A tenth of a point read's time, 2026-12-06.)
    pub(crate) fn touch(&self) {
        const LINE: usize = 64;
        let mut sum = 0u32;
        for span in self.spans.iter().step_by(LINE / SPAN_BYTES as usize) {
            sum = sum.wrapping_add(span.0);
        }
        for byte in self.bytes.iter().step_by(LINE) {
            sum = sum.wrapping_add(u32::from(*byte));
        }
        if let Some(last) = self.bytes.last() {
            sum = sum.wrapping_add(u32::from(*last));
        }
        // Only the loads matter: their sum is kept from being optimised
        // away.
        std::hint::black_box(sum);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when the node has no entries (never for a decoded node).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Key of entry `i`.
    pub fn key(&self, i: usize) -> &[u8] {
        let (start, klen, _) = self.spans[i];
        &self.bytes[start as usize..start as usize + klen as usize]
    }

    /// Value of entry `i`.
    pub fn value(&self, i: usize) -> &[u8] {
        let (start, klen, vlen) = self.spans[i];
        let v = start as usize + klen as usize;
        &self.bytes[v..v + vlen as usize]
    }

    /// The index of the first entry whose key `below` is false for, given
    /// that it is true for a prefix of the keys (as for sorted keys and a
    /// "less than" test): a binary search.
    pub fn partition_point(&self, below: impl FnMut(&[u8]) -> bool) -> usize {
        self.partition_point_from(0, below)
    }

    /// [`Node::partition_point`] among the entries from `start` on,
    /// relative to `start`.
    pub fn partition_point_from(
        &self,
        start: usize,
        mut below: impl FnMut(&[u8]) -> bool,
    ) -> usize {
        self.spans[start.min(self.spans.len())..].partition_point(|&(key_start, klen, _)| {
            below(&self.bytes[key_start as usize..key_start as usize + klen as usize])
        })
    }

    /// Entries as (key, value) pairs.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        (0..self.len()).map(|i| (self.key(i), self.value(i)))
    }

    /// Checks the node's keys against the order of its tree and the range
    /// its place in the tree gives it: strictly ascending by `ops`
    /// ([`Node::check_ascending`]), the first above `low` and the last at
    /// most `high` ([`Node::check_range`]).
    pub fn check_keys<O: TreeOps + ?Sized>(
        &self,
        ops: &O,
        low: Option<&[u8]>,
        high: Option<&[u8]>,
    ) -> std::result::Result<(), KeyOrderError> {
        self.check_ascending(ops)?;
        self.check_range(ops, low, high)
    }

    /// Checks that the keys are strictly ascending by `ops`: one comparison
    /// per key, each with the key before it.
    pub fn check_ascending<O: TreeOps + ?Sized>(
        &self,
        ops: &O,
    ) -> std::result::Result<(), KeyOrderError> {
        for i in 1..self.len() {
            if ops.compare(self.key(i - 1), self.key(i)).is_ge() {
                return Err(KeyOrderError::NotAscending { index: i });
            }
        }
        Ok(())
    }

    /// Checks the keys, known to be ascending, against the range the node's
    /// place in its tree gives it: an interior node's key for a child is
    /// the child's last key, so child `i` of a node may hold keys above key
    /// `i - 1` (or above the node's own `low` for the first child) and at
    /// most key `i`; the root has neither bound. Two comparisons.
    pub fn check_range<O: TreeOps + ?Sized>(
        &self,
        ops: &O,
        low: Option<&[u8]>,
        high: Option<&[u8]>,
    ) -> std::result::Result<(), KeyOrderError> {
        if let Some(low) = low {
            if ops.compare(low, self.key(0)).is_ge() {
                return Err(KeyOrderError::BelowRange);
            }
        }
        if let Some(high) = high {
            let last = self.len() - 1;
            if ops.compare(self.key(last), high).is_gt() {
                return Err(KeyOrderError::AboveRange { index: last });
            }
        }
        Ok(())
    }
}

/// The error of a node that cannot be decoded or is out of order.
fn corrupt(file: &CouchFile, offset: u64, detail: impl Into<String>) -> Error {
    Error::CorruptNode {
        path: file.path().to_path_buf(),
        offset,
        detail: detail.into(),
    }
}

/// How a node's keys break the order of its tree ([`Node::check_keys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrderError {
    /// Key `index` is not above the key before it in the node.
    NotAscending {
        /// The key's index in the node.
        index: usize,
    },
    /// The first key is not above the parent's key of the child before
    /// this one (or the parent's own lower bound): the node overlaps a
    /// subtree to its left.
    BelowRange,
    /// The last key is above the node's key in its parent (the greatest
    /// key the parent says the subtree holds).
    AboveRange {
        /// The key's index in the node (the last).
        index: usize,
    },
}

impl KeyOrderError {
    /// The index in the node of the key found out of order.
    pub fn index(&self) -> usize {
        match self {
            KeyOrderError::NotAscending { index } | KeyOrderError::AboveRange { index } => *index,
            KeyOrderError::BelowRange => 0,
        }
    }
}

impl fmt::Display for KeyOrderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOrderError::NotAscending { index } => write!(
                f,
                "keys out of order: key {index} is not above key {}",
                index.saturating_sub(1)
            ),
            KeyOrderError::BelowRange => {
                f.write_str("keys out of order: key 0 is not above the previous key of its parent")
            }
            KeyOrderError::AboveRange { index } => write!(
                f,
                "keys out of order: key {index} is above its key in the parent"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use couchfile::encode_kv_length;

    #[test]
    fn node_round_trip() {
        let entries: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"bb", b""), (b"", b"333")];
        let mut bytes = vec![LEAF];
        for (k, v) in &entries {
            bytes.extend_from_slice(&encode_kv_length(k.len(), v.len()).unwrap());
            bytes.extend_from_slice(k);
            bytes.extend_from_slice(v);
        }
        let node = Node::decode(bytes).unwrap();
        assert!(node.is_leaf);
        assert_eq!(node.entries().collect::<Vec<_>>(), entries);
    }

    #[test]
    fn check_keys_wants_ascending_keys_within_the_parents_range() {
        let node = |keys: &[&[u8]]| {
            let mut bytes = vec![LEAF];
            for k in keys {
                bytes.extend_from_slice(&encode_kv_length(k.len(), 0).unwrap());
                bytes.extend_from_slice(k);
            }
            Node::decode(bytes).unwrap()
        };
        let ops = crate::Local;
        let good = node(&[b"b", b"c", b"e"]);
        assert_eq!(good.check_keys(&ops, None, None), Ok(()));
        assert_eq!(good.check_keys(&ops, Some(b"a"), Some(b"e")), Ok(()));
        assert_eq!(
            good.check_keys(&ops, Some(b"b"), None),
            Err(KeyOrderError::BelowRange)
        );
        assert_eq!(
            good.check_keys(&ops, None, Some(b"d")),
            Err(KeyOrderError::AboveRange { index: 2 })
        );
        let repeated = node(&[b"b", b"b"]);
        assert_eq!(
            repeated.check_keys(&ops, None, None),
            Err(KeyOrderError::NotAscending { index: 1 })
        );
        let reversed = node(&[b"c", b"a"]);
        let e = reversed.check_keys(&ops, None, None).unwrap_err();
        assert_eq!(e.index(), 1);
        assert!(e.to_string().contains("key 1 is not above key 0"), "{e}");
        // By seq, keys compare as numbers.
        let seqs = node(&[&[0, 0, 0, 0, 0, 9], &[0, 0, 0, 0, 1, 0]]);
        assert_eq!(seqs.check_keys(&crate::BySeq, None, None), Ok(()));
    }

    #[test]
    fn a_cached_node_is_checked_again_for_a_tree_of_another_order() {
        use couchfile::{ChunkCache, DbHeader, FileWriter, MemBackend};
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let file = CouchFile::new(Arc::new(MemBackend::new()), "forged.couch")
            .unwrap()
            .with_cache(Arc::clone(&cache));
        let (mut w, _) = FileWriter::create(file, &DbHeader::new(14)).unwrap();
        // Ascending as bytes ("ab" < "b"), not as by-seq numbers.
        let mut bytes = vec![LEAF];
        for k in [&b"ab"[..], b"b"] {
            bytes.extend_from_slice(&encode_kv_length(k.len(), 0).unwrap());
            bytes.extend_from_slice(k);
        }
        let offset = w.append_compressed_chunk(&bytes).unwrap().offset;
        w.flush().unwrap();
        let file = w.file().clone();
        let node = Node::read_ordered(&file, offset, &crate::ById).unwrap();
        assert_eq!(node.len(), 2);
        assert_eq!(cache.len(), 1);
        // Cached, but checked for the by-id order only.
        let e = Node::read_ordered(&file, offset, &crate::BySeq).unwrap_err();
        assert!(e.to_string().contains("not above key 0"), "{e}");
        assert!(Node::read_ordered(&file, offset, &crate::ById).is_ok());
    }

    #[test]
    fn bad_nodes_are_errors() {
        assert!(Node::decode(vec![]).is_err());
        assert!(Node::decode(vec![2]).is_err());
        assert!(Node::decode(vec![1]).is_err());
        assert!(Node::decode(vec![1, 0, 0x10, 0, 0, 1, b'k']).is_err());
        assert!(Node::decode(vec![1, 0, 0x10, 0, 0]).is_err());
    }
}
