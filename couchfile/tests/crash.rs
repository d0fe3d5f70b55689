//! Crash tests of the two-phase commit through the fault-injecting backend:
//! a commit is cut at every one of its mutating operations (writes and
//! syncs), and every crash image (nothing, a torn prefix, or everything of
//! the unsynced writes surviving) must open at the previous header or at the
//! new one with all of its chunks, in normal and recovery mode. ENOSPC and
//! EIO fail the commit with the right error, leave the previous header in
//! place, and a new writer on the file commits again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use couchfile::block::{align_up, physical_len};
use couchfile::{
    Backend, CouchFile, CrcKind, DbHeader, Error, FaultController, FaultKind, FaultRule,
    FaultyBackend, FileWriter, IoOp, LocatedHeader, MemBackend, OpKind, OpenMode, TornTail,
    BLOCK_SIZE,
};
use std::sync::Arc;

/// One chunk to append.
#[derive(Debug, Clone, Copy)]
enum Spec {
    Plain(usize),
    Compressed(usize),
    /// A plain chunk sized so that the writer ends exactly at a block
    /// boundary (the header then needs no padding).
    PadToBoundary,
}

struct Scenario {
    name: &'static str,
    version: u8,
    /// The chunks of each commit after the create.
    base: &'static [&'static [Spec]],
    /// The chunks of the commit that is crashed.
    next: &'static [Spec],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "mixed chunks crossing boundaries",
        version: 14,
        base: &[
            &[Spec::Plain(300), Spec::Compressed(5000)],
            &[Spec::Plain(4000), Spec::Compressed(17), Spec::Plain(9000)],
            &[Spec::Plain(1), Spec::Plain(2), Spec::Plain(3)],
        ],
        next: &[
            Spec::Plain(700),
            Spec::Plain(4100),
            Spec::Compressed(6000),
            Spec::Plain(9000),
            Spec::Plain(12),
        ],
    },
    Scenario {
        name: "data ending exactly at a block boundary",
        version: 14,
        base: &[&[Spec::Plain(5000)], &[Spec::Compressed(300)]],
        next: &[
            Spec::Plain(6000),
            Spec::Compressed(100),
            Spec::PadToBoundary,
        ],
    },
    Scenario {
        name: "a header and no chunks",
        version: 14,
        base: &[&[Spec::Plain(100)], &[]],
        next: &[],
    },
    Scenario {
        name: "first commit after the create",
        version: 14,
        base: &[],
        next: &[Spec::Plain(5000), Spec::Compressed(100), Spec::Plain(0)],
    },
    Scenario {
        name: "more than the writer buffers (flushes while appending)",
        version: 14,
        base: &[&[Spec::Plain(10_000)]],
        // 70 x 16 KiB > the 1 MiB write buffer.
        next: &[Spec::Plain(16 * 1024); 70],
    },
    Scenario {
        name: "version 11 (CRC-32, no prev_header_pos)",
        version: 11,
        base: &[
            &[Spec::Plain(3000)],
            &[Spec::Compressed(7000), Spec::Plain(4095)],
        ],
        next: &[Spec::Plain(4096), Spec::Compressed(20_000), Spec::Plain(1)],
    },
];

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half random, half repetitive: compressible but not trivially.
            if (i / 64) % 2 == 0 {
                (x >> 32) as u8
            } else {
                b"couchstore"[i % 10]
            }
        })
        .collect()
}

/// A chunk as appended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    offset: u64,
    data: Vec<u8>,
    compressed: bool,
}

fn append(writer: &mut FileWriter, spec: Spec, seed: u64) -> couchfile::Result<Chunk> {
    let (data, compressed) = match spec {
        Spec::Plain(n) => (payload(n, seed), false),
        Spec::Compressed(n) => (payload(n, seed), true),
        Spec::PadToBoundary => {
            // 8 prefix bytes and the payload, plus a block byte for each
            // boundary the chunk starts at or crosses.
            let pos = writer.position();
            let room = align_up(pos) - pos;
            let len = if room == 0 {
                BLOCK_SIZE - 9
            } else if room >= 8 {
                room - 8
            } else {
                room + BLOCK_SIZE - 9
            };
            (payload(len as usize, seed), false)
        }
    };
    let pos = if compressed {
        writer.append_compressed_chunk(&data)?
    } else {
        writer.append_chunk(&data)?
    };
    if matches!(spec, Spec::PadToBoundary) {
        assert_eq!(writer.position() % BLOCK_SIZE, 0, "pad to a boundary");
    }
    Ok(Chunk {
        offset: pos.offset,
        data,
        compressed,
    })
}

