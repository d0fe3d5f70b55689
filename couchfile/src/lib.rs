//! The byte layer of couchstore's file format (disk version 14, readable 11 to
//! 14): 4096-byte blocks with their block-type prefix byte, data chunks with
//! length and CRC (CRC-32C, or CRC-32 for version 11), snappy-compressed
//! chunks, header chunks with couchstore's two-phase commit, finding the last
//! valid header on open (normal and recovery mode) and walking older and newer
//! headers, and the codecs of the structures stored in chunks: the database
//! header, node pointers, by-id and by-seq values and kv-engine's rev_meta,
//! and a bounded cache of decoded chunks that files can share
//! ([`ChunkCache`], where the `btree` crate keeps its decoded nodes).
//! All I/O goes through the small [`Backend`] trait, implemented for real
//! files ([`FileBackend`], which reads the bytes already in the file in
//! place through a read-only memory map: [`Backend::read_in_place`]), memory ([`MemBackend`]) and fault injection
//! ([`FaultyBackend`]: crashes at the N-th write or sync, torn tails, ENOSPC,
//! EIO), and the names of files through the [`Directory`] trait (on disk,
//! [`OsDirectory`], or in memory with the same faults, [`FaultyDirectory`]),
//! which also gives its owner an exclusive lock ([`Directory::lock`]).
//! This crate is not a B-tree or a document store: it knows nothing of
//! node layouts or of which chunk holds what; the `btree` crate builds on it.
//! Nothing read from disk is trusted: every length is checked against the
//! file and sane limits before it sizes an allocation, and bad bytes give an
//! [`Error`] naming the file and offset.
//!
//! ```
//! use std::sync::Arc;
//! use couchfile::{CouchFile, DbHeader, FileWriter, MemBackend, OpenMode};
//!
//! # fn main() -> couchfile::Result<()> {
//! let file = CouchFile::new(Arc::new(MemBackend::new()), "example.couch")?;
//! let (mut writer, _) = FileWriter::create(file.clone(), &DbHeader::new(14))?;
//! let body = writer.append_compressed_chunk(b"{\"hello\":\"world\"}")?;
//! let mut header = DbHeader::new(14);
//! header.update_seq = 1;
//! header.prev_header_pos = Some(0);
//! let offset = writer.commit(&header)?;
//!
//! let found = file.find_last_header(OpenMode::Normal)?.expect("a header");
//! assert_eq!((found.offset, found.header.update_seq), (offset, 1));
//! assert_eq!(file.read_compressed_chunk(body.offset)?, b"{\"hello\":\"world\"}");
//! assert_eq!(file.headers_from(found, OpenMode::Normal)?.len(), 2);
//! # Ok(())
//! # }
//! ```

mod backend;
pub mod block;
mod cache;
mod codec;
mod crc;
mod dir;
mod error;
mod fault;
mod file;
pub mod fuzzing;
mod writeback;

pub use backend::{sync_directory, Backend, FileBackend, InPlace, MemBackend};
pub use block::{BlockType, BLOCK_SIZE};
pub use cache::{CacheStats, ChunkCache, DecodedChunk};
pub use codec::{
    decode_kv_length, decode_seq_key, decode_u48, encode_kv_length, encode_seq_key, encode_u48,
    DbHeader, DocInfo, DocInfoRef, NodePointer, NodePointerRef, RevMeta, RevMetaTail, RevMetaV1,
    CONTENT_META_COMPRESSED, CURRENT_DISK_VERSION, MAX_BODY_OFFSET, MAX_KEY_LEN, MAX_U48,
    MAX_VALUE_LEN, NO_PREV_HEADER_POS, OLDEST_DISK_VERSION,
};
pub use crc::CrcKind;
pub use dir::{
    DirLock, Directory, FaultyDirectory, LockHolder, NameTail, OsDirectory, FORK_GRACE,
    LOCK_FILE_NAME,
};
pub use error::{Error, IoOp, Result};
pub use fault::{FaultController, FaultKind, FaultRule, FaultyBackend, OpKind, TornTail};
pub use file::{
    compress, decompress, CheckedChunk, ChunkPos, Compressor, CouchFile, FileWriter, LocatedHeader,
    OpenMode, SequentialReader, MAX_CHUNK_LEN, MAX_DECOMPRESSED_LEN, MAX_HEADER_LEN,
};
pub use writeback::Writeback;

/// Compiles and runs the examples in the crate's README.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
