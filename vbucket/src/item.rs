//! Documents as users see them, and mutations on their way to disk.

use crate::error::{Error, Result};
use btree::{Body, DocUpdate};
use couchfile::{DocInfoRef, RevMeta, CONTENT_META_COMPRESSED};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Memcached datatype bit: the value is JSON.
pub const DATATYPE_JSON: u8 = 0x01;

/// couchstore `content_meta` low bits: the body is JSON.
const CONTENT_META_JSON: u8 = 0;
/// couchstore `content_meta` low bits: the body is not JSON (binary).
const CONTENT_META_NON_JSON: u8 = 3;

/// A document's metadata, as kv-engine keeps it in `rev_meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ItemMeta {
    /// CAS. On a set or delete, 0 means "assign one" (a hybrid logical
    /// clock, as kv-engine does); any other value is stored as given (as
    /// kv-engine's set-with-meta does).
    pub cas: u64,
    /// Expiry time in seconds since the epoch; 0 = never.
    pub exptime: u32,
    /// Client flags, stored as given.
    pub flags: u32,
    /// Memcached datatype bits ([`DATATYPE_JSON`], ...).
    pub datatype: u8,
    /// Revision number. On a set or delete, 0 means "assign one": one above
    /// the key's previous revision, queued or stored (a key never stored
    /// starts at 1); it grows across flushes, reopens and compactions, and
    /// stays at [`crate::MAX_REV_SEQ`] once there. Any other value is
    /// stored as given (as set-with-meta does).
    pub rev_seq: u64,
}

/// A document read back: the newest mutation of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a deletion).
    pub value: Vec<u8>,
    /// True for a deletion (tombstone).
    pub deleted: bool,
    /// The sequence number of the mutation.
    pub seqno: u64,
    /// Its metadata.
    pub meta: ItemMeta,
}

/// What a set or delete was given: its seqno and CAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mutation {
    /// The sequence number assigned (wait for it with `wait_persisted`).
    pub seqno: u64,
    /// The CAS stored.
    pub cas: u64,
}

/// The revision of an accepted mutation.
#[derive(Debug, Clone)]
pub(crate) enum Rev {
    /// Known: given, or one above a known revision.
    Known(u64),
    /// Automatic, `n` above the revision the key had in the file when the
    /// first mutation of a run of automatic ones (`base`, shared by the
    /// run) was accepted with the key clean. The base is read by the first
    /// commit of a mutation of the run, or the first read of one, whichever
    /// comes first ([`Item::unresolved_base`]): until then the file still
    /// holds the key's revision from before the run, since a key is clean
    /// only once its last mutation is committed.
    Auto { base: Arc<OnceLock<u64>>, n: u64 },
}

impl Rev {
    /// The revision after this one, for the next automatic mutation of the
    /// key while this one is queued.
    pub(crate) fn next(&self) -> Rev {
        match self {
            Rev::Known(rev) => Rev::Known(add_rev(*rev, 1)),
            Rev::Auto { base, n } => match base.get() {
                Some(base) => Rev::Known(add_rev(*base, n + 1)),
                None => Rev::Auto {
                    base: Arc::clone(base),
                    n: n + 1,
                },
            },
        }
    }

    /// The revision, once known (`None` while an automatic one's base is
    /// not read yet).
    pub(crate) fn resolve(&self) -> Option<u64> {
        match self {
            Rev::Known(rev) => Some(*rev),
            Rev::Auto { base, n } => base.get().map(|b| add_rev(*b, *n)),
        }
    }
}

/// `rev + n`, staying at [`crate::MAX_REV_SEQ`] once there.
fn add_rev(rev: u64, n: u64) -> u64 {
    rev.saturating_add(n).min(crate::MAX_REV_SEQ)
}

/// One accepted mutation, shared by the dirty table (reads of unflushed
/// writes) and the flusher's queue.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    pub(crate) deleted: bool,
    pub(crate) seqno: u64,
    /// Its metadata; `rev_seq` is in `rev`.
    pub(crate) meta: ItemMeta,
    pub(crate) rev: Rev,
}

impl Item {
    /// The document as a reader sees it, once its revision is known (the
    /// reader sets the base of an automatic one first).
    pub(crate) fn to_document(&self) -> Document {
        Document {
            key: self.key.clone(),
            value: self.value.clone(),
            deleted: self.deleted,
            seqno: self.seqno,
            meta: ItemMeta {
                rev_seq: self.rev.resolve().unwrap_or(0),
                ..self.meta
            },
        }
    }

    /// The base of an automatic revision that is not read yet.
    pub(crate) fn unresolved_base(&self) -> Option<&OnceLock<u64>> {
        match &self.rev {
            Rev::Auto { base, .. } if base.get().is_none() => Some(base),
            _ => None,
        }
    }

    /// The document update the flush target saves.
    pub(crate) fn to_doc_update(&self, compress: bool) -> DocUpdate {
        let kind = if self.meta.datatype & DATATYPE_JSON != 0 {
            CONTENT_META_JSON
        } else {
            CONTENT_META_NON_JSON
        };
        let (body, compressed) = if self.deleted && self.value.is_empty() {
            (Body::None, false)
        } else {
            (Body::Plain(self.value.clone()), compress)
        };
        let m = &self.meta;
        // An automatic revision whose base is not read yet is `n` above
        // the stored one, which the save reads and returns (the flush
        // target then sets the base).
        let (rev_seq, rev_seq_above_stored) = match (&self.rev, self.rev.resolve()) {
            (_, Some(rev)) => (rev, false),
            (Rev::Auto { n, .. }, None) => (*n, true),
            (Rev::Known(rev), None) => (*rev, false),
        };
        DocUpdate {
            id: self.key.clone(),
            seq: Some(self.seqno),
            rev_seq,
            rev_seq_above_stored,
            rev_meta: RevMeta::new(m.cas, m.exptime, m.flags, m.datatype).encode(),
            deleted: self.deleted,
            content_meta: kind
                | if compressed {
                    CONTENT_META_COMPRESSED
                } else {
                    0
                },
            body,
        }
    }
}

/// The flusher's handle on an [`Item`].
#[derive(Debug, Clone)]
pub(crate) struct QueuedItem(pub(crate) Arc<Item>);

impl flusher::FlushItem for QueuedItem {
    fn key(&self) -> &[u8] {
        &self.0.key
    }

    fn seqno(&self) -> u64 {
        self.0.seqno
    }

    fn size(&self) -> usize {
        // Key, value and the fixed part, as the dirty table holds them.
        self.0.key.len() + self.0.value.len() + std::mem::size_of::<Item>()
    }
}

/// The live documents of `docs`: deletions become `None`.
pub(crate) fn live_only(docs: Vec<Option<Document>>) -> Vec<Option<Document>> {
    docs.into_iter()
        .map(|doc| doc.filter(|d| !d.deleted))
        .collect()
}

/// The metadata stored in a document's `rev_meta`.
pub(crate) fn meta_of(path: &Path, info: &DocInfoRef<'_>) -> Result<ItemMeta> {
    let rev = RevMeta::decode(info.rev_meta).map_err(|source| Error::BadRevMeta {
        path: path.to_path_buf(),
        key: String::from_utf8_lossy(info.id).into_owned(),
        source,
    })?;
    Ok(ItemMeta {
        cas: rev.cas,
        exptime: rev.exptime,
        flags: rev.flags,
        datatype: rev.v1.map_or(0, |v| v.datatype),
        rev_seq: info.rev_seq,
    })
}
