//! `vbucket`: one vbucket and a store of many, tying `flusher`, `compactor`,
//! `btree` and `couchfile` together. It is meant to own the file naming
//! (`<vbid>.couch.<rev>`), the vbucket lock, the header-offset handoff between
//! flusher and compactor that lets compaction run concurrently with flushing
//! (only the final catch-up round holds the lock), the swap to the new file
//! revision, readers that stay valid across swaps, the `_local/vbstate`
//! document, cleanup of stale revisions and `.compact` files at open, and
//! statistics. It is not a network server or a cache: it is the persistence
//! layer below one. The vbucket itself is filled in by later work.
//!
//! So far the crate holds [`tool`], the library behind the `couchtool`
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
//!   ([`tool::verify`] does the same for tests).
//!
//! Exit status: 0 when all is well, 1 on an error or a problem found.

pub mod tool;
