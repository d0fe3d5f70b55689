//! Property tests of chunk framing across 4096-byte block boundaries: random
//! sequences of plain and snappy chunks (0 to 20 KiB, some sized to start
//! exactly at or a few bytes before a boundary) interleaved with flushes and
//! header commits are written through [`FileWriter`], then every chunk must
//! read back, every block byte must be 0x00 except the 0x01 of committed
//! headers, the last header must be found and the headers walked; flipped
//! bytes and truncations must give errors, never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use couchfile::block::{align_up, physical_len};
use couchfile::{
    compress, Backend, CouchFile, CrcKind, DbHeader, Error, FileBackend, FileWriter, LocatedHeader,
    MemBackend, OpenMode, SequentialReader, BLOCK_SIZE,
};
use proptest::prelude::*;
use std::sync::Arc;

/// What a generated payload is made of.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Incompressible pseudo-random bytes.
    Random,
    /// One byte repeated (0x00 and 0x01 look like block bytes).
    Byte(u8),
    /// Compressible text.
    Text,
}

#[derive(Debug, Clone)]
enum Op {
    /// Appends a chunk; reads it back through the writer first when
    /// `read_via_writer` (which flushes).
    Chunk {
        len: usize,
        compressed: bool,
        fill: Fill,
        seed: u64,
        read_via_writer: bool,
    },
    /// Appends a plain chunk sized so that the next chunk starts `before`
    /// bytes (0 = exactly at) before a block boundary, `extra_blocks` further.
    PadTo {
        before: u64,
        extra_blocks: u64,
        seed: u64,
    },
    Flush,
    Commit,
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn nonzero_byte(&mut self) -> u8 {
        (self.below(255) + 1) as u8
    }
}

fn payload(len: usize, fill: Fill, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    match fill {
        Fill::Random => (0..len).map(|_| (rng.next() >> 32) as u8).collect(),
        Fill::Byte(b) => vec![b; len],
        Fill::Text => {
            const WORDS: &[u8] =
                b"{\"key\":\"doc-0042\",\"value\":\"lorem ipsum dolor sit amet\"},";
            let shift = rng.below(WORDS.len() as u64) as usize;
            (0..len)
                .map(|i| WORDS[(i + shift) % WORDS.len()] ^ ((i / 251) as u8 & 3))
                .collect()
        }
    }
}

/// A chunk as written.
#[derive(Debug)]
struct Chunk {
    offset: u64,
    /// Physical end (exclusive).
    end: u64,
    /// What was given to the writer.
    data: Vec<u8>,
    /// The chunk's payload on disk (snappy of `data` when compressed).
    stored: Vec<u8>,
    compressed: bool,
}

/// A committed header.
#[derive(Debug, Clone)]
struct Committed {
    offset: u64,
    /// Physical end of the header chunk (exclusive).
    end: u64,
    header: DbHeader,
}

fn read_back(file: &CouchFile, c: &Chunk) -> couchfile::Result<Vec<u8>> {
    if c.compressed {
        file.read_compressed_chunk(c.offset)
    } else {
        file.read_chunk(c.offset)
    }
}

fn assert_reads_back(file: &CouchFile, c: &Chunk, when: &str) {
    let got = read_back(file, c)
        .unwrap_or_else(|e| panic!("{when}: chunk at {} does not read: {e}", c.offset));
    assert!(
        got == c.data,
        "{when}: chunk at {} reads {} bytes that differ from the {} written",
        c.offset,
        got.len(),
        c.data.len()
    );
    if c.compressed {
        let raw = file.read_chunk(c.offset).unwrap();
        assert!(raw == c.stored, "{when}: raw chunk at {} differs", c.offset);
    }
}

/// Number of block boundaries in `[from, to)`.
fn boundaries_in(from: u64, to: u64) -> u64 {
    (align_up(to) - align_up(from.min(to))) / BLOCK_SIZE
}

/// Physical position of logical byte `i` of the chunk stored at `offset`.
fn physical_of(offset: u64, i: u64) -> u64 {
    offset + physical_len(offset, i + 1) - 1
}

