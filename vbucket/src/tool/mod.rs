//! The library behind the `couchtool` binary: listings of a couchstore file
//! (JSON Lines, byte for byte as the couchstore test vectors record them, and
//! readable text), its headers, a summary, and a checker of the trees and
//! bodies of a header ([`verify`]). Every command writes to a
//! `&mut dyn Write`, so tests call them without spawning a process; the binary
//! only parses arguments, picks the stream and turns the result into an exit
//! status. [`compact`] writes a compacted copy of a file.
//!
//! The JSON Lines format (see `testdata/couchstore/README.md`) is, one object a line,
//! keys in this order and no spaces:
//!
//! - `{"type":"header","offset":N,"disk_version":N,"update_seq":N,"purge_seq":N,"timestamp":N,"doc_count":N,"deleted_count":N,"space_used":N}`
//! - `{"type":"doc","seq":N,"id":"HEX","rev_seq":N,"deleted":BOOL,"content_meta":N,"rev_meta":"HEX","physical_size":N,"body_len":N,"body_sha256":"HEX"}`,
//!   with `null`s where there is no body and `"body_error":"NAME"` after
//!   them where the body cannot be read;
//! - `{"type":"local","id":"TEXT","value":"TEXT"}`;
//! - `{"type":"end","docs":N,"locals":N}` (a headers listing:
//!   `{"type":"end","headers":N}`);
//! - `{"type":"open_error","mode":"normal","error":"NAME"}` alone when the
//!   file cannot be opened.

mod compact;
mod rollback;
mod verify;

pub use crate::history::AsOf;
pub use compact::{compact, CompactOptions, CompactSummary};
pub use rollback::{rollback, RollbackSummary};
pub use verify::{verify, verify_snapshot, verify_with, Problem, Report};

use btree::{ChangesFilter, Snapshot};
use couchfile::{CouchFile, CrcKind, DocInfo, LocatedHeader, OpenMode};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::Path;

pub use crate::error::{Error, Result};

/// Turns a failed write of a listing into [`Error::Output`].
trait OutputResult<T> {
    fn output(self) -> Result<T>;
}

impl<T> OutputResult<T> for io::Result<T> {
    fn output(self) -> Result<T> {
        self.map_err(Error::Output)
    }
}

/// How to open a file: the mode used to find the last valid header, or a
/// header given by its offset, or the newest header as of a seqno or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// How a corrupt last header is treated (normal: an error; recovery:
    /// fall back to an older header).
    pub mode: OpenMode,
    /// Open at the header whose block starts here instead of the last one.
    pub header_offset: Option<u64>,
    /// Open at the newest header of the file's history (from the last
    /// header back, see [`crate::history`]) at or before this point; when
    /// there is none, the open fails as for a file without a header
    /// (`COUCHSTORE_ERROR_NO_HEADER`). Ignored with `header_offset`.
    pub as_of: Option<AsOf>,
}

impl OpenOptions {
    /// Normal mode at the last header.
    pub fn normal() -> Self {
        Self::default()
    }

    /// Recovery mode at the last valid header.
    pub fn recovery() -> Self {
        Self {
            mode: OpenMode::Recovery,
            ..Self::default()
        }
    }

    /// At the header at `offset`.
    pub fn at(offset: u64) -> Self {
        Self {
            header_offset: Some(offset),
            ..Self::default()
        }
    }

    /// At the newest header at or before `point`.
    pub fn as_of(point: AsOf) -> Self {
        Self {
            as_of: Some(point),
            ..Self::default()
        }
    }
}

/// What a command met that makes its exit status a failure although it ran
/// to the end: the file could not be opened (a JSON Lines listing then holds
/// the `open_error` line), a body could not be read, a header further back is
/// corrupt. One message per problem, each naming the file, for stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The problems met.
    pub problems: Vec<String>,
}

impl Outcome {
    /// True when nothing went wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// `normal` or `recovery`, as the `open_error` line names the mode.
pub fn mode_name(mode: OpenMode) -> &'static str {
    match mode {
        OpenMode::Normal => "normal",
        OpenMode::Recovery => "recovery",
    }
}

