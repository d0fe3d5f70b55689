//! `vbucket`: one vbucket and a store of many, tying `flusher`, `compactor`,
//! `btree` and `couchfile` together. It is meant to own the file naming
//! (`<vbid>.couch.<rev>`), the vbucket lock, the header-offset handoff between
//! flusher and compactor that lets compaction run concurrently with flushing
//! (only the final catch-up round holds the lock), the swap to the new file
//! revision, readers that stay valid across swaps, the `_local/vbstate`
//! document, cleanup of stale revisions and `.compact` files at open, and
//! statistics. It is not a network server or a cache: it is the persistence
//! layer below one. This crate is a placeholder: it is filled in by later work
//! and exports nothing yet.