/// Length of the plain chunk payload that, appended at `pos`, ends `before`
/// bytes before a block boundary (`extra_blocks` blocks beyond the first
/// one that leaves room for an 8-byte prefix).
fn pad_payload_len(pos: u64, before: u64, extra_blocks: u64) -> usize {
    let min_end = pos + physical_len(pos, 8);
    let target = align_up(min_end + before) + extra_blocks * BLOCK_SIZE - before;
    let want = target - pos;
    // physical_len is strictly increasing in the logical length.
    let (mut lo, mut hi) = (8u64, want);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if physical_len(pos, mid) < want {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    assert_eq!(physical_len(pos, lo), want, "no chunk ends at {target}");
    (lo - 8) as usize
}

/// The writer, its in-memory file and what was written so far.
struct Harness {
    version: u8,
    mem: Arc<MemBackend>,
    reader: CouchFile,
    writer: FileWriter,
    chunks: Vec<Chunk>,
    headers: Vec<Committed>,
}

impl Harness {
    fn create(version: u8) -> Self {
        let mem = Arc::new(MemBackend::new());
        let file = CouchFile::new(mem.clone(), "t.couch").unwrap();
        let header = DbHeader::new(version);
        let (writer, offset) = FileWriter::create(file, &header).unwrap();
        assert_eq!(offset, 0);
        assert_eq!(writer.file().crc(), CrcKind::for_version(version));
        let end = writer.position();
        assert_eq!(
            end,
            physical_len(0, 8 + header.encode().unwrap().len() as u64)
        );
        let reader = writer.file().clone();
        Self {
            version,
            mem,
            reader,
            writer,
            chunks: Vec::new(),
            headers: vec![Committed {
                offset,
                end,
                header,
            }],
        }
    }

    fn append(&mut self, data: Vec<u8>, compressed: bool, read_via_writer: bool) -> u64 {
        let before = self.writer.position();
        let pos = if compressed {
            self.writer.append_compressed_chunk(&data).unwrap()
        } else {
            self.writer.append_chunk(&data).unwrap()
        };
        let stored = if compressed {
            compress(&data)
        } else {
            data.clone()
        };
        assert_eq!(pos.offset, before, "a chunk goes where the writer was");
        assert_eq!(pos.disk_size, 8 + stored.len() as u64, "disk_size");
        let end = self.writer.position();
        assert_eq!(end - before, physical_len(before, pos.disk_size));
        let chunk = Chunk {
            offset: pos.offset,
            end,
            data,
            stored,
            compressed,
        };
        if chunk.offset >= self.mem.len().unwrap() {
            // Still in the write buffer: not on the backend yet.
            assert!(
                matches!(
                    self.reader.read_chunk(chunk.offset),
                    Err(Error::ShortRead { .. })
                ),
                "an unflushed chunk at {} must be a short read",
                chunk.offset
            );
        }
        if read_via_writer {
            let got = if compressed {
                self.writer.read_compressed_chunk(chunk.offset).unwrap()
            } else {
                self.writer.read_chunk(chunk.offset).unwrap()
            };
            assert!(
                got == chunk.data,
                "writer read of chunk at {}",
                chunk.offset
            );
            assert_reads_back(&self.reader, &chunk, "after the writer's read");
        }
        self.chunks.push(chunk);
        end
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Chunk {
                len,
                compressed,
                fill,
                seed,
                read_via_writer,
            } => {
                self.append(payload(len, fill, seed), compressed, read_via_writer);
            }
            Op::PadTo {
                before,
                extra_blocks,
                seed,
            } => {
                let len = pad_payload_len(self.writer.position(), before, extra_blocks);
                let end = self.append(payload(len, Fill::Random, seed), false, false);
                assert_eq!((end + before) % BLOCK_SIZE, 0, "padded to {before} before");
            }
            Op::Flush => {
                self.writer.flush().unwrap();
                assert_eq!(self.mem.len().unwrap(), self.writer.position());
                for c in &self.chunks {
                    assert_reads_back(&self.reader, c, "after a flush");
                }
            }
            Op::Commit => self.commit(),
        }
    }

    fn commit(&mut self) {
        let prev = self.headers.last().unwrap();
        let mut header = DbHeader::new(self.version);
        header.update_seq = prev.header.update_seq + 1;
        if self.version >= 14 {
            header.prev_header_pos = Some(prev.offset);
        }
        let expected = align_up(self.writer.position());
        let offset = self.writer.commit(&header).unwrap();
        assert_eq!(offset, expected, "a header goes at the next block boundary");
        let end = self.writer.position();
        assert_eq!(
            end,
            offset + physical_len(offset, 8 + header.encode().unwrap().len() as u64)
        );
        assert_eq!(self.mem.len().unwrap(), end, "a commit writes everything");
        let found = self
            .reader
            .find_last_header(OpenMode::Normal)
            .unwrap()
            .unwrap();
        assert_eq!((found.offset, &found.header), (offset, &header));
        for c in &self.chunks {
            assert_reads_back(&self.reader, c, "after a commit");
        }
        self.headers.push(Committed {
            offset,
            end,
            header,
        });
    }

    /// Flushes and returns the file image.
    fn finish(&mut self) -> Vec<u8> {
        self.writer.flush().unwrap();
        let image = self.mem.to_bytes();
        assert_eq!(image.len() as u64, self.writer.position());
        image
    }
}