fn read_back(file: &CouchFile, c: &Chunk) -> couchfile::Result<Vec<u8>> {
    if c.compressed {
        file.read_compressed_chunk(c.offset)
    } else {
        file.read_chunk(c.offset)
    }
}

fn assert_chunks(file: &CouchFile, chunks: &[Chunk], what: &str) {
    for c in chunks {
        let got = read_back(file, c)
            .unwrap_or_else(|e| panic!("{what}: chunk at {} does not read: {e}", c.offset));
        assert!(got == c.data, "{what}: chunk at {} differs", c.offset);
    }
}

fn next_header(version: u8, prev: &LocatedHeader) -> DbHeader {
    let mut h = DbHeader::new(version);
    h.update_seq = prev.header.update_seq + 1;
    if version >= 14 {
        h.prev_header_pos = Some(prev.offset);
    }
    h
}

/// A file with the scenario's base commits, on a fault-injecting backend.
struct Base {
    controller: FaultController,
    backend: Arc<FaultyBackend<MemBackend>>,
    writer: FileWriter,
    /// Every header committed, oldest first.
    headers: Vec<LocatedHeader>,
    /// Every chunk committed.
    chunks: Vec<Chunk>,
}

fn build_base(s: &Scenario) -> Base {
    let controller = FaultController::new();
    let backend = Arc::new(FaultyBackend::new(MemBackend::new(), controller.clone()));
    let file = CouchFile::new(backend.clone(), "crash.couch").unwrap();
    let first = DbHeader::new(s.version);
    let (mut writer, offset) = FileWriter::create(file, &first).unwrap();
    let mut headers = vec![LocatedHeader {
        offset,
        header: first,
    }];
    let mut chunks = Vec::new();
    for (i, commit) in s.base.iter().enumerate() {
        for (j, &spec) in commit.iter().enumerate() {
            chunks.push(append(&mut writer, spec, (i * 100 + j) as u64).unwrap());
        }
        let header = next_header(s.version, headers.last().unwrap());
        let offset = writer.commit(&header).unwrap();
        headers.push(LocatedHeader { offset, header });
    }
    assert_eq!(backend.unsynced_bytes(), 0, "a commit syncs everything");
    Base {
        controller,
        backend,
        writer,
        headers,
        chunks,
    }
}

/// What a commit that completes leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Committed {
    header: LocatedHeader,
    chunks: Vec<Chunk>,
}

/// Appends the scenario's next chunks and commits.
fn run_next(s: &Scenario, base: &mut Base) -> couchfile::Result<Committed> {
    let mut chunks = Vec::new();
    for (j, &spec) in s.next.iter().enumerate() {
        chunks.push(append(&mut base.writer, spec, 10_000 + j as u64)?);
    }
    let header = next_header(s.version, base.headers.last().unwrap());
    let offset = base.writer.commit(&header)?;
    Ok(Committed {
        header: LocatedHeader { offset, header },
        chunks,
    })
}

/// The torn tails tried on a crash with `unsynced` bytes written since the
/// last sync.
fn torn_tails(unsynced: u64) -> Vec<TornTail> {
    let mut ks: Vec<u64> = (1..=16).collect();
    ks.extend(unsynced.saturating_sub(16)..unsynced);
    // Spread over the rest; an odd stride lands at varied block offsets.
    let stride = (unsynced / 256).max(509) | 1;
    ks.extend((0..unsynced).step_by(stride as usize));
    ks.extend([unsynced / 3, unsynced / 2]);
    ks.retain(|&k| k >= 1 && k < unsynced);
    ks.sort_unstable();
    ks.dedup();
    let mut tails = vec![TornTail::Nothing];
    tails.extend(ks.into_iter().map(TornTail::Prefix));
    tails.push(TornTail::Everything);
    tails
}

/// Which header a crash image opened at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opened {
    Previous,
    New,
}

