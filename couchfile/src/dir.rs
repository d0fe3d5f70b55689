//! Directories: the name operations a vbucket store needs (list, open,
//! create, remove, rename, sync) and the exclusive lock of its owner, on
//! disk ([`OsDirectory`]) or in memory with fault injection
//! ([`FaultyDirectory`]), so crash tests can cover files and the names that
//! point at them together.

use crate::backend::{sync_directory, Backend, FileBackend, MemBackend};
use crate::error::{Error, IoOp};
use crate::fault::{FaultController, FaultyBackend, OpKind, TornTail};
use parking_lot::Mutex;
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Name of the lock file an [`OsDirectory`] keeps for [`Directory::lock`].
/// It is not a vbucket file: stores leave it alone.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Who holds a directory's lock, as its lock file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The holder's process id.
    pub pid: Option<u32>,
    /// The holder's host name, when it could be read.
    pub host: Option<String>,
}

impl LockHolder {
    /// This process, on this host.
    pub fn this_process() -> Self {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && !h.contains(['\n', '=']));
        Self {
            pid: Some(std::process::id()),
            host,
        }
    }

    /// The lock file's text: `pid=<pid>` and `host=<name>` lines.
    fn to_text(&self) -> String {
        let mut text = String::new();
        if let Some(pid) = self.pid {
            text.push_str(&format!("pid={pid}\n"));
        }
        if let Some(host) = &self.host {
            text.push_str(&format!("host={host}\n"));
        }
        text
    }

    /// Reads [`LockHolder::to_text`]; `None` when it names nobody (an empty
    /// file: the holder has not written it yet).
    fn parse(text: &str) -> Option<Self> {
        let mut holder = Self {
            pid: None,
            host: None,
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", pid)) => holder.pid = pid.trim().parse().ok(),
                Some(("host", host)) if !host.trim().is_empty() => {
                    holder.host = Some(host.trim().to_owned());
                }
                _ => {}
            }
        }
        (holder.pid.is_some() || holder.host.is_some()).then_some(holder)
    }

    /// `process 1234 on host h`, or `another owner (pid unknown)`.
    pub(crate) fn describe(holder: Option<&Self>) -> String {
        match holder {
            Some(holder) => holder.to_string(),
            None => "another owner (pid unknown)".to_owned(),
        }
    }
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "process {pid}")?,
            None => f.write_str("a process of unknown pid")?,
        }
        if let Some(host) = &self.host {
            write!(f, " on host {host}")?;
        }
        Ok(())
    }
}

/// A directory's exclusive lock ([`Directory::lock`]), held until dropped.
pub struct DirLock {
    path: PathBuf,
    /// Whatever holds the lock: dropping it releases it.
    _held: Box<dyn Any + Send + Sync>,
}

impl DirLock {
    /// The lock on the directory `path`, held as long as `held` lives (for
    /// implementations of [`Directory::lock`]).
    pub fn new(path: impl Into<PathBuf>, held: impl Any + Send + Sync) -> Self {
        Self {
            path: path.into(),
            _held: Box::new(held),
        }
    }

    /// The directory locked.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Debug for DirLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirLock").field("path", &self.path).finish()
    }
}

/// A directory of files: the operations a vbucket store needs on names.
pub trait Directory: Send + Sync + fmt::Debug {
    /// The directory's path (used to name files in errors: `path.join(name)`).
    fn path(&self) -> &Path;
    /// Names of the regular files in it (any order).
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing (`NotFound` if missing).
    fn open(&self, name: &str) -> io::Result<Arc<dyn Backend>>;
    /// Creates a new empty file; `AlreadyExists` if the name exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn Backend>>;
    /// Removes a file (`NotFound` if missing). Open handles keep working
    /// (POSIX unlink semantics).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically renames `from` to `to`, replacing `to` if it exists.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes the names (creates, removes, renames) durable: fsync of the
    /// directory.
    fn sync(&self) -> io::Result<()>;
    /// Takes the directory's exclusive lock, held until the returned
    /// [`DirLock`] is dropped: one owner at a time may use the directory.
    /// Does not wait for another owner: fails at once with
    /// [`Error::Locked`] (naming the holder where it is known) while
    /// another owner holds it, in this process or another.
    fn lock(&self) -> crate::Result<DirLock>;
}

