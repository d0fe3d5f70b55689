#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `couchtool compact` against couchstore's own compactions in
//! `testdata/couchstore`: `0.couch.2` is `0.couch.1` compacted with
//! deletes kept and `0.couch.3` with `COUCHSTORE_COMPACT_FLAG_DROP_DELETES`.
//! Compacting `0.couch.1` here must give the same logical content as each:
//! the same `dump --jsonl` doc, local and end lines, and the same header
//! except for its offset and space used. Those two depend on the layout,
//! which differs: this project's bottom-up builders fill nodes to their own
//! thresholds, not couchstore's compacting ones (deletes kept: by-id and
//! by-seq trees of 30,478 and 33,137 bytes here, 31,817 and 33,437 in
//! `0.couch.2`; a file of 139,369 bytes with its header at 139,264, against
//! 143,465 and 143,360), and the header's place follows the file's size.
//! Everything else matches: bodies (copied as stored, so the same
//! `physical_size` and `content_meta`), the by-id reduce (counts and body
//! bytes), the local tree (a single node of the same size), and the purge
//! seqno (couchstore's DROP_DELETES counts purges: the source's purge seqno
//! plus one, here 1; `tool::compact` reproduces that, where
//! `compactor::copy_snapshot` alone would record the highest seqno dropped,
//! 1200). The compacted files must pass `tool::verify` and
//! `couchread.py --verify`.

mod support;

use couchfile::{CouchFile, CrcKind};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use support::couchread_verify;
use vbucket::tool::{self, CompactOptions, CompactSummary, OpenOptions};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/couchstore");

fn vector(name: &str) -> PathBuf {
    Path::new(VECTORS).join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dump(path: &Path) -> String {
    let mut out = Vec::new();
    let outcome = tool::dump_jsonl(path, &OpenOptions::normal(), &mut out).unwrap();
    assert!(outcome.is_ok(), "{}: {outcome:?}", path.display());
    String::from_utf8(out).unwrap()
}

/// Compacts `src` into `name` in a fresh temporary directory.
fn compact(src: &Path, options: &CompactOptions) -> (tempfile::TempDir, PathBuf, CompactSummary) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("0.couch.2");
    let start = Instant::now();
    let summary = tool::compact(src, &dst, options).unwrap();
    eprintln!("{summary} in {:?}", start.elapsed());
    // The sort runs are gone; only the new file is left.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["0.couch.2"]);
    (dir, dst, summary)
}

/// The header line's fields, without the layout ones (offset, space used).
fn logical_header(line: &str) -> Value {
    let mut v: Value = serde_json::from_str(line).unwrap();
    let o = v.as_object_mut().unwrap();
    assert_eq!(o["type"], "header", "{line}");
    o.remove("offset").unwrap();
    o.remove("space_used").unwrap();
    v
}

/// Asserts that `got` (a `dump --jsonl` listing) equals `expected` but for
/// the header's offset and space used.
fn assert_same_content(got: &str, expected: &str, what: &str) {
    let got: Vec<&str> = got.lines().collect();
    let expected: Vec<&str> = expected.lines().collect();
    assert_eq!(
        logical_header(got[0]),
        logical_header(expected[0]),
        "{what}: header"
    );
    for (i, (g, e)) in got.iter().zip(&expected).enumerate().skip(1) {
        assert_eq!(g, e, "{what}: line {} differs", i + 1);
    }
    assert_eq!(got.len(), expected.len(), "{what}: line counts differ");
}

/// The header figures of `ours` and of couchstore's `theirs` agree but for
/// the layout ones (offset, by-id and by-seq tree sizes, space used).
fn assert_same_summary(ours: &Path, theirs: &Path) {
    let summary = |path: &Path| {
        let s =
            tool::HeaderSummary::of(&tool::open(path, &OpenOptions::normal()).unwrap()).unwrap();
        (
            s.disk_version,
            s.update_seq,
            s.purge_seq,
            s.timestamp,
            s.doc_count,
            s.deleted_count,
            s.body_size,
            s.local_size,
        )
    };
    assert_eq!(summary(ours), summary(theirs), "{}", theirs.display());
}

