//! `couchtool` against the files the real couchstore library wrote in
//! `testdata/couchstore`: its JSON Lines listings must equal the
//! recorded ones byte for byte, its text listings the recorded `dump.txt` and
//! `headers.txt`, and `verify` must pass on the sound files and fail on the
//! damaged ones. Also `verify` on files this project's own `btree` writes, on
//! corrupted copies, and the binary itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::{Body, Db, DbOptions, DocUpdate, LocalUpdate};
use couchfile::{CouchFile, MemBackend, OpenMode, RevMeta, CONTENT_META_COMPRESSED};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use vbucket::tool::{self, OpenOptions};

fn vectors_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/couchstore"
    ))
}

fn vector(name: &str) -> PathBuf {
    vectors_dir().join(name)
}

/// The binary vector files: `*.couch` and `*.couch.<digits>`.
fn vector_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("testdata/couchstore is in the repository")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.ends_with(".couch")
                || name.rsplit_once(".couch.").is_some_and(|(_, rev)| {
                    !rev.is_empty() && rev.chars().all(|c| c.is_ascii_digit())
                })
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the vector files, found {files:?}"
    );
    files
}

fn sibling(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Panics with the first differing line, which reads better than two
/// 250 KB strings.
fn assert_same(got: &str, expected: &str, what: &str) {
    if got == expected {
        return;
    }
    for (i, (g, e)) in got.lines().zip(expected.lines()).enumerate() {
        assert_eq!(g, e, "{what}: line {} differs", i + 1);
    }
    assert_eq!(
        got.lines().count(),
        expected.lines().count(),
        "{what}: line counts differ"
    );
    panic!("{what}: output differs (line endings?)");
}

fn dump_jsonl(path: &Path, options: &OpenOptions) -> (String, tool::Outcome) {
    let mut out = Vec::new();
    let outcome = tool::dump_jsonl(path, options, &mut out).unwrap();
    (String::from_utf8(out).unwrap(), outcome)
}

#[test]
fn dump_jsonl_equals_the_recorded_listing_of_every_vector() {
    for file in vector_files() {
        let expected = read(&sibling(&file, ".expect.jsonl"));
        let (got, outcome) = dump_jsonl(&file, &OpenOptions::normal());
        assert_same(&got, &expected, &file.display().to_string());
        // Clean listings succeed; an open error or a bad body is a failure.
        let damaged = expected.contains("open_error") || expected.contains("body_error");
        assert_eq!(outcome.is_ok(), !damaged, "{}: {outcome:?}", file.display());

        let recovery_path = sibling(&file, ".recovery.expect.jsonl");
        let expected = if recovery_path.exists() {
            read(&recovery_path)
        } else {
            expected
        };
        let (got, _) = dump_jsonl(&file, &OpenOptions::recovery());
        assert_same(&got, &expected, &format!("{} (recovery)", file.display()));
    }
}

#[test]
fn headers_jsonl_equals_the_recorded_headers_of_every_vector() {
    for file in vector_files() {
        let expected = read(&sibling(&file, ".headers.jsonl"));
        let mut out = Vec::new();
        tool::headers_jsonl(&file, OpenMode::Normal, &mut out).unwrap();
        assert_same(
            &String::from_utf8(out).unwrap(),
            &expected,
            &file.display().to_string(),
        );
    }
}

#[test]
fn dump_jsonl_at_a_header_offset_equals_the_recorded_listing() {
    let file = vector("0.couch.1");
    let expected = read(&sibling(&file, ".at110592.expect.jsonl"));
    let (got, outcome) = dump_jsonl(&file, &OpenOptions::at(110_592));
    assert_same(&got, &expected, "0.couch.1 at 110592");
    assert!(outcome.is_ok());

    // Not a header there, or beyond the end: the open_error line.
    for offset in [4096, 1 << 40, 100] {
        let (got, outcome) = dump_jsonl(&file, &OpenOptions::at(offset));
        assert!(
            got.starts_with(
                "{\"type\":\"open_error\",\"mode\":\"normal\",\"error\":\"COUCHSTORE_ERROR_"
            ),
            "{got}"
        );
        assert_eq!(got.lines().count(), 1);
        assert!(!outcome.is_ok());
    }
}

#[test]
fn a_missing_file_is_an_open_error_line() {
    let (got, outcome) = dump_jsonl(
        &vectors_dir().join("no_such_file.couch"),
        &OpenOptions::recovery(),
    );
    assert_eq!(
        got,
        "{\"type\":\"open_error\",\"mode\":\"recovery\",\"error\":\"COUCHSTORE_ERROR_OPEN_FILE\"}\n"
    );
    assert!(!outcome.is_ok());
}

#[test]
fn text_listings_equal_the_recorded_dump_and_headers() {
    for file in vector_files() {
        let dump_txt = sibling(&file, ".dump.txt");
        if dump_txt.exists() {
            let mut out = Vec::new();
            let outcome = tool::dump_text(&file, &OpenOptions::normal(), &mut out).unwrap();
            assert!(outcome.is_ok());
            let out = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = out.lines().collect();
            // header line, the dump.txt lines, a total.
            assert!(lines[0].starts_with("header pos="), "{}", lines[0]);
            assert!(lines.last().unwrap().starts_with("total docs="));
            let mut middle = lines[1..lines.len() - 1].join("\n");
            middle.push('\n');
            assert_same(&middle, &read(&dump_txt), &dump_txt.display().to_string());
        }
        let headers_txt = sibling(&file, ".headers.txt");
        if headers_txt.exists() {
            let mut out = Vec::new();
            tool::headers_text(&file, OpenMode::Normal, &mut out).unwrap();
            let out = String::from_utf8(out).unwrap();
            let expected = read(&headers_txt);
            assert_same(
                &out,
                &format!("{expected}{} headers\n", expected.lines().count()),
                &headers_txt.display().to_string(),
            );
            // info lists the same header lines.
            let mut out = Vec::new();
            tool::info(&file, &OpenOptions::normal(), &mut out).unwrap();
            let out = String::from_utf8(out).unwrap();
            let listed: String = out
                .lines()
                .filter(|l| l.starts_with("header pos="))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_same(&listed, &expected, &format!("info of {}", file.display()));
            assert!(out.contains("fragmentation: "), "{out}");
        }
    }
}

#[test]
fn the_text_dump_names_an_unreadable_body() {
    let mut out = Vec::new();
    let outcome = tool::dump_text(
        &vector("flipped_body_bit.couch"),
        &OpenOptions::normal(),
        &mut out,
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    let line = out.lines().find(|l| l.starts_with("seq=101 ")).unwrap();
    assert!(
        line.contains("body_error=COUCHSTORE_ERROR_CHECKSUM_FAIL"),
        "{line}"
    );
    assert_eq!(outcome.problems.len(), 1, "{outcome:?}");
    assert!(
        outcome.problems[0].contains("seq 101") && outcome.problems[0].contains("offset 7020"),
        "{outcome:?}"
    );
    // Normal-mode text commands fail on a corrupt last header.
    let e = tool::dump_text(
        &vector("flipped_header_bit.couch"),
        &OpenOptions::normal(),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(matches!(e, tool::Error::Open { .. }), "{e}");
}

#[test]
fn verify_passes_on_sound_files() {
    for name in [
        "0.couch.1",
        "0.couch.2",
        "0.couch.3",
        "legacy_v11.couch",
        "torn_tail.couch",
        "unfinished_header.couch",
    ] {
        let report = tool::verify(&vector(name)).unwrap();
        assert!(report.is_ok(), "{name}: {:?}", report.problems);
        assert!(report.nodes > 0 && report.by_seq_entries > 0, "{report}");
        assert_eq!(report.by_id_entries, report.by_seq_entries);
    }
    // Every older header of 0.couch.1 too.
    for offset in [0, 36_864, 73_728, 110_592, 147_456, 163_840, 172_032] {
        let report = tool::verify_with(&vector("0.couch.1"), &OpenOptions::at(offset)).unwrap();
        assert!(report.is_ok(), "@{offset}: {:?}", report.problems);
    }
    let report = tool::verify_with(
        &vector("flipped_header_bit.couch"),
        &OpenOptions::recovery(),
    )
    .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn verify_fails_on_damaged_files() {
    let report = tool::verify(&vector("flipped_body_bit.couch")).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].offset, 7020);
    assert!(
        report.problems[0].message.contains("seq 101")
            && report.problems[0]
                .message
                .contains("COUCHSTORE_ERROR_CHECKSUM_FAIL"),
        "{:?}",
        report.problems
    );
    let mut out = Vec::new();
    report.write_to(&mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("flipped_body_bit.couch: offset 7020: "),
        "{out}"
    );
    assert!(out.lines().last().unwrap().starts_with("FAILED"), "{out}");

    // A normal open of a file whose last header is corrupt fails.
    assert!(tool::verify(&vector("flipped_header_bit.couch")).is_err());
}

/// Copies a vector to a temporary file, changed by `damage`.
fn damaged_copy(name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> tempfile::NamedTempFile {
    let mut bytes = std::fs::read(vector(name)).unwrap();
    damage(&mut bytes);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &bytes).unwrap();
    tmp
}

#[test]
fn verify_finds_a_damaged_node() {
    // The by-id root of 0.couch.3's only header.
    let file = CouchFile::open_read_only(vector("0.couch.3")).unwrap();
    let header = file
        .find_last_header(OpenMode::Normal)
        .unwrap()
        .unwrap()
        .header;
    let root = header.by_id_root.unwrap().pointer;
    let tmp = damaged_copy("0.couch.3", |b| b[root as usize + 10] ^= 0x01);
    let report = tool::verify(tmp.path()).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.problems[0].offset, root, "{:?}", report.problems);
    assert!(
        report.problems[0]
            .message
            .contains("by-id node: checksum mismatch"),
        "{:?}",
        report.problems
    );
    // The by-seq tree still lists every doc, whose by-id twins are now missing.
    assert!(report
        .problems
        .iter()
        .any(|p| p.message.contains("has no by-id entry")));
}

#[test]
fn no_command_panics_on_damaged_or_cut_files() {
    let original = std::fs::read(vector("0.couch.3")).unwrap();
    let len = original.len();
    #[derive(Clone, Copy)]
    enum Damage {
        Flip(usize),
        Fill(usize),
        Cut(usize),
    }
    let mut cases = Vec::new();
    for i in (0..len).step_by(len / 150) {
        cases.extend([Damage::Flip(i), Damage::Fill(i)]);
    }
    cases.extend([1, 100, 4096, len / 2, len - 1].map(Damage::Cut));
    let mut failures = 0;
    for damage in cases {
        let damage = |b: &mut Vec<u8>| match damage {
            Damage::Flip(i) => b[i] ^= 0x5a,
            Damage::Fill(i) => b[i..(i + 64).min(len)].fill(0xff),
            Damage::Cut(n) => b.truncate(n),
        };
        let tmp = damaged_copy("0.couch.3", damage);
        let path = tmp.path();
        for mode in [OpenMode::Normal, OpenMode::Recovery] {
            let options = OpenOptions {
                mode,
                ..OpenOptions::default()
            };
            let _ = tool::dump_jsonl(path, &options, &mut Vec::new());
            let _ = tool::dump_text(path, &options, &mut Vec::new());
            let _ = tool::headers_jsonl(path, mode, &mut Vec::new());
            let _ = tool::info(path, &options, &mut Vec::new());
            match tool::verify_with(path, &options) {
                Ok(report) if report.is_ok() => {}
                _ => failures += 1,
            }
        }
    }
    // Most damage is seen (some lands on unused bytes, such as old nodes).
    assert!(failures > 100, "only {failures} damaged copies failed");
}

fn doc(id: String, n: u64, deleted: bool) -> DocUpdate {
    DocUpdate {
        body: if deleted && n.is_multiple_of(2) {
            Body::None
        } else {
            Body::Plain(
                format!(
                    "{{\"n\":{n},\"pad\":\"{}\"}}",
                    "x".repeat((n % 50) as usize)
                )
                .into_bytes(),
            )
        },
        id: id.into_bytes(),
        seq: None,
        rev_seq: n,
        rev_seq_above_stored: false,
        rev_meta: RevMeta::new(n, 0, 0, 1).encode(),
        deleted,
        content_meta: if n.is_multiple_of(3) {
            CONTENT_META_COMPRESSED
        } else {
            0
        },
    }
}

#[test]
fn verify_passes_on_files_this_project_writes() {
    let backend = Arc::new(MemBackend::new());
    let file = CouchFile::new(backend, "mem.couch").unwrap();
    let mut db = Db::open(file, &DbOptions::default()).unwrap();
    let mut ts = 1_700_000_000_000_000_000;
    for round in 0..8u64 {
        let docs: Vec<DocUpdate> = (0..400u64)
            .map(|i| {
                let key = (i * 7919 + round * 13) % 3000;
                let d = doc(
                    format!("key_{key:05}"),
                    round * 1000 + i,
                    round > 3 && i % 5 == 0,
                );
                (d.id.clone(), d)
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_values()
            .collect();
        let locals = [LocalUpdate {
            id: format!("_local/round{}", round % 3).into_bytes(),
            value: (round != 6).then(|| format!("{{\"round\":{round}}}").into_bytes()),
        }];
        db.save(&docs, &locals).unwrap();
        ts += 1;
        db.commit(ts).unwrap();
        let snapshot = db.snapshot();
        let report = tool::verify_snapshot(&snapshot);
        assert!(report.is_ok(), "round {round}: {:?}", report.problems);
        assert_eq!(report.by_id_entries, report.by_seq_entries);
        let counts = snapshot.doc_counts().unwrap();
        assert_eq!(counts.live + counts.deleted, report.by_id_entries);
    }
}

#[test]
fn the_binary_lists_a_vector_and_reports_failures() {
    let bin = env!("CARGO_BIN_EXE_couchtool");
    let file = vector("legacy_v11.couch");
    let out = Command::new(bin)
        .args(["dump", "--jsonl"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_same(
        &String::from_utf8(out.stdout).unwrap(),
        &read(&sibling(&file, ".expect.jsonl")),
        "couchtool dump --jsonl legacy_v11.couch",
    );
    assert!(out.stderr.is_empty());

    let out = Command::new(bin)
        .args(["verify"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("OK: "));

    // A corrupt last header: the open_error line, exit status 1.
    let file = vector("flipped_header_bit.couch");
    let out = Command::new(bin)
        .args(["dump", "--jsonl"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_same(
        &String::from_utf8(out.stdout).unwrap(),
        &read(&sibling(&file, ".expect.jsonl")),
        "couchtool dump --jsonl flipped_header_bit.couch",
    );
    assert!(!out.stderr.is_empty());

    // A bad body: verify exits 1 and names the file and offset.
    let out = Command::new(bin)
        .args(["verify"])
        .arg(vector("flipped_body_bit.couch"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("flipped_body_bit.couch: offset 7020: body of seq 101"));

    // Bad arguments: exit status 1, no panic.
    let out = Command::new(bin)
        .args(["dump", "--header-offset", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(bin)
        .args(["info", "/nonexistent/file"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("COUCHSTORE_ERROR_OPEN_FILE"));
}

#[test]
fn the_binary_prints_its_version_and_every_subcommand_gives_an_example() {
    let bin = env!("CARGO_BIN_EXE_couchtool");
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("couchtool {}", env!("CARGO_PKG_VERSION"))
    );
    for command in ["dump", "headers", "info", "verify", "compact"] {
        let out = Command::new(bin)
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}: {out:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains(&format!("Examples:\n  couchtool {command} ")),
            "{command} --help gives no example:\n{help}"
        );
    }
    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("Examples:\n  couchtool "), "{help}");
    let out = Command::new(bin)
        .args(["compact", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("--upgrade"));
}