/// Opens `path` read-only at a header as `options` say.
pub fn open(path: &Path, options: &OpenOptions) -> btree::Result<Snapshot> {
    let file = CouchFile::open_read_only(path)?;
    match (options.header_offset, options.as_of) {
        (Some(offset), _) => Snapshot::open_at(file, offset),
        (None, None) => Snapshot::open_latest(file, options.mode),
        (None, Some(point)) => {
            let latest = Snapshot::open_latest(file, options.mode)?;
            let index = crate::history::HeaderIndex::build(
                latest.file(),
                latest.located_header(),
                options.mode,
            )?;
            match index.find(point) {
                Some(header) => Ok(Snapshot::new(latest.file().clone(), header.clone())),
                None => Err(btree::Error::File(couchfile::Error::NoHeader {
                    path: path.to_path_buf(),
                })),
            }
        }
    }
}

fn open_or_error(path: &Path, options: &OpenOptions) -> Result<Snapshot> {
    open(path, options).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        mode: options.mode,
        source,
    })
}

/// Parses a duration for the command line: a whole number with a unit,
/// `ns`, `us`, `ms`, `s`, `m`, `h` or `d` (`90s`, `15m`, `2h`, `7d`); a
/// bare number is seconds.
pub fn parse_duration(text: &str) -> std::result::Result<std::time::Duration, String> {
    use std::time::Duration;
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number and a unit, such as 90s or 2h"))?;
    let per_unit = match unit {
        "ns" => Duration::from_nanos(1),
        "us" => Duration::from_micros(1),
        "ms" => Duration::from_millis(1),
        "" | "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (ns, us, ms, s, m, h, d)"
            ))
        }
    };
    let n = u32::try_from(n).map_err(|_| format!("{text:?}: too large"))?;
    per_unit
        .checked_mul(n)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `bytes` for people: UTF-8 text as is, control characters and bytes that
/// are not UTF-8 escaped (`\n`, `\u{1b}`, `\xff`).
pub fn printable(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                s.extend(c.escape_default());
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s
}

/// An error's message without the file name, for messages that name it.
pub(crate) fn describe(e: &couchfile::Error) -> String {
    match e {
        couchfile::Error::Checksum {
            stored, computed, ..
        } => format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        couchfile::Error::ShortRead {
            wanted, file_len, ..
        } => format!("{wanted} bytes run past the end of the file ({file_len} bytes)"),
        couchfile::Error::Corrupt { what, detail, .. }
        | couchfile::Error::Malformed { what, detail } => format!("corrupt {what}: {detail}"),
        other => other.to_string(),
    }
}

/// [`describe`] for the B-tree layer's errors.
pub(crate) fn describe_btree(e: &btree::Error) -> String {
    match e {
        btree::Error::File(e) => describe(e),
        btree::Error::CorruptNode { offset, detail, .. } => {
            format!("corrupt B-tree node at offset {offset}: {detail}")
        }
        other => other.to_string(),
    }
}

/// A JSON string literal of `text`.
fn json_string(text: &str) -> io::Result<String> {
    serde_json::to_string(text).map_err(io::Error::other)
}

/// The figures of one header that the listings print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderSummary {
    /// Offset of the header's block.
    pub offset: u64,
    /// Disk version.
    pub disk_version: u8,
    /// Highest sequence number assigned.
    pub update_seq: u64,
    /// Purge sequence number.
    pub purge_seq: u64,
    /// Commit timestamp (0 before version 13).
    pub timestamp: u64,
    /// Live documents, from the by-id root's reduce.
    pub doc_count: u64,
    /// Deleted documents, from the by-id root's reduce.
    pub deleted_count: u64,
    /// Bytes of the bodies, from the by-id root's reduce.
    pub body_size: u64,
    /// Subtree size of the by-id root.
    pub by_id_size: u64,
    /// Subtree size of the by-seq root.
    pub by_seq_size: u64,
    /// Subtree size of the local root.
    pub local_size: u64,
    /// Bodies plus the three trees.
    pub space_used: u64,
}

impl HeaderSummary {
    /// Summarizes `header` of `file`.
    pub fn new(file: &CouchFile, header: &LocatedHeader) -> btree::Result<Self> {
        Self::of(&Snapshot::new(file.clone(), header.clone()))
    }

    /// Summarizes the header `snapshot` reads.
    pub fn of(snapshot: &Snapshot) -> btree::Result<Self> {
        let h = snapshot.header();
        let counts = snapshot.doc_counts()?;
        let size = |r: &Option<couchfile::NodePointer>| r.as_ref().map_or(0, |r| r.subtree_size);
        Ok(Self {
            offset: snapshot.offset(),
            disk_version: h.disk_version,
            update_seq: h.update_seq,
            purge_seq: h.purge_seq,
            timestamp: h.timestamp,
            doc_count: counts.live,
            deleted_count: counts.deleted,
            body_size: counts.size,
            by_id_size: size(&h.by_id_root),
            by_seq_size: size(&h.by_seq_root),
            local_size: size(&h.local_root),
            space_used: snapshot.space_used()?,
        })
    }

