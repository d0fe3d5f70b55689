//! Codecs for the structures stored inside chunks: the database header, root
//! and node pointers, the by-id and by-seq index values, and kv-engine's
//! rev_meta. All integers are big-endian; decoders never trust a length they
//! read and return [`Error::Malformed`] on anything that does not fit.

use crate::error::{Error, Result};

/// Largest key a B-tree node can hold (12-bit length).
pub const MAX_KEY_LEN: usize = 0xFFF;
/// Largest value a B-tree node can hold (28-bit length).
pub const MAX_VALUE_LEN: usize = 0x0FFF_FFFF;
/// Largest value of a 48-bit field.
pub const MAX_U48: u64 = (1 << 48) - 1;
/// Largest body offset (47 bits; bit 47 of the field is the deleted flag).
pub const MAX_BODY_OFFSET: u64 = (1 << 47) - 1;
/// `prev_header_pos` of a file's first header (`NO_PREV_HEADER_POS`).
pub const NO_PREV_HEADER_POS: u64 = (1 << 47) - 1;
/// The disk version this crate writes.
pub const CURRENT_DISK_VERSION: u8 = 14;
/// The oldest disk version this crate reads.
pub const OLDEST_DISK_VERSION: u8 = 11;

/// Reads a big-endian unsigned integer of at most 8 bytes.
#[inline]
fn be(bytes: &[u8]) -> u64 {
    // One word load, where a byte-at-a-time fold costs three instructions a
    // byte: the document info of every point read has five of these.
    let mut word = [0u8; 8];
    let n = bytes.len().min(8);
    word[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(word)
}

/// A cursor over a byte slice whose reads fail with `Malformed` instead of
/// panicking when the slice runs out.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(Error::malformed(
                self.what,
                format!("needs {n} more bytes, {} left", self.bytes.len()),
            ));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    #[inline]
    fn uint(&mut self, n: usize) -> Result<u64> {
        Ok(be(self.take(n)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

fn put_uint(out: &mut Vec<u8>, value: u64, n: usize) {
    out.extend_from_slice(&value.to_be_bytes()[8 - n..]);
}

fn check_fits(what: &str, value: u64, max: u64) -> Result<()> {
    if value > max {
        return Err(Error::InvalidArgument(format!(
            "{what} {value} does not fit (max {max})"
        )));
    }
    Ok(())
}

/// Encodes a 48-bit big-endian integer.
pub fn encode_u48(value: u64) -> [u8; 6] {
    let b = value.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Decodes a 48-bit big-endian integer from the first 6 bytes of `bytes`.
pub fn decode_u48(bytes: &[u8]) -> Result<u64> {
    Reader::new(bytes, "48-bit integer").uint(6)
}

/// Encodes a sequence number as a by-seq key (6 bytes, big-endian).
pub fn encode_seq_key(seq: u64) -> Result<[u8; 6]> {
    check_fits("sequence number", seq, MAX_U48)?;
    Ok(encode_u48(seq))
}

/// Decodes a by-seq key; it must be exactly 6 bytes.
pub fn decode_seq_key(key: &[u8]) -> Result<u64> {
    if key.len() != 6 {
        return Err(Error::malformed(
            "by-seq key",
            format!("{} bytes, expected 6", key.len()),
        ));
    }
    decode_u48(key)
}

/// Packs a key length (12 bits) and value length (28 bits) into 5 bytes, as
/// node entries and by-seq values do.
pub fn encode_kv_length(key_len: usize, value_len: usize) -> Result<[u8; 5]> {
    check_fits("key length", key_len as u64, MAX_KEY_LEN as u64)?;
    check_fits("value length", value_len as u64, MAX_VALUE_LEN as u64)?;
    let packed = ((key_len as u64) << 28) | value_len as u64;
    let b = packed.to_be_bytes();
    Ok([b[3], b[4], b[5], b[6], b[7]])
}

/// Unpacks 5 bytes into (key length, value length).
pub fn decode_kv_length(bytes: &[u8]) -> Result<(usize, usize)> {
    let packed = Reader::new(bytes, "kv length").uint(5)?;
    Ok(((packed >> 28) as usize, (packed & 0x0FFF_FFFF) as usize))
}

/// A pointer to a B-tree node: where it is, the bytes of its subtree, and
/// its reduce value. Stored in the header (as a root) and in interior nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodePointer {
    /// Stored offset of the node's chunk.
    pub pointer: u64,
    /// Disk size of the node and all its descendants.
    pub subtree_size: u64,
    /// The reduce value of the subtree (format depends on the tree).
    pub reduce: Vec<u8>,
}

impl NodePointer {
    /// Encodes as a root in a header: `u48 pointer, u48 subtree size, reduce`.
    pub fn encode_root(&self, out: &mut Vec<u8>) -> Result<()> {
        check_fits("node pointer", self.pointer, MAX_U48)?;
        check_fits("subtree size", self.subtree_size, MAX_U48)?;
        put_uint(out, self.pointer, 6);
        put_uint(out, self.subtree_size, 6);
        out.extend_from_slice(&self.reduce);
        Ok(())
    }

    /// Length of [`NodePointer::encode_root`]'s output.
    pub fn root_len(&self) -> usize {
        12 + self.reduce.len()
    }

    /// Decodes a root as stored in a header (the whole slice is the root).
    pub fn decode_root(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "root pointer");
        let pointer = r.uint(6)?;
        let subtree_size = r.uint(6)?;
        Ok(Self {
            pointer,
            subtree_size,
            reduce: r.rest().to_vec(),
        })
    }

    /// Encodes as an interior-node value:
    /// `u48 pointer, u48 subtree size, u16 reduce length, reduce`.
    pub fn encode_kp_value(&self, out: &mut Vec<u8>) -> Result<()> {
        check_fits(
            "reduce length",
            self.reduce.len() as u64,
            u64::from(u16::MAX),
        )?;
        check_fits("node pointer", self.pointer, MAX_U48)?;
        check_fits("subtree size", self.subtree_size, MAX_U48)?;
        put_uint(out, self.pointer, 6);
        put_uint(out, self.subtree_size, 6);
        put_uint(out, self.reduce.len() as u64, 2);
        out.extend_from_slice(&self.reduce);
        Ok(())
    }

    /// Decodes an interior-node value; the slice must be exactly one pointer.
    pub fn decode_kp_value(bytes: &[u8]) -> Result<Self> {
        Ok(NodePointerRef::decode_kp_value(bytes)?.to_owned())
    }
}

/// A [`NodePointer`] borrowing its reduce from the bytes it was decoded
/// from: what a walk over an interior node's entries reads without
/// allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePointerRef<'a> {
    /// Stored offset of the node's chunk.
    pub pointer: u64,
    /// Disk size of the node and all its descendants.
    pub subtree_size: u64,
    /// The subtree's reduce value.
    pub reduce: &'a [u8],
}

impl<'a> NodePointerRef<'a> {
    /// Decodes an interior-node value; the slice must be exactly one pointer.
    pub fn decode_kp_value(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "node pointer");
        let pointer = r.uint(6)?;
        let subtree_size = r.uint(6)?;
        let reduce_len = r.uint(2)? as usize;
        let reduce = r.take(reduce_len)?;
        if !r.rest().is_empty() {
            return Err(Error::malformed(
                "node pointer",
                "trailing bytes after the reduce value",
            ));
        }
        Ok(Self {
            pointer,
            subtree_size,
            reduce,
        })
    }

    /// The child offset of an interior-node value, checked as
    /// [`NodePointerRef::decode_kp_value`] checks the value, without
    /// decoding the rest: all a point lookup needs of each level.
    pub fn decode_pointer(bytes: &[u8]) -> Result<u64> {
        if let Some((head, reduce)) = bytes.split_first_chunk::<14>() {
            if reduce.len() == usize::from(u16::from_be_bytes([head[12], head[13]])) {
                return Ok(be(&head[..6]));
            }
        }
        // Malformed: the full decode says how.
        NodePointerRef::decode_kp_value(bytes).map(|pointer| pointer.pointer)
    }

    /// The owned pointer.
    pub fn to_owned(&self) -> NodePointer {
        NodePointer {
            pointer: self.pointer,
            subtree_size: self.subtree_size,
            reduce: self.reduce.to_vec(),
        }
    }
}