fn open_image(image: &[u8], crc: CrcKind) -> (Arc<MemBackend>, CouchFile) {
    let mem = Arc::new(MemBackend::from_bytes(image.to_vec()));
    let mut file = CouchFile::new(mem.clone(), "t.couch").unwrap();
    file.set_crc(crc);
    (mem, file)
}

fn located(c: &Committed) -> LocatedHeader {
    LocatedHeader {
        offset: c.offset,
        header: c.header.clone(),
    }
}

/// Block bytes, header search and header walks on an untouched image.
fn check_image(image: &[u8], h: &Harness) {
    let header_offsets: Vec<u64> = h.headers.iter().map(|c| c.offset).collect();
    for b in (0..image.len() as u64).step_by(BLOCK_SIZE as usize) {
        let byte = image[b as usize];
        let expected = u8::from(header_offsets.contains(&b));
        assert_eq!(byte, expected, "block byte at {b}");
    }
    // Opened afresh, as an opener does: CRC-32C until the header says.
    let mem = Arc::new(MemBackend::from_bytes(image.to_vec()));
    let mut file = CouchFile::new(mem, "t.couch").unwrap();
    let newest_first: Vec<LocatedHeader> = h.headers.iter().rev().map(located).collect();
    for mode in [OpenMode::Normal, OpenMode::Recovery] {
        let found = file.find_last_header(mode).unwrap().unwrap();
        assert_eq!(&found, &newest_first[0], "last header in {mode:?}");
        assert_eq!(file.headers_from(found, mode).unwrap(), newest_first);
    }
    file.set_crc(CrcKind::for_version(newest_first[0].header.disk_version));
    for c in &h.chunks {
        assert_reads_back(&file, c, "from the image");
    }
    // From a real file, read from its map: in place, or copied out of it
    // without the block bytes where a chunk crosses a block boundary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.couch");
    std::fs::write(&path, image).unwrap();
    let backend = Arc::new(FileBackend::open_read_only(&path).unwrap());
    let mut mapped = CouchFile::new(backend, &path).unwrap();
    mapped.set_crc(file.crc());
    for c in &h.chunks {
        assert_reads_back(&mapped, c, "from the file's map");
    }
    // In file order through a window smaller than the larger chunks, and
    // through one larger than most images.
    for window in [BLOCK_SIZE as usize * 2, 1 << 20] {
        let mut reader = SequentialReader::new(window);
        for c in &h.chunks {
            let got = reader.read_chunk(&file, c.offset).unwrap();
            assert!(
                got == file.read_chunk(c.offset).unwrap(),
                "chunk at {} through a {window}-byte window",
                c.offset
            );
        }
    }
    for (i, c) in h.headers.iter().enumerate() {
        assert_eq!(
            file.read_header_at(c.offset).unwrap().as_ref(),
            Some(&c.header)
        );
        let next = file.next_header(&located(c)).unwrap();
        assert_eq!(
            next,
            h.headers.get(i + 1).map(located),
            "after {}",
            c.offset
        );
    }
    for b in (0..image.len() as u64).step_by(BLOCK_SIZE as usize) {
        if !header_offsets.contains(&b) {
            assert_eq!(file.read_header_at(b).unwrap(), None, "block {b}");
        }
    }
}