fn header_field(listing: &str, field: &str) -> u64 {
    let v: Value = serde_json::from_str(listing.lines().next().unwrap()).unwrap();
    v[field].as_u64().unwrap()
}

/// `tool::verify`, `couchread.py --verify`, and a single header.
fn check_file(path: &Path, summary: &CompactSummary) {
    let report = tool::verify(path).unwrap();
    assert!(report.is_ok(), "{}: {:?}", path.display(), report.problems);
    assert_eq!(report.by_id_entries, report.by_seq_entries);
    couchread_verify(path, None);
    let mut out = Vec::new();
    tool::headers_jsonl(path, couchfile::OpenMode::Normal, &mut out).unwrap();
    let headers = String::from_utf8(out).unwrap();
    assert_eq!(headers.lines().count(), 2, "{headers}");
    assert_eq!(
        header_field(&headers, "offset"),
        summary.target_header,
        "{headers}"
    );
    assert_eq!(summary.size_after, std::fs::metadata(path).unwrap().len());
}

#[test]
fn compacting_keeps_deletes_like_couchstore() {
    let src = vector("0.couch.1");
    let (_dir, dst, summary) = compact(&src, &CompactOptions::default());
    let got = dump(&dst);
    assert_same_content(&got, &read(&vector("0.couch.2.expect.jsonl")), "0.couch.2");
    assert_same_summary(&dst, &vector("0.couch.2"));
    // couchstore's header, field by field (its headers listing too).
    let expected_headers = read(&vector("0.couch.2.headers.jsonl"));
    assert_eq!(
        logical_header(got.lines().next().unwrap()),
        logical_header(expected_headers.lines().next().unwrap())
    );
    check_file(&dst, &summary);

    assert_eq!(summary.source_header, 184_320);
    assert_eq!(summary.copy.docs_copied, 1001);
    assert_eq!(summary.copy.tombstones_purged, 0);
    assert_eq!((summary.update_seq, summary.purge_seq), (1201, 0));
    assert_eq!(summary.size_before, 184_425);
    // Old versions gone: smaller than the source, near couchstore's 143,465.
    assert!(
        summary.size_after < summary.size_before,
        "{summary}: not smaller"
    );
    let text = summary.to_string();
    assert!(
        text.contains("1001 docs copied, 0 tombstones purged") && text.contains("184425 -> "),
        "{text}"
    );
}

#[test]
fn compacting_with_drop_deletes_is_couchstores_drop_deletes() {
    let src = vector("0.couch.1");
    let options = CompactOptions {
        drop_deletes: true,
        ..CompactOptions::default()
    };
    let (_dir, dst, summary) = compact(&src, &options);
    let got = dump(&dst);
    assert_same_content(&got, &read(&vector("0.couch.3.expect.jsonl")), "0.couch.3");
    assert_same_summary(&dst, &vector("0.couch.3"));
    // purge_seq 1: couchstore counts DROP_DELETES compactions.
    assert_eq!(header_field(&got, "purge_seq"), 1);
    assert_eq!(header_field(&got, "deleted_count"), 0);
    check_file(&dst, &summary);
    assert_eq!(summary.copy.docs_copied, 901);
    assert_eq!(summary.copy.tombstones_purged, 100);
    assert_eq!(summary.purge_seq, 1);

    // Compacting the result again with drop-deletes counts one more purge,
    // as couchstore would.
    let (_dir2, again, summary) = compact(&dst, &options);
    assert_eq!(summary.copy.tombstones_purged, 0);
    assert_eq!(header_field(&dump(&again), "purge_seq"), 2);
}

