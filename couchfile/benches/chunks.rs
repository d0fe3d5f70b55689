//! Chunk writes and reads (plain and snappy-compressed) and checksum throughput.
#![allow(clippy::unwrap_used)]

use couchfile::{CouchFile, CrcKind, FileWriter, MemBackend};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;

/// Somewhat compressible bytes, like a JSON document.
fn body(len: usize) -> Vec<u8> {
    let text = b"{\"name\":\"user\",\"age\":42,\"tags\":[\"a\",\"b\"],\"score\":3.25}";
    text.iter().cycle().take(len).copied().collect()
}

fn checksums(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    let data = body(64 * 1024);
    g.throughput(Throughput::Bytes(data.len() as u64));
    for kind in [CrcKind::Crc32c, CrcKind::Crc32] {
        g.bench_function(format!("{kind:?}/64KiB"), |b| {
            b.iter(|| kind.checksum(black_box(&data)))
        });
    }
    g.finish();
}

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk_write");
    for len in [256usize, 4096, 65536] {
        let data = body(len);
        g.throughput(Throughput::Bytes(len as u64 * 100));
        for compressed in [false, true] {
            let name = if compressed { "compressed" } else { "plain" };
            g.bench_with_input(BenchmarkId::new(name, len), &data, |b, data| {
                b.iter(|| {
                    let file = CouchFile::new(Arc::new(MemBackend::new()), "bench").unwrap();
                    let mut w = FileWriter::new(file).unwrap();
                    for _ in 0..100 {
                        if compressed {
                            w.append_compressed_chunk(data).unwrap();
                        } else {
                            w.append_chunk(data).unwrap();
                        }
                    }
                    w.flush().unwrap();
                })
            });
        }
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk_read");
    for len in [256usize, 4096, 65536] {
        let data = body(len);
        for compressed in [false, true] {
            let name = if compressed { "compressed" } else { "plain" };
            let file = CouchFile::new(Arc::new(MemBackend::new()), "bench").unwrap();
            let mut w = FileWriter::new(file.clone()).unwrap();
            let offsets: Vec<u64> = (0..100)
                .map(|_| {
                    if compressed {
                        w.append_compressed_chunk(&data).unwrap().offset
                    } else {
                        w.append_chunk(&data).unwrap().offset
                    }
                })
                .collect();
            w.flush().unwrap();
            g.throughput(Throughput::Bytes(len as u64 * 100));
            g.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter(|| {
                    for &o in &offsets {
                        let got = if compressed {
                            file.read_compressed_chunk(o).unwrap()
                        } else {
                            file.read_chunk(o).unwrap()
                        };
                        black_box(got);
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, checksums, writes, reads);
criterion_main!(benches);
