//! Reads every file that the real couchstore library wrote in
//! `testdata/couchstore` and checks that this crate finds the same
//! header (normal and recovery mode, including couchstore's outcome on the
//! crash-shaped copies), walks the same headers, answers the same probes, and
//! reads the same B-tree nodes and bodies that couchstore's listings name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use couchfile::{CouchFile, DbHeader, DocInfo, LocatedHeader, NodePointer, OpenMode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/couchstore")
}

/// The binary vector files: `*.couch` and `*.couch.<n>`.
fn vector_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("testdata/couchstore is in the repository")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.ends_with(".couch")
                || name
                    .rsplit_once(".couch.")
                    .is_some_and(|(_, rev)| rev.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the vector files, found {files:?}"
    );
    files
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sibling(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn uint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `header` line couchstore's tools print for a header.
fn header_line(h: &LocatedHeader) -> Value {
    let root_size = |r: &Option<NodePointer>| r.as_ref().map_or(0, |r| r.subtree_size);
    let (live, deleted, size) = match &h.header.by_id_root {
        Some(r) => (
            uint(&r.reduce[0..5]),
            uint(&r.reduce[5..10]),
            uint(&r.reduce[10..16]),
        ),
        None => (0, 0, 0),
    };
    let hd = &h.header;
    json!({
        "type": "header",
        "offset": h.offset,
        "disk_version": hd.disk_version,
        "update_seq": hd.update_seq,
        "purge_seq": hd.purge_seq,
        "timestamp": hd.timestamp,
        "doc_count": live,
        "deleted_count": deleted,
        "space_used": size + root_size(&hd.by_id_root) + root_size(&hd.by_seq_root)
            + root_size(&hd.local_root),
    })
}

fn open_error_line(mode: OpenMode, e: &couchfile::Error) -> Value {
    let mode = match mode {
        OpenMode::Normal => "normal",
        OpenMode::Recovery => "recovery",
    };
    json!({"type": "open_error", "mode": mode, "error": e.couchstore_name()})
}

fn open(path: &Path, mode: OpenMode) -> Result<(CouchFile, LocatedHeader), couchfile::Error> {
    let mut file = CouchFile::open_read_only(path)?;
    let header = file
        .find_last_header(mode)?
        .expect("vector files are not empty");
    file.set_crc(couchfile::CrcKind::for_version(header.header.disk_version));
    Ok((file, header))
}

/// What opening `path` in `mode` lists first: the header line or the error line.
fn first_line(path: &Path, mode: OpenMode) -> Value {
    match open(path, mode) {
        Ok((_, h)) => header_line(&h),
        Err(e) => open_error_line(mode, &e),
    }
}

#[test]
fn every_vector_opens_at_the_header_couchstore_names() {
    for file in vector_files() {
        let normal = jsonl(&sibling(&file, ".expect.jsonl"));
        assert_eq!(
            first_line(&file, OpenMode::Normal),
            normal[0],
            "{}",
            file.display()
        );
        let recovery_path = sibling(&file, ".recovery.expect.jsonl");
        let recovery = if recovery_path.exists() {
            jsonl(&recovery_path)
        } else {
            normal
        };
        assert_eq!(
            first_line(&file, OpenMode::Recovery),
            recovery[0],
            "{} (recovery)",
            file.display()
        );
    }
}

#[test]
fn every_vector_walks_its_headers_back_as_couchstore_does() {
    for file in vector_files() {
        let expected = jsonl(&sibling(&file, ".headers.jsonl"));
        let got: Vec<Value> = match open(&file, OpenMode::Normal) {
            Err(e) => vec![open_error_line(OpenMode::Normal, &e)],
            Ok((f, h)) => {
                let headers = f.headers_from(h, OpenMode::Normal).unwrap();
                let n = headers.len();
                headers
                    .iter()
                    .map(header_line)
                    .chain([json!({"type": "end", "headers": n})])
                    .collect()
            }
        };
        assert_eq!(got, expected, "{}", file.display());
    }
}

#[test]
fn probes_answer_as_couchstore_did() {
    for file in vector_files() {
        let probe_path = sibling(&file, ".probe.jsonl");
        if !probe_path.exists() {
            continue;
        }
        for probe in jsonl(&probe_path) {
            let mode = match probe["mode"].as_str().unwrap() {
                "normal" => OpenMode::Normal,
                _ => OpenMode::Recovery,
            };
            let opened = open(&file, mode);
            let got = match probe["probe"].as_str().unwrap() {
                "open" => match &opened {
                    Ok((_, h)) => json!({
                        "probe": "open", "mode": probe["mode"], "status": "COUCHSTORE_SUCCESS",
                        "header_offset": h.offset, "update_seq": h.header.update_seq,
                    }),
                    Err(e) => json!({
                        "probe": "open", "mode": probe["mode"], "status": e.couchstore_name(),
                    }),
                },
                "seek_forward_from_open_header" => {
                    let (f, h) = opened.unwrap();
                    let status = match f.next_header(&h) {
                        Ok(Some(_)) => "COUCHSTORE_SUCCESS",
                        Ok(None) => "COUCHSTORE_ERROR_NO_HEADER",
                        Err(e) => e.couchstore_name(),
                    };
                    json!({"probe": probe["probe"], "mode": probe["mode"], "status": status})
                }
                other => panic!("unknown probe {other}"),
            };
            assert_eq!(got, probe, "{}", file.display());
        }
    }
}

#[test]
fn header_at_110592_of_0_couch_1_is_the_one_couchstore_lists() {
    let path = vectors_dir().join("0.couch.1");
    let expected = jsonl(&sibling(&path, ".at110592.expect.jsonl"));
    let file = CouchFile::open_read_only(&path).unwrap();
    let header = file.read_header_at(110_592).unwrap().unwrap();
    let got = header_line(&LocatedHeader {
        offset: 110_592,
        header,
    });
    assert_eq!(got, expected[0]);
    // Not a header block: no header there.
    assert_eq!(file.read_header_at(4096).unwrap(), None);
}

/// Entries of a node: (key, value).
fn node_entries(node: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut entries = Vec::new();
    let mut rest = &node[1..];
    while !rest.is_empty() {
        let (klen, vlen) = couchfile::decode_kv_length(rest).unwrap();
        entries.push((
            rest[5..5 + klen].to_vec(),
            rest[5 + klen..5 + klen + vlen].to_vec(),
        ));
        rest = &rest[5 + klen + vlen..];
    }
    entries
}

/// Every leaf entry of the tree under `root`, in key order, checking that
/// each interior pointer's subtree size adds up.
fn leaf_entries(file: &CouchFile, root: &NodePointer, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    let raw = file.read_chunk(root.pointer).unwrap();
    let node = couchfile::decompress(&raw).unwrap();
    let mut subtree = 8 + raw.len() as u64;
    match node[0] {
        1 => out.extend(node_entries(&node)),
        0 => {
            for (_, value) in node_entries(&node) {
                let child = NodePointer::decode_kp_value(&value).unwrap();
                subtree += child.subtree_size;
                leaf_entries(file, &child, out);
            }
        }
        t => panic!("node type {t}"),
    }
    assert_eq!(
        subtree, root.subtree_size,
        "subtree size of node {}",
        root.pointer
    );
}

/// The doc lines of couchstore's listing, rebuilt from the by-seq tree with
/// this crate's chunk reads and codecs.
fn doc_lines(file: &CouchFile, header: &DbHeader) -> Vec<Value> {
    let mut entries = Vec::new();
    if let Some(root) = &header.by_seq_root {
        leaf_entries(file, root, &mut entries);
    }
    entries
        .iter()
        .map(|(k, v)| {
            let info = DocInfo::decode_by_seq(k, v).unwrap();
            let body = (info.bp != 0).then(|| {
                if info.is_compressed() {
                    file.read_compressed_chunk(info.bp)
                } else {
                    file.read_chunk(info.bp)
                }
            });
            let mut line = json!({
                "type": "doc", "seq": info.db_seq, "id": hex(&info.id), "rev_seq": info.rev_seq,
                "deleted": info.deleted, "content_meta": info.content_meta,
                "rev_meta": hex(&info.rev_meta), "physical_size": info.physical_size,
                "body_len": null, "body_sha256": null,
            });
            match body {
                Some(Ok(b)) => {
                    line["body_len"] = json!(b.len());
                    line["body_sha256"] = json!(hex(&Sha256::digest(&b)));
                }
                Some(Err(e)) => line["body_error"] = json!(e.couchstore_name()),
                None => {}
            }
            line
        })
        .collect()
}

#[test]
fn every_doc_and_body_reads_back_as_couchstore_lists() {
    let mut compared = 0;
    let mut body_errors = 0;
    for file_path in vector_files() {
        for (mode, suffix) in [
            (OpenMode::Normal, ".expect.jsonl"),
            (OpenMode::Recovery, ".recovery.expect.jsonl"),
        ] {
            let expect_path = sibling(&file_path, suffix);
            if !expect_path.exists() {
                continue;
            }
            let expected: Vec<Value> = jsonl(&expect_path)
                .into_iter()
                .filter(|l| l["type"] == "doc")
                .collect();
            let Ok((file, header)) = open(&file_path, mode) else {
                assert!(expected.is_empty());
                continue;
            };
            let got = doc_lines(&file, &header.header);
            assert_eq!(got.len(), expected.len(), "{}", expect_path.display());
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g, e, "{}", expect_path.display());
                body_errors += usize::from(g.get("body_error").is_some());
            }
            compared += got.len();
        }
    }
    // 0.couch.1 alone lists 1001 docs; flipped_body_bit has one bad body in
    // each of its two listings.
    assert!(compared > 10_000, "only {compared} docs compared");
    assert_eq!(body_errors, 2);
}

