//! The I/O backend: the small set of operations the format needs from a file.
//!
//! Three implementations: [`FileBackend`] (a real file, positional I/O and
//! `fdatasync`), [`MemBackend`] (a byte vector, for tests and tools) and
//! [`crate::FaultyBackend`] (a wrapper that injects crashes and errors).

use parking_lot::RwLock;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Positional I/O on one file. Implementations are shared between a writer
/// and any number of readers, so every method takes `&self`.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read,
    /// fewer only at the end of the file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `data` at `offset`, extending the file if needed (an
    /// append is a write at [`Backend::len`]).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// The file's current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts (or extends with zeros) the file to `len` bytes.
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// How many names the file has in the file system: 0 once it has been
    /// removed from its directory (or the directory deleted) while open.
    /// A sync still succeeds on such a file, but what it makes durable can
    /// never be found again, so a commit checks this after its sync
    /// ([`crate::FileWriter::commit`]). Files without names (in memory)
    /// report 1, the default.
    fn link_count(&self) -> io::Result<u64> {
        Ok(1)
    }

    /// Reads as much of `buf` as the file holds at `offset`, looping over
    /// short reads; returns the number of bytes read.
    fn read_full_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(offset + done as u64, &mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A real file on disk, read and written with `pread`/`pwrite`.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
}

impl FileBackend {
    /// Opens an existing file for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self::from_file(file, path))
    }

    /// Opens an existing file for reading only; writes will fail.
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).open(path)?;
        Ok(Self::from_file(file, path))
    }

    /// Creates a new file, failing if it exists.
    pub fn create_new(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self::from_file(file, path))
    }

    /// Opens a file for reading and writing, creating it if it does not exist.
    pub fn open_or_create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self::from_file(file, path))
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, path: impl AsRef<Path>) -> Self {
        Self {
            file,
            path: path.as_ref().to_path_buf(),
        }
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for FileBackend {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// One `fstat`: its `st_nlink`.
    fn link_count(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.nlink())
    }
}

/// Makes a directory's entries (created, renamed or removed files) durable.
pub fn sync_directory(dir: impl AsRef<Path>) -> io::Result<()> {
    File::open(dir.as_ref())?.sync_all()
}

/// A file held in memory. Cheap to create; `sync` does nothing.
#[derive(Debug, Default)]
pub struct MemBackend {
    bytes: RwLock<Vec<u8>>,
}

impl MemBackend {
    /// An empty in-memory file.
    pub fn new() -> Self {
        Self::default()
    }

    /// An in-memory file holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

impl Backend for MemBackend {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let bytes = self.bytes.read();
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= bytes.len() {
            return Ok(0);
        }
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let end = start + data.len();
        let mut bytes = self.bytes.write();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        self.bytes.write().resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(b: &dyn Backend) {
        assert!(b.is_empty().unwrap());
        b.write_at(0, b"hello").unwrap();
        b.write_at(10, b"world").unwrap();
        assert_eq!(b.len().unwrap(), 15);
        let mut buf = [0xffu8; 20];
        assert_eq!(b.read_full_at(0, &mut buf).unwrap(), 15);
        assert_eq!(&buf[..15], b"hello\0\0\0\0\0world");
        b.write_at(1, b"EL").unwrap();
        let mut two = [0u8; 3];
        assert_eq!(b.read_full_at(0, &mut two).unwrap(), 3);
        assert_eq!(&two, b"hEL");
        b.sync().unwrap();
        b.truncate(4).unwrap();
        assert_eq!(b.len().unwrap(), 4);
        assert_eq!(b.read_full_at(4, &mut buf).unwrap(), 0);
        assert_eq!(b.read_full_at(100, &mut buf).unwrap(), 0);
    }

    #[test]
    fn mem_backend_reads_what_was_written() {
        exercise(&MemBackend::new());
    }

    #[test]
    fn file_backend_reads_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        exercise(&FileBackend::create_new(&path).unwrap());
        assert!(FileBackend::create_new(&path).is_err());
        let ro = FileBackend::open_read_only(&path).unwrap();
        assert_eq!(ro.len().unwrap(), 4);
        assert!(ro.write_at(0, b"x").is_err());
        sync_directory(dir.path()).unwrap();
    }

    #[test]
    fn file_backend_counts_its_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = FileBackend::create_new(&path).unwrap();
        assert_eq!(b.link_count().unwrap(), 1);
        std::fs::hard_link(&path, dir.path().join("g")).unwrap();
        assert_eq!(b.link_count().unwrap(), 2);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(dir.path().join("g")).unwrap();
        assert_eq!(b.link_count().unwrap(), 0);
        // Still writable and syncable: only the link count tells.
        b.write_at(0, b"lost").unwrap();
        b.sync().unwrap();
        assert_eq!(MemBackend::new().link_count().unwrap(), 1);
    }
}