/// Flips single logical bytes of every chunk: the read must fail with a
/// checksum error (or corrupt / short read where the length field was hit).
/// Flipped block-prefix bytes inside a chunk are invisible to the reader.
fn check_flips(image: &[u8], crc: CrcKind, chunks: &[Chunk], seed: u64) {
    let (mem, file) = open_image(image, crc);
    let mut rng = Rng::new(seed);
    for c in chunks {
        let logical_len = 8 + c.stored.len() as u64;
        let mut picks: Vec<u64> = (0..12).collect();
        picks.extend(logical_len.saturating_sub(4)..logical_len);
        for _ in 0..6 {
            picks.push(rng.below(logical_len));
        }
        let boundaries: Vec<u64> = (align_up(c.offset)..c.end)
            .step_by(BLOCK_SIZE as usize)
            .collect();
        for &b in &boundaries {
            for p in [b.wrapping_sub(1), b + 1] {
                if (c.offset..c.end).contains(&p) && p % BLOCK_SIZE != 0 {
                    picks.push(p - c.offset - boundaries_in(c.offset, p));
                }
            }
        }
        picks.retain(|&i| i < logical_len);
        picks.sort_unstable();
        picks.dedup();
        for i in picks {
            let p = physical_of(c.offset, i);
            assert_ne!(p % BLOCK_SIZE, 0, "logical byte {i} maps to a block byte");
            let orig = image[p as usize];
            mem.write_at(p, &[orig ^ rng.nonzero_byte()]).unwrap();
            let r = file.read_chunk(c.offset);
            // A compaction's reader, which takes chunks straight from its
            // window, must see the same damage the same way.
            for window in [BLOCK_SIZE as usize * 2, 1 << 20] {
                let through = SequentialReader::new(window).read_chunk(&file, c.offset);
                assert_eq!(
                    through.as_ref().map_err(ToString::to_string),
                    r.as_ref().map_err(ToString::to_string),
                    "flipping logical byte {i} of the chunk at {}, read through a {window}-byte window",
                    c.offset
                );
            }
            let ok = match &r {
                Err(Error::Checksum { offset, .. }) => *offset == c.offset,
                Err(Error::Corrupt { .. } | Error::ShortRead { .. }) => i < 4,
                // A wrong length is a different message for the CRC, which
                // cannot catch every one: a payload whose CRC register ends
                // at 0 (CRC 0xffffffff, e.g. ff ff ff ff) checks equally with
                // zeros (the hole before a header) appended. Any such read
                // must be the payload cut or extended, never altered.
                Ok(v) => {
                    i < 4
                        && v.len() != c.stored.len()
                        && (v.starts_with(&c.stored) || c.stored.starts_with(v))
                }
                _ => false,
            };
            assert!(
                ok,
                "flipping logical byte {i} (at {p}) of the chunk at {} gave {:?}",
                c.offset,
                r.as_ref().map(Vec::len)
            );
            if c.compressed && r.is_err() {
                assert!(file.read_compressed_chunk(c.offset).is_err());
            }
            mem.write_at(p, &[orig]).unwrap();
        }
        for &b in &boundaries {
            mem.write_at(b, &[image[b as usize] ^ 0xff]).unwrap();
            let got = file.read_chunk(c.offset).unwrap();
            assert!(got == c.stored, "block byte {b} changed the chunk's bytes");
            mem.write_at(b, &[image[b as usize]]).unwrap();
        }
        assert_reads_back(&file, c, "after restoring");
    }
}

/// What `find_last_header` must give on the image cut to `len` bytes:
/// `Ok(None)` for an empty file, `Some(i)` for header `i`, `None` for an error.
fn expected_after_truncation(headers: &[Committed], len: u64, mode: OpenMode) -> Option<usize> {
    // The search starts in the block of byte len - 2: headers in later
    // blocks have at most their block byte left.
    let mut candidates = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| h.offset + 2 <= len)
        .rev();
    match mode {
        OpenMode::Normal => candidates.next().filter(|(_, h)| h.end <= len),
        OpenMode::Recovery => candidates.find(|(_, h)| h.end <= len),
    }
    .map(|(i, _)| i)
}