/// Accepts a plain file name: not empty, not `.`, no `/`, `..` or NUL.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name.contains(['/', '\0']) || name.contains("..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file name {name:?}"),
        ));
    }
    Ok(())
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file named {name:?}"))
}

/// A real directory, through `std::fs` and [`FileBackend`].
#[derive(Debug)]
pub struct OsDirectory {
    path: PathBuf,
    /// Whether the files it opens read in place through a memory map.
    mapped_reads: bool,
}

impl OsDirectory {
    /// The directory at `path`, created (with its parents) if missing. Its
    /// files read in place through a memory map
    /// ([`OsDirectory::with_mapped_reads`]). An empty path is an
    /// `InvalidInput` error: it names no directory (its files would land
    /// in the process's current directory, relative to it).
    pub fn new(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.as_os_str().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty path names no directory",
            ));
        }
        fs::create_dir_all(&path)?;
        Ok(Self {
            path,
            mapped_reads: true,
        })
    }

    /// This directory with its files reading in place through a memory map
    /// (`true`, the default) or only with `pread` (`false`; see
    /// [`FileBackend::with_mapped_reads`] for the trade).
    pub fn with_mapped_reads(mut self, mapped_reads: bool) -> Self {
        self.mapped_reads = mapped_reads;
        self
    }

    fn file_path(&self, name: &str) -> io::Result<PathBuf> {
        check_name(name)?;
        Ok(self.path.join(name))
    }
}

impl Directory for OsDirectory {
    fn path(&self) -> &Path {
        &self.path
    }

    /// Names that are not UTF-8 are left out: they cannot be opened by name.
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Backend>> {
        let file = FileBackend::open(self.file_path(name)?)?;
        Ok(Arc::new(file.with_mapped_reads(self.mapped_reads)))
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn Backend>> {
        let file = FileBackend::create_new(self.file_path(name)?)?;
        Ok(Arc::new(file.with_mapped_reads(self.mapped_reads)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.file_path(name)?)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.file_path(from)?, self.file_path(to)?)
    }

    fn sync(&self) -> io::Result<()> {
        sync_directory(&self.path)
    }

    /// An advisory lock (`flock`, through [`File::try_lock`]) on the file
    /// [`LOCK_FILE_NAME`] in the directory, created if missing. `flock`
    /// locks belong to an open file, so two opens in one process conflict
    /// as two processes do; the kernel drops the lock when the holder
    /// closes the file or dies. Once it holds the lock, the holder writes
    /// its pid and host name into the file for the error of the next one.
    ///
    /// One wait: a child process forked by this process (any
    /// `std::process::Command` of any thread) shares every open file until
    /// it execs and closes them, so for that moment it holds a lock this
    /// process has already released. When the lock file names this process
    /// as the holder and no lock of this process holds it, the lock is
    /// retried for up to [`FORK_GRACE`]; a
    /// lock held by another process, or by another owner in this one,
    /// fails at once.
    fn lock(&self) -> crate::Result<DirLock> {
        let path = self.path.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, IoOp::Open, 0, e))?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            let meta = file
                .metadata()
                .map_err(|e| Error::io(&path, IoOp::Open, 0, e))?;
            (meta.dev(), meta.ino())
        };
        let locked = |file: &File| Error::Locked {
            path: self.path.clone(),
            holder: read_holder(file),
        };
        let deadline = std::time::Instant::now() + FORK_GRACE;
        let mut pause = std::time::Duration::from_millis(1);
        let held = loop {
            match HeldLocks::try_take(id, &file) {
                Ok(held) => break held,
                Err(TakeError::HeldHere) => return Err(locked(&file)),
                Err(TakeError::Io(e)) => return Err(Error::io(&path, IoOp::Lock, 0, e)),
                Err(TakeError::WouldBlock) => {
                    let holder = read_holder(&file);
                    let forked_child = holder.as_ref() == Some(&LockHolder::this_process());
                    if !forked_child || std::time::Instant::now() >= deadline {
                        return Err(Error::Locked {
                            path: self.path.clone(),
                            holder,
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(50));
                }
            }
        };
        let text = LockHolder::this_process().to_text();
        file.set_len(0)
            .map_err(|e| Error::io(&path, IoOp::Truncate, 0, e))?;
        file.write_all_at(text.as_bytes(), 0)
            .map_err(|e| Error::io(&path, IoOp::Write, 0, e))?;
        tracing::debug!(path = %path.display(), "directory locked");
        Ok(DirLock::new(self.path.clone(), (held, file)))
    }
}