#[test]
fn by_id_tree_agrees_with_by_seq_tree_in_every_header() {
    for file_path in vector_files() {
        let Ok((file, last)) = open(&file_path, OpenMode::Recovery) else {
            continue;
        };
        for h in file.headers_from(last, OpenMode::Recovery).unwrap() {
            let mut by_id = Vec::new();
            if let Some(root) = &h.header.by_id_root {
                leaf_entries(&file, root, &mut by_id);
            }
            let mut by_seq = Vec::new();
            if let Some(root) = &h.header.by_seq_root {
                leaf_entries(&file, root, &mut by_seq);
            }
            let mut from_id: Vec<DocInfo> = by_id
                .iter()
                .map(|(k, v)| DocInfo::decode_by_id(k, v).unwrap())
                .collect();
            from_id.sort_by_key(|d| d.db_seq);
            let from_seq: Vec<DocInfo> = by_seq
                .iter()
                .map(|(k, v)| DocInfo::decode_by_seq(k, v).unwrap())
                .collect();
            assert_eq!(from_id, from_seq, "{} @{}", file_path.display(), h.offset);
            for (k, v) in &by_id {
                let info = DocInfo::decode_by_id(k, v).unwrap();
                assert_eq!(&info.encode_by_id_value().unwrap(), v);
            }
            for (k, v) in &by_seq {
                let info = DocInfo::decode_by_seq(k, v).unwrap();
                assert_eq!(&info.encode_by_seq_value().unwrap(), v);
                couchfile::RevMeta::decode(&info.rev_meta).unwrap();
            }
        }
    }
}

#[test]
fn local_documents_read_back_as_couchstore_lists() {
    for file_path in vector_files() {
        let expected: Vec<Value> = jsonl(&sibling(&file_path, ".expect.jsonl"))
            .into_iter()
            .filter(|l| l["type"] == "local")
            .collect();
        let Ok((file, h)) = open(&file_path, OpenMode::Normal) else {
            continue;
        };
        let mut entries = Vec::new();
        if let Some(root) = &h.header.local_root {
            leaf_entries(&file, root, &mut entries);
        }
        let got: Vec<Value> = entries
            .iter()
            .map(|(k, v)| {
                json!({"type": "local", "id": String::from_utf8_lossy(k),
                       "value": String::from_utf8_lossy(v)})
            })
            .collect();
        assert_eq!(got, expected, "{}", file_path.display());
    }
}
