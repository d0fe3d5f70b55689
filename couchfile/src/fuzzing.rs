//! Entry points for the fuzz targets (`fuzz/` at the repository root): each
//! feeds arbitrary bytes to one decoder and must never panic, whatever the
//! bytes. Also exercised by this crate's tests on random and real inputs.

use crate::{
    CouchFile, DbHeader, DocInfo, LocatedHeader, MemBackend, NodePointer, NodePointerRef, OpenMode,
    RevMeta, SequentialReader, BLOCK_SIZE,
};
use std::sync::Arc;

/// Decodes `data` as a header body; what decodes must re-encode to the same bytes.
pub fn decode_db_header(data: &[u8]) {
    if let Ok(header) = DbHeader::decode(data) {
        if let Ok(encoded) = header.encode() {
            // prev_header_pos = NO_PREV normalises to None and back, so the
            // bytes must survive the round trip exactly.
            assert_eq!(encoded, data, "header re-encodes differently");
        }
    }
}

/// Decodes `data` as an interior-node value (whole, and its offset alone,
/// which must agree) and as a header root.
pub fn decode_node_pointer(data: &[u8]) {
    let decoded = NodePointer::decode_kp_value(data);
    let offset = NodePointerRef::decode_pointer(data);
    assert_eq!(
        decoded.as_ref().ok().map(|p| p.pointer),
        offset.as_ref().ok().copied(),
        "the offset alone decodes differently"
    );
    if let Ok(p) = decoded {
        let mut out = Vec::new();
        if p.encode_kp_value(&mut out).is_ok() {
            assert_eq!(out, data, "node pointer re-encodes differently");
        }
    }
    let _ = NodePointer::decode_root(data);
}

/// Splits `data` into a key and a value and decodes a by-id entry.
pub fn decode_by_id_value(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (key, value) = data.split_at(split);
    if let Ok(info) = DocInfo::decode_by_id(key, value) {
        if let Ok(encoded) = info.encode_by_id_value() {
            assert_eq!(encoded, value, "by-id value re-encodes differently");
        }
    }
}

/// Decodes a by-seq entry: the first 6 bytes are the key.
pub fn decode_by_seq_value(data: &[u8]) {
    let split = data.len().min(6);
    let (key, value) = data.split_at(split);
    if let Ok(info) = DocInfo::decode_by_seq(key, value) {
        let _ = info.encode_by_seq_value();
    }
}

/// Decodes kv-engine rev_meta.
pub fn decode_rev_meta(data: &[u8]) {
    if let Ok(meta) = RevMeta::decode(data) {
        assert_eq!(meta.encode(), data, "rev_meta re-encodes differently");
    }
}

fn file_of(data: &[u8]) -> Option<CouchFile> {
    CouchFile::new(
        Arc::new(MemBackend::from_bytes(data.to_vec())),
        "fuzz.couch",
    )
    .ok()
}

/// Treats `data` as a file image and reads a chunk, plain and compressed, at
/// a few offsets, including offsets named by the first bytes.
pub fn read_chunks(data: &[u8]) {
    let Some(file) = file_of(data) else { return };
    let mut offsets = vec![0u64, 1, BLOCK_SIZE, BLOCK_SIZE + 1];
    offsets.extend(data.chunks_exact(4).take(4).map(|c| {
        u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])) % (data.len() as u64 + 1)
    }));
    read_chunks_at(&file, offsets);
}

/// Reads the chunk at each offset, plain and compressed, and through a
/// compaction's windowed reader, which must agree with the plain read, on
/// damage too.
fn read_chunks_at(file: &CouchFile, offsets: impl IntoIterator<Item = u64>) {
    let mut windowed = SequentialReader::new(2 * BLOCK_SIZE as usize);
    for offset in offsets {
        let plain = file.read_chunk(offset);
        let through = windowed.read_chunk(file, offset);
        assert_eq!(
            through.map_err(|e| e.to_string()),
            plain.map_err(|e| e.to_string()),
            "chunk at {offset}"
        );
        let _ = file.read_compressed_chunk(offset);
    }
}

/// Treats `data` as a file image: finds the last header in both modes and
/// walks every header backwards and forwards.
pub fn find_header(data: &[u8]) {
    let Some(file) = file_of(data) else { return };
    for mode in [OpenMode::Normal, OpenMode::Recovery] {
        if let Ok(Some(last)) = file.find_last_header(mode) {
            if let Ok(all) = file.headers_from(last.clone(), mode) {
                assert!(all.windows(2).all(|w| w[0].offset > w[1].offset));
            }
            let first = LocatedHeader {
                offset: 0,
                header: last.header.clone(),
            };
            let _ = file.next_header(&first);
        }
    }
}

/// Images of real couchstore files for the entry points' tests: each file
/// of the repository's `testdata/couchstore` named here whole, cut in half, and with
/// every 997th byte flipped.
pub fn vector_images() -> std::io::Result<Vec<Vec<u8>>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/couchstore");
    let mut images = Vec::new();
    for name in ["0.couch.1", "legacy_v11.couch", "flipped_body_bit.couch"] {
        let bytes = std::fs::read(format!("{dir}/{name}"))?;
        let cut = bytes[..bytes.len() / 2].to_vec();
        let mut flipped = bytes.clone();
        for i in (0..flipped.len()).step_by(997) {
            flipped[i] ^= 0x5a;
        }
        images.extend([bytes, cut, flipped]);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Deterministic pseudo-random bytes (splitmix64).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    }

    fn every_entry_point(data: &[u8]) {
        decode_db_header(data);
        decode_node_pointer(data);
        decode_by_id_value(data);
        decode_by_seq_value(data);
        decode_rev_meta(data);
        read_chunks(data);
        find_header(data);
    }

    #[test]
    fn fuzz_entry_points_survive_garbage_and_real_files() {
        for (len, seed) in [(0, 0), (1, 1), (7, 2), (64, 3), (5000, 4), (9000, 5)] {
            every_entry_point(&noise(len, seed));
        }
        for image in vector_images().unwrap() {
            every_entry_point(&image);
            // Every offset, in file order as a compaction reads: each real
            // chunk, and everything between.
            let file = file_of(&image).unwrap();
            read_chunks_at(&file, 0..image.len() as u64 + 2);
        }
    }
}