/// Opens `bytes` in both modes: it must give the base's last header or the
/// new one, and the new one only if its block byte became 0x01 (with every
/// chunk of the commit then readable). Committed chunks always read.
fn check_opens(s: &Scenario, base: &Base, new: &Committed, bytes: Vec<u8>, what: &str) -> Opened {
    let flipped = bytes.get(new.header.offset as usize) == Some(&1);
    let mut file = CouchFile::new(Arc::new(MemBackend::from_bytes(bytes)), "crash.couch").unwrap();
    let previous = base.headers.last().unwrap();
    let mut opened = None;
    for mode in [OpenMode::Normal, OpenMode::Recovery] {
        let found = file
            .find_last_header(mode)
            .unwrap_or_else(|e| panic!("{}: {what}, {mode:?}: {e}", s.name))
            .unwrap_or_else(|| panic!("{}: {what}, {mode:?}: empty file", s.name));
        let this = if found == *previous {
            Opened::Previous
        } else if found == new.header {
            Opened::New
        } else {
            panic!(
                "{}: {what}, {mode:?}: found header at {} (update_seq {}), expected {} or {}",
                s.name, found.offset, found.header.update_seq, previous.offset, new.header.offset
            );
        };
        assert_eq!(
            this == Opened::New,
            flipped,
            "{}: {what}, {mode:?}: the new header counts iff its block byte is 0x01",
            s.name
        );
        assert_eq!(*opened.get_or_insert(this), this, "modes disagree");
        let walked = file.headers_from(found, mode).unwrap();
        let mut expected: Vec<_> = base.headers.iter().rev().cloned().collect();
        if this == Opened::New {
            expected.insert(0, new.header.clone());
        }
        assert_eq!(walked, expected, "{}: {what}: headers walked", s.name);
        file.set_crc(CrcKind::for_version(s.version));
        assert_chunks(&file, &base.chunks, what);
        if this == Opened::New {
            assert_chunks(&file, &new.chunks, what);
        }
    }
    opened.unwrap()
}

/// The dry run: the commit's outcome and how many mutating operations it
/// (appends included) takes.
fn dry_run(s: &Scenario) -> (Committed, u64) {
    let mut base = build_base(s);
    let before = base.controller.mutation_count();
    let new = run_next(s, &mut base).unwrap();
    let count = base.controller.mutation_count() - before;
    assert_eq!(new.header.offset % BLOCK_SIZE, 0);
    assert!(
        count >= 4,
        "{}: a commit is at least 2 writes and 2 syncs",
        s.name
    );
    (new, count)
}

#[test]
fn a_crash_at_any_write_or_sync_of_a_commit_opens_at_the_previous_or_the_new_header() {
    let mut points = 0;
    let mut images = 0;
    for s in SCENARIOS {
        let (new, count) = dry_run(s);
        let mut saw_new = false;
        for n in 0..count {
            let mut base = build_base(s);
            base.controller.crash_at(n);
            let err = run_next(s, &mut base).expect_err("the crashed commit must fail");
            assert!(
                matches!(err, Error::Io { .. }),
                "{}: crash at {n}: {err}",
                s.name
            );
            assert!(base.controller.has_crashed());
            let unsynced = base.backend.unsynced_bytes();
            points += 1;
            for torn in torn_tails(unsynced) {
                let image = base.backend.crash_image(torn).unwrap();
                let what = format!("crash at {n}/{count}, {torn:?} of {unsynced}");
                saw_new |= check_opens(s, &base, &new, image, &what) == Opened::New;
                images += 1;
            }
        }
        // The last sync is what makes the commit durable: only a crash there
        // with the flipped byte on disk can show the new header.
        assert!(saw_new, "{}: no crash image had the new header", s.name);
    }
    println!("{points} crash points, {images} crash images checked");
}

#[test]
fn a_crash_after_the_commits_last_sync_keeps_the_new_header() {
    for s in SCENARIOS {
        let (new, count) = dry_run(s);
        // Crash at the first operation after the commit, then one further:
        // an unsynced append after the header must not hide it either.
        for extra in [0, 1] {
            let mut base = build_base(s);
            base.controller.crash_at(count + extra);
            let got = run_next(s, &mut base).unwrap();
            assert_eq!(got, new, "{}: same commit as the dry run", s.name);
            assert!(!base.controller.has_crashed());
            assert_eq!(base.backend.unsynced_bytes(), 0);
            let after =
                append(&mut base.writer, Spec::Plain(5000), 7).and_then(|_| base.writer.sync());
            assert!(after.is_err(), "{}: the crash must stop the append", s.name);
            assert!(base.controller.has_crashed());
            for torn in torn_tails(base.backend.unsynced_bytes()) {
                let image = base.backend.crash_image(torn).unwrap();
                let what = format!("crash after the commit (+{extra}), {torn:?}");
                assert_eq!(check_opens(s, &base, &new, image, &what), Opened::New);
            }
        }
    }
}

