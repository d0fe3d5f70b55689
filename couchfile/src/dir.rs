//! Directories: the name operations a vbucket store needs (list, open,
//! create, remove, rename, sync), on disk ([`OsDirectory`]) or in memory with
//! fault injection ([`FaultyDirectory`]), so crash tests can cover files and
//! the names that point at them together.

use crate::backend::{sync_directory, Backend, FileBackend, MemBackend};
use crate::fault::{FaultController, FaultyBackend, OpKind, TornTail};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
}

impl OsDirectory {
    /// The directory at `path`, created (with its parents) if missing.
    pub fn new(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        fs::create_dir_all(&path)?;
        Ok(Self { path })
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
        Ok(Arc::new(FileBackend::open(self.file_path(name)?)?))
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn Backend>> {
        Ok(Arc::new(FileBackend::create_new(self.file_path(name)?)?))
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
        }
    }

    /// The controller shared by the directory and its files.
    pub fn controller(&self) -> &FaultController {
        &self.controller
    }

    /// The directory a crash now would leave: the names `names` says, each
    /// file holding its [`FaultyBackend::crash_image`] under `torn`. The
    /// image has a fresh controller and counts as fully synced. Works
    /// whether or not the controller has crashed.
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
        removed.map(drop).ok_or_else(|| not_found(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        self.controller.check(OpKind::Rename)?;
        let mut names = self.names.lock();
        let file = names.live.remove(from).ok_or_else(|| not_found(from))?;
        names.live.insert(to.to_owned(), file);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.controller.check(OpKind::SyncDir)?;
        let mut names = self.names.lock();
        names.durable = names.live.clone();
        Ok(())
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