    /// Writes the `header` JSON line.
    pub fn write_jsonl(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "{{\"type\":\"header\",\"offset\":{},\"disk_version\":{},\"update_seq\":{},\"purge_seq\":{},\"timestamp\":{},\"doc_count\":{},\"deleted_count\":{},\"space_used\":{}}}",
            self.offset,
            self.disk_version,
            self.update_seq,
            self.purge_seq,
            self.timestamp,
            self.doc_count,
            self.deleted_count,
            self.space_used
        )
    }

    /// Writes the header as one line of text (the vectors' `headers.txt` form).
    pub fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "header pos={} version={} update_seq={} purge_seq={} timestamp={} doc_count={} deleted_count={} space_used={}",
            self.offset,
            self.disk_version,
            self.update_seq,
            self.purge_seq,
            self.timestamp,
            self.doc_count,
            self.deleted_count,
            self.space_used
        )
    }
}

fn write_open_error(out: &mut dyn Write, mode: OpenMode, e: &btree::Error) -> io::Result<()> {
    writeln!(
        out,
        "{{\"type\":\"open_error\",\"mode\":\"{}\",\"error\":{}}}",
        mode_name(mode),
        json_string(e.couchstore_name())?
    )
}

/// Opens `path` for a JSON Lines listing; when it cannot be opened, writes
/// the `open_error` line, notes the problem and returns `None`.
fn open_for_jsonl(
    path: &Path,
    options: &OpenOptions,
    out: &mut dyn Write,
    outcome: &mut Outcome,
) -> Result<Option<Snapshot>> {
    match open(path, options) {
        Ok(snapshot) => Ok(Some(snapshot)),
        Err(source) => {
            write_open_error(out, options.mode, &source).output()?;
            let e = Error::Open {
                path: path.to_path_buf(),
                mode: options.mode,
                source,
            };
            outcome.problems.push(e.to_string());
            Ok(None)
        }
    }
}

/// Calls `f` with every by-seq entry of `snapshot`, in seq order, deletions
/// included; stops at the first error of `f` or of the tree.
fn each_doc(snapshot: &Snapshot, f: &mut dyn FnMut(DocInfo) -> Result<()>) -> Result<()> {
    let mut failure = None;
    snapshot.changes_since(0, ChangesFilter::All, &mut |info| match f(info) {
        Ok(()) => Ok(ControlFlow::Continue(())),
        Err(e) => {
            failure = Some(e);
            Ok(ControlFlow::Break(()))
        }
    })?;
    failure.map_or(Ok(()), Err)
}

/// Receives a local document: (id, value).
type LocalFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// Calls `f` with every local document of `snapshot`, in id order.
fn each_local(snapshot: &Snapshot, f: &mut LocalFn<'_>) -> Result<()> {
    let mut failure = None;
    snapshot.local_docs(&mut |id, value| match f(id, value) {
        Ok(()) => Ok(ControlFlow::Continue(())),
        Err(e) => {
            failure = Some(e);
            Ok(ControlFlow::Break(()))
        }
    })?;
    failure.map_or(Ok(()), Err)
}

fn body_problem(snapshot: &Snapshot, info: &DocInfo, e: &btree::Error) -> String {
    format!(
        "{}: body of seq {} (id {}) at offset {}: {}: {}",
        snapshot.file().path().display(),
        info.db_seq,
        printable(&info.id),
        info.bp,
        e.couchstore_name(),
        describe_btree(e)
    )
}