/// The database header: the roots of the three trees and the file's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbHeader {
    /// Disk version, 11 to 14.
    pub disk_version: u8,
    /// The last assigned sequence number.
    pub update_seq: u64,
    /// Highest sequence number purged by compaction.
    pub purge_seq: u64,
    /// Unused by couchstore (0), kept and copied.
    pub purge_ptr: u64,
    /// Commit timestamp (ns since the epoch by default); 0 before version 13.
    pub timestamp: u64,
    /// Offset of the previous header (version 14); `None` for the first
    /// header of a file or where the version has no such field. A hint only.
    pub prev_header_pos: Option<u64>,
    /// Version 14: the file starts with an encryption metadata header.
    pub has_metadata_header: bool,
    /// Root of the by-sequence tree.
    pub by_seq_root: Option<NodePointer>,
    /// Root of the by-id tree.
    pub by_id_root: Option<NodePointer>,
    /// Root of the local-documents tree.
    pub local_root: Option<NodePointer>,
}

impl Default for DbHeader {
    fn default() -> Self {
        Self::new(CURRENT_DISK_VERSION)
    }
}

impl DbHeader {
    /// The header of an empty file of `disk_version`.
    pub fn new(disk_version: u8) -> Self {
        Self {
            disk_version,
            update_seq: 0,
            purge_seq: 0,
            purge_ptr: 0,
            timestamp: 0,
            prev_header_pos: None,
            has_metadata_header: false,
            by_seq_root: None,
            by_id_root: None,
            local_root: None,
        }
    }

