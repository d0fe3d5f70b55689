//! Files written by [`Db`] from random batches pass the independent Python
//! reader (`couchread.py --verify`, which recomputes every
//! node's reduce and subtree size and checks chunk CRCs), and what it prints
//! (documents in seq or id order with their metadata and body lengths, after
//! decompressing compressed bodies; local documents) is what was written, at
//! the last header and at every older one. Batches hold inserts, updates,
//! deletes with and without body, plain and compressed bodies (content_meta
//! 0x80), local documents and several commits; one file has thousands of
//! documents in a multi-level tree.
//!
//! The reader is not part of the repository: it is looked for in a
//! `shared/tools` directory beside it (or at `$COUCHREAD`). Without it or
//! without `python3` the files are still written and reopened, and the test
//! output says that the cross-check was skipped and why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::node::Node;
use btree::{Body, Db, DbOptions, DocUpdate, LocalUpdate, NodeConfig};
use couchfile::{compress, CouchFile, FileBackend, NodePointer, CONTENT_META_COMPRESSED};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

#[path = "support/couchread.rs"]
mod reader;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Printable ASCII without space and backslash, so couchread prints it
    /// unescaped and it splits on spaces.
    fn printable(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let c = b'!' + self.below(94) as u8;
                if c == b'\\' {
                    b'_'
                } else {
                    c
                }
            })
            .collect()
    }

    /// A JSON-ish body, compressible.
    fn text(&mut self, len: usize) -> Vec<u8> {
        let t = format!("{{\"n\":{},\"tags\":[\"x\",\"yz\"]}}", self.below(1000));
        t.bytes().cycle().take(len).collect()
    }
}

/// What couchread prints of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Printed {
    seq: u64,
    id: Vec<u8>,
    rev: u64,
    deleted: bool,
    content_meta: u8,
    physical_size: u64,
    rev_meta: String,
    /// Length of the (decompressed) body; `None` without a body.
    body_len: Option<usize>,
}

#[derive(Debug, Clone)]
struct MDoc {
    seq: u64,
    rev: u64,
    rev_meta: Vec<u8>,
    deleted: bool,
    content_meta: u8,
    body_len: Option<usize>,
    physical_size: u64,
}

#[derive(Debug, Clone, Default)]
struct Model {
    docs: BTreeMap<Vec<u8>, MDoc>,
    locals: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Model {
    fn printed(&self, by_id: bool) -> Vec<Printed> {
        let mut out: Vec<Printed> = self
            .docs
            .iter()
            .map(|(id, d)| Printed {
                seq: d.seq,
                id: id.clone(),
                rev: d.rev,
                deleted: d.deleted,
                content_meta: d.content_meta,
                physical_size: d.physical_size,
                rev_meta: d.rev_meta.iter().fold(String::new(), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                }),
                body_len: d.body_len,
            })
            .collect();
        if !by_id {
            out.sort_by_key(|p| p.seq);
        }
        out
    }
}

/// Runs couchread (`reader`) on `path` with `args`; panics unless it succeeds.
fn couchread(reader: &Path, path: &Path, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(reader)
        .arg(path)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "couchread {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("couchread prints UTF-8")
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}=");
    line.split(' ')
        .find_map(|f| f.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// Parses couchread's document and local document lines.
fn parse(output: &str) -> (Vec<Printed>, BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut docs = Vec::new();
    let mut locals = BTreeMap::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("local id=") {
            let (id, json) = rest.split_once(" json=").expect("local line");
            locals.insert(id.as_bytes().to_vec(), json.as_bytes().to_vec());
        } else if line.starts_with("seq=") {
            let body_len = line.split(' ').find_map(|f| {
                let f = f.strip_prefix("body[")?;
                Some(f[..f.find(']')?].parse::<usize>().unwrap())
            });
            let hex = field(line, "content_meta");
            docs.push(Printed {
                seq: field(line, "seq").parse().unwrap(),
                id: field(line, "id").as_bytes().to_vec(),
                rev: field(line, "rev").parse().unwrap(),
                deleted: field(line, "deleted") == "1",
                content_meta: u8::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap(),
                physical_size: field(line, "physical_size").parse().unwrap(),
                rev_meta: field(line, "rev_meta").to_string(),
                body_len,
            });
        } else if !line.is_empty() {
            panic!("unexpected couchread line {line:?}");
        }
    }
    (docs, locals)
}