/// `couchtool dump --jsonl`: the JSON Lines listing of `path` opened as
/// `options` say. An open failure is the single `open_error` line (and a
/// problem); an unreadable body is listed with its `body_error` (and a
/// problem). An error while walking a tree stops the listing before its
/// `end` line.
pub fn dump_jsonl(path: &Path, options: &OpenOptions, out: &mut dyn Write) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let Some(snapshot) = open_for_jsonl(path, options, out, &mut outcome)? else {
        return Ok(outcome);
    };
    HeaderSummary::of(&snapshot)?.write_jsonl(out).output()?;
    let mut docs = 0u64;
    each_doc(&snapshot, &mut |info| {
        docs += 1;
        write!(
            out,
            "{{\"type\":\"doc\",\"seq\":{},\"id\":\"{}\",\"rev_seq\":{},\"deleted\":{},\"content_meta\":{},\"rev_meta\":\"{}\",\"physical_size\":{},",
            info.db_seq,
            hex(&info.id),
            info.rev_seq,
            info.deleted,
            info.content_meta,
            hex(&info.rev_meta),
            info.physical_size
        ).output()?;
        match snapshot.read_body(&info) {
            Ok(Some(body)) => writeln!(
                out,
                "\"body_len\":{},\"body_sha256\":\"{}\"}}",
                body.len(),
                hex(&Sha256::digest(&body))
            )
            .output()?,
            Ok(None) => writeln!(out, "\"body_len\":null,\"body_sha256\":null}}").output()?,
            Err(e) => {
                writeln!(
                    out,
                    "\"body_len\":null,\"body_sha256\":null,\"body_error\":{}}}",
                    json_string(e.couchstore_name()).output()?
                )
                .output()?;
                outcome.problems.push(body_problem(&snapshot, &info, &e));
            }
        }
        Ok(())
    })?;
    let mut locals = 0u64;
    each_local(&snapshot, &mut |id, value| {
        locals += 1;
        writeln!(
            out,
            "{{\"type\":\"local\",\"id\":{},\"value\":{}}}",
            json_string(&String::from_utf8_lossy(id)).output()?,
            json_string(&String::from_utf8_lossy(value)).output()?
        )
        .output()?;
        Ok(())
    })?;
    writeln!(
        out,
        "{{\"type\":\"end\",\"docs\":{docs},\"locals\":{locals}}}"
    )
    .output()?;
    Ok(outcome)
}

/// Longest body prefix shown by [`dump_text`].
const BODY_PREVIEW: usize = 60;

/// `couchtool dump`: the listing for people. The header line, one line per
/// document in seq order (`seq= id= rev= deleted= content_meta= bp=
/// physical_size= rev_meta= body[len]=`, bodies decompressed and cut at 60
/// bytes with `...`, as the vectors' `dump.txt` files), one line per local
/// document, and a total. Fails with [`Error::Open`] when the file cannot be
/// opened.
pub fn dump_text(path: &Path, options: &OpenOptions, out: &mut dyn Write) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let snapshot = open_or_error(path, options)?;
    HeaderSummary::of(&snapshot)?.write_text(out).output()?;
    let mut docs = 0u64;
    each_doc(&snapshot, &mut |info| {
        docs += 1;
        write!(
            out,
            "seq={} id={} rev={} deleted={} content_meta=0x{:02x} bp={} physical_size={} rev_meta={}",
            info.db_seq,
            printable(&info.id),
            info.rev_seq,
            u8::from(info.deleted),
            info.content_meta,
            info.bp,
            info.physical_size,
            hex(&info.rev_meta)
        ).output()?;
        match snapshot.read_body(&info) {
            Ok(Some(body)) => {
                let shown = &body[..body.len().min(BODY_PREVIEW)];
                let more = if body.len() > BODY_PREVIEW { "..." } else { "" };
                writeln!(out, " body[{}]={}{more}", body.len(), printable(shown)).output()?;
            }
            Ok(None) => writeln!(out).output()?,
            Err(e) => {
                writeln!(
                    out,
                    " body_error={} ({})",
                    e.couchstore_name(),
                    describe_btree(&e)
                )
                .output()?;
                outcome.problems.push(body_problem(&snapshot, &info, &e));
            }
        }
        Ok(())
    })?;
    let mut locals = 0u64;
    each_local(&snapshot, &mut |id, value| {
        locals += 1;
        writeln!(out, "local id={} json={}", printable(id), printable(value)).output()?;
        Ok(())
    })?;
    writeln!(out, "total docs={docs} locals={locals}").output()?;
    Ok(outcome)
}

/// Calls `f` with every header from the one `snapshot` reads back to the
/// oldest, newest first (as [`CouchFile::headers_from`] lists them, one at a
/// time, so that the headers before a corrupt one are still shown); returns
/// how many there were.
fn each_header(
    snapshot: &Snapshot,
    mode: OpenMode,
    f: &mut dyn FnMut(&HeaderSummary) -> Result<()>,
) -> Result<u64> {
    let file = snapshot.file();
    let mut current = snapshot.located_header().clone();
    let mut n = 0;
    loop {
        f(&HeaderSummary::new(file, &current)?)?;
        n += 1;
        match file.previous_header(&current, mode)? {
            Some(prev) => current = prev,
            None => return Ok(n),
        }
    }
}