    /// Bytes of the fixed part of a header of `disk_version`.
    pub fn fixed_len(disk_version: u8) -> usize {
        match disk_version {
            0..=12 => 25,
            13 => 33,
            _ => 39,
        }
    }

    /// Encodes the header body.
    pub fn encode(&self) -> Result<Vec<u8>> {
        if !(OLDEST_DISK_VERSION..=CURRENT_DISK_VERSION).contains(&self.disk_version) {
            return Err(Error::InvalidArgument(format!(
                "disk version {} is not writable (11 to 14)",
                self.disk_version
            )));
        }
        check_fits("update_seq", self.update_seq, MAX_U48)?;
        check_fits("purge_seq", self.purge_seq, MAX_U48)?;
        check_fits("purge_ptr", self.purge_ptr, MAX_U48)?;
        let root_len = |r: &Option<NodePointer>| -> Result<u64> {
            let len = r.as_ref().map_or(0, NodePointer::root_len) as u64;
            check_fits("root size", len, u64::from(u16::MAX))?;
            Ok(len)
        };
        let mut out = Vec::with_capacity(Self::fixed_len(self.disk_version) + 64);
        out.push(self.disk_version);
        put_uint(&mut out, self.update_seq, 6);
        put_uint(&mut out, self.purge_seq, 6);
        put_uint(&mut out, self.purge_ptr, 6);
        put_uint(&mut out, root_len(&self.by_seq_root)?, 2);
        put_uint(&mut out, root_len(&self.by_id_root)?, 2);
        put_uint(&mut out, root_len(&self.local_root)?, 2);
        if self.disk_version >= 13 {
            put_uint(&mut out, self.timestamp, 8);
        }
        if self.disk_version >= 14 {
            let prev = self.prev_header_pos.unwrap_or(NO_PREV_HEADER_POS);
            check_fits("prev_header_pos", prev, NO_PREV_HEADER_POS)?;
            put_uint(
                &mut out,
                (prev << 1) | u64::from(self.has_metadata_header),
                6,
            );
        }
        for root in [&self.by_seq_root, &self.by_id_root, &self.local_root]
            .into_iter()
            .flatten()
        {
            root.encode_root(&mut out)?;
        }
        Ok(out)
    }