/// Checks the file at `header` (None: the last one) against `model` with
/// couchread `--verify` (which also walks and verifies the by-id tree),
/// comparing the documents printed in seq order, bodies included, and the
/// local documents; with `by_id` also the documents printed in id order.
/// Skipped when the reader cannot run (see [`reader::couchread`]).
fn check_with_couchread(path: &Path, header: Option<u64>, model: &Model, by_id: bool) {
    let Some(reader) = reader::couchread() else {
        return;
    };
    let offset = header.map(|h| h.to_string());
    let mut args = vec!["--verify"];
    if let Some(o) = &offset {
        args.extend(["--header-offset", o.as_str()]);
    }
    let (docs, locals) = parse(&couchread(reader, path, &args));
    assert_eq!(
        docs.len(),
        model.docs.len(),
        "couchread doc count at {header:?}"
    );
    assert_eq!(docs, model.printed(false), "by-seq docs at {header:?}");
    assert_eq!(&locals, &model.locals, "local docs at {header:?}");

    if by_id {
        args.extend(["--byid", "--no-body"]);
        let (docs, _) = parse(&couchread(reader, path, &args));
        let mut want = model.printed(true);
        for p in &mut want {
            p.body_len = None;
        }
        assert_eq!(docs, want, "by-id docs at {header:?}");
    }
}

fn open_db(path: &Path, options: &DbOptions) -> Db {
    let backend = FileBackend::open_or_create(path).unwrap();
    let file = CouchFile::new(Arc::new(backend), path).unwrap();
    Db::open(file, options).unwrap()
}

/// Levels of the tree under `root` (following the first child).
fn depth(file: &CouchFile, root: Option<&NodePointer>) -> usize {
    let Some(root) = root else { return 0 };
    let mut offset = root.pointer;
    let mut levels = 1;
    loop {
        let node = Node::read(file, offset).unwrap();
        if node.is_leaf {
            return levels;
        }
        offset = NodePointer::decode_kp_value(node.value(0)).unwrap().pointer;
        levels += 1;
    }
}

/// Knobs of one random file.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    commits: usize,
    docs_per_commit: u64,
    ids: u64,
    version: u8,
    nodes: NodeConfig,
    /// Percent of documents with bodies of up to 8 KiB (the rest up to 300 bytes).
    big_percent: u64,
}