/// `couchtool headers --jsonl`: a `header` line for every header from the
/// one `mode` opens at back to the oldest, then `{"type":"end","headers":N}`;
/// the `open_error` line alone when the file cannot be opened. A corrupt
/// header on the way back (normal mode) stops the listing before its `end`
/// line with an error.
pub fn headers_jsonl(path: &Path, mode: OpenMode, out: &mut dyn Write) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let options = OpenOptions {
        mode,
        ..OpenOptions::default()
    };
    let Some(snapshot) = open_for_jsonl(path, &options, out, &mut outcome)? else {
        return Ok(outcome);
    };
    let n = each_header(&snapshot, mode, &mut |h| h.write_jsonl(out).output())?;
    writeln!(out, "{{\"type\":\"end\",\"headers\":{n}}}").output()?;
    Ok(outcome)
}

/// `couchtool headers`: every header, newest first, one line each (the
/// vectors' `headers.txt` form), then their number.
pub fn headers_text(path: &Path, mode: OpenMode, out: &mut dyn Write) -> Result<Outcome> {
    let options = OpenOptions {
        mode,
        ..OpenOptions::default()
    };
    let snapshot = open_or_error(path, &options)?;
    let n = each_header(&snapshot, mode, &mut |h| h.write_text(out).output())?;
    writeln!(out, "{n} headers").output()?;
    Ok(Outcome::default())
}

fn crc_name(crc: CrcKind) -> &'static str {
    match crc {
        CrcKind::Crc32 => "CRC-32",
        CrcKind::Crc32c => "CRC-32C",
    }
}

/// `couchtool info`: the header opened (counts, tree sizes, space used), the
/// file's size and fragmentation (the share of the file that the header's
/// data does not use), and every header back to the oldest.
pub fn info(path: &Path, options: &OpenOptions, out: &mut dyn Write) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let snapshot = open_or_error(path, options)?;
    let file = snapshot.file();
    let s = HeaderSummary::of(&snapshot)?;
    let file_size = file.len()?;
    writeln!(out, "file: {}", path.display()).output()?;
    writeln!(out, "file size: {file_size} bytes").output()?;
    writeln!(
        out,
        "header at offset {}: disk version {} ({})",
        s.offset,
        s.disk_version,
        crc_name(CrcKind::for_version(s.disk_version))
    )
    .output()?;
    writeln!(out, "  update_seq: {}", s.update_seq).output()?;
    writeln!(out, "  purge_seq: {}", s.purge_seq).output()?;
    writeln!(out, "  timestamp: {}", s.timestamp).output()?;
    writeln!(
        out,
        "  documents: {} live, {} deleted",
        s.doc_count, s.deleted_count
    )
    .output()?;
    writeln!(out, "  bodies: {} bytes", s.body_size).output()?;
    writeln!(
        out,
        "  trees: by-id {} bytes, by-seq {} bytes, local {} bytes",
        s.by_id_size, s.by_seq_size, s.local_size
    )
    .output()?;
    writeln!(out, "  space used: {} bytes", s.space_used).output()?;
    let unused = file_size.saturating_sub(s.space_used);
    let percent = if file_size == 0 {
        0.0
    } else {
        unused as f64 * 100.0 / file_size as f64
    };
    writeln!(
        out,
        "fragmentation: {percent:.1}% ({unused} of {file_size} bytes not used by this header)"
    )
    .output()?;
    match file.headers_from(snapshot.located_header().clone(), options.mode) {
        Ok(headers) => {
            writeln!(out, "headers: {} (newest first)", headers.len()).output()?;
            for h in &headers {
                HeaderSummary::new(file, h)?.write_text(out).output()?;
            }
        }
        Err(e) => {
            writeln!(out, "headers: cannot walk back: {e}").output()?;
            outcome.problems.push(format!(
                "walking back the headers of {}: {e}",
                path.display()
            ));
        }
    }
    Ok(outcome)
}

/// `couchtool verify`: checks the header `options` open at with [`verify_with`]
/// and writes each problem (file and offset) then a one-line summary.
pub fn verify_command(path: &Path, options: &OpenOptions, out: &mut dyn Write) -> Result<Outcome> {
    let report = verify_with(path, options)?;
    report.write_to(out).output()?;
    Ok(Outcome {
        problems: if report.is_ok() {
            Vec::new()
        } else {
            vec![format!(
                "{}: {} problem(s) found",
                path.display(),
                report.problems.len()
            )]
        },
    })
}
