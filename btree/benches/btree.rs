//! Documents on a vbucket of one million: a 1,000-document batch (save and
//! commit, with its two syncs) of updates to random existing documents and of
//! new documents, random point lookups (doc info and body), and a full by-seq
//! fold (`changes_since(0)`). The file (16-byte keys, ~100-byte compressed
//! JSON bodies, couchstore's node sizes) is built once in a tempdir with
//! batches of 20,000 documents.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use btree::{Body, ChangesFilter, Db, DbOptions, DocUpdate, Snapshot};
use couchfile::{CouchFile, FileBackend, RevMeta, CONTENT_META_COMPRESSED};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeSet;
use std::hint::black_box;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DOCS: u64 = 1_000_000;
const BUILD_BATCH: u64 = 20_000;
const BATCH: usize = 1_000;

/// A 16-byte key.
fn key(i: u64) -> Vec<u8> {
    format!("key{i:013}").into_bytes()
}

/// A ~100-byte JSON body.
fn body(i: u64, round: u64) -> Vec<u8> {
    format!(
        "{{\"id\":{i},\"round\":{round},\"name\":\"user-{:08x}\",\"active\":true,\"score\":{},\"tags\":[\"a\",\"b\"]}}",
        i.wrapping_mul(0x9E37_79B9),
        i % 977
    )
    .into_bytes()
}

fn doc(i: u64, round: u64) -> DocUpdate {
    DocUpdate {
        id: key(i),
        seq: None,
        rev_seq: round + 1,
        rev_seq_above_stored: false,
        rev_meta: RevMeta::new(i ^ round, 0, 0, 1).encode(),
        deleted: false,
        content_meta: CONTENT_META_COMPRESSED,
        body: Body::Plain(body(i, round)),
    }
}

fn open(path: &Path) -> Db {
    let backend = FileBackend::open_or_create(path).unwrap();
    let file = CouchFile::new(Arc::new(backend), path).unwrap();
    Db::open(file, &DbOptions::default()).unwrap()
}

fn build(path: &Path) -> Db {
    let start = Instant::now();
    let mut db = open(path);
    let mut next = 0;
    while next < DOCS {
        let docs: Vec<DocUpdate> = (next..(next + BUILD_BATCH).min(DOCS))
            .map(|i| doc(i, 0))
            .collect();
        db.save(&docs, &[]).unwrap();
        next += docs.len() as u64;
        db.commit(next).unwrap();
    }
    let len = std::fs::metadata(path).unwrap().len();
    eprintln!(
        "built {DOCS} documents in {:.1?}: {:.1} MiB",
        start.elapsed(),
        len as f64 / (1 << 20) as f64
    );
    db
}

fn vbucket(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.couch.1");
    let mut db = build(&path);
    let mut rng = SmallRng::seed_from_u64(1);

    let snap: Snapshot = db.snapshot();
    let mut g = c.benchmark_group("vbucket_1M");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("lookup_doc_info_and_body", |b| {
        b.iter(|| {
            let k = key(rng.random::<u64>() % DOCS);
            let info = snap.doc_info(&k).unwrap().expect("present");
            black_box(snap.read_body(&info).unwrap())
        })
    });
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("doc_infos_1000_sorted_keys", |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| key(rng.random::<u64>() % DOCS))
                    .collect::<BTreeSet<_>>()
            },
            |keys| {
                let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                black_box(snap.doc_infos(&keys).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("vbucket_1M");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(DOCS));
    g.bench_function("changes_since_0", |b| {
        b.iter(|| {
            let mut n = 0u64;
            snap.changes_since(0, ChangesFilter::All, &mut |info| {
                n += info.db_seq & 1;
                Ok(ControlFlow::Continue(()))
            })
            .unwrap();
            black_box(n)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("vbucket_1M");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(BATCH as u64));
    let mut round = 0;
    g.bench_function("save_commit_1000_random_updates", |b| {
        b.iter_batched(
            || {
                round += 1;
                let ids: BTreeSet<u64> = (0..BATCH).map(|_| rng.random::<u64>() % DOCS).collect();
                let docs: Vec<DocUpdate> = ids.into_iter().map(|i| doc(i, round)).collect();
                (docs, round)
            },
            |(docs, round)| {
                db.save(&docs, &[]).unwrap();
                db.commit(round).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    let mut next = DOCS;
    g.bench_function("save_commit_1000_new_keys", |b| {
        b.iter_batched(
            || {
                let docs: Vec<DocUpdate> = (next..next + BATCH as u64).map(|i| doc(i, 0)).collect();
                next += BATCH as u64;
                (docs, next)
            },
            |(docs, timestamp)| {
                db.save(&docs, &[]).unwrap();
                db.commit(timestamp).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    let len = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "file after the batches: {:.1} MiB",
        len as f64 / (1 << 20) as f64
    );
}

criterion_group!(benches, vbucket);
criterion_main!(benches);
