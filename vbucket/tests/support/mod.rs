//! Helpers shared by the vbucket integration tests (`mod support;`): a
//! deterministic generator, the file checkers (`verify_snapshot` and
//! `couchread.py --verify`), and the model of accepted mutations the crash
//! sweeps check reopened vbuckets against. Each test crate uses a part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vbucket::Document;

/// The independent reader of the format, beside the repository.
pub const COUCHREAD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/tools/couchread.py"
);

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

/// `couchread.py --verify` (at `header_offset`, or the last header) finds
/// nothing wrong with the file at `path`.
pub fn couchread_verify(path: &Path, header_offset: Option<u64>) {
    let mut command = Command::new("python3");
    command.arg(COUCHREAD).arg(path).arg("--verify");
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

/// The names of the files in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
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