    /// Decodes a header body. Checks the structure only; the file layer
    /// checks the version range and the positions against the file.
    pub fn decode(body: &[u8]) -> Result<Self> {
        const WHAT: &str = "header";
        let mut r = Reader::new(body, WHAT);
        let disk_version = r.uint(1)? as u8;
        if !(OLDEST_DISK_VERSION..=CURRENT_DISK_VERSION).contains(&disk_version) {
            return Err(Error::malformed(
                WHAT,
                format!("unsupported disk version {disk_version}"),
            ));
        }
        let update_seq = r.uint(6)?;
        let purge_seq = r.uint(6)?;
        let purge_ptr = r.uint(6)?;
        let seq_len = r.uint(2)? as usize;
        let id_len = r.uint(2)? as usize;
        let local_len = r.uint(2)? as usize;
        let timestamp = if disk_version >= 13 { r.uint(8)? } else { 0 };
        let (prev_header_pos, has_metadata_header) = if disk_version >= 14 {
            let raw = r.uint(6)?;
            let prev = raw >> 1;
            ((prev != NO_PREV_HEADER_POS).then_some(prev), raw & 1 == 1)
        } else {
            (None, false)
        };
        let roots_len = seq_len + id_len + local_len;
        if r.bytes.len() != roots_len {
            return Err(Error::malformed(
                WHAT,
                format!(
                    "root sizes add up to {roots_len} bytes but {} follow the fixed part",
                    r.bytes.len()
                ),
            ));
        }
        let mut root = |len: usize| -> Result<Option<NodePointer>> {
            match len {
                0 => Ok(None),
                1..=11 => Err(Error::malformed(
                    WHAT,
                    format!("root of {len} bytes is shorter than 12"),
                )),
                _ => NodePointer::decode_root(r.take(len)?).map(Some),
            }
        };
        Ok(Self {
            disk_version,
            update_seq,
            purge_seq,
            purge_ptr,
            timestamp,
            prev_header_pos,
            has_metadata_header,
            by_seq_root: root(seq_len)?,
            by_id_root: root(id_len)?,
            local_root: root(local_len)?,
        })
    }
}

/// What the indexes know of one document: the by-id value with its key, or
/// equally the by-seq value with its key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DocInfo {
    /// The document's key.
    pub id: Vec<u8>,
    /// Its sequence number (48 bits).
    pub db_seq: u64,
    /// Its revision number (48 bits).
    pub rev_seq: u64,
    /// Opaque revision metadata (kv-engine: see [`RevMeta`]).
    pub rev_meta: Vec<u8>,
    /// True for a deletion (tombstone).
    pub deleted: bool,
    /// `0x80` = body stored snappy-compressed; low bits: datatype hint.
    pub content_meta: u8,
    /// Stored offset of the body chunk; 0 = no body.
    pub bp: u64,
    /// 8 + stored body length (0 when there is no body).
    pub physical_size: u64,
}

/// A [`DocInfo`] decoded in place: the key and the revision metadata are
/// borrowed from the by-id entry, so decoding allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocInfoRef<'a> {
    /// The document's key.
    pub id: &'a [u8],
    /// Its sequence number (48 bits).
    pub db_seq: u64,
    /// Its revision number (48 bits).
    pub rev_seq: u64,
    /// Opaque revision metadata (kv-engine: see [`RevMeta`]).
    pub rev_meta: &'a [u8],
    /// True for a deletion (tombstone).
    pub deleted: bool,
    /// `0x80` = body stored snappy-compressed; low bits: datatype hint.
    pub content_meta: u8,
    /// Stored offset of the body chunk; 0 = no body.
    pub bp: u64,
    /// 8 + stored body length (0 when there is no body).
    pub physical_size: u64,
}

impl<'a> DocInfoRef<'a> {
    /// Decodes a by-id entry, borrowing from it.
    pub fn decode_by_id(key: &'a [u8], value: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(value, "by-id value");
        let db_seq = r.uint(6)?;
        let physical_size = r.uint(4)?;
        let bp = r.uint(6)?;
        let rev_seq = r.uint(6)?;
        let content_meta = r.uint(1)? as u8;
        Ok(Self {
            id: key,
            db_seq,
            rev_seq,
            rev_meta: r.rest(),
            deleted: bp & DELETED_BIT != 0,
            content_meta,
            bp: bp & !DELETED_BIT,
            physical_size,
        })
    }

    /// True when the body is stored snappy-compressed.
    pub fn is_compressed(&self) -> bool {
        self.content_meta & CONTENT_META_COMPRESSED != 0
    }

