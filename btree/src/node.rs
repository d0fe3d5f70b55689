//! The node format: one snappy-compressed chunk holding a type byte
//! (1 = leaf, 0 = interior) and entries `kvlen(5) key value`.

use crate::error::{Error, Result};
use crate::tree::TreeOps;
use couchfile::{decode_kv_length, CouchFile};
use std::fmt;
use std::sync::Arc;

/// Type byte of a leaf (key-value) node.
pub const LEAF: u8 = 1;
/// Type byte of an interior (key-pointer) node.
pub const INTERIOR: u8 = 0;

/// A decoded node: its bytes (shared with the file's chunk cache) and where
/// each entry's key and value lie.
#[derive(Debug, Clone)]
pub struct Node {
    /// True for a leaf.
    pub is_leaf: bool,
    bytes: Arc<Vec<u8>>,
    /// (key start, key length, value length) of each entry.
    spans: Vec<(u32, u16, u32)>,
}

impl Node {
    /// Reads and decodes the node stored at `offset`, through the file's
    /// chunk cache if it has one.
    pub fn read(file: &CouchFile, offset: u64) -> Result<Self> {
        let bytes = file.read_cached_chunk(offset)?;
        Self::decode(bytes).map_err(|detail| Error::CorruptNode {
            path: file.path().to_path_buf(),
            offset,
            detail,
        })
    }

    /// Decodes node bytes (already decompressed).
    pub fn decode(bytes: impl Into<Arc<Vec<u8>>>) -> std::result::Result<Self, String> {
        let bytes: Arc<Vec<u8>> = bytes.into();
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
        Ok(Self {
            is_leaf,
            bytes,
            spans,
        })
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

    /// Entries as (key, value) pairs.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        (0..self.len()).map(|i| (self.key(i), self.value(i)))
    }

    /// Checks the node's keys against the order of its tree and the range
    /// its place in the tree gives it: strictly ascending by `ops`, the
    /// first above `low` and the last at most `high`. An interior node's key
    /// for a child is the child's last key, so child `i` of a node may hold
    /// keys above key `i - 1` (or above the node's own `low` for the first
    /// child) and at most key `i`; the root has neither bound. One
    /// comparison per key, each with the key before it.
    pub fn check_keys<O: TreeOps + ?Sized>(
        &self,
        ops: &O,
        low: Option<&[u8]>,
        high: Option<&[u8]>,
    ) -> std::result::Result<(), KeyOrderError> {
        let mut previous = low;
        for i in 0..self.len() {
            let key = self.key(i);
            if let Some(previous) = previous {
                if ops.compare(previous, key).is_ge() {
                    return Err(if i == 0 {
                        KeyOrderError::BelowRange
                    } else {
                        KeyOrderError::NotAscending { index: i }
                    });
                }
            }
            previous = Some(key);
        }
        match (previous, high) {
            (Some(last), Some(high)) if ops.compare(last, high).is_gt() => {
                Err(KeyOrderError::AboveRange {
                    index: self.len() - 1,
                })
            }
            _ => Ok(()),
        }
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
    fn bad_nodes_are_errors() {
        assert!(Node::decode(vec![]).is_err());
        assert!(Node::decode(vec![2]).is_err());
        assert!(Node::decode(vec![1]).is_err());
        assert!(Node::decode(vec![1, 0, 0x10, 0, 0, 1, b'k']).is_err());
        assert!(Node::decode(vec![1, 0, 0x10, 0, 0]).is_err());
    }
}