/// Opens the backend's current bytes and two crash images: all must give
/// the previous header when `must_be_previous`, else previous or new.
fn check_after_failure(s: &Scenario, base: &Base, new: &Committed, must_be_previous: bool) {
    let current = {
        let len = base.backend.len().unwrap();
        let mut bytes = vec![0u8; len as usize];
        assert_eq!(
            base.backend.read_full_at(0, &mut bytes).unwrap() as u64,
            len
        );
        bytes
    };
    let images = [
        ("current bytes", current),
        (
            "crash image, nothing unsynced",
            base.backend.crash_image(TornTail::Nothing).unwrap(),
        ),
        (
            "crash image, everything",
            base.backend.crash_image(TornTail::Everything).unwrap(),
        ),
    ];
    for (what, bytes) in images {
        let opened = check_opens(s, base, new, bytes, what);
        if must_be_previous || what == "crash image, nothing unsynced" {
            assert_eq!(opened, Opened::Previous, "{}: {what}", s.name);
        }
    }
}

/// How a new writer continues after a failed commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Append at the end of the file, after whatever the failed commit left.
    AppendAtEnd,
    /// Cut the file back to the end of the last header first
    /// ([`FileWriter::truncate`]).
    TruncateToHeader,
}

/// The recovery path after a failed commit: open the file, find the last
/// header (recorded in `base.headers` if the failed commit's header made it),
/// then append the scenario's chunks with a new writer and commit.
fn recover(s: &Scenario, base: &mut Base, how: Recovery) -> couchfile::Result<Committed> {
    let mut file = CouchFile::new(base.backend.clone(), "crash.couch")?;
    let last = file.find_last_header(OpenMode::Normal)?.expect("a header");
    if last != *base.headers.last().unwrap() {
        // The failed commit's header made it (its byte was written though
        // the sync reporting it failed).
        assert_eq!(
            last.header.update_seq,
            base.headers.last().unwrap().header.update_seq + 1
        );
        base.headers.push(last.clone());
    }
    file.set_crc(CrcKind::for_version(last.header.disk_version));
    // The failed writer is never used again.
    base.writer = FileWriter::new(file)?;
    assert_eq!(base.writer.position(), base.backend.len().unwrap());
    if how == Recovery::TruncateToHeader {
        let body = last.header.encode()?;
        let end = last.offset + physical_len(last.offset, 8 + body.len() as u64);
        base.writer.truncate(end)?;
    }
    let mut chunks = Vec::new();
    for (j, &spec) in s.next.iter().enumerate() {
        chunks.push(append(&mut base.writer, spec, 20_000 + j as u64)?);
    }
    let header = next_header(s.version, &last);
    let offset = base.writer.commit(&header)?;
    Ok(Committed {
        header: LocatedHeader { offset, header },
        chunks,
    })
}

/// Recovers after a failed commit (faults cleared): the new header is found
/// in both modes, durable, and every committed chunk reads back.
fn recover_and_check(s: &Scenario, mut base: Base, how: Recovery) {
    base.controller.clear_faults();
    let new = recover(s, &mut base, how).unwrap();
    assert_eq!(base.backend.unsynced_bytes(), 0);
    let mut headers = base.headers.clone();
    headers.push(new.header.clone());
    let expected: Vec<_> = headers.iter().rev().cloned().collect();
    let mut chunks = base.chunks.clone();
    chunks.extend(new.chunks.iter().cloned());
    let current = {
        let mut bytes = vec![0u8; base.backend.len().unwrap() as usize];
        base.backend.read_full_at(0, &mut bytes).unwrap();
        bytes
    };
    for bytes in [
        current,
        base.backend.crash_image(TornTail::Nothing).unwrap(),
    ] {
        let mut file =
            CouchFile::new(Arc::new(MemBackend::from_bytes(bytes)), "crash.couch").unwrap();
        for mode in [OpenMode::Normal, OpenMode::Recovery] {
            let found = file.find_last_header(mode).unwrap().unwrap();
            assert_eq!(found, new.header, "{}: {how:?}, {mode:?}", s.name);
            let walked = file.headers_from(found, mode).unwrap();
            assert_eq!(walked, expected, "{}: {how:?}: headers walked", s.name);
        }
        file.set_crc(CrcKind::for_version(s.version));
        assert_chunks(&file, &chunks, "after recovery");
    }
}

/// A base file whose next commit failed on EIO from every sync, faults
/// cleared: its tail holds the failed commit's chunks and unflipped header.
fn failed_base(s: &Scenario) -> Base {
    let mut base = build_base(s);
    base.controller
        .inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
    run_next(s, &mut base).expect_err("the commit must fail");
    base.controller.clear_faults();
    base
}

