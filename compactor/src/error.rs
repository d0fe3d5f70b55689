//! The compactor's errors.

use std::path::PathBuf;

/// Errors of compaction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The byte layer failed (I/O, or bad bytes at an offset of the source).
    #[error(transparent)]
    File(#[from] couchfile::Error),
    /// The document layer failed.
    #[error(transparent)]
    Tree(#[from] btree::Error),
    /// A spilled sort run does not read back as written.
    #[error("{path}: sort run corrupt at offset {offset}")]
    CorruptRun {
        /// The run file.
        path: PathBuf,
        /// Where.
        offset: u64,
    },
    /// The compaction was cancelled.
    #[error("compaction cancelled")]
    Cancelled,
    /// The arguments do not describe a valid compaction.
    #[error("invalid compaction request: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// The compactor's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