#[test]
fn purge_before_seq_drops_exactly_the_older_tombstones() {
    let src = vector("0.couch.1");
    let full = read(&vector("0.couch.1.expect.jsonl"));
    // Tombstones are seqs 1101..=1200 (90 without a body, then 10 with one).
    for (n, purged, purge_seq) in [
        (0, 0, 0),
        (1101, 0, 0),
        (1102, 1, 1101),
        (1150, 49, 1149),
        (1195, 94, 1194),
        (1201, 100, 1200),
        (u64::MAX, 100, 1200),
    ] {
        let options = CompactOptions {
            purge_before_seq: n,
            ..CompactOptions::default()
        };
        let (_dir, dst, summary) = compact(&src, &options);
        let got = dump(&dst);
        // The source's listing without the tombstones below n, and with
        // the header counts and purge seqno changed accordingly.
        let mut lines: Vec<String> = Vec::new();
        for line in full.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            match v["type"].as_str().unwrap() {
                "doc" if v["deleted"] == true && v["seq"].as_u64().unwrap() < n => {}
                "header" => {
                    let mut v = v.clone();
                    v["purge_seq"] = purge_seq.into();
                    v["deleted_count"] = (100 - purged).into();
                    lines.push(v.to_string());
                }
                "end" => lines.push(format!(
                    "{{\"type\":\"end\",\"docs\":{},\"locals\":1}}",
                    1001 - purged
                )),
                _ => lines.push(line.to_string()),
            }
        }
        let expected = lines.join("\n") + "\n";
        assert_same_content(&got, &expected, &format!("purge before {n}"));
        assert_eq!(summary.copy.tombstones_purged, purged, "{summary}");
        assert_eq!(summary.purge_seq, purge_seq, "{summary}");
        if n == 1150 {
            check_file(&dst, &summary);
        }
    }
}

#[test]
fn compacting_an_older_header_or_a_recovered_one() {
    // At 110592 the file held seqs 1..=750, no deletes.
    let options = CompactOptions {
        open: OpenOptions::at(110_592),
        ..CompactOptions::default()
    };
    let (_dir, dst, summary) = compact(&vector("0.couch.1"), &options);
    assert_same_content(
        &dump(&dst),
        &read(&vector("0.couch.1.at110592.expect.jsonl")),
        "0.couch.1 at 110592",
    );
    assert_eq!(summary.source_header, 110_592);

    // A corrupt last header: a normal open fails, a recovery one falls back.
    let file = vector("flipped_header_bit.couch");
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("out.couch");
    let e = tool::compact(&file, &dst, &CompactOptions::default()).unwrap_err();
    assert!(matches!(e, tool::Error::Open { .. }), "{e}");
    assert!(!dst.exists());
    let options = CompactOptions {
        open: OpenOptions::recovery(),
        ..CompactOptions::default()
    };
    let (_dir, dst, summary) = compact(&file, &options);
    assert_same_content(
        &dump(&dst),
        &read(&vector("flipped_header_bit.couch.recovery.expect.jsonl")),
        "flipped_header_bit.couch (recovery)",
    );
    assert_eq!(summary.source_header, 172_032);
}

/// The CRC that the chunks of `path` carry: the by-seq root's chunk is read
/// with each; exactly one must match.
fn chunk_crc(path: &Path) -> CrcKind {
    let header = tool::open(path, &OpenOptions::normal())
        .unwrap()
        .header()
        .clone();
    let root = header.by_seq_root.expect("a by-seq root").pointer;
    let matching: Vec<CrcKind> = [CrcKind::Crc32, CrcKind::Crc32c]
        .into_iter()
        .filter(|&crc| {
            let mut file = CouchFile::open_read_only(path).unwrap();
            file.set_crc(crc);
            file.read_chunk(root).is_ok()
        })
        .collect();
    assert_eq!(matching.len(), 1, "{}: {matching:?}", path.display());
    matching[0]
}