#[test]
fn a_crash_at_any_operation_of_a_recovery_opens_at_a_committed_header() {
    let mut points = 0;
    let mut images = 0;
    for s in SCENARIOS {
        for how in [Recovery::AppendAtEnd, Recovery::TruncateToHeader] {
            let mut dry = failed_base(s);
            let before = dry.controller.mutation_count();
            let new = recover(s, &mut dry, how).unwrap();
            let count = dry.controller.mutation_count() - before;
            let mut saw_new = false;
            for n in 0..count {
                let mut base = failed_base(s);
                base.controller.crash_at(n);
                assert!(recover(s, &mut base, how).is_err());
                points += 1;
                for torn in torn_tails(base.backend.unsynced_bytes()) {
                    let image = base.backend.crash_image(torn).unwrap();
                    let what = format!("{how:?}, crash at {n}/{count}, {torn:?}");
                    saw_new |= check_opens(s, &base, &new, image, &what) == Opened::New;
                    images += 1;
                }
            }
            assert!(saw_new, "{}: {how:?}: never saw the new header", s.name);
        }
    }
    println!("{points} crash points in recoveries, {images} crash images checked");
}

#[test]
fn no_space_on_any_write_of_a_commit_fails_with_no_space_and_keeps_the_previous_header() {
    for s in SCENARIOS {
        let (new, _) = dry_run(s);
        let mut failed = 0;
        for skip in 0.. {
            let mut base = build_base(s);
            base.controller.inject(FaultRule {
                skip,
                ..FaultRule::once(OpKind::Write, FaultKind::NoSpace)
            });
            let err = match run_next(s, &mut base) {
                Ok(got) => {
                    // Past the commit's last write: nothing failed.
                    assert_eq!(got, new);
                    assert_eq!(base.controller.injected_count(), 0);
                    break;
                }
                Err(e) => e,
            };
            failed += 1;
            assert!(
                matches!(
                    err,
                    Error::Io {
                        op: IoOp::Write,
                        ..
                    }
                ),
                "{}: {err}",
                s.name
            );
            assert!(err.is_no_space(), "{}: {err} must be ENOSPC", s.name);
            assert_eq!(err.couchstore_name(), "COUCHSTORE_ERROR_NO_SPACE");
            check_after_failure(s, &base, &new, true);
            let how = if skip % 2 == 0 {
                Recovery::AppendAtEnd
            } else {
                Recovery::TruncateToHeader
            };
            recover_and_check(s, base, how);
        }
        // The data, the header and its flipped byte: at least 2 writes.
        assert!(failed >= 2, "{}: {failed} writes failed", s.name);
    }
}

/// Every scenario with each way of recovering.
fn scenarios_and_recoveries() -> impl Iterator<Item = (&'static Scenario, Recovery)> {
    SCENARIOS.iter().flat_map(|s| {
        [Recovery::AppendAtEnd, Recovery::TruncateToHeader]
            .into_iter()
            .map(move |how| (s, how))
    })
}

#[test]
fn eio_on_every_sync_fails_the_commit_without_no_space_and_keeps_the_previous_header() {
    for (s, how) in scenarios_and_recoveries() {
        let (new, _) = dry_run(s);
        let mut base = build_base(s);
        base.controller
            .inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
        let err = run_next(s, &mut base).expect_err("the commit must fail");
        assert!(
            matches!(err, Error::Io { op: IoOp::Sync, .. }),
            "{}: {err}",
            s.name
        );
        assert!(!err.is_no_space(), "{}: {err} is not ENOSPC", s.name);
        assert_eq!(err.io_error().and_then(|e| e.raw_os_error()), Some(5));
        // The first sync failed: the header's byte is still 0x00.
        check_after_failure(s, &base, &new, true);
        // While syncs fail, a new writer cannot commit either.
        let file = CouchFile::new(base.backend.clone(), "crash.couch").unwrap();
        let mut retry = FileWriter::new(file).unwrap();
        let header = next_header(s.version, base.headers.last().unwrap());
        assert!(retry.commit(&header).is_err());
        drop(retry);
        check_after_failure(s, &base, &new, true);
        recover_and_check(s, base, how);
    }
}

#[test]
fn eio_on_the_second_sync_of_a_commit_leaves_either_header_and_recovery_commits() {
    for (s, how) in scenarios_and_recoveries() {
        let (new, _) = dry_run(s);
        let mut base = build_base(s);
        // The commit's syncs: the header's, then the flipped byte's.
        base.controller.inject(FaultRule {
            skip: 1,
            ..FaultRule::always(OpKind::Sync, FaultKind::Eio)
        });
        let err = run_next(s, &mut base).expect_err("the commit must fail");
        assert!(
            matches!(err, Error::Io { op: IoOp::Sync, .. }),
            "{}: {err}",
            s.name
        );
        assert!(!err.is_no_space());
        // The flipped byte is in the page cache but not synced: the live
        // file shows the new header, a crash may lose it.
        check_after_failure(s, &base, &new, false);
        recover_and_check(s, base, how);
    }
}
