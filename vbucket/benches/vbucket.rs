//! A vbucket of a [`Store`]: durable batches of writes through the flusher,
//! and point reads of persisted and of unflushed documents. Keys are 16
//! bytes, values 256 random bytes (stored snappy-compressed, the default).
//!
//! - `durable_batch_1000`: 1,000 sets of new keys, then `wait_persisted` of
//!   the last seqno, on real files in a tempdir (every commit syncs twice).
//!   The flusher cuts batches of up to 10,000 items, but it wakes on the
//!   first set, so an iteration is one commit or two (the number per
//!   iteration is printed).
//! - `get_persisted_100k/{cached,uncached}`: `get` of random keys of a
//!   vbucket of 100,000 persisted documents (none in the dirty table), after
//!   a reopen, with the default node cache and without one: the by-id
//!   lookup and the body read.
//! - `get_many_100_of_100k/{cached,uncached}`: `get_many` of 100 random
//!   keys of the same vbucket (throughput in keys).
//! - `get_unflushed`: `get` of keys whose mutations are still in the dirty
//!   table. To keep them there the vbucket lives in a fault-injecting
//!   in-memory directory whose writes fail, so every commit fails (and is
//!   retried with a long backoff).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use couchfile::{FaultController, FaultKind, FaultRule, FaultyDirectory, OpKind};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vbucket::{FlusherConfig, ItemMeta, Store, StoreConfig, VBucket};

const BATCH: usize = 1_000;
const PERSISTED: u64 = 100_000;
const UNFLUSHED: u64 = 1_000;
/// Keys of one `get_many`.
const GET_MANY: usize = 100;
const VALUE_LEN: usize = 256;
const TIMEOUT: Duration = Duration::from_secs(60);

/// A 16-byte key.
fn key(i: u64) -> Vec<u8> {
    format!("key{i:013}").into_bytes()
}

/// Random values to pick from.
fn values(rng: &mut SmallRng) -> Vec<Vec<u8>> {
    (0..256)
        .map(|_| {
            let mut value = vec![0u8; VALUE_LEN];
            rng.fill(&mut value[..]);
            value
        })
        .collect()
}

fn config() -> StoreConfig {
    StoreConfig {
        flusher: FlusherConfig {
            max_batch_items: 10_000,
            backpressure_timeout: TIMEOUT,
            ..FlusherConfig::default()
        },
        ..StoreConfig::default()
    }
}

/// Sets keys `from..to`, then waits until they are persisted.
fn fill(vb: &VBucket, from: u64, to: u64, values: &[Vec<u8>], rng: &mut SmallRng) -> u64 {
    let mut last = 0;
    for i in from..to {
        let value = &values[(rng.random::<u64>() % values.len() as u64) as usize];
        last = vb.set(&key(i), value, ItemMeta::default()).unwrap().seqno;
    }
    vb.wait_persisted(last, TIMEOUT).unwrap()
}