/// Cuts the image at many lengths: complete chunks still read, cut ones are
/// short reads, and the header search gives the newest complete header or
/// an error as couchstore does.
fn check_truncations(image: &[u8], crc: CrcKind, h: &Harness, seed: u64) {
    let len = image.len() as u64;
    let mut rng = Rng::new(seed);
    let mut cuts: Vec<u64> = vec![0, 1, 2, 3, len.saturating_sub(1), len];
    for c in &h.chunks {
        cuts.extend([c.offset, c.offset + 1, c.offset + 8, c.offset + 9]);
        cuts.extend([c.end - 1, c.end, c.end + 1]);
    }
    for c in &h.headers {
        cuts.extend([c.offset, c.offset + 1, c.offset + 2, c.offset + 3]);
        cuts.extend([c.end - 1, c.end]);
    }
    for b in (0..len).step_by(BLOCK_SIZE as usize) {
        cuts.extend([b.saturating_sub(1), b, b + 1, b + 2]);
    }
    for _ in 0..16 {
        cuts.push(rng.below(len + 1));
    }
    cuts.retain(|&l| l <= len);
    cuts.sort_unstable_by(|a, b| b.cmp(a));
    cuts.dedup();
    let (mem, _) = open_image(image, crc);
    for cut in cuts {
        mem.truncate(cut).unwrap();
        let mut file = CouchFile::new(mem.clone(), "t.couch").unwrap();
        file.set_crc(crc);
        for c in &h.chunks {
            if c.end <= cut {
                assert_reads_back(&file, c, &format!("cut at {cut}"));
            } else {
                assert!(
                    matches!(file.read_chunk(c.offset), Err(Error::ShortRead { .. })),
                    "chunk at {}..{} cut at {cut} must be a short read",
                    c.offset,
                    c.end
                );
                assert!(read_back(&file, c).is_err());
            }
        }
        for mode in [OpenMode::Normal, OpenMode::Recovery] {
            let got = file.find_last_header(mode);
            if cut == 0 {
                assert!(matches!(got, Ok(None)), "empty file: {got:?}");
                continue;
            }
            match (expected_after_truncation(&h.headers, cut, mode), got) {
                (Some(i), Ok(Some(found))) => {
                    assert_eq!(found, located(&h.headers[i]), "cut at {cut}, {mode:?}");
                    let walked = file.headers_from(found, mode).unwrap();
                    let expected: Vec<_> = h.headers[..=i].iter().rev().map(located).collect();
                    assert_eq!(walked, expected, "walk from the cut at {cut}, {mode:?}");
                }
                (None, Err(e)) => assert!(
                    e.is_corruption() || matches!(e, Error::NoHeader { .. }),
                    "cut at {cut}, {mode:?}: unexpected error {e}"
                ),
                (want, got) => {
                    panic!("cut at {cut}, {mode:?}: expected header {want:?}, got {got:?}")
                }
            }
        }
    }
}

/// Writes `ops` into a new file of `version` and checks everything.
fn check_framing(version: u8, ops: &[Op], seed: u64) {
    let mut h = Harness::create(version);
    for op in ops {
        h.apply(op);
    }
    let image = h.finish();
    check_image(&image, &h);
    let crc = CrcKind::for_version(version);
    check_flips(&image, crc, &h.chunks, seed);
    check_truncations(&image, crc, &h, seed);
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        3 => 0usize..=64,
        3 => 0usize..=4200,
        2 => 0usize..=20 * 1024,
    ];
    let fill = prop_oneof![
        3 => Just(Fill::Random),
        1 => prop::sample::select(vec![0x00u8, 0x01, 0x02, 0xff]).prop_map(Fill::Byte),
        2 => Just(Fill::Text),
    ];
    prop_oneof![
        6 => (len, any::<bool>(), fill, any::<u64>(), any::<bool>()).prop_map(
            |(len, compressed, fill, seed, read_via_writer)| Op::Chunk {
                len,
                compressed,
                fill,
                seed,
                read_via_writer,
            }
        ),
        3 => (0u64..=8, 0u64..=2, any::<u64>()).prop_map(|(before, extra_blocks, seed)| {
            Op::PadTo {
                before,
                extra_blocks,
                seed,
            }
        }),
        1 => Just(Op::Flush),
        2 => Just(Op::Commit),
    ]
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Only the two test files may be created: no regression files.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn chunks_and_headers_round_trip_across_block_boundaries_and_resist_flips_and_cuts(
        ops in prop::collection::vec(op_strategy(), 1..24),
        seed in any::<u64>(),
    ) {
        check_framing(14, &ops, seed);
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn version_11_files_round_trip_with_crc32(
        ops in prop::collection::vec(op_strategy(), 1..16),
        seed in any::<u64>(),
    ) {
        check_framing(11, &ops, seed);
    }
}