/// `legacy_v11.couch.expect.jsonl` with the header's disk version set to
/// `version`: what couchstore's compaction of the file lists (it copies
/// every document as stored and the header's update seq, purge seq and
/// timestamp, which is 0 in a version 11 file); only the layout differs.
fn v11_listing_at_version(version: u8) -> String {
    let expected = read(&vector("legacy_v11.couch.expect.jsonl"));
    let (first, rest) = expected.split_once('\n').unwrap();
    let mut header: Value = serde_json::from_str(first).unwrap();
    header["disk_version"] = version.into();
    format!("{header}\n{rest}")
}

#[test]
fn a_version_11_file_stays_version_11_with_crc32() {
    // As couchstore's compaction without COUCHSTORE_COMPACT_FLAG_UPGRADE_DB:
    // the target is opened with legacy CRC and keeps the source's version.
    let src = vector("legacy_v11.couch");
    let (_dir, dst, summary) = compact(&src, &CompactOptions::default());
    assert_eq!((summary.source_version, summary.target_version), (11, 11));
    let got = dump(&dst);
    assert_eq!(header_field(&got, "disk_version"), 11);
    assert_same_content(&got, &v11_listing_at_version(11), "legacy_v11 compacted");
    assert_eq!(chunk_crc(&dst), CrcKind::Crc32);
    check_file(&dst, &summary);
    assert!(
        summary.to_string().contains("version 11) into"),
        "{summary}"
    );
}

#[test]
fn a_version_11_file_is_upgraded_to_version_14_with_upgrade() {
    // As couchstore's UPGRADE_DB flag (couch_compact --upgrade, and what
    // kv_engine passes): the same documents, written with CRC-32C under a
    // version 14 header.
    let options = CompactOptions {
        upgrade: true,
        ..CompactOptions::default()
    };
    let (_dir, dst, summary) = compact(&vector("legacy_v11.couch"), &options);
    assert_eq!((summary.source_version, summary.target_version), (11, 14));
    let got = dump(&dst);
    assert_eq!(header_field(&got, "disk_version"), 14);
    assert_same_content(&got, &v11_listing_at_version(14), "legacy_v11 upgraded");
    assert_eq!(chunk_crc(&dst), CrcKind::Crc32c);
    check_file(&dst, &summary);
}

#[test]
fn upgrade_changes_nothing_for_a_version_14_file() {
    let (_dir, plain, _) = compact(&vector("0.couch.1"), &CompactOptions::default());
    let options = CompactOptions {
        upgrade: true,
        ..CompactOptions::default()
    };
    let (_dir2, upgraded, summary) = compact(&vector("0.couch.1"), &options);
    assert_eq!((summary.source_version, summary.target_version), (14, 14));
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&upgraded).unwrap()
    );
}

#[test]
fn versions_12_and_13_are_written_as_14_with_or_without_upgrade() {
    // couchstore writes only versions 14 and 11 (legacy CRC): without the
    // upgrade flag a version 12 or 13 source still compacts to 14.
    for version in [12u8, 13] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.couch");
        let options = btree::DbOptions {
            new_file_version: version,
            ..btree::DbOptions::default()
        };
        let backend = std::sync::Arc::new(couchfile::FileBackend::create_new(&src).unwrap());
        let mut db = btree::Db::open(CouchFile::new(backend, &src).unwrap(), &options).unwrap();
        let docs: Vec<btree::DocUpdate> = (0..50u64)
            .map(|n| btree::DocUpdate {
                id: format!("key_{n:03}").into_bytes(),
                seq: None,
                rev_seq: 1,
                rev_seq_above_stored: false,
                rev_meta: vec![0; 18],
                deleted: n % 10 == 0,
                content_meta: 0,
                body: btree::Body::Plain(format!("{{\"n\":{n}}}").into_bytes()),
            })
            .collect();
        db.save(&docs, &[]).unwrap();
        db.commit(1_700_000_000_000_000_000).unwrap();
        drop(db);
        let source = dump(&src);
        assert_eq!(header_field(&source, "disk_version"), u64::from(version));
        let expected = source.replacen(
            &format!("\"disk_version\":{version},"),
            "\"disk_version\":14,",
            1,
        );
        for upgrade in [false, true] {
            let options = CompactOptions {
                upgrade,
                ..CompactOptions::default()
            };
            let (_dir, dst, summary) = compact(&src, &options);
            assert_eq!(
                summary.target_version, 14,
                "version {version}, upgrade {upgrade}"
            );
            let got = dump(&dst);
            assert_same_content(&got, &expected, &format!("version {version}"));
            assert_eq!(chunk_crc(&dst), CrcKind::Crc32c);
            check_file(&dst, &summary);
        }
    }
}