    /// The owned [`DocInfo`].
    pub fn to_owned(&self) -> DocInfo {
        DocInfo {
            id: self.id.to_vec(),
            db_seq: self.db_seq,
            rev_seq: self.rev_seq,
            rev_meta: self.rev_meta.to_vec(),
            deleted: self.deleted,
            content_meta: self.content_meta,
            bp: self.bp,
            physical_size: self.physical_size,
        }
    }
}

/// `content_meta` flag: the body chunk is snappy-compressed.
pub const CONTENT_META_COMPRESSED: u8 = 0x80;

const DELETED_BIT: u64 = 1 << 47;

impl DocInfo {
    /// True when the body is stored snappy-compressed.
    pub fn is_compressed(&self) -> bool {
        self.content_meta & CONTENT_META_COMPRESSED != 0
    }

    fn bp_field(&self) -> Result<u64> {
        check_fits("body offset", self.bp, MAX_BODY_OFFSET)?;
        Ok(self.bp | if self.deleted { DELETED_BIT } else { 0 })
    }

    /// Encodes the by-id value (the key is [`DocInfo::id`]).
    pub fn encode_by_id_value(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(23 + self.rev_meta.len());
        self.encode_by_id_value_into(&mut out)?;
        Ok(out)
    }

    /// [`DocInfo::encode_by_id_value`] into `out`, which it clears first
    /// (for a caller reusing one buffer).
    pub fn encode_by_id_value_into(&self, out: &mut Vec<u8>) -> Result<()> {
        check_fits("db_seq", self.db_seq, MAX_U48)?;
        check_fits("rev_seq", self.rev_seq, MAX_U48)?;
        check_fits("physical_size", self.physical_size, u64::from(u32::MAX))?;
        let bp = self.bp_field()?;
        out.clear();
        put_uint(out, self.db_seq, 6);
        put_uint(out, self.physical_size, 4);
        put_uint(out, bp, 6);
        put_uint(out, self.rev_seq, 6);
        out.push(self.content_meta);
        out.extend_from_slice(&self.rev_meta);
        Ok(())
    }

    /// Sets the revision of an encoded by-id value, in place.
    pub fn patch_by_id_rev_seq(value: &mut [u8], rev_seq: u64) -> Result<()> {
        check_fits("rev_seq", rev_seq, MAX_U48)?;
        // Layout: db_seq (6), physical_size (4), bp (6), then rev_seq (6).
        let len = value.len();
        let field = value.get_mut(16..22).ok_or_else(|| Error::Malformed {
            what: "by-id value",
            detail: format!("{len} bytes, too short for a revision"),
        })?;
        field.copy_from_slice(&rev_seq.to_be_bytes()[2..]);
        Ok(())
    }

    /// Decodes a by-id entry.
    pub fn decode_by_id(key: &[u8], value: &[u8]) -> Result<Self> {
        Ok(DocInfoRef::decode_by_id(key, value)?.to_owned())
    }

    /// The same info, borrowing its key and revision metadata.
    pub fn borrowed(&self) -> DocInfoRef<'_> {
        DocInfoRef {
            id: &self.id,
            db_seq: self.db_seq,
            rev_seq: self.rev_seq,
            rev_meta: &self.rev_meta,
            deleted: self.deleted,
            content_meta: self.content_meta,
            bp: self.bp,
            physical_size: self.physical_size,
        }
    }

    /// Encodes the by-seq value (the key is [`encode_seq_key`] of
    /// [`DocInfo::db_seq`]).
    pub fn encode_by_seq_value(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(18 + self.id.len() + self.rev_meta.len());
        self.encode_by_seq_value_into(&mut out)?;
        Ok(out)
    }

    /// [`DocInfo::encode_by_seq_value`] into `out`, which it clears first
    /// (for a caller reusing one buffer).
    pub fn encode_by_seq_value_into(&self, out: &mut Vec<u8>) -> Result<()> {
        check_fits("rev_seq", self.rev_seq, MAX_U48)?;
        let lengths = encode_kv_length(self.id.len(), self.physical_size as usize)?;
        check_fits("physical_size", self.physical_size, MAX_VALUE_LEN as u64)?;
        let bp = self.bp_field()?;
        out.clear();
        out.extend_from_slice(&lengths);
        put_uint(out, bp, 6);
        put_uint(out, self.rev_seq, 6);
        out.push(self.content_meta);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.rev_meta);
        Ok(())
    }

    /// Decodes a by-seq entry.
    pub fn decode_by_seq(key: &[u8], value: &[u8]) -> Result<Self> {
        let db_seq = decode_seq_key(key)?;
        let mut r = Reader::new(value, "by-seq value");
        let (id_len, physical_size) = decode_kv_length(r.take(5)?)?;
        let bp = r.uint(6)?;
        let rev_seq = r.uint(6)?;
        let content_meta = r.uint(1)? as u8;
        let id = r.take(id_len)?.to_vec();
        Ok(Self {
            id,
            db_seq,
            rev_seq,
            rev_meta: r.rest().to_vec(),
            deleted: bp & DELETED_BIT != 0,
            content_meta,
            bp: bp & !DELETED_BIT,
            physical_size: physical_size as u64,
        })
    }
}