/// Every start 0 to 8 bytes before a boundary, with payload sizes around
/// one block, plain and compressed, and a commit from each position.
#[test]
fn chunks_starting_at_or_just_before_a_block_boundary_read_back() {
    for before in 0..=8 {
        for len in [0usize, 1, 7, 8, 9, 4086, 4087, 4088, 4095, 4096, 4097, 8191] {
            for compressed in [false, true] {
                let mut ops = vec![
                    Op::PadTo {
                        before,
                        extra_blocks: 0,
                        seed: 1,
                    },
                    Op::Chunk {
                        len,
                        compressed,
                        fill: Fill::Random,
                        seed: len as u64,
                        read_via_writer: true,
                    },
                    Op::PadTo {
                        before,
                        extra_blocks: 1,
                        seed: 2,
                    },
                    Op::Commit,
                ];
                // Then a chunk right after the header, in its block.
                ops.push(Op::Chunk {
                    len,
                    compressed,
                    fill: Fill::Text,
                    seed: 3,
                    read_via_writer: false,
                });
                ops.push(Op::Commit);
                check_framing(14, &ops, before * 31 + len as u64);
            }
        }
    }
}

/// A version-11 file: CRC-32 (IEEE) on chunks and headers, readable only
/// once the opener switches to the CRC the found header implies.
#[test]
fn version_11_file_uses_crc32_for_chunks_and_headers_and_is_found() {
    let mut h = Harness::create(11);
    assert_eq!(h.writer.file().crc(), CrcKind::Crc32);
    let sizes = [10usize, 5000, 0, 4000, 12_000, 77];
    for (i, &len) in sizes.iter().enumerate() {
        h.append(payload(len, Fill::Text, i as u64), i % 2 == 1, i == 0);
        if i % 3 == 2 {
            h.commit();
        }
    }
    h.commit();
    let image = h.finish();
    check_image(&image, &h);
    let field = |pos: u64| {
        let mut b = [0u8; 4];
        for (k, byte) in b.iter_mut().enumerate() {
            *byte = image[physical_of(pos, 4 + k as u64) as usize];
        }
        u32::from_be_bytes(b)
    };
    for c in &h.chunks {
        assert_eq!(field(c.offset), CrcKind::Crc32.checksum(&c.stored));
    }
    for c in &h.headers {
        assert_eq!(c.header.disk_version, 11);
        assert_eq!(c.header.prev_header_pos, None);
        let body = c.header.encode().unwrap();
        assert_eq!(field(c.offset), CrcKind::Crc32.checksum(&body));
    }
    let mem = Arc::new(MemBackend::from_bytes(image.clone()));
    let mut file = CouchFile::new(mem, "t.couch").unwrap();
    let found = file.find_last_header(OpenMode::Normal).unwrap().unwrap();
    assert_eq!(found, located(h.headers.last().unwrap()));
    // Read as CRC-32C, a non-empty chunk fails its checksum.
    let big = h.chunks.iter().find(|c| !c.stored.is_empty()).unwrap();
    assert!(matches!(
        file.read_chunk(big.offset),
        Err(Error::Checksum { .. })
    ));
    file.set_crc(CrcKind::for_version(found.header.disk_version));
    for c in &h.chunks {
        assert_reads_back(&file, c, "version 11");
    }
    check_flips(&image, CrcKind::Crc32, &h.chunks, 11);
}
