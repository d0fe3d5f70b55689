//! Functions shared by the vbucket integration tests (`mod support;`): a
//! deterministic generator, the file checkers (`verify_snapshot` and
//! `couchread.py --verify`), and the model of accepted mutations the crash
//! sweeps check reopened vbuckets against. Each test crate uses a part.
#![allow(dead_code)]

use btree::NodeConfig;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vbucket::{Document, FlusherConfig, StoreConfig, VBucket, VbState};

#[path = "../../../btree/tests/support/couchread.rs"]
mod reader;
pub use reader::couchread;

/// A small xorshift64* generator: deterministic and dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
}

/// Starts this test binary running only the test `test` (one that does its
/// work in a child process when one of `envs` is set, and returns at once
/// otherwise), with `envs` set and its stdin and stdout piped.
pub fn spawn_test_process(test: &str, envs: &[(&str, &std::ffi::OsStr)]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// `couchread.py --verify` (at `header_offset`, or the last header) finds
/// nothing wrong with the file at `path`; skipped, and said so once, when
/// the reader cannot run (see [`couchread`]).
pub fn couchread_verify(path: &Path, header_offset: Option<u64>) {
    let Some(reader) = couchread() else {
        return;
    };
    let mut command = Command::new("python3");
    command.arg(reader).arg(path).arg("--verify");
    if let Some(offset) = header_offset {
        command.arg("--header-offset").arg(offset.to_string());
    }
    let out = command.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "couchread.py --verify {} (header {header_offset:?}) failed:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `verify_snapshot` at the last header and `couchread.py --verify` find
/// nothing wrong with the file at `path` (nothing may be writing to it).
pub fn verify_file(path: &Path) {
    let backend = Arc::new(couchfile::FileBackend::open_read_only(path).unwrap());
    let file = couchfile::CouchFile::new(backend, path).unwrap();
    let snapshot = btree::Snapshot::open_latest(file, couchfile::OpenMode::Normal).unwrap();
    let report = vbucket::tool::verify_snapshot(&snapshot);
    assert!(
        report.problems.is_empty(),
        "{path:?}: {:?}",
        report.problems
    );
    couchread_verify(path, None);
}

/// The names of the files in `dir`, sorted, without the store's lock file
/// (`LOCK`, which a store leaves in its directory).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != couchfile::LOCK_FILE_NAME)
        .collect();
    v.sort();
    v
}

/// One mutation a vbucket accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub seqno: u64,
    pub key: Vec<u8>,
    /// `None` for a deletion.
    pub value: Option<Vec<u8>>,
    pub cas: u64,
    pub flags: u32,
    pub datatype: u8,
}

/// The state `accepted` leaves after its mutations up to `high_seqno`.
pub fn model(accepted: &[Accepted], high_seqno: u64) -> BTreeMap<Vec<u8>, &Accepted> {
    accepted
        .iter()
        .take_while(|a| a.seqno <= high_seqno)
        .map(|a| (a.key.clone(), a))
        .collect()
}

/// `doc` is the mutation `a`.
pub fn assert_doc(doc: &Document, a: &Accepted, what: &str) {
    let key = String::from_utf8_lossy(&a.key);
    assert_eq!(doc.key, a.key, "{what}");
    assert_eq!(doc.seqno, a.seqno, "{what}: seqno of {key}");
    assert_eq!(doc.deleted, a.value.is_none(), "{what}: deleted {key}");
    assert_eq!(
        doc.value,
        a.value.clone().unwrap_or_default(),
        "{what}: value of {key} (seqno {})",
        a.seqno
    );
    assert_eq!(doc.meta.cas, a.cas, "{what}: cas of {key}");
    assert_eq!(doc.meta.flags, a.flags, "{what}: flags of {key}");
    assert_eq!(doc.meta.datatype, a.datatype, "{what}: datatype of {key}");
}

/// Checks `vb`, reopened after a crash, against the mutations it accepted:
/// its high seqno lies between `persisted` and the last accepted one and
/// is its persisted seqno (in the vbstate too), its documents in seqno order
/// are exactly `accepted` up to that seqno, and point reads of every key ever
/// written agree. Returns the high seqno, the model at it and the vbstate.
pub fn check_against_model<'a>(
    vb: &VBucket,
    accepted: &'a [Accepted],
    persisted: u64,
    what: &str,
) -> (u64, BTreeMap<Vec<u8>, &'a Accepted>, VbState) {
    let snapshot = vb.snapshot();
    let high = snapshot.high_seqno();
    let last = accepted.last().map_or(0, |a| a.seqno);
    assert!(
        persisted <= high && high <= last,
        "{what}: high seqno {high}, persisted {persisted}, last accepted {last}"
    );
    assert_eq!(vb.high_seqno(), high, "{what}");
    assert_eq!(vb.persisted_seqno(), high, "{what}");
    let vbstate = snapshot.vbstate().unwrap().expect("a vbstate");
    assert_eq!(vbstate.persisted_seqno, high, "{what}: vbstate");
    let expected = model(accepted, high);
    let mut found = Vec::new();
    snapshot
        .changes_since(0, &mut |doc| {
            found.push(doc);
            ControlFlow::Continue(())
        })
        .unwrap_or_else(|e| panic!("{what}: changes_since: {e}"));
    assert!(
        found.windows(2).all(|w| w[0].seqno < w[1].seqno),
        "{what}: changes out of seqno order"
    );
    let found: BTreeMap<Vec<u8>, Document> =
        found.into_iter().map(|d| (d.key.clone(), d)).collect();
    assert_eq!(
        found
            .keys()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>(),
        expected
            .keys()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>(),
        "{what}: the keys on disk at high seqno {high}"
    );
    for (key, a) in &expected {
        assert_doc(&found[key], a, what);
    }
    // Point reads of every key ever written, through the vbucket.
    for a in accepted {
        let doc = vb.get_including_deleted(&a.key).unwrap();
        match expected.get(&a.key) {
            Some(e) => assert_doc(&doc.expect("a document"), e, what),
            None => assert_eq!(doc, None, "{what}"),
        }
    }
    (high, expected, vbstate)
}

/// The shortest and the longest of the I/O counts of a crash sweep's dry
/// runs, which vary with the flusher's batching.
pub fn shortest_and_longest(counts: impl Iterator<Item = u64>) -> (u64, u64) {
    counts.fold((u64::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)))
}

/// The store configuration of the crash sweeps: one flusher thread, small
/// batches (many commits), small nodes (trees of several levels), quick
/// retries, a short close timeout so that a crashed store gives up at once,
/// and a small node cache: recovery after failed commits and the switch to a
/// compacted file must never serve a stale node.
pub fn crash_config() -> StoreConfig {
    StoreConfig {
        flusher: FlusherConfig {
            threads: 1,
            max_batch_items: 8,
            max_batch_bytes: 64 << 10,
            retry_backoff_min: Duration::from_micros(100),
            retry_backoff_max: Duration::from_millis(1),
            close_timeout: Duration::from_millis(20),
            ..FlusherConfig::default()
        },
        nodes: NodeConfig {
            leaf_threshold: 400,
            interior_threshold: 200,
        },
        node_cache_bytes: 256 << 10,
        ..StoreConfig::default()
    }
}
