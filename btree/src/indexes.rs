//! The three trees of a couchstore file: key orders and reduces.

use crate::error::{Error, Result};
use crate::tree::TreeOps;
use std::cmp::Ordering;

fn uint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

fn put(out: &mut Vec<u8>, value: u64, n: usize) {
    out.extend_from_slice(&value.to_be_bytes()[8 - n..]);
}

fn bad_reduce(what: &'static str, detail: String) -> Error {
    Error::File(couchfile::Error::Malformed { what, detail })
}

/// The by-id reduce: live and deleted document counts and the total
/// physical size of their bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdReduce {
    /// Documents not deleted (40 bits).
    pub live: u64,
    /// Deleted documents (40 bits).
    pub deleted: u64,
    /// Sum of `physical_size` (48 bits).
    pub size: u64,
}

impl IdReduce {
    /// Encodes as `u40 live, u40 deleted, u48 size`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        put(&mut out, self.live, 5);
        put(&mut out, self.deleted, 5);
        put(&mut out, self.size, 6);
        out
    }

    /// Decodes a 16-byte by-id reduce.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 16 {
            return Err(bad_reduce(
                "by-id reduce",
                format!("{} bytes, expected 16", bytes.len()),
            ));
        }
        Ok(Self {
            live: uint(&bytes[0..5]),
            deleted: uint(&bytes[5..10]),
            size: uint(&bytes[10..16]),
        })
    }
}

/// Key order and reduce of the by-id tree: keys compare as bytes (a shorter
/// prefix first), reduce is [`IdReduce`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ById;

/// The byte-wise order of two keys, as `a.cmp(b)`, with the first eight
/// bytes compared as one big-endian word first: most comparisons of a
/// search end there, without a call to `memcmp` (the largest share of a
/// point read's time before, 2026-12-06).
#[inline]
pub(crate) fn compare_bytes(a: &[u8], b: &[u8]) -> Ordering {
    if let (Some(a8), Some(b8)) = (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        let (x, y) = (u64::from_be_bytes(*a8), u64::from_be_bytes(*b8));
        if x != y {
            return x.cmp(&y);
        }
    }
    a.cmp(b)
}

impl TreeOps for ById {
    fn compare(&self, a: &[u8], b: &[u8]) -> Ordering {
        compare_bytes(a, b)
    }

    fn reduce(&self, entries: &mut dyn Iterator<Item = (&[u8], &[u8])>) -> Result<Vec<u8>> {
        let mut r = IdReduce::default();
        for (_, value) in entries {
            if value.len() < 23 {
                return Err(bad_reduce(
                    "by-id value",
                    format!("{} bytes, expected at least 23", value.len()),
                ));
            }
            if value[10] & 0x80 != 0 {
                r.deleted += 1;
            } else {
                r.live += 1;
            }
            r.size += uint(&value[6..10]);
        }
        Ok(r.encode())
    }

    fn rereduce(&self, reduces: &mut dyn Iterator<Item = &[u8]>) -> Result<Vec<u8>> {
        let mut total = IdReduce::default();
        for bytes in reduces {
            let r = IdReduce::decode(bytes)?;
            total.live += r.live;
            total.deleted += r.deleted;
            total.size += r.size;
        }
        Ok(total.encode())
    }
}

/// Key order and reduce of the by-seq tree: keys are 48-bit big-endian
/// sequence numbers; the reduce is the count of entries (`u40`).
#[derive(Debug, Clone, Copy, Default)]
pub struct BySeq;

/// Decodes a by-seq reduce (the entry count).
pub fn decode_seq_reduce(bytes: &[u8]) -> Result<u64> {
    if bytes.len() != 5 {
        return Err(bad_reduce(
            "by-seq reduce",
            format!("{} bytes, expected 5", bytes.len()),
        ));
    }
    Ok(uint(bytes))
}

fn encode_seq_reduce(count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(5);
    put(&mut out, count, 5);
    out
}

impl TreeOps for BySeq {
    fn compare(&self, a: &[u8], b: &[u8]) -> Ordering {
        // Keys are 6 bytes; a wrong length still orders deterministically.
        uint(a).cmp(&uint(b)).then(a.len().cmp(&b.len()))
    }

    fn reduce(&self, entries: &mut dyn Iterator<Item = (&[u8], &[u8])>) -> Result<Vec<u8>> {
        Ok(encode_seq_reduce(entries.count() as u64))
    }

    fn rereduce(&self, reduces: &mut dyn Iterator<Item = &[u8]>) -> Result<Vec<u8>> {
        let mut total = 0;
        for r in reduces {
            total += decode_seq_reduce(r)?;
        }
        Ok(encode_seq_reduce(total))
    }
}

/// Key order of the local-documents tree (bytes); it has no reduce.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl TreeOps for Local {
    fn compare(&self, a: &[u8], b: &[u8]) -> Ordering {
        compare_bytes(a, b)
    }

    fn reduce(&self, _: &mut dyn Iterator<Item = (&[u8], &[u8])>) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    fn rereduce(&self, _: &mut dyn Iterator<Item = &[u8]>) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::compare_bytes;
    use proptest::prelude::*;

    proptest! {
        /// The word-first comparison is the byte-wise order, for keys of
        /// any length, sharing prefixes or not.
        #[test]
        fn compare_bytes_is_the_byte_order(
            a in proptest::collection::vec(0u8..4, 0..20),
            b in proptest::collection::vec(0u8..4, 0..20),
            shared in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let (a, b) = ([&shared[..], &a].concat(), [&shared[..], &b].concat());
            prop_assert_eq!(compare_bytes(&a, &b), a.cmp(&b));
        }
    }
}
