//! The I/O backend: the small set of operations the format needs from a file.
//!
//! Three implementations: [`FileBackend`] (a real file, positional I/O and
//! `fdatasync`), [`MemBackend`] (a byte vector, for tests and tools) and
//! [`crate::FaultyBackend`] (a wrapper that injects crashes and errors).

use memmap2::{Mmap, MmapOptions};
use parking_lot::{RwLock, RwLockReadGuard};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, Range};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

    /// The bytes `[offset, offset + len)` read in place, without a copy
    /// through the kernel, when the backend maps its file (a
    /// [`FileBackend`]) and the bytes are known to be in it; `None`
    /// otherwise, and the caller reads them with [`Backend::read_at`].
    /// A thread holds at most one [`InPlace`] at a time.
    fn read_in_place(&self, offset: u64, len: usize) -> io::Result<Option<InPlace<'_>>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Asks the processor to start loading the bytes at `offset` into its
    /// caches, for a read of them that comes after other work: only a
    /// hint, nothing is read. Does nothing when the backend does not map
    /// its file (the default) or the bytes are not known to be in it. Like
    /// [`Backend::read_in_place`], it may take the map's read lock: not to
    /// be called while the thread holds an [`InPlace`].
    fn prefetch(&self, offset: u64) {
        let _ = offset;
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

/// Bytes of a file read in place ([`Backend::read_in_place`]): a slice of
/// the file's memory map, which stays mapped (and the file uncut) while
/// this lives.
pub struct InPlace<'a> {
    map: RwLockReadGuard<'a, FileMap>,
    range: Range<usize>,
    /// The backend's count of the bytes known to be in the file.
    in_file: &'a AtomicU64,
}

impl<'a> InPlace<'a> {
    /// The bytes `[offset, offset + len)` of the same map under the same
    /// read lock (no second lock taken), when they are known to be in the
    /// file and the map covers them; `None` otherwise, with the lock
    /// released, for the caller to ask the backend again
    /// ([`Backend::read_in_place`], which may grow the map).
    pub fn moved_to(self, offset: u64, len: usize) -> Option<InPlace<'a>> {
        let end = offset.checked_add(len as u64)?;
        // Checked under the read lock this holds, as in `read_in_place`.
        if end > self.in_file.load(Ordering::Acquire) || end > self.map.len() {
            return None;
        }
        // Both fit in usize: they are within the map's length.
        let range = offset as usize..end as usize;
        Some(InPlace { range, ..self })
    }
}

impl Deref for InPlace<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.map.map {
            Some(map) => &map[self.range.clone()],
            // An InPlace is only made from a map covering its range.
            None => &[],
        }
    }
}

impl fmt::Debug for InPlace<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InPlace")
            .field("range", &self.range)
            .finish()
    }
}

/// The memory map of a [`FileBackend`], grown as the file grows.
#[derive(Default)]
struct FileMap {
    map: Option<Mmap>,
}

impl FileMap {
    fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |map| map.len() as u64)
    }
}

/// The least a [`FileBackend`] maps: the map reaches past the end of the
/// file, so that the file grows into it without a new map for a while.
const MIN_MAP_LEN: u64 = 16 << 20;

/// A real file on disk, read and written with `pread`/`pwrite`, and read in
/// place through a read-only memory map ([`Backend::read_in_place`]).
///
/// The map covers more than the file (it is address space, not memory), so
/// the file grows into it; it is replaced by a larger one only when a read
/// reaches past it. Only bytes known to be in the file are read through
/// it: the file's length when opened, grown by every write of this handle
/// and cut by its [`Backend::truncate`], which waits for every [`InPlace`]
/// to be dropped first. Touching a mapped page past the end of the file
/// would kill the process (`SIGBUS`), which is why the map is only for files
/// nobody else cuts: a store's files, which its directory lock keeps to one
/// owner, and which only grow but for that truncate.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    map: RwLock<FileMap>,
    /// Bytes known to be in the file (see above). Lowered only under the
    /// map's write lock.
    in_file: AtomicU64,
    /// Set when mapping failed (a file system without `mmap`, no address
    /// space): reads go through `pread` from then on.
    unmappable: AtomicBool,
}

impl fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.path)
            .field("mapped", &self.map.read().len())
            .field("in_file", &self.in_file.load(Ordering::Relaxed))
            .finish()
    }
}

