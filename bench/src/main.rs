//! `bench`: the project's main job. The workload runner (a store of vbuckets
//! under a write and read load with concurrent compaction) arrives with the
//! later issues; until then this binary is a short demo of the byte layer: it
//! writes a couchstore file of document bodies in batches, each batch ending
//! with a durable two-phase header commit, reopens it, finds the last header
//! as couchstore does, walks every header back, reads every body, and prints
//! what it did and how fast. It is not a benchmark harness: the criterion
//! micro-benchmarks run with `cargo xtask bench`.

use couchfile::{CouchFile, DbHeader, FileBackend, FileWriter, OpenMode};
use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

const BATCHES: u64 = 20;
const BODIES_PER_BATCH: u64 = 1_000;
const BODY_LEN: usize = 256;

fn body(i: u64) -> Vec<u8> {
    format!("{{\"id\":{i},\"payload\":\"{}\"}}", "x".repeat(BODY_LEN)).into_bytes()
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("0.couch.1");
    println!(
        "demo: writing {} in {BATCHES} durable batches",
        path.display()
    );

    let start = Instant::now();
    let file = CouchFile::new(Arc::new(FileBackend::create_new(&path)?), &path)?;
    let (mut writer, mut last_header) = FileWriter::create(file, &DbHeader::new(14))?;
    let mut offsets = Vec::new();
    for batch in 0..BATCHES {
        for i in 0..BODIES_PER_BATCH {
            let n = batch * BODIES_PER_BATCH + i;
            let data = body(n);
            let pos = if n % 3 == 0 {
                writer.append_compressed_chunk(&data)?
            } else {
                writer.append_chunk(&data)?
            };
            offsets.push((pos.offset, n % 3 == 0, n));
        }
        let mut header = DbHeader::new(14);
        header.update_seq = (batch + 1) * BODIES_PER_BATCH;
        header.prev_header_pos = Some(last_header);
        last_header = writer.commit(&header)?;
    }
    let write_time = start.elapsed();

    let start = Instant::now();
    let file = CouchFile::open_read_only(&path)?;
    let last = file
        .find_last_header(OpenMode::Normal)?
        .ok_or("the file has no header")?;
    let headers = file.headers_from(last.clone(), OpenMode::Normal)?;
    for &(offset, compressed, n) in &offsets {
        let data = if compressed {
            file.read_compressed_chunk(offset)?
        } else {
            file.read_chunk(offset)?
        };
        if data != body(n) {
            return Err(format!("body {n} at offset {offset} reads back wrong").into());
        }
    }
    let read_time = start.elapsed();

    let bodies = offsets.len() as f64;
    println!(
        "wrote {} bodies and {BATCHES} commits ({} bytes) in {:.1} ms: {:.0} bodies/s, {:.1} ms per durable commit",
        offsets.len(),
        file.len()?,
        write_time.as_secs_f64() * 1e3,
        bodies / write_time.as_secs_f64(),
        write_time.as_secs_f64() * 1e3 / BATCHES as f64,
    );
    println!(
        "reopened: last header at offset {} (update_seq {}), {} headers walked back",
        last.offset,
        last.header.update_seq,
        headers.len()
    );
    println!(
        "read back and checked every body in {:.1} ms ({:.0} bodies/s)",
        read_time.as_secs_f64() * 1e3,
        bodies / read_time.as_secs_f64()
    );
    Ok(())
}
