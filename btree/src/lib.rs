//! `btree`: the copy-on-write B+tree of a couchstore file, whose nodes are
//! `couchfile` chunks, and the three couchstore indexes built on it (by-id,
//! by-seq and local documents). It is meant to provide batch modification with
//! sorted actions, point and range lookups, folds that use reduce values, a
//! bottom-up builder for sorted input (used by compaction), and the document
//! operations on one header: read a document by id or seq, list changes since a
//! seq, read local documents, and apply one batch of documents. It is not the
//! byte layer (block framing, checksums, headers and codecs live in
//! `couchfile`), and it knows nothing about flushing, compaction scheduling or
//! file revisions. This crate is a placeholder: it is filled in by later work
//! and exports nothing yet.