impl FileBackend {
    /// Opens an existing file for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file, path)
    }

    /// Opens an existing file for reading only; writes will fail.
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).open(path)?;
        Self::from_file(file, path)
    }

    /// Creates a new file, failing if it exists.
    pub fn create_new(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Self::from_file(file, path)
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
        Self::from_file(file, path)
    }

    /// Wraps an already open file (one `fstat`, for its length). Takes a
    /// shared advisory lock on it (`flock`), which tells the last handle on
    /// an unlinked file that it is the last ([`FileBackend`]'s `Drop`).
    pub fn from_file(file: File, path: impl AsRef<Path>) -> io::Result<Self> {
        let len = file.metadata()?.len();
        // Fails only while another handle releases the file, unlinked:
        // then read with `pread`, which reports a cut where a map would
        // kill the process.
        let shared = file.try_lock_shared().is_ok();
        Ok(Self {
            file,
            path: path.as_ref().to_path_buf(),
            map: RwLock::new(FileMap::default()),
            in_file: AtomicU64::new(len),
            unmappable: AtomicBool::new(!shared),
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This file reading in place through its memory map (`true`, the
    /// default) or only with `pread` (`false`). The trade: a map saves a
    /// system call and the kernel's copy on every read, but a disk that
    /// fails to read a page kills the process (`SIGBUS`) where `pread`
    /// returns `EIO`, an error the store reports.
    pub fn with_mapped_reads(self, mapped_reads: bool) -> Self {
        self.unmappable.store(!mapped_reads, Ordering::Relaxed);
        self
    }

    /// Maps enough of the file to reach `end` (unless a map already does).
    fn grow_map(&self, end: u64) -> io::Result<()> {
        let mut map = self.map.write();
        if end <= map.len() {
            return Ok(());
        }
        let len = end.max(MIN_MAP_LEN).next_power_of_two();
        let Ok(len) = usize::try_from(len) else {
            self.unmappable.store(true, Ordering::Relaxed);
            return Ok(());
        };
        match map_file(&self.file, len) {
            Ok(new) => map.map = Some(new),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "reads fall back to pread: the file cannot be mapped");
                self.unmappable.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Bytes an unlinked file is cut by at a time when its last handle goes
/// (see `Drop for FileBackend`).
const RELEASE_STEP: u64 = 32 << 20;

/// The pause after each [`RELEASE_STEP`] cut: it lets the syncs of other
/// files through between two cuts. Without it the cuts ran back to back and
/// the flusher's first commit after a compaction's switch waited 25 to 38 ms
/// in its sync, against 6 to 9 ms with it (bench peers, a 570 MB revision
/// released, 2026-12-06). A 570 MB file takes about 180 ms to release.
const RELEASE_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

impl Drop for FileBackend {
    /// The last handle on an unlinked file (an old revision after a
    /// compaction) cuts it down step by step, on a thread of its own,
    /// before closing it. Closing it whole frees all its blocks at once,
    /// and the file system's block allocation waits meanwhile: the commits
    /// of other files stalled for up to 300 ms when a compaction released
    /// a 570 MB revision, against under 185 ms with this (bench peers,
    /// 2026-12-06), and the cuts are paced (10 ms apart). Only when
    /// no other handle, in this process or another, has the file open:
    /// each holds a shared `flock`, and this takes the exclusive one first.
    fn drop(&mut self) {
        let map = std::mem::take(self.map.get_mut());
        drop(map);
        let Ok(meta) = self.file.metadata() else {
            return;
        };
        if meta.nlink() != 0 || meta.len() <= RELEASE_STEP || self.file.try_lock().is_err() {
            return;
        }
        let len = meta.len();
        // Without a thread (or a second descriptor for it), this one does it.
        let spawned = self.file.try_clone().and_then(|file| {
            std::thread::Builder::new()
                .name("release-file".into())
                .spawn(move || cut_down(&file, len))
        });
        if spawned.is_err() {
            cut_down(&self.file, len);
        }
    }
}

/// Cuts `file`, of `len` bytes, down by [`RELEASE_STEP`] at a time, with a
/// [`RELEASE_PAUSE`] after each cut.
fn cut_down(file: &File, mut len: u64) {
    while len > RELEASE_STEP {
        len -= RELEASE_STEP;
        if file.set_len(len).is_err() {
            return;
        }
        std::thread::sleep(RELEASE_PAUSE);
    }
}

/// A read-only shared map of the first `len` bytes of `file` (which may be
/// more than the file holds).
#[allow(unsafe_code)]
fn map_file(file: &File, len: usize) -> io::Result<Mmap> {
    // SAFETY: memmap2 calls this unsafe because the mapped bytes can change
    // or vanish under the slices made of them. `FileBackend` hands out
    // slices (`InPlace`) only of bytes known to be in the file, and those
    // never change: the files are append-only, so a write never touches
    // bytes already written, and the one way to remove bytes,
    // `FileBackend::truncate`, takes the map's write lock, so it waits
    // until no slice is alive and lowers the known length before any new
    // slice is made. Other processes are kept off a store's files by its
    // directory lock. Measured to matter: `get` of a persisted document
    // spent about a fifth of its time in `pread` and the kernel's copy
    // (docs/performance.md).
    unsafe { MmapOptions::new().len(len).map(file) }
}

/// Hints the processor to load the cache line holding `byte` (a no-op on
/// other processors than x86-64).
#[allow(unsafe_code)]
#[inline]
fn prefetch_line(byte: &u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is unsafe only for taking a raw pointer. A
    // prefetch reads nothing the program sees and never faults, whatever
    // the address; this one is made from a reference, so it is valid too.
    // Measured to matter: prefetching a document's body as soon as its
    // offset is known made the read-back of 200,000 keys about 4% faster
    // (bench peers --reread 4, ten processes alternating with and without
    // it, 2026-12-06, eabfea5), where a plain load lost time (the atomic
    // operations after it wait for it).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            std::ptr::from_ref(byte).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = byte;
}

impl Backend for FileBackend {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.in_file
            .fetch_max(offset + data.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        // No slice of the map is alive while this holds the write lock.
        let _map = self.map.write();
        let result = self.file.set_len(len);
        // Whether or not the cut happened, only what is surely left counts.
        self.in_file.fetch_min(len, Ordering::AcqRel);
        result
    }

    /// One `fstat`: its `st_nlink`.
    fn link_count(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.nlink())
    }

    fn prefetch(&self, offset: u64) {
        let map = self.map.read();
        if offset >= self.in_file.load(Ordering::Acquire) {
            return;
        }
        let byte = map
            .map
            .as_ref()
            .and_then(|map| map.get(usize::try_from(offset).ok()?));
        if let Some(byte) = byte {
            prefetch_line(byte);
        }
    }

    fn read_in_place(&self, offset: u64, len: usize) -> io::Result<Option<InPlace<'_>>> {
        let Some(end) = offset.checked_add(len as u64) else {
            return Ok(None);
        };
        if self.unmappable.load(Ordering::Relaxed) {
            return Ok(None);
        }
        for _ in 0..2 {
            let map = self.map.read();
            // Checked under the read lock: a truncate cannot lower it now.
            if end > self.in_file.load(Ordering::Acquire) {
                return Ok(None);
            }
            if end <= map.len() {
                // Both fit in usize: they are within the map's length.
                let range = offset as usize..end as usize;
                return Ok(Some(InPlace {
                    map,
                    range,
                    in_file: &self.in_file,
                }));
            }
            drop(map);
            self.grow_map(end)?;
        }
        Ok(None)
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
    use std::sync::Arc;

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

    fn in_place(b: &dyn Backend, offset: u64, len: usize) -> Option<Vec<u8>> {
        b.read_in_place(offset, len)
            .unwrap()
            .map(|bytes| bytes.to_vec())
    }

    #[test]
    fn file_backend_reads_in_place_what_is_in_the_file_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"there at open").unwrap();
        let b = FileBackend::open(&path).unwrap();
        assert_eq!(in_place(&b, 0, 13).unwrap(), b"there at open");
        assert_eq!(in_place(&b, 9, 4).unwrap(), b"open");
        // Past the end: not read in place (the caller's read reports it).
        assert_eq!(in_place(&b, 9, 5), None);
        assert_eq!(in_place(&b, u64::MAX, 2), None);
        // The file grows into the map, and past it: a larger map.
        b.write_at(13, b", grown").unwrap();
        assert_eq!(in_place(&b, 0, 20).unwrap(), b"there at open, grown");
        let far = MIN_MAP_LEN * 3 + 5;
        b.write_at(far, b"far out").unwrap();
        assert_eq!(in_place(&b, far, 7).unwrap(), b"far out");
        assert!(b.map.read().len() >= far + 7);
        assert_eq!(in_place(&b, 0, 5).unwrap(), b"there");
        // Other backends read with read_at.
        assert_eq!(
            in_place(&MemBackend::from_bytes(b"mem".to_vec()), 0, 3),
            None
        );
    }

    #[test]
    fn file_backend_never_reads_in_place_what_a_truncate_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = FileBackend::create_new(&path).unwrap();
        b.write_at(0, &[7u8; 10_000]).unwrap();
        assert_eq!(in_place(&b, 9_000, 1_000).unwrap(), vec![7u8; 1_000]);
        b.truncate(5_000).unwrap();
        assert_eq!(in_place(&b, 9_000, 1_000), None, "cut: past the end");
        assert_eq!(in_place(&b, 4_000, 1_000).unwrap(), vec![7u8; 1_000]);
        // Written again after the cut: the new bytes.
        b.write_at(5_000, &[9u8; 5_000]).unwrap();
        assert_eq!(in_place(&b, 9_000, 1_000).unwrap(), vec![9u8; 1_000]);
        // A truncate waits for a slice alive in another thread.
        let b = Arc::new(b);
        let slice = b.read_in_place(0, 10).unwrap().unwrap();
        let cutter = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || b.truncate(0).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(&slice[..], &[7u8; 10][..], "the cut waits");
        drop(slice);
        cutter.join().unwrap();
        assert_eq!(in_place(&*b, 0, 10), None);
    }

    #[test]
    fn bytes_read_in_place_move_under_the_same_lock_only_within_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = FileBackend::create_new(&path).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        b.write_at(0, &data).unwrap();
        let first = b.read_in_place(0, 8).unwrap().unwrap();
        let moved = first.moved_to(9_000, 1_000).unwrap();
        assert_eq!(&moved[..], &data[9_000..]);
        // Past the file's end (though within its map): not moved.
        assert!(moved.moved_to(9_000, 1_001).is_none());
        let first = b.read_in_place(0, 8).unwrap().unwrap();
        assert!(first.moved_to(u64::MAX, 2).is_none());
        // The lock went with it: a cut goes ahead.
        b.truncate(5_000).unwrap();
        let first = b.read_in_place(0, 8).unwrap().unwrap();
        assert!(first.moved_to(4_000, 1_001).is_none(), "cut: past the end");
        let first = b.read_in_place(0, 8).unwrap().unwrap();
        assert_eq!(
            &first.moved_to(4_000, 1_000).unwrap()[..],
            &data[4_000..5_000]
        );
    }

    #[test]
    fn a_prefetch_of_any_offset_is_only_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = FileBackend::create_new(&path).unwrap();
        // Before the file has bytes or a map, in it, past its end, past
        // its map, at the end of the address space: nothing happens.
        b.prefetch(0);
        b.write_at(0, b"a chunk").unwrap();
        assert_eq!(in_place(&b, 0, 7).unwrap(), b"a chunk");
        for offset in [0, 3, 6, 7, 1 << 20, MIN_MAP_LEN + 1, u64::MAX] {
            b.prefetch(offset);
        }
        assert_eq!(in_place(&b, 0, 7).unwrap(), b"a chunk");
        MemBackend::from_bytes(b"in memory".to_vec()).prefetch(3);
    }

    #[test]
    fn a_file_read_in_place_stays_readable_after_it_is_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = FileBackend::create_new(&path).unwrap();
        b.write_at(0, b"still here").unwrap();
        assert_eq!(in_place(&b, 0, 10).unwrap(), b"still here");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(in_place(&b, 0, 10).unwrap(), b"still here");
        b.write_at(10, b", grown").unwrap();
        assert_eq!(in_place(&b, 0, 17).unwrap(), b"still here, grown");
    }

    /// A sparse file of three release steps and a bit, "end" at its end.
    fn big_file(path: &Path) -> u64 {
        let len = RELEASE_STEP * 3 + 3;
        let f = FileBackend::create_new(path).unwrap();
        f.write_at(len - 3, b"end").unwrap();
        len
    }

    #[test]
    fn a_linked_file_is_left_whole_when_its_last_handle_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = big_file(&path);
        drop(FileBackend::open(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    }

    #[test]
    fn an_unlinked_file_another_handle_holds_is_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = big_file(&path);
        let first = FileBackend::open(&path).unwrap();
        let second = FileBackend::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(first);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(second.len().unwrap(), len);
        let mut end = [0u8; 3];
        second.read_full_at(len - 3, &mut end).unwrap();
        assert_eq!(&end, b"end");
        assert_eq!(in_place(&second, len - 3, 3).unwrap(), b"end");
    }

    #[test]
    fn the_last_handle_on_an_unlinked_file_cuts_it_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        big_file(&path);
        let backend = FileBackend::open(&path).unwrap();
        // A plain descriptor (no flock) to watch the length by.
        let watcher = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(backend);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while watcher.metadata().unwrap().len() > RELEASE_STEP {
            assert!(std::time::Instant::now() < deadline, "never cut down");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