/// What follows the V1 fields in longer rev_meta versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevMetaTail {
    /// V1: nothing (18 bytes in all).
    None,
    /// V2 (old files): the conflict-resolution mode byte (19 bytes in all).
    ConflictResolution(u8),
    /// V3 (durable prepares): 7 bytes of durability metadata, kept opaque
    /// (25 bytes in all).
    Durability([u8; 7]),
}

/// The V1+ part of kv-engine's rev_meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevMetaV1 {
    /// Historically the "flex code" (0x01); bit 7 is the delete source
    /// (set = deleted by expiry/TTL).
    pub flex_code: u8,
    /// The memcached datatype bits (JSON, snappy, xattr).
    pub datatype: u8,
    /// Fields of later versions.
    pub tail: RevMetaTail,
}

/// kv-engine's revision metadata, stored in [`DocInfo::rev_meta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevMeta {
    /// Compare-and-swap value.
    pub cas: u64,
    /// Expiry time (seconds since the epoch; 0 = never).
    pub exptime: u32,
    /// Client flags, stored as given.
    pub flags: u32,
    /// V1+ fields; `None` for the 16-byte V0.
    pub v1: Option<RevMetaV1>,
}

impl RevMeta {
    /// V1 metadata as kv-engine writes for a live document.
    pub fn new(cas: u64, exptime: u32, flags: u32, datatype: u8) -> Self {
        Self {
            cas,
            exptime,
            flags,
            v1: Some(RevMetaV1 {
                flex_code: 0x01,
                datatype,
                tail: RevMetaTail::None,
            }),
        }
    }

    /// The datatype, 0 for V0.
    pub fn datatype(&self) -> u8 {
        self.v1.map_or(0, |v| v.datatype)
    }

