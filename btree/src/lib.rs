//! The copy-on-write B+tree of couchstore files and the three indexes built on
//! it. Nodes are snappy-compressed `couchfile` chunks in couchstore's node format
//! (leaf and interior nodes, 12/28-bit key/value length packing, pointers with
//! subtree size and reduce value), cut by couchstore's size rules (1279-byte
//! threshold, nodes cut at two thirds of it; configurable). [`BTree`] applies a
//! sorted batch of actions in one pass (a large batch on two threads: the
//! caller's and a second, scoped one), looks up many keys at once, folds over
//! ranges with early stop, sums reduce values over a range from the stored
//! reduces, and builds a tree bottom-up from sorted input; it is generic over key
//! order and reduce through [`TreeOps`]. On top of it, [`Db`] writes batches of
//! documents (by-id, by-seq and local trees) and commits headers, and
//! [`Snapshot`] reads one header: documents by id or seq, changes since a seq,
//! id ranges, counts, local documents. This crate is not a flusher or a
//! compactor: it knows nothing of queues, revisions or concurrency beyond "one
//! writer, many snapshots". Nothing read from disk is trusted: a bad node is an
//! [`Error`], not a panic or a wrong answer. Every walk down a tree (folds,
//! lookups, range reduces, modifies) checks each node it reads: keys strictly
//! ascending and within the range the parent's keys give the child (an
//! interior key is its child's last key), children before their parent in
//! the file. A tree whose nodes repeat a child, point out of order or in a
//! cycle is then an [`Error::CorruptNode`] as soon as the walk meets it, and
//! no walk reads a node twice.
//!
//! ```
//! use std::sync::Arc;
//! use btree::{Body, Db, DbOptions, DocUpdate, LocalUpdate};
//! use couchfile::{CouchFile, MemBackend};
//!
//! # fn main() -> btree::Result<()> {
//! let file = CouchFile::new(Arc::new(MemBackend::new()), "0.couch.1")?;
//! let mut db = Db::open(file, &DbOptions::default())?;
//! let doc = DocUpdate {
//!     id: b"key".to_vec(),
//!     seq: None,
//!     rev_seq: 1,
//!     rev_seq_above_stored: false,
//!     rev_meta: couchfile::RevMeta::new(1, 0, 0, 1).encode(),
//!     deleted: false,
//!     content_meta: couchfile::CONTENT_META_COMPRESSED,
//!     body: Body::Plain(b"{\"a\":1}".to_vec()),
//! };
//! let local = LocalUpdate { id: b"_local/vbstate".to_vec(), value: Some(b"{}".to_vec()) };
//! assert_eq!(db.save(&[doc], &[local])?, vec![1]);
//! db.commit(1_700_000_000_000_000_000)?;
//!
//! let snap = db.snapshot();
//! let info = snap.doc_info(b"key")?.expect("saved");
//! assert_eq!(snap.read_body(&info)?.as_deref(), Some(&b"{\"a\":1}"[..]));
//! assert_eq!(snap.local_doc(b"_local/vbstate")?.as_deref(), Some(&b"{}"[..]));
//! assert_eq!(snap.count_changes(0, 10)?, 1);
//! # Ok(())
//! # }
//! ```

mod db;
mod error;
pub mod fuzzing;
mod indexes;
pub mod node;
mod tree;

pub use db::{Body, ChangesFilter, Db, DbOptions, DocUpdate, LocalUpdate, SavedDoc, Snapshot};
pub use error::{Error, Result};
pub use indexes::{decode_seq_reduce, ById, BySeq, IdReduce, Local};
pub use tree::{
    Action, ActionOp, BTree, Builder, EntryFn, FetchFn, NodeConfig, TreeOps, ValuePatch,
    PARALLEL_MODIFY_MIN_ACTIONS, PARALLEL_MODIFY_MIN_RUNS,
};

/// Compiles and runs the examples in the crate's README.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