/// Writes a file by `plan` in a tempdir (reopening it between commits), then
/// checks it with couchread at the last header and at every older one.
/// Returns the by-id tree's depth at the end.
fn write_and_check(plan: Plan) -> usize {
    let mut rng = Rng(plan.seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.couch.1");
    let options = DbOptions {
        nodes: plan.nodes,
        new_file_version: plan.version,
        ..DbOptions::default()
    };
    let mut db = open_db(&path, &options);
    let ids: Vec<Vec<u8>> = (0..plan.ids)
        .map(|i| {
            let len = if rng.chance(5) {
                100 + rng.below(400) as usize
            } else {
                1 + rng.below(30) as usize
            };
            let mut id = format!("{i}:").into_bytes();
            id.extend(rng.printable(len));
            id
        })
        .collect();
    let local_ids: Vec<Vec<u8>> = vec![
        b"_local/vbstate".to_vec(),
        b"_local/collections/manifest".to_vec(),
        b"_local/x".to_vec(),
    ];
    let mut model = Model::default();
    let mut seq = 0;
    let mut history = vec![(db.committed().offset, model.clone())];
    for commit in 0..plan.commits {
        // One or two saves per commit.
        for _ in 0..1 + rng.below(2) {
            let n = rng.below(plan.docs_per_commit + 1);
            let mut batch: BTreeMap<Vec<u8>, DocUpdate> = BTreeMap::new();
            let mut order = Vec::new();
            for _ in 0..n {
                let id = ids[rng.below(ids.len() as u64) as usize].clone();
                if batch.contains_key(&id) {
                    continue;
                }
                let kind = rng.below(10);
                let deleted = kind >= 7;
                let content_meta = [0u8, 0x80, 0x83, 3][rng.below(4) as usize];
                let body = if kind == 9 {
                    None
                } else {
                    let len = if rng.chance(plan.big_percent) {
                        rng.below(8192) as usize
                    } else {
                        rng.below(300) as usize
                    };
                    Some(if rng.chance(50) {
                        rng.text(len)
                    } else {
                        rng.bytes(len)
                    })
                };
                let stored = rng.chance(20);
                let rev_meta_len = rng.below(26) as usize;
                let update = DocUpdate {
                    id: id.clone(),
                    seq: None,
                    rev_seq: 1 + rng.below(1 << 40),
                    rev_seq_above_stored: false,
                    rev_meta: rng.bytes(rev_meta_len),
                    deleted,
                    content_meta,
                    body: match &body {
                        None => Body::None,
                        Some(b) if stored && content_meta & CONTENT_META_COMPRESSED != 0 => {
                            Body::Stored(compress(b))
                        }
                        Some(b) if stored => Body::Stored(b.clone()),
                        Some(b) => Body::Plain(b.clone()),
                    },
                };
                seq += 1;
                let physical_size = body.as_ref().map_or(0, |b| {
                    8 + if content_meta & CONTENT_META_COMPRESSED != 0 {
                        compress(b).len()
                    } else {
                        b.len()
                    } as u64
                });
                model.docs.insert(
                    id.clone(),
                    MDoc {
                        seq,
                        rev: update.rev_seq,
                        rev_meta: update.rev_meta.clone(),
                        deleted,
                        content_meta,
                        body_len: body.as_ref().map(Vec::len),
                        physical_size,
                    },
                );
                order.push(id.clone());
                batch.insert(id, update);
            }
            let docs: Vec<DocUpdate> = order.iter().map(|id| batch[id].clone()).collect();
            let mut locals = Vec::new();
            for id in &local_ids {
                if rng.chance(30) {
                    let value = rng.chance(80).then(|| {
                        let len = rng.below(200) as usize;
                        let mut v = format!("{{\"commit\":{commit},\"pad\":\"").into_bytes();
                        v.extend(rng.printable(len).into_iter().map(|c| {
                            if c == b'"' {
                                b'.'
                            } else {
                                c
                            }
                        }));
                        v.extend(b"\"}");
                        v
                    });
                    match &value {
                        Some(v) => model.locals.insert(id.clone(), v.clone()),
                        None => model.locals.remove(id),
                    };
                    locals.push(LocalUpdate {
                        id: id.clone(),
                        value,
                    });
                }
            }
            db.save(&docs, &locals).unwrap();
        }
        let offset = db
            .commit(1_700_000_000_000_000_000 + commit as u64)
            .unwrap();
        history.push((offset, model.clone()));
        // Reopen between commits.
        drop(db);
        db = open_db(&path, &options);
    }
    check_with_couchread(&path, None, &model, true);
    for (offset, old) in &history {
        check_with_couchread(&path, Some(*offset), old, false);
    }
    let snap = db.snapshot();
    depth(snap.file(), snap.header().by_id_root.as_ref())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_files_pass_couchread(
        seed in any::<u64>(),
        commits in 1usize..5,
        docs_per_commit in 0u64..300,
        ids in 1u64..400,
        version in prop::sample::select(vec![11u8, 12, 13, 14]),
        threshold in prop::option::of(200usize..1279),
    ) {
        let nodes = threshold.map_or_else(NodeConfig::default, |t| NodeConfig {
            leaf_threshold: t,
            interior_threshold: t,
        });
        write_and_check(Plan {
            seed,
            commits,
            docs_per_commit,
            ids,
            version,
            nodes,
            big_percent: 5,
        });
    }
}

/// Thousands of documents with couchstore's node sizes: a tree of several
/// levels, over several commits with updates and deletes.
#[test]
fn thousands_of_documents_pass_couchread() {
    let depth = write_and_check(Plan {
        seed: 42,
        commits: 5,
        docs_per_commit: 2500,
        ids: 6000,
        version: couchfile::CURRENT_DISK_VERSION,
        nodes: NodeConfig::default(),
        big_percent: 1,
    });
    assert!(depth >= 3, "by-id tree of {depth} levels");
}
