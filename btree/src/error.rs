//! The crate's one error type.

use std::path::PathBuf;

/// Convenient alias for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a tree or document operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The byte layer failed: I/O, checksum, corrupt chunk or header.
    #[error(transparent)]
    File(#[from] couchfile::Error),
    /// A node decoded from the file breaks the node format or the tree's
    /// invariants (order, reduce size, subtree size).
    #[error("{path}: corrupt B-tree node at offset {offset}: {detail}")]
    CorruptNode {
        /// The file.
        path: PathBuf,
        /// Offset of the node's chunk.
        offset: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// A document or action batch is not sorted, or names a key twice.
    #[error("batch names key {key:?} twice or out of order (at index {index}); keys must be unique and, for actions, sorted")]
    UnsortedOrDuplicate {
        /// The offending key (lossy UTF-8).
        key: String,
        /// Its index in the batch.
        index: usize,
    },
    /// A value given by the caller does not fit the format.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The name of the couchstore error code for the same condition.
    pub fn couchstore_name(&self) -> &'static str {
        match self {
            Error::File(e) => e.couchstore_name(),
            Error::CorruptNode { .. } => "COUCHSTORE_ERROR_CORRUPT",
            Error::UnsortedOrDuplicate { .. } | Error::InvalidArgument(_) => {
                "COUCHSTORE_ERROR_INVALID_ARGUMENTS"
            }
        }
    }
}
