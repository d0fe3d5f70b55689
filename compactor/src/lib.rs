//! `compactor`: copies the live data of a snapshot at one header into a new
//! couchstore file (by-seq order, bodies copied as stored, the by-id index
//! rebuilt by sorting and spilling to disk when large), applies a purge policy
//! (tombstones older than a purge seqno or age; expired items reported to the
//! caller), and replays the changes between two header offsets into the new
//! file. It is meant to be throttleable and cancellable and to report progress.
//! It is not the orchestration of a compaction: taking the vbucket lock,
//! deciding when catch-up rounds stop, renaming and swapping files belong to the
//! `vbucket` crate. This crate is a placeholder: it is filled in by later work
//! and exports nothing yet.
