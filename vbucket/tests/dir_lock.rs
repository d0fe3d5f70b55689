#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One owner per data directory: a store holds its directory's lock for its
//! whole life. A second open, by another store of this process or by
//! another process, fails at once with [`Error::DirectoryLocked`] naming
//! the directory and the holder's pid, before it reads or removes any file;
//! closing or dropping the store (or the death of its process) releases
//! the lock, and the directory opens again with everything in it.
//!
//! The two-process test runs this test binary again as the holder:
//! `holder_process` does nothing unless [`HOLDER_ENV`] names a directory,
//! in which case it opens a store there, says so on stdout and waits.

mod support;

use couchfile::{Directory, FaultController, FaultyDirectory, LOCK_FILE_NAME};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;
use support::names;
use vbucket::{Error, ItemMeta, Store, StoreConfig};

const WAIT: Duration = Duration::from_secs(30);
/// Set to a directory: `holder_process` opens a store there and holds it.
const HOLDER_ENV: &str = "VBUCKET_DIR_LOCK_HOLDER";
/// What the holder prints once its store is open.
const HOLDING: &str = "holding the store";

/// Writes `key` = `value` to vbucket 0 and waits until it is persisted.
fn write(store: &Store, key: &str, value: &str) {
    let vb = store.open_vbucket(0).unwrap();
    let m = vb
        .set(key.as_bytes(), value.as_bytes(), ItemMeta::default())
        .unwrap();
    vb.wait_persisted(m.seqno, WAIT).unwrap();
}

fn read(store: &Store, key: &str) -> Option<Vec<u8>> {
    store
        .vbucket(0)
        .unwrap()
        .get(key.as_bytes())
        .unwrap()
        .map(|d| d.value)
}

/// `result` is the locked error for `dir`, held by process `pid`.
fn assert_locked(result: Result<Store, Error>, dir: &Path, pid: u32) {
    match result {
        Err(e @ Error::DirectoryLocked { .. }) => {
            let message = e.to_string();
            let Error::DirectoryLocked {
                path, pid: holder, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, dir);
            assert_eq!(holder, Some(pid), "{message}");
            assert!(message.contains(&dir.display().to_string()), "{message}");
            assert!(message.contains(&format!("process {pid}")), "{message}");
        }
        Err(e) => panic!("expected the directory to be locked, got {e:?}"),
        Ok(_) => panic!("a second store opened {}", dir.display()),
    }
}

#[test]
fn a_second_store_in_this_process_fails_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    write(&store, "k", "v");
    // A leftover an open would remove, and the bytes of the live file.
    std::fs::write(dir.path().join("0.couch.9.compact"), b"leftover").unwrap();
    let before = std::fs::read(dir.path().join("0.couch.1")).unwrap();

    assert_locked(
        Store::open(dir.path(), StoreConfig::default()),
        dir.path(),
        std::process::id(),
    );
    assert_eq!(names(dir.path()), ["0.couch.1", "0.couch.9.compact"]);
    assert_eq!(std::fs::read(dir.path().join("0.couch.1")).unwrap(), before);
    // The first store is unaffected.
    write(&store, "k2", "v2");
    assert_eq!(read(&store, "k").unwrap(), b"v");
    store.close().unwrap();
}

#[test]
fn the_lock_is_released_by_close_and_by_drop() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    write(&store, "k", "closed");
    store.close().unwrap();

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(read(&store, "k").unwrap(), b"closed");
    write(&store, "k", "dropped");
    drop(store);

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(read(&store, "k").unwrap(), b"dropped");
    // The lock file names its holder and is not a vbucket's file.
    let text = std::fs::read_to_string(dir.path().join(LOCK_FILE_NAME)).unwrap();
    assert!(
        text.contains(&format!("pid={}", std::process::id())),
        "{text}"
    );
    assert_eq!(store.vbuckets(), [0]);
    store.close().unwrap();
}

#[test]
fn a_failed_open_releases_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    // A file named like a revision that is not one: the open fails.
    std::fs::write(dir.path().join("4.couch.1"), vec![7u8; 9000]).unwrap();
    assert!(Store::open(dir.path(), StoreConfig::default()).is_err());
    std::fs::remove_file(dir.path().join("4.couch.1")).unwrap();
    Store::open(dir.path(), StoreConfig::default())
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn two_stores_on_one_in_memory_directory_conflict() {
    let dir = Arc::new(FaultyDirectory::new(FaultController::new()));
    let open = || {
        Store::open_in(
            Arc::clone(&dir) as Arc<dyn Directory>,
            StoreConfig::default(),
        )
    };
    let store = open().unwrap();
    write(&store, "k", "v");
    assert_locked(open(), Path::new("/faulty"), std::process::id());
    store.close().unwrap();
    let store = open().unwrap();
    assert_eq!(read(&store, "k").unwrap(), b"v");
    drop(store);
    open().unwrap().close().unwrap();
}

/// Not a test of its own: the holder process of
/// `another_process_cannot_open_a_locked_directory`.
#[test]
fn holder_process() {
    let Some(dir) = std::env::var_os(HOLDER_ENV) else {
        return;
    };
    let store = Store::open(&dir, StoreConfig::default()).unwrap();
    write(&store, "from", "the holder");
    // Straight to the stdout pipe: the test harness may capture `println!`.
    let mut out = std::io::stdout();
    writeln!(out, "{HOLDING} {}", std::process::id()).unwrap();
    out.flush().unwrap();
    // Holds the store until its stdin closes (or it is killed).
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    store.close().unwrap();
}

/// Starts this test binary as `holder_process` on `dir`, and returns once
/// its store is open.
fn start_holder(dir: &Path) -> std::process::Child {
    let mut child = support::spawn_test_process("holder_process", &[(HOLDER_ENV, dir.as_os_str())]);
    // Its output is read on a thread (to the end, so that it never blocks
    // on a full pipe), and the line saying it holds the store is awaited
    // with a timeout.
    let stdout = child.stdout.take().unwrap();
    let expected = format!("{HOLDING} {}", child.id());
    let (holding, told) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            // After the harness's `test holder_process ... `.
            if line.is_ok_and(|line| line.ends_with(&expected)) {
                let _ = holding.send(());
            }
        }
    });
    if told.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        panic!("the holder did not open its store: {:?}", child.wait());
    }
    child
}

#[test]
fn another_process_cannot_open_a_locked_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = start_holder(dir.path());
    assert_locked(
        Store::open(dir.path(), StoreConfig::default()),
        dir.path(),
        holder.id(),
    );
    // The holder closes its store and exits: the directory is free.
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(read(&store, "from").unwrap(), b"the holder");
    store.close().unwrap();

    // A holder that dies without closing (killed) releases it too.
    let mut holder = start_holder(dir.path());
    assert_locked(
        Store::open(dir.path(), StoreConfig::default()),
        dir.path(),
        holder.id(),
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(read(&store, "from").unwrap(), b"the holder");
    store.close().unwrap();
}