/// How long [`OsDirectory::lock`] waits for a lock that only a child
/// forked by this process holds (until the child execs: microseconds on an
/// idle machine, longer on a loaded one).
pub const FORK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The lock files (device, inode) that locks of this process hold, so
/// that [`OsDirectory::lock`] tells a second owner in this process (an
/// error at once) from a forked child that still shares a released lock
/// (worth a short wait).
#[derive(Debug)]
struct HeldLocks {
    id: (u64, u64),
}

/// Every lock file this process holds a lock on.
static HELD_LOCKS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// Why [`HeldLocks::try_take`] did not take the lock.
enum TakeError {
    /// A lock of this process holds the file.
    HeldHere,
    /// Another open file holds it (another process, or a forked child).
    WouldBlock,
    Io(io::Error),
}

impl HeldLocks {
    /// Takes `file`'s `flock` and records it, unless this process already
    /// holds a lock on the file `id`. Checked and taken under one mutex, so
    /// two threads of this process cannot both get past the check.
    fn try_take(id: (u64, u64), file: &File) -> Result<Self, TakeError> {
        let mut held = HELD_LOCKS.lock();
        if held.contains(&id) {
            return Err(TakeError::HeldHere);
        }
        match file.try_lock() {
            Ok(()) => {
                held.push(id);
                Ok(Self { id })
            }
            Err(TryLockError::WouldBlock) => Err(TakeError::WouldBlock),
            Err(TryLockError::Error(e)) => Err(TakeError::Io(e)),
        }
    }
}

impl Drop for HeldLocks {
    fn drop(&mut self) {
        HELD_LOCKS.lock().retain(|id| *id != self.id);
    }
}

/// The holder a lock file names (read without the lock: best effort).
fn read_holder(file: &File) -> Option<LockHolder> {
    let mut buf = [0u8; 512];
    let n = file.read_at(&mut buf, 0).ok()?;
    LockHolder::parse(&String::from_utf8_lossy(&buf[..n]))
}

/// The in-process lock of a [`FaultyDirectory`]: released when dropped.
#[derive(Debug)]
struct HeldFlag(Arc<AtomicBool>);

