//! The crate's one error type.

use crate::dir::LockHolder;
use std::io;
use std::path::{Path, PathBuf};

/// Convenient alias for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which I/O operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Opening or creating the file.
    Open,
    /// A positional read.
    Read,
    /// A positional write or append.
    Write,
    /// `fdatasync` / `fsync`.
    Sync,
    /// Asking for the file's length.
    Len,
    /// Truncating the file.
    Truncate,
    /// Taking an advisory lock on it (a directory's lock file).
    Lock,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Sync => "sync",
            IoOp::Len => "stat",
            IoOp::Truncate => "truncate",
            IoOp::Lock => "lock",
        })
    }
}

/// Everything that can go wrong reading or writing a couchstore file.
///
/// Variants that come from a file name the file and the offset. Decoders that
/// work on a byte slice (the codecs) return [`Error::Malformed`], which the
/// file layer turns into [`Error::Corrupt`] with the location through
/// [`Error::located`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend failed (this includes ENOSPC, EIO and simulated crashes).
    #[error("{path}: {op} failed at offset {offset}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operation.
        op: IoOp,
        /// Offset of the operation (0 where it has none).
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A chunk or header did not match its stored checksum.
    #[error("{path}: checksum mismatch in chunk at offset {offset} (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Offset of the chunk (its stored position).
        offset: u64,
        /// Checksum stored in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A read needed bytes beyond the end of the file.
    #[error(
        "{path}: {wanted} bytes at offset {offset} run past the end of the file ({file_len} bytes)"
    )]
    ShortRead {
        /// The file.
        path: PathBuf,
        /// Offset where the read started.
        offset: u64,
        /// Physical bytes wanted.
        wanted: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Bytes on disk are not what the format allows.
    #[error("{path}: corrupt {what} at offset {offset}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Offset of the offending chunk or header.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A decoder was given bytes it cannot decode (no file context yet).
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A header names a disk version this crate does not read.
    #[error("{path}: unsupported disk version {version} in header at offset {offset} (readable: 11 to 14)")]
    HeaderVersion {
        /// The file.
        path: PathBuf,
        /// Offset of the header.
        offset: u64,
        /// The version byte found.
        version: u8,
    },
    /// A non-empty file holds no valid header.
    #[error("{path}: no valid header found")]
    NoHeader {
        /// The file.
        path: PathBuf,
    },
    /// The file is encrypted, which this crate does not support.
    #[error("{path}: file is encrypted (metadata header at offset {offset}); encrypted files are not supported")]
    Encrypted {
        /// The file.
        path: PathBuf,
        /// Offset of the metadata header or of the header that refers to it.
        offset: u64,
    },
    /// A value given to an encoder does not fit the format.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A commit was synced, but its file no longer has a name: it was
    /// removed from its directory (or the directory itself was deleted), so
    /// nothing written to it can be found again. The commit must not be
    /// reported durable.
    #[error("{path}: the file was removed from its directory; the commit of the header at offset {offset} is lost with it")]
    Unlinked {
        /// The file (the name it had).
        path: PathBuf,
        /// Offset of the header whose commit failed.
        offset: u64,
    },
    /// A directory's exclusive lock is held by someone else (another store
    /// of this process, or another process): only one may own it.
    #[error("{path}: the directory is locked by {}", LockHolder::describe(holder.as_ref()))]
    Locked {
        /// The directory.
        path: PathBuf,
        /// Who holds the lock, as its lock file says (`None` when it says
        /// nothing readable, e.g. the holder has not yet written it).
        holder: Option<LockHolder>,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, op: IoOp, offset: u64, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Malformed {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn corrupt(
        path: &Path,
        offset: u64,
        what: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            offset,
            what,
            detail: detail.into(),
        }
    }

    /// Attaches a location to a [`Error::Malformed`] error, turning it into
    /// [`Error::Corrupt`]; other errors are returned unchanged.
    pub fn located(self, path: &Path, offset: u64) -> Self {
        match self {
            Error::Malformed { what, detail } => Error::Corrupt {
                path: path.to_path_buf(),
                offset,
                what,
                detail,
            },
            other => other,
        }
    }

    /// The underlying I/O error, if this is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }

    /// True when the disk is full (ENOSPC).
    pub fn is_no_space(&self) -> bool {
        self.io_error()
            .is_some_and(|e| e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28))
    }

    /// True for damage found in the file's bytes (checksum, corruption,
    /// truncation), as opposed to a failing device or a bad argument.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::Checksum { .. }
                | Error::ShortRead { .. }
                | Error::Corrupt { .. }
                | Error::Malformed { .. }
                | Error::HeaderVersion { .. }
        )
    }

    /// The name of the couchstore error code that the C library reports for
    /// the same condition (`COUCHSTORE_ERROR_CHECKSUM_FAIL`, ...), used by the
    /// tools that reproduce couchstore's listings.
    pub fn couchstore_name(&self) -> &'static str {
        match self {
            Error::Io { op, source, .. } => {
                if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28)
                {
                    "COUCHSTORE_ERROR_NO_SPACE"
                } else {
                    match op {
                        IoOp::Open | IoOp::Lock => "COUCHSTORE_ERROR_OPEN_FILE",
                        IoOp::Read | IoOp::Len => "COUCHSTORE_ERROR_READ",
                        IoOp::Write | IoOp::Truncate => "COUCHSTORE_ERROR_WRITE",
                        IoOp::Sync => "COUCHSTORE_ERROR_WRITE",
                    }
                }
            }
            Error::Checksum { .. } => "COUCHSTORE_ERROR_CHECKSUM_FAIL",
            Error::ShortRead { .. } => "COUCHSTORE_ERROR_READ",
            Error::Corrupt { .. } | Error::Malformed { .. } => "COUCHSTORE_ERROR_CORRUPT",
            Error::HeaderVersion { .. } => "COUCHSTORE_ERROR_HEADER_VERSION",
            Error::NoHeader { .. } => "COUCHSTORE_ERROR_NO_HEADER",
            Error::Encrypted { .. } => "COUCHSTORE_ERROR_NOT_SUPPORTED",
            Error::InvalidArgument(_) => "COUCHSTORE_ERROR_INVALID_ARGUMENTS",
            Error::Unlinked { .. } => "COUCHSTORE_ERROR_WRITE",
            Error::Locked { .. } => "COUCHSTORE_ERROR_OPEN_FILE",
        }
    }
}