#[test]
fn the_stores_compaction_upgrades_a_version_11_revision_to_14() {
    // kv_engine always passes the upgrade flag, and so does the Store.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(vector("legacy_v11.couch"), dir.path().join("0.couch.1")).unwrap();
    let store = vbucket::Store::open(dir.path(), vbucket::StoreConfig::default()).unwrap();
    let vb = store.vbucket(0).unwrap();
    let report = vb.compact(&vbucket::CompactionOptions::default()).unwrap();
    assert_eq!((report.revision_before, report.revision_after), (1, 2));
    store.close().unwrap();
    let new = dir.path().join("0.couch.2");
    let got = dump(&new);
    assert_eq!(header_field(&got, "disk_version"), 14);
    // The Store may add its own local documents (vbstate): compare the
    // documents only.
    let docs = |listing: &str| -> Vec<String> {
        listing
            .lines()
            .filter(|l| l.starts_with("{\"type\":\"doc\""))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        docs(&got),
        docs(&read(&vector("legacy_v11.couch.expect.jsonl")))
    );
    assert_eq!(docs(&got).len(), 100);
    assert_eq!(chunk_crc(&new), CrcKind::Crc32c);
}

#[test]
fn a_failed_compaction_leaves_no_target() {
    let dir = tempfile::tempdir().unwrap();
    // A body that fails its checksum stops the copy; the target is removed.
    let dst = dir.path().join("bad.couch");
    let e = tool::compact(
        &vector("flipped_body_bit.couch"),
        &dst,
        &CompactOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, tool::Error::Compaction(_)), "{e}");
    assert!(e.to_string().contains("flipped_body_bit.couch"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // An existing target is an error and is left alone.
    std::fs::write(&dst, b"keep me").unwrap();
    let e = tool::compact(&vector("0.couch.1"), &dst, &CompactOptions::default()).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");

    // Drop-deletes and purge-before-seq together make no sense.
    let options = CompactOptions {
        drop_deletes: true,
        purge_before_seq: 5,
        ..CompactOptions::default()
    };
    let other = dir.path().join("other.couch");
    assert!(tool::compact(&vector("0.couch.1"), &other, &options).is_err());
    assert!(!other.exists());
}

#[test]
fn the_binary_compacts_and_exits_1_when_the_target_exists() {
    let bin = env!("CARGO_BIN_EXE_couchtool");
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("0.couch.3");
    let out = Command::new(bin)
        .args(["compact", "--drop-deletes"])
        .arg(vector("0.couch.1"))
        .arg(&dst)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("901 docs copied, 100 tombstones purged"),
        "{stdout}"
    );
    assert!(out.stderr.is_empty(), "{:?}", out.stderr);
    assert_same_content(
        &dump(&dst),
        &read(&vector("0.couch.3.expect.jsonl")),
        "couchtool compact --drop-deletes",
    );

    let before = std::fs::read(&dst).unwrap();
    let out = Command::new(bin)
        .args(["compact"])
        .arg(vector("0.couch.1"))
        .arg(&dst)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8(out.stderr).unwrap().contains("exists"),
        "the error names the cause"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), before, "DST left alone");

    // Conflicting options: a usage error, exit 1.
    let out = Command::new(bin)
        .args(["compact", "--drop-deletes", "--purge-before-seq", "5"])
        .arg(vector("0.couch.1"))
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!dir.path().join("x").exists());
}