impl Drop for HeldFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Which names survive in a [`FaultyDirectory::crash_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameTail {
    /// The names as of the last directory sync: later creates, removes and
    /// renames are undone.
    Synced,
    /// The live names: every create, remove and rename reached the disk.
    Everything,
}

type MemFile = Arc<FaultyBackend<MemBackend>>;

struct Names {
    /// What `list` and `open` see.
    live: BTreeMap<String, MemFile>,
    /// The mapping as of the last `sync`; it keeps removed files alive.
    durable: BTreeMap<String, MemFile>,
}

/// An in-memory directory whose files are [`FaultyBackend`]s sharing its
/// [`FaultController`]: the crash counter counts file writes and syncs and
/// the directory's creates, removes, renames and syncs alike, and rules can
/// fail any of them. Name operations apply at once to the live view; a
/// [`Directory::sync`] makes the current names the durable ones.
pub struct FaultyDirectory {
    path: PathBuf,
    controller: FaultController,
    names: Mutex<Names>,
    /// True while a [`DirLock`] of this directory lives.
    locked: Arc<AtomicBool>,
}

impl fmt::Debug for FaultyDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names.lock();
        f.debug_struct("FaultyDirectory")
            .field("path", &self.path)
            .field("live", &names.live.keys().collect::<Vec<_>>())
            .field("durable", &names.durable.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl FaultyDirectory {
    /// An empty directory at the fake path `/faulty`.
    pub fn new(controller: FaultController) -> Self {
        Self::new_at("/faulty", controller)
    }

    /// An empty directory at the fake path `path` (nothing touches the disk).
    pub fn new_at(path: impl AsRef<Path>, controller: FaultController) -> Self {
        Self::with_files(path.as_ref().to_path_buf(), controller, [])
    }

    /// A directory at `/faulty` holding `files`, names and contents synced,
    /// with a fresh controller.
    pub fn from_files(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self::with_files(PathBuf::from("/faulty"), FaultController::new(), files)
    }

    fn with_files(
        path: PathBuf,
        controller: FaultController,
        files: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Self {
        let live: BTreeMap<_, _> = files
            .into_iter()
            .map(|(name, bytes)| {
                let file = FaultyBackend::new(MemBackend::from_bytes(bytes), controller.clone());
                (name, Arc::new(file))
            })
            .collect();
        let names = Names {
            durable: live.clone(),
            live,
        };
        Self {
            path,
            controller,
            names: Mutex::new(names),
            locked: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The controller shared by the directory and its files.
    pub fn controller(&self) -> &FaultController {
        &self.controller
    }

    /// The directory a crash now would leave: the names `names` says, each
    /// file holding its [`FaultyBackend::crash_image`] under `torn`. The
    /// image has a fresh controller, counts as fully synced and is not
    /// locked (the crashed owner is gone). Works whether or not the
    /// controller has crashed.
    pub fn crash_image(&self, torn: TornTail, names: NameTail) -> io::Result<FaultyDirectory> {
        let state = self.names.lock();
        let map = match names {
            NameTail::Synced => &state.durable,
            NameTail::Everything => &state.live,
        };
        let files = map
            .iter()
            .map(|(name, file)| Ok((name.clone(), file.crash_image(torn)?)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self::with_files(
            self.path.clone(),
            FaultController::new(),
            files,
        ))
    }

    /// The current contents of the live file `name`, bypassing the
    /// controller (for tests).
    pub fn file_bytes(&self, name: &str) -> io::Result<Vec<u8>> {
        self.live_file(name)?.crash_image(TornTail::Everything)
    }

    fn live_file(&self, name: &str) -> io::Result<MemFile> {
        let file = self.names.lock().live.get(name).cloned();
        file.ok_or_else(|| not_found(name))
    }
}

impl Directory for FaultyDirectory {
    fn path(&self) -> &Path {
        &self.path
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.controller.check(OpKind::List)?;
        Ok(self.names.lock().live.keys().cloned().collect())
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Backend>> {
        check_name(name)?;
        self.controller.check(OpKind::Open)?;
        Ok(self.live_file(name)?)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn Backend>> {
        check_name(name)?;
        self.controller.check(OpKind::Create)?;
        let mut names = self.names.lock();
        if names.live.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("file {name:?} exists"),
            ));
        }
        let file = Arc::new(FaultyBackend::new(
            MemBackend::new(),
            self.controller.clone(),
        ));
        names.live.insert(name.to_owned(), file.clone());
        Ok(file)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.controller.check(OpKind::Remove)?;
        let removed = self.names.lock().live.remove(name);
        let removed = removed.ok_or_else(|| not_found(name))?;
        removed.set_linked(false);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        self.controller.check(OpKind::Rename)?;
        let mut names = self.names.lock();
        let file = names.live.remove(from).ok_or_else(|| not_found(from))?;
        if let Some(replaced) = names.live.insert(to.to_owned(), file) {
            replaced.set_linked(false);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.controller.check(OpKind::SyncDir)?;
        let mut names = self.names.lock();
        names.durable = names.live.clone();
        Ok(())
    }

    /// An in-process lock (no file, no I/O, outside the fault controller):
    /// two stores on one in-memory directory conflict as they would on
    /// disk. The holder named is this process.
    fn lock(&self) -> crate::Result<DirLock> {
        if self.locked.swap(true, Ordering::AcqRel) {
            return Err(Error::Locked {
                path: self.path.clone(),
                holder: Some(LockHolder::this_process()),
            });
        }
        Ok(DirLock::new(
            self.path.clone(),
            HeldFlag(Arc::clone(&self.locked)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultKind, FaultRule};

    fn sorted(dir: &dyn Directory) -> Vec<String> {
        let mut names = dir.list().unwrap();
        names.sort();
        names
    }

    fn crashed(dir: &FaultyDirectory, torn: TornTail, names: NameTail) -> FaultyDirectory {
        dir.crash_image(torn, names).unwrap()
    }

    #[test]
    fn os_directory_creates_renames_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = OsDirectory::new(tmp.path().join("vb")).unwrap();
        assert!(dir.list().unwrap().is_empty());
        let f = dir.create("0.couch.1").unwrap();
        f.write_at(0, b"one").unwrap();
        assert_eq!(
            dir.create("0.couch.1").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        dir.create("0.couch.1.compact")
            .unwrap()
            .write_at(0, b"two")
            .unwrap();
        fs::create_dir(dir.path().join("subdir")).unwrap();
        assert_eq!(sorted(&dir), ["0.couch.1", "0.couch.1.compact"]);
        dir.rename("0.couch.1.compact", "0.couch.2").unwrap();
        dir.remove("0.couch.1").unwrap();
        dir.sync().unwrap();
        assert_eq!(sorted(&dir), ["0.couch.2"]);
        let mut buf = [0u8; 3];
        f.read_full_at(0, &mut buf).unwrap(); // unlinked but still open
        assert_eq!(&buf, b"one");
        dir.open("0.couch.2")
            .unwrap()
            .read_full_at(0, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"two");
        for (name, kind) in [
            ("0.couch.1", io::ErrorKind::NotFound),
            ("../x", io::ErrorKind::InvalidInput),
            ("", io::ErrorKind::InvalidInput),
        ] {
            assert_eq!(dir.open(name).unwrap_err().kind(), kind);
            assert_eq!(dir.remove(name).unwrap_err().kind(), kind);
        }
    }

    /// A compaction swap: `0.couch.1` live, `.compact` written and synced,
    /// then renamed to `0.couch.2` and the old file removed.
    fn swap(dir: &FaultyDirectory) -> io::Result<()> {
        let old = dir.create("0.couch.1")?;
        old.write_at(0, b"old")?;
        old.sync()?;
        dir.sync()?;
        let new = dir.create("0.couch.1.compact")?;
        new.write_at(0, b"new")?;
        new.sync()?;
        dir.rename("0.couch.1.compact", "0.couch.2")?;
        dir.remove("0.couch.1")?;
        dir.sync()
    }

    #[test]
    fn crash_at_the_rename_keeps_the_synced_names() {
        let c = FaultController::new();
        let dir = FaultyDirectory::new(c.clone());
        c.crash_at(7); // create, write, sync, syncdir, create, write, sync, *rename*
        assert!(swap(&dir).is_err());
        assert!(c.has_crashed());
        assert!(dir.list().is_err());
        let image = crashed(&dir, TornTail::Everything, NameTail::Synced);
        assert_eq!(sorted(&image), ["0.couch.1"]);
        assert_eq!(image.file_bytes("0.couch.1").unwrap(), b"old");
        let image = crashed(&dir, TornTail::Nothing, NameTail::Everything);
        assert_eq!(sorted(&image), ["0.couch.1", "0.couch.1.compact"]);
        assert_eq!(image.file_bytes("0.couch.1.compact").unwrap(), b"new");
        // The image is a working, uncrashed directory.
        image.remove("0.couch.1").unwrap();
        assert!(!image.controller().has_crashed());
    }

    #[test]
    fn unsynced_remove_comes_back_and_renames_show_under_everything() {
        let dir = FaultyDirectory::new(FaultController::new());
        let c = dir.controller().clone();
        c.crash_at(9); // the final directory sync
        assert!(swap(&dir).is_err());
        let synced = crashed(&dir, TornTail::Nothing, NameTail::Synced);
        assert_eq!(sorted(&synced), ["0.couch.1"]);
        assert_eq!(synced.file_bytes("0.couch.1").unwrap(), b"old");
        let all = crashed(&dir, TornTail::Nothing, NameTail::Everything);
        assert_eq!(sorted(&all), ["0.couch.2"]);
        assert_eq!(all.file_bytes("0.couch.2").unwrap(), b"new");

        let dir = FaultyDirectory::new(FaultController::new());
        swap(&dir).unwrap();
        let image = crashed(&dir, TornTail::Nothing, NameTail::Synced);
        assert_eq!(sorted(&image), ["0.couch.2"]);
        assert_eq!(dir.controller().mutation_count(), 10);
    }

    #[test]
    fn crash_points_count_file_writes_and_directory_operations() {
        let dir = FaultyDirectory::from_files([("a".to_owned(), b"synced".to_vec())]);
        let c = dir.controller().clone();
        c.crash_at(2);
        let a = dir.open("a").unwrap(); // not a mutation
        a.write_at(6, b"+tail").unwrap();
        dir.create("b").unwrap();
        assert!(dir.rename("a", "c").is_err());
        assert!(a.read_full_at(0, &mut [0u8; 1]).is_err());
        let image = crashed(&dir, TornTail::Prefix(1), NameTail::Everything);
        assert_eq!(sorted(&image), ["a", "b"]);
        assert_eq!(image.file_bytes("a").unwrap(), b"synced+");
        assert_eq!(image.file_bytes("b").unwrap(), b"");
    }

    #[test]
    fn os_directory_lock_is_exclusive_and_names_its_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = OsDirectory::new(tmp.path()).unwrap();
        let lock = dir.lock().unwrap();
        assert_eq!(lock.path(), tmp.path());
        // A second open of the lock file in this process conflicts too.
        let other = OsDirectory::new(tmp.path()).unwrap();
        match other.lock().unwrap_err() {
            Error::Locked { path, holder } => {
                assert_eq!(path, tmp.path());
                assert_eq!(holder.unwrap().pid, Some(std::process::id()));
            }
            e => panic!("{e:?}"),
        }
        let message = other.lock().unwrap_err().to_string();
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        // The lock file is a regular file of the directory.
        assert_eq!(sorted(&dir), [LOCK_FILE_NAME]);
        drop(lock);
        let again = other.lock().unwrap();
        assert!(dir.lock().is_err());
        drop(again);
        dir.lock().unwrap();
    }

    /// Another open of the lock file, locked by hand: what a child forked
    /// by this process holds until it execs.
    fn flock_as_a_forked_child(tmp: &Path, holder: &LockHolder) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(tmp.join(LOCK_FILE_NAME))
            .unwrap();
        file.try_lock().unwrap();
        file.set_len(0).unwrap();
        file.write_all_at(holder.to_text().as_bytes(), 0).unwrap();
        file
    }

    #[test]
    fn a_lock_only_a_forked_child_shares_is_waited_for() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = OsDirectory::new(tmp.path()).unwrap();
        let child = flock_as_a_forked_child(tmp.path(), &LockHolder::this_process());
        // The "child" execs (closes its files) a little later.
        let exec = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(child);
        });
        let lock = dir.lock().unwrap();
        exec.join().unwrap();
        // A second owner in this process still fails at once.
        let start = std::time::Instant::now();
        assert!(matches!(dir.lock(), Err(Error::Locked { .. })));
        assert!(start.elapsed() < FORK_GRACE);
        drop(lock);
        dir.lock().unwrap();
    }

    #[test]
    fn a_lock_another_process_holds_fails_without_waiting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = OsDirectory::new(tmp.path()).unwrap();
        let other = LockHolder {
            pid: Some(std::process::id().wrapping_add(1)),
            host: LockHolder::this_process().host,
        };
        let _held = flock_as_a_forked_child(tmp.path(), &other);
        let start = std::time::Instant::now();
        match dir.lock().unwrap_err() {
            Error::Locked { holder, .. } => assert_eq!(holder, Some(other)),
            e => panic!("{e:?}"),
        }
        assert!(start.elapsed() < FORK_GRACE);
    }

    #[test]
    fn lock_file_text_round_trips() {
        let me = LockHolder::this_process();
        assert_eq!(LockHolder::parse(&me.to_text()), Some(me));
        assert_eq!(LockHolder::parse(""), None);
        assert_eq!(LockHolder::parse("garbage\n"), None);
        let holder = LockHolder::parse("pid=42\nhost=db1\n").unwrap();
        assert_eq!(holder.to_string(), "process 42 on host db1");
        assert_eq!(LockHolder::describe(None), "another owner (pid unknown)");
    }

    #[test]
    fn faulty_directory_lock_is_exclusive_in_process() {
        let dir = FaultyDirectory::new(FaultController::new());
        let lock = dir.lock().unwrap();
        assert!(matches!(dir.lock(), Err(Error::Locked { .. })));
        // A crash image is a new directory: the crashed owner is gone.
        let image = crashed(&dir, TornTail::Nothing, NameTail::Everything);
        drop(image.lock().unwrap());
        drop(lock);
        let _again = dir.lock().unwrap();
        assert!(dir.list().unwrap().is_empty(), "no lock file in memory");
    }

    #[test]
    fn faulty_directory_unlinks_removed_and_replaced_files() {
        let dir = FaultyDirectory::new(FaultController::new());
        let a = dir.create("a").unwrap();
        let b = dir.create("b").unwrap();
        assert_eq!(a.link_count().unwrap(), 1);
        dir.rename("a", "c").unwrap();
        assert_eq!(a.link_count().unwrap(), 1, "a rename keeps the file");
        dir.rename("b", "c").unwrap();
        assert_eq!(a.link_count().unwrap(), 0, "replaced");
        assert_eq!(b.link_count().unwrap(), 1);
        dir.remove("c").unwrap();
        assert_eq!(b.link_count().unwrap(), 0, "removed");
    }

    #[test]
    fn injected_faults_hit_directory_operations() {
        let c = FaultController::new();
        let dir = FaultyDirectory::new_at("/vb", c.clone());
        assert_eq!(dir.path(), Path::new("/vb"));
        c.inject(FaultRule::once(OpKind::Create, FaultKind::NoSpace));
        assert_eq!(dir.create("x").unwrap_err().raw_os_error(), Some(28));
        assert!(dir.list().unwrap().is_empty());
        dir.create("x").unwrap();
        c.inject(FaultRule::always(OpKind::SyncDir, FaultKind::Eio));
        assert_eq!(dir.sync().unwrap_err().raw_os_error(), Some(5));
        c.clear_faults();
        dir.sync().unwrap();
        assert_eq!(c.injected_count(), 2);
        assert!(!c.has_crashed());
    }
}