fn durable_batches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    let values = values(&mut rng);
    let mut next = 0u64;
    let commits_before = vb.stats().unwrap().commits;
    let mut iterations = 0u64;

    let mut g = c.benchmark_group("vbucket");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("durable_batch_1000", |b| {
        b.iter_batched(
            || {
                let batch: Vec<(Vec<u8>, usize)> = (next..next + BATCH as u64)
                    .map(|i| (key(i), (rng.random::<u64>() % values.len() as u64) as usize))
                    .collect();
                next += BATCH as u64;
                iterations += 1;
                batch
            },
            |batch| {
                let mut last = 0;
                for (k, v) in &batch {
                    last = vb.set(k, &values[*v], ItemMeta::default()).unwrap().seqno;
                }
                vb.wait_persisted(last, TIMEOUT).unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    let stats = vb.stats().unwrap();
    eprintln!(
        "durable_batch_1000: {iterations} batches in {} commits ({:.2} per batch); file {:.1} MiB; commit latency {:?}",
        stats.commits - commits_before,
        (stats.commits - commits_before) as f64 / iterations.max(1) as f64,
        stats.file_size as f64 / f64::from(1 << 20),
        stats.flush.commit_latency.summary(),
    );
    drop(vb);
    store.close().unwrap();
}

fn persisted_reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(2);
    {
        let store = Store::open(dir.path(), config()).unwrap();
        let vb = store.open_vbucket(0).unwrap();
        let values = values(&mut rng);
        let start = Instant::now();
        fill(&vb, 0, PERSISTED, &values, &mut rng);
        let stats = vb.stats().unwrap();
        assert_eq!(stats.live_docs, PERSISTED, "{stats:?}");
        eprintln!(
            "get_persisted_100k: {PERSISTED} documents persisted in {:.1?} ({} commits), file {:.1} MiB",
            start.elapsed(),
            stats.commits,
            stats.file_size as f64 / f64::from(1 << 20),
        );
        drop(vb);
        store.close().unwrap();
    }
    // Reopened, so that every read is of the file (nothing dirty), with the
    // default node cache and without one.
    for (name, cache_bytes) in [
        ("cached", vbucket::DEFAULT_NODE_CACHE_BYTES),
        ("uncached", 0),
    ] {
        let store = Store::open(
            dir.path(),
            StoreConfig {
                node_cache_bytes: cache_bytes,
                ..config()
            },
        )
        .unwrap();
        let vb = store.open_vbucket(0).unwrap();
        let mut g = c.benchmark_group("vbucket");
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        g.bench_function(format!("get_persisted_100k/{name}"), |b| {
            b.iter(|| {
                let k = key(rng.random::<u64>() % PERSISTED);
                black_box(vb.get(&k).unwrap().expect("present"))
            })
        });
        g.throughput(Throughput::Elements(GET_MANY as u64));
        g.bench_function(format!("get_many_{GET_MANY}_of_100k/{name}"), |b| {
            b.iter_batched(
                || {
                    (0..GET_MANY)
                        .map(|_| key(rng.random::<u64>() % PERSISTED))
                        .collect::<Vec<_>>()
                },
                |keys| {
                    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                    black_box(vb.get_many(&keys).unwrap())
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
        let stats = vb.stats().unwrap();
        assert_eq!(stats.dirty_items, 0);
        if let Some(cache) = stats.node_cache {
            eprintln!("get_persisted_100k/{name}: node cache {cache:?}");
        }
        drop(vb);
        store.close().unwrap();
    }
}

fn unflushed_reads(c: &mut Criterion) {
    let controller = FaultController::new();
    let dir = Arc::new(FaultyDirectory::new(controller.clone()));
    let mut config = config();
    // Few retries of the failing commits while measuring.
    config.flusher.retry_backoff_min = Duration::from_secs(1);
    config.flusher.retry_backoff_max = Duration::from_secs(10);
    let store = Store::open_in(dir, config).unwrap();
    let vb = store.open_vbucket(0).unwrap();
    controller.inject(FaultRule::always(OpKind::Write, FaultKind::Eio));
    let mut rng = SmallRng::seed_from_u64(3);
    let values = values(&mut rng);
    let mut last = 0;
    for i in 0..UNFLUSHED {
        let value = &values[(rng.random::<u64>() % values.len() as u64) as usize];
        last = vb.set(&key(i), value, ItemMeta::default()).unwrap().seqno;
    }
    assert_eq!(vb.stats().unwrap().dirty_items, UNFLUSHED);

    let mut g = c.benchmark_group("vbucket");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("get_unflushed", |b| {
        b.iter(|| {
            let k = key(rng.random::<u64>() % UNFLUSHED);
            black_box(vb.get(&k).unwrap().expect("present"))
        })
    });
    g.finish();
    let stats = vb.stats().unwrap();
    assert_eq!(stats.dirty_items, UNFLUSHED, "{stats:?}");
    assert_eq!(stats.flush.persisted_seqno, 0, "{stats:?}");
    eprintln!(
        "get_unflushed: {} failed commits while measuring",
        stats.flush.commit_failures
    );
    controller.clear_faults();
    vb.wait_persisted(last, TIMEOUT).unwrap();
    drop(vb);
    store.close().unwrap();
}

criterion_group!(benches, durable_batches, persisted_reads, unflushed_reads);
criterion_main!(benches);