    /// Encodes (16, 18, 19 or 25 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25);
        put_uint(&mut out, self.cas, 8);
        put_uint(&mut out, u64::from(self.exptime), 4);
        put_uint(&mut out, u64::from(self.flags), 4);
        if let Some(v1) = self.v1 {
            out.push(v1.flex_code);
            out.push(v1.datatype);
            match v1.tail {
                RevMetaTail::None => {}
                RevMetaTail::ConflictResolution(mode) => out.push(mode),
                RevMetaTail::Durability(bytes) => out.extend_from_slice(&bytes),
            }
        }
        out
    }

    /// Decodes; the length says the version.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "rev_meta";
        let mut r = Reader::new(bytes, WHAT);
        let cas = r.uint(8)?;
        let exptime = r.uint(4)? as u32;
        let flags = r.uint(4)? as u32;
        let rest = r.rest();
        let v1 = match rest.len() {
            0 => None,
            2 | 3 | 9 => {
                let tail = match &rest[2..] {
                    [] => RevMetaTail::None,
                    [mode] => RevMetaTail::ConflictResolution(*mode),
                    more => {
                        let mut d = [0u8; 7];
                        d.copy_from_slice(more);
                        RevMetaTail::Durability(d)
                    }
                };
                Some(RevMetaV1 {
                    flex_code: rest[0],
                    datatype: rest[1],
                    tail,
                })
            }
            n => {
                return Err(Error::malformed(
                    WHAT,
                    format!("{} bytes is no known version (16, 18, 19, 25)", 16 + n),
                ))
            }
        };
        Ok(Self {
            cas,
            exptime,
            flags,
            v1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn be_reads_every_length_up_to_a_word() {
        let bytes = [0x81u8, 0x02, 0xF3, 0x04, 0x05, 0xA6, 0x07, 0x08];
        for n in 0..=8 {
            let slow = bytes[..n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            assert_eq!(be(&bytes[..n]), slow, "{n} bytes");
        }
    }

    /// The v14 header at 184320 of vectors/0.couch.1, as the format document
    /// lists it.
    const HEADER_0_COUCH_1: &str = "0e0000000004b1000000000000000000000000\
        0011001c000c17979cfe362a0006000000054000\
        00000002cea800000000829c00000003e9\
        00000002ca70000000007748000000038500000000640000000121 34\
        00000002995b00000000005f";

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    proptest::proptest! {
        /// The pointer-only decode agrees with the full one on any bytes:
        /// the same offset, or an error where it fails.
        #[test]
        fn decode_pointer_is_the_full_decodes_pointer(
            pointer in 0u64..1 << 48,
            size in 0u64..1 << 48,
            reduce in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
            cut in 0usize..40,
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3),
        ) {
            let mut bytes = encode_u48(pointer).to_vec();
            bytes.extend_from_slice(&encode_u48(size));
            bytes.extend_from_slice(&(reduce.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&reduce);
            bytes.extend_from_slice(&extra);
            bytes.truncate(cut.max(bytes.len().saturating_sub(cut)));
            let full = NodePointerRef::decode_kp_value(&bytes).map(|p| p.pointer);
            let fast = NodePointerRef::decode_pointer(&bytes);
            proptest::prop_assert_eq!(full.as_ref().ok(), fast.as_ref().ok());
            proptest::prop_assert_eq!(full.is_err(), fast.is_err());
            if extra.is_empty() && cut == 0 {
                proptest::prop_assert_eq!(fast.ok(), Some(pointer));
            }
        }
    }

    #[test]
    fn decodes_a_real_header_and_encodes_it_back() {
        let body = unhex(HEADER_0_COUCH_1);
        assert_eq!(body.len(), 96);
        let h = DbHeader::decode(&body).unwrap();
        assert_eq!(h.disk_version, 14);
        assert_eq!(h.update_seq, 1201);
        assert_eq!(h.timestamp, 1_700_000_000_000_000_006);
        assert_eq!(h.prev_header_pos, Some(172_032));
        assert!(!h.has_metadata_header);
        let seq = h.by_seq_root.as_ref().unwrap();
        assert_eq!((seq.pointer, seq.subtree_size), (183_976, 33_436));
        assert_eq!(seq.reduce, unhex("00000003e9"));
        let id = h.by_id_root.as_ref().unwrap();
        assert_eq!((id.pointer, id.subtree_size), (182_896, 30_536));
        let local = h.local_root.as_ref().unwrap();
        assert_eq!((local.pointer, local.subtree_size), (170_331, 95));
        assert!(local.reduce.is_empty());
        assert_eq!(h.encode().unwrap(), body);
    }

    #[test]
    fn header_versions_round_trip() {
        for v in 11..=14u8 {
            let mut h = DbHeader::new(v);
            h.update_seq = 77;
            h.purge_seq = 3;
            h.by_id_root = Some(NodePointer {
                pointer: 4000,
                subtree_size: 300,
                reduce: vec![1; 16],
            });
            if v >= 13 {
                h.timestamp = 123;
            }
            if v >= 14 {
                h.prev_header_pos = Some(8192);
                h.has_metadata_header = true;
            }
            let body = h.encode().unwrap();
            assert_eq!(body.len(), DbHeader::fixed_len(v) + 28);
            assert_eq!(DbHeader::decode(&body).unwrap(), h);
        }
        let mut first = DbHeader::new(14);
        first.prev_header_pos = None;
        let body = first.encode().unwrap();
        assert_eq!(decode_u48(&body[33..]).unwrap(), NO_PREV_HEADER_POS << 1);
        assert!(DbHeader::decode(&body[..30]).is_err());
        assert!(DbHeader::new(10).encode().is_err());
    }

    #[test]
    fn header_rejects_bad_root_sizes() {
        let mut body = DbHeader::new(14).encode().unwrap();
        body[20] = 5; // seqrootsize = 5, no bytes follow
        assert!(matches!(
            DbHeader::decode(&body),
            Err(Error::Malformed { .. })
        ));
        body.extend_from_slice(&[0; 5]);
        assert!(DbHeader::decode(&body).is_err());
    }

    #[test]
    fn kv_length_packing() {
        let packed = encode_kv_length(0xABC, 0x0123_4567).unwrap();
        assert_eq!(packed, [0xAB, 0xC1, 0x23, 0x45, 0x67]);
        assert_eq!(decode_kv_length(&packed).unwrap(), (0xABC, 0x0123_4567));
        assert!(encode_kv_length(4096, 0).is_err());
        assert!(encode_kv_length(0, 1 << 28).is_err());
        assert!(decode_kv_length(&packed[..4]).is_err());
    }

    #[test]
    fn node_pointer_round_trips() {
        let p = NodePointer {
            pointer: 123_456,
            subtree_size: 789,
            reduce: vec![0, 0, 0, 3, 0xe9],
        };
        let mut kp = Vec::new();
        p.encode_kp_value(&mut kp).unwrap();
        assert_eq!(kp.len(), 14 + 5);
        assert_eq!(NodePointer::decode_kp_value(&kp).unwrap(), p);
        assert!(NodePointer::decode_kp_value(&kp[..kp.len() - 1]).is_err());
        let mut root = Vec::new();
        p.encode_root(&mut root).unwrap();
        assert_eq!(NodePointer::decode_root(&root).unwrap(), p);
        assert!(NodePointer::decode_root(&root[..11]).is_err());
    }

    #[test]
    fn doc_info_round_trips_through_both_indexes() {
        let info = DocInfo {
            id: b"key_0990".to_vec(),
            db_seq: 1191,
            rev_seq: 2,
            rev_meta: RevMeta::new(0x33dd, 0, 0, 1).encode(),
            deleted: true,
            content_meta: CONTENT_META_COMPRESSED,
            bp: 170_000,
            physical_size: 19,
        };
        let id_value = info.encode_by_id_value().unwrap();
        assert_eq!(DocInfo::decode_by_id(&info.id, &id_value).unwrap(), info);
        let seq_key = encode_seq_key(info.db_seq).unwrap();
        let seq_value = info.encode_by_seq_value().unwrap();
        assert_eq!(DocInfo::decode_by_seq(&seq_key, &seq_value).unwrap(), info);
        assert!(DocInfo::decode_by_seq(&seq_key, &seq_value[..20]).is_err());
        assert!(DocInfo::decode_by_id(&info.id, &id_value[..22]).is_err());
        assert!(DocInfo::decode_by_seq(&seq_key[..5], &seq_value).is_err());
        let too_far = DocInfo {
            bp: 1 << 47,
            ..info
        };
        assert!(too_far.encode_by_id_value().is_err());
    }

    #[test]
    fn rev_meta_versions_round_trip() {
        let v0 = RevMeta {
            cas: 1,
            exptime: 2,
            flags: 3,
            v1: None,
        };
        let v1 = RevMeta::new(0x1064, 0, 0xcafe0064, 1);
        let mut v2 = v1;
        v2.v1 = Some(RevMetaV1 {
            tail: RevMetaTail::ConflictResolution(1),
            ..v1.v1.unwrap()
        });
        let mut v3 = v1;
        v3.v1 = Some(RevMetaV1 {
            tail: RevMetaTail::Durability([1, 2, 3, 4, 5, 6, 7]),
            ..v1.v1.unwrap()
        });
        for (m, len) in [(v0, 16), (v1, 18), (v2, 19), (v3, 25)] {
            let bytes = m.encode();
            assert_eq!(bytes.len(), len);
            assert_eq!(RevMeta::decode(&bytes).unwrap(), m);
        }
        // kv-engine's bytes from the vectors: cas 0x1064, flags 0xcafe0064.
        let real = unhex("000000000000106400000000cafe00640101");
        assert_eq!(RevMeta::decode(&real).unwrap(), v1);
        assert!(RevMeta::decode(&real[..17]).is_err());
        assert!(RevMeta::decode(&real[..15]).is_err());
    }
}
