//! `vbucket`: the persistence layer of one vbucket and a [`Store`] of many,
//! tying `flusher`, `btree` and `couchfile` together. Each vbucket lives in
//! one append-only couchstore file, `<vbid>.couch.<rev>`, in the store's data
//! directory, which the store holds an exclusive lock on while it is open
//! ([`Error::DirectoryLocked`] for a second owner); on open the newest
//! revision is used and older revisions and `.compact` leftovers are
//! removed, while a revision with no valid header is reported
//! ([`Error::DamagedRevision`]) and kept, or moved aside
//! ([`DamagedFiles`]). Writers [`VBucket::set`]
//! and [`VBucket::delete`] from any thread: the mutation gets its seqno at
//! once, is readable at once (the dirty table is read before the file), and
//! is durable once [`VBucket::wait_persisted`] returns; a shared pool of
//! flusher threads commits batches (bodies, by-id and by-seq updates and the
//! `_local/vbstate` document, then the header, then sync) under the
//! vbucket's commit lock and publishes the offset of every header it commits
//! ([`VBucket::latest_header`]: the handoff compaction consumes). Readers
//! take [`ReadSnapshot`]s at the latest or an older header and run
//! concurrently with the flusher; [`VBucket::get`] and
//! [`VBucket::get_many`] search B-tree nodes kept decoded in a cache the
//! store's vbuckets share ([`StoreConfig::node_cache_bytes`], 32 MiB by
//! default) and read bodies in place from a memory map of the file
//! ([`StoreConfig::mapped_reads`]). It is not a network server or a
//! cache: it is the persistence layer below one.
//!
//! The crate also holds [`tool`], the library behind the `couchtool`
//! command-line binary (`src/bin/couchtool.rs`), which inspects and checks
//! couchstore files:
//!
//! - `couchtool dump [--jsonl] [--recovery] [--header-offset N] FILE` lists
//!   the header and every document (by seq, bodies' length and SHA-256 or a
//!   preview) and local document; `--jsonl` prints exactly the JSON Lines
//!   listing that the couchstore test vectors record;
//! - `couchtool headers [--jsonl] [--recovery] FILE` lists every header from
//!   the one opened back to the oldest;
//! - `couchtool info [--recovery] [--header-offset N] FILE` summarizes the
//!   header, the file's size and its fragmentation;
//! - `couchtool verify [--recovery] [--header-offset N] FILE` walks the three
//!   trees and the bodies and checks checksums, key order, subtree sizes,
//!   reduce values and that the by-id and by-seq trees agree
//!   ([`tool::verify`] does the same for tests);
//! - `couchtool compact [--drop-deletes] [--purge-before-seq N] [--upgrade]
//!   [--recovery] [--header-offset N] SRC DST` copies a header of SRC into
//!   the new file DST with the compactor and prints a summary
//!   ([`tool::compact`]); a version 11 file stays version 11 unless
//!   `--upgrade` is given, as with couchstore's `couch_compact`; with
//!   `--history-age DURATION --history-granularity DURATION [--now
//!   UNIX_NANOS]` it keeps one header per period of the window ([`History`]);
//! - `couchtool rollback FILE --to-seq N` appends the newest header at or
//!   below N again as the newest and prints the seqno rolled back to, or
//!   "to zero" ([`tool::rollback`]);
//! - `--as-of-seq N` and `--as-of-time UNIX_NANOS` open the newest header at
//!   or before a seqno or a time (dump, info, verify, compact).
//!
//! [`VBucket::history`], [`VBucket::snapshot_as_of_seqno`] and
//! [`VBucket::snapshot_as_of_time`] read a vbucket's older headers;
//! [`VBucket::rollback`] goes back to one (see [`history`]).
//!
//! Exit status: 0 when all is well, 1 on an error or a problem found.
//! `cargo install --path vbucket` installs `couchtool`; `couchtool --version`
//! prints its version and every subcommand's `--help` gives examples.
//!
//! `docs/design.md` in the repository describes a write's whole path, the
//! compaction protocol step by step (what the commit lock covers, why each
//! step is crash-safe) and the invariants with the tests that check them.
//!
//! ```
//! use std::time::Duration;
//! use vbucket::{ItemMeta, Store, StoreConfig};
//!
//! # fn main() -> vbucket::Result<()> {
//! let dir = tempfile::tempdir().map_err(|e| vbucket::Error::Io {
//!     path: "tmp".into(), op: "tempdir", source: e })?;
//! let store = Store::open(dir.path(), StoreConfig::default())?;
//! let vb = store.open_vbucket(0)?;
//! let m = vb.set(b"user:1", br#"{"name":"Ada"}"#, ItemMeta::default())?;
//! vb.wait_persisted(m.seqno, Duration::from_secs(10))?;
//! store.close()?;
//!
//! let store = Store::open(dir.path(), StoreConfig::default())?;
//! let doc = store.vbucket(0)?.get(b"user:1")?.expect("persisted");
//! assert_eq!(doc.value, br#"{"name":"Ada"}"#);
//! # Ok(())
//! # }
//! ```

mod compaction;
mod error;
mod files;
pub mod fuzzing;
pub mod history;
mod item;
mod snapshot;
mod store;
pub mod tool;
mod vbstate;
mod vbucket;

pub use compaction::{
    CompactionHook, CompactionMode, CompactionOptions, CompactionPhase, CompactionReport,
    RoundStats, DEFAULT_COMPACTION_SYNC_EVERY_BYTES,
};
pub use compactor::{CompactionConfig, PurgePolicy, PurgeSeqRule};
pub use error::{Error, Result};
pub use files::{compact_name, revision_name, DamagedFiles};
pub use history::{AsOf, History, HistoryEntry};
pub use item::{Document, ItemMeta, Mutation, DATATYPE_JSON};
pub use snapshot::ReadSnapshot;
pub use store::{
    AutoCompaction, CompactionLog, Store, StoreConfig, StoreStats, StoreTotals,
    DEFAULT_BACKGROUND_SYNC_BYTES, DEFAULT_NODE_CACHE_BYTES, MAX_KEPT_REPORTS,
};
pub use vbstate::{FailoverEntry, VbState, VbucketState, VBSTATE_ID};
pub use vbucket::{
    CommitEvent, CommitObserver, CommittedHeader, RollbackTo, VBucket, VBucketStats, MAX_REV_SEQ,
    MAX_SEQNO, MAX_VALUE_SIZE, RESERVED_CAS,
};

/// Re-exported so users can configure the flusher and read its statistics.
pub use couchfile::CacheStats;
pub use flusher::{FlushStats, FlusherConfig, LatencySummary, Vbid};

/// Compiles and runs the examples in the crate's README.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Compiles and runs the examples in the repository's README (the top
/// crate, which can see every layer).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct RepositoryReadmeDoctests;
