//! External sorting of (key, value) pairs, used to rebuild the by-id index of
//! a compacted file from pairs met in by-seq order.
//!
//! Pairs are kept in memory up to a byte budget; beyond it the buffered pairs
//! are sorted and spilled as a *run* to a temporary file in a [`Directory`]
//! (next to the compaction target), and [`ExternalSorter::finish`] k-way
//! merges the runs and the in-memory tail with a binary heap. Keys compare
//! bytewise.
//!
//! A run file `{prefix}.run{N}` is a sequence of records
//! `[u32 LE key_len][u32 LE value_len][key][value]` in key order. Runs are
//! temporary: they are never synced, a run is removed as soon as the merge
//! has read it to the end, and whatever runs remain are removed when the
//! [`SortedEntries`] (or an unfinished [`ExternalSorter`]) is dropped.
//! Removal errors are logged and otherwise ignored: a leftover run is
//! cleaned up with the other compaction leftovers, which is why prefixes
//! look like `3.couch.2.compact`.

use crate::error::{Error, Result};
use couchfile::{Backend, Directory};
use rayon::slice::ParallelSliceMut;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Bytes of a run record before its key: the key and value lengths.
const RECORD_HEADER: usize = 8;
/// What a buffered pair costs in memory besides its bytes: its place in
/// the buffer's index.
const PAIR_OVERHEAD: usize = std::mem::size_of::<BufferedPair>();
/// Records are gathered into writes of about this size.
const WRITE_BUFFER: usize = 1 << 20;
/// The largest read buffer of a run during the merge.
const MAX_READ_BUFFER: usize = 256 << 10;
/// The smallest read buffer of a run during the merge.
const MIN_READ_BUFFER: usize = 4 << 10;
/// How many existing names `{prefix}.run{N}` are skipped before giving up.
const MAX_NAME_ATTEMPTS: u32 = 1 << 16;

/// A key and its value.
type Pair = (Vec<u8>, Vec<u8>);

/// The 16 bytes of `key` from `from` on, big-endian, zero-padded: ordered
/// as the keys' bytes from `from` on are, except that different keys may
/// tie.
fn key_prefix(key: &[u8], from: usize) -> u128 {
    let mut bytes = [0u8; 16];
    let rest = key.get(from..).unwrap_or_default();
    let n = rest.len().min(16);
    bytes[..n].copy_from_slice(&rest[..n]);
    u128::from_be_bytes(bytes)
}

/// Where one pair lies in a [`PairBuffer`], with its sort prefix.
#[derive(Debug, Clone, Copy)]
struct BufferedPair {
    /// [`key_prefix`] of the key after the prefix all keys share (set by
    /// [`PairBuffer::sort`]).
    prefix: u128,
    /// Where the key starts in [`PairBuffer::bytes`]; the value follows it.
    start: usize,
    key_len: u32,
    value_len: u32,
}

/// Pairs held in memory: all their bytes in one buffer and an index of
/// where each lies. A pair costs no allocation of its own, and sorting
/// moves only the index's entries, which sit together in memory: an
/// in-memory sort of pairs of their own vectors spent a third of
/// `couchtool compact`'s time allocating, freeing and faulting in their
/// memory. With this buffer, compacting a file of 200,000 documents went
/// from 0.43 to 0.29 s (medians of five interleaved runs, same output;
/// 2026-12-03, commit 72188f3).
#[derive(Debug, Default)]
struct PairBuffer {
    /// Each pair's key, then its value.
    bytes: Vec<u8>,
    /// The pairs, in push order until [`PairBuffer::sort`].
    index: Vec<BufferedPair>,
}

impl PairBuffer {
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Adds a pair; the caller has checked both lengths fit a `u32`.
    fn push(&mut self, key: &[u8], value: &[u8], key_len: u32, value_len: u32) {
        self.index.push(BufferedPair {
            prefix: 0,
            start: self.bytes.len(),
            key_len,
            value_len,
        });
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
    }

    /// The bytes of `pair`: its key, then its value.
    fn key_and_value(&self, pair: &BufferedPair) -> &[u8] {
        &self.bytes[pair.start..pair.start + pair.key_len as usize + pair.value_len as usize]
    }

    /// The length of the longest prefix all keys share.
    fn common_prefix_len(&self) -> usize {
        let Some((first, rest)) = self.index.split_first() else {
            return 0;
        };
        let first = key_of(&self.bytes, first);
        rest.iter().fold(first.len(), |len, pair| {
            first[..len]
                .iter()
                .zip(key_of(&self.bytes, pair))
                .take_while(|(a, b)| a == b)
                .count()
        })
    }

    /// Sorts the pairs by key. The comparison looks at 16 bytes of each key
    /// kept in the index and reads the keys only to break a tie. Those 16
    /// bytes are taken after the prefix every key shares, since real ids
    /// tend to start alike (`user::`, `key:0000`): there, the first bytes
    /// tie on nearly every comparison. `couchtool compact` of a file of
    /// 396,429 ids `key:0000000000` to `key:0000999999`: `memcmp` went from
    /// 22% of the perf samples with a prefix of the first 8 bytes to 6%,
    /// and the sort and by-id build from 460 to 295 ms (medians of five
    /// interleaved runs; 2026-11-22, commit d527a3e).
    fn sort(&mut self, parallel: bool) {
        let from = self.common_prefix_len();
        let bytes = &self.bytes;
        for pair in &mut self.index {
            pair.prefix = key_prefix(key_of(bytes, pair), from);
        }
        let order = |a: &BufferedPair, b: &BufferedPair| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| key_of(bytes, a)[from..].cmp(&key_of(bytes, b)[from..]))
        };
        if parallel && self.index.len() >= PARALLEL_SORT_MIN_PAIRS {
            self.index.par_sort_unstable_by(order);
        } else {
            self.index.sort_unstable_by(order);
        }
    }

    /// Empties the buffer, keeping its memory for the next pairs.
    fn clear(&mut self) {
        self.bytes.clear();
        self.index.clear();
    }
}

/// The key of `pair` in `bytes`, the buffer it indexes.
fn key_of<'b>(bytes: &'b [u8], pair: &BufferedPair) -> &'b [u8] {
    &bytes[pair.start..pair.start + pair.key_len as usize]
}

/// Fewest buffered pairs a parallel sort ([`ExternalSorter::set_parallel`])
/// sorts on more than one thread: below, handing out the halves costs more
/// than it saves.
const PARALLEL_SORT_MIN_PAIRS: usize = 4096;

/// Pairs a [`SortedBuffer`] copies out together.
const STAGED_PAIRS: usize = 1024;

/// A sorted [`PairBuffer`] read from the start, a pair at a time.
///
/// In key order the pairs lie scattered over the buffer, each a likely
/// cache miss. They are copied out [`STAGED_PAIRS`] at a time by a short
/// loop, which lets the processor fetch many of them at once: read one by
/// one, each between a builder's encoding and compression of nodes, they
/// were fetched one after the other. The by-id build of `couchtool compact`
/// of 200,000 documents went from 63-78 to 36-52 ms (six interleaved runs;
/// 2026-12-03, commit 39a8adb).
#[derive(Debug)]
struct SortedBuffer {
    buffer: PairBuffer,
    /// Index of the first pair not staged yet.
    unstaged: usize,
    /// The staged pairs: their bytes, key then value, one after the other.
    staged: Vec<u8>,
    /// The staged pairs' key and value lengths.
    staged_lens: Vec<(u32, u32)>,
    /// The next staged pair to return, and where its bytes start.
    next: usize,
    next_start: usize,
}

impl SortedBuffer {
    fn new(mut buffer: PairBuffer, parallel: bool) -> Self {
        buffer.sort(parallel);
        Self {
            buffer,
            unstaged: 0,
            staged: Vec::new(),
            staged_lens: Vec::with_capacity(STAGED_PAIRS),
            next: 0,
            next_start: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.buffer.len() - self.unstaged + self.staged_lens.len() - self.next
    }

    /// Copies the next pairs in order into the stage.
    fn stage(&mut self) {
        self.staged.clear();
        self.staged_lens.clear();
        let end = self.buffer.len().min(self.unstaged + STAGED_PAIRS);
        for pair in &self.buffer.index[self.unstaged..end] {
            self.staged
                .extend_from_slice(self.buffer.key_and_value(pair));
            self.staged_lens.push((pair.key_len, pair.value_len));
        }
        self.unstaged = end;
        self.next = 0;
        self.next_start = 0;
    }

    /// The next pair, lent until the next call.
    fn next_pair(&mut self) -> Option<(&[u8], &[u8])> {
        if self.next == self.staged_lens.len() {
            self.stage();
        }
        let &(key_len, value_len) = self.staged_lens.get(self.next)?;
        let start = self.next_start;
        let end = start + key_len as usize + value_len as usize;
        self.next += 1;
        self.next_start = end;
        Some(self.staged[start..end].split_at(key_len as usize))
    }

    /// The next pair, copied out.
    fn next_owned(&mut self) -> Option<Pair> {
        self.next_pair().map(|(k, v)| (k.to_vec(), v.to_vec()))
    }
}

/// A length as stored in a run record.
fn record_len(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::InvalidArgument(format!("sort {what} of {n} bytes exceeds the 4 GiB limit"))
    })
}

/// The run files created so far, removed when this is dropped.
struct RunFiles<'d> {
    dir: &'d dyn Directory,
    names: Vec<String>,
}

impl RunFiles<'_> {
    /// Removes the run `name` now; if that fails it is retried at drop.
    fn release(&mut self, name: &str) {
        match self.dir.remove(name) {
            Ok(()) => self.names.retain(|n| n != name),
            Err(e) => tracing::debug!(run = name, error = %e, "sort run not removed yet"),
        }
    }

    /// Removes every remaining run, ignoring errors.
    fn release_all(&mut self) {
        for name in self.names.drain(..) {
            if let Err(e) = self.dir.remove(&name) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(
                        path = %self.dir.path().join(&name).display(),
                        error = %e,
                        "could not remove a sort run; it is left behind"
                    );
                }
            }
        }
    }
}

impl Drop for RunFiles<'_> {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// One spilled run: where it is and how many bytes were written to it.
struct Run {
    name: String,
    backend: Arc<dyn Backend>,
    len: u64,
}

/// Sorts (key, value) pairs by key, bytewise, within a memory budget,
/// spilling sorted runs to temporary files in a [`Directory`].
///
/// Push the pairs in any order with [`ExternalSorter::push`], then
/// [`ExternalSorter::finish`] gives them back sorted. Pairs with equal keys
/// are all returned, in an unspecified order. Dropping an unfinished sorter
/// removes the runs it spilled.
pub struct ExternalSorter<'d> {
    dir: &'d dyn Directory,
    prefix: String,
    memory_budget: usize,
    /// Sorts on the threads of rayon's global pool ([`Self::set_parallel`]).
    parallel: bool,
    pending: PairBuffer,
    pending_bytes: usize,
    runs: Vec<Run>,
    next_run: u64,
    bytes_spilled: u64,
    /// Last: the run files are removed after everything else is dropped.
    files: RunFiles<'d>,
}

impl fmt::Debug for ExternalSorter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalSorter")
            .field("dir", &self.dir.path())
            .field("prefix", &self.prefix)
            .field("memory_budget", &self.memory_budget)
            .field("pending", &self.pending.len())
            .field("pending_bytes", &self.pending_bytes)
            .field("runs_spilled", &self.runs.len())
            .field("bytes_spilled", &self.bytes_spilled)
            .finish()
    }
}

impl<'d> ExternalSorter<'d> {
    /// A sorter spilling to `dir`. Run files are named `{prefix}.run{N}` in
    /// `dir` (a name that already exists is skipped, never overwritten);
    /// `memory_budget` bytes of keys+values are kept in memory before a run
    /// is spilled. Each buffered pair counts its key and value lengths plus
    /// its entry in the index of the buffer (32 bytes on 64-bit targets), so
    /// a budget also bounds the memory of many tiny pairs. A budget of 0
    /// spills every pair as its own run.
    ///
    /// During the merge each run is read through a buffer of
    /// `memory_budget / runs` bytes, kept between 4 KiB and 256 KiB.
    pub fn new(dir: &'d dyn Directory, prefix: impl Into<String>, memory_budget: usize) -> Self {
        Self {
            dir,
            prefix: prefix.into(),
            memory_budget,
            parallel: false,
            pending: PairBuffer::default(),
            pending_bytes: 0,
            runs: Vec::new(),
            next_run: 0,
            bytes_spilled: 0,
            files: RunFiles {
                dir,
                names: Vec::new(),
            },
        }
    }

    /// Sorts the buffered pairs on the threads of rayon's global pool (one
    /// per core), or on the caller's thread alone (the default).
    pub fn set_parallel(&mut self, parallel: bool) {
        self.parallel = parallel;
    }

    /// Adds a pair. When the buffered pairs exceed the memory budget they
    /// are sorted and spilled as a new run.
    ///
    /// Errors: [`Error::InvalidArgument`] for a key or value of 4 GiB or
    /// more (the pair is not added); [`Error::Io`] if the run cannot be
    /// created or written (the pair was added, and the sorter should be
    /// dropped).
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let key_len = record_len(key.len(), "key")?;
        let value_len = record_len(value.len(), "value")?;
        self.pending_bytes = self
            .pending_bytes
            .saturating_add(key.len() + value.len() + PAIR_OVERHEAD);
        self.pending.push(key, value, key_len, value_len);
        if self.pending_bytes > self.memory_budget {
            self.spill()?;
        }
        Ok(())
    }

    /// Makes room in memory for `pairs` more pairs of about `pair_bytes`
    /// bytes each (as many as the memory budget holds at most), so the
    /// buffers do not grow, copying themselves, pair by pair.
    pub fn reserve(&mut self, pairs: usize, pair_bytes: usize) {
        let fit = self.memory_budget / (pair_bytes + PAIR_OVERHEAD).max(1);
        let pairs = pairs.min(fit.saturating_add(1));
        self.pending.index.reserve(pairs);
        self.pending.bytes.reserve(pairs.saturating_mul(pair_bytes));
    }

    /// How many runs have been spilled to files so far.
    pub fn runs_spilled(&self) -> usize {
        self.runs.len()
    }

    /// How many bytes have been written to run files so far (record headers
    /// included).
    pub fn bytes_spilled(&self) -> u64 {
        self.bytes_spilled
    }

    /// Ends the input: the pairs come back sorted by key. With no run
    /// spilled this is an in-memory sort; otherwise the runs and the pairs
    /// still in memory are merged, reading the first record of every run
    /// here (so a corrupt run may already fail here).
    pub fn finish(self) -> Result<SortedEntries<'d>> {
        let ExternalSorter {
            dir,
            memory_budget,
            parallel,
            pending,
            runs,
            mut files,
            ..
        } = self;
        let pending = SortedBuffer::new(pending, parallel);
        if runs.is_empty() {
            return Ok(SortedEntries {
                state: State::Memory(pending),
                files,
            });
        }
        let buffer = (memory_budget / runs.len()).clamp(MIN_READ_BUFFER, MAX_READ_BUFFER);
        let mut sources: Vec<Source> = runs
            .into_iter()
            .map(|run| Source::Run(RunReader::new(dir, run, buffer)))
            .collect();
        if pending.remaining() > 0 {
            sources.push(Source::Memory(pending));
        }
        let mut merger = Merger {
            heap: BinaryHeap::with_capacity(sources.len()),
            sources,
            error: None,
            current: None,
        };
        for source in 0..merger.sources.len() {
            merger.advance(source, &[], &mut files)?;
        }
        Ok(SortedEntries {
            state: State::Merge(merger),
            files,
        })
    }

    /// Sorts the buffered pairs and writes them as a new run.
    fn spill(&mut self) -> Result<()> {
        self.pending.sort(self.parallel);
        let (name, backend) = self.create_run()?;
        let io_err = |e| Error::io(self.dir.path().join(&name), "write sort run", e);
        let total = self.pending.bytes.len() + self.pending.len() * RECORD_HEADER;
        let mut buf = Vec::with_capacity(total.min(WRITE_BUFFER));
        let mut offset = 0u64;
        for pair in &self.pending.index {
            buf.extend_from_slice(&pair.key_len.to_le_bytes());
            buf.extend_from_slice(&pair.value_len.to_le_bytes());
            buf.extend_from_slice(self.pending.key_and_value(pair));
            if buf.len() >= WRITE_BUFFER {
                backend.write_at(offset, &buf).map_err(io_err)?;
                offset += buf.len() as u64;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            backend.write_at(offset, &buf).map_err(io_err)?;
            offset += buf.len() as u64;
        }
        tracing::debug!(run = %name, pairs = self.pending.len(), bytes = offset, "spilled a sort run");
        self.runs.push(Run {
            name,
            backend,
            len: offset,
        });
        self.bytes_spilled += offset;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Creates the next free `{prefix}.run{N}`, registered for removal.
    fn create_run(&mut self) -> Result<(String, Arc<dyn Backend>)> {
        let mut attempts = 0;
        loop {
            let name = format!("{}.run{}", self.prefix, self.next_run);
            self.next_run += 1;
            match self.dir.create(&name) {
                Ok(backend) => {
                    self.files.names.push(name.clone());
                    return Ok((name, backend));
                }
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists && attempts < MAX_NAME_ATTEMPTS =>
                {
                    tracing::debug!(run = %name, "sort run name taken; trying the next");
                    attempts += 1;
                }
                Err(e) => return Err(Error::io(self.dir.path().join(&name), "create sort run", e)),
            }
        }
    }
}

/// The pairs of an [`ExternalSorter`], sorted by key.
///
/// Each item is a pair or an error; after an error the iteration ends.
/// Reading a run can fail with [`Error::Io`], or with [`Error::CorruptRun`]
/// when the run does not read back as written (a length running past the
/// end of the run, a truncated run, or keys out of order). Dropping this
/// removes the remaining run files.
pub struct SortedEntries<'d> {
    state: State,
    /// Last: the run files are removed after the readers are dropped.
    files: RunFiles<'d>,
}

enum State {
    /// Nothing was spilled: the sorted pairs.
    Memory(SortedBuffer),
    /// Runs and maybe an in-memory tail, merged.
    Merge(Merger),
    /// Exhausted or failed.
    Done,
}

impl fmt::Debug for SortedEntries<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Memory(pairs) => format!("memory ({} left)", pairs.remaining()),
            State::Merge(merger) => format!("merging {} sources", merger.heap.len()),
            State::Done => "done".to_owned(),
        };
        f.debug_struct("SortedEntries")
            .field("state", &state)
            .field("runs", &self.files.names)
            .finish()
    }
}

impl Iterator for SortedEntries<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_pair()
            .map(|pair| pair.map(|(key, value)| (key.to_vec(), value.to_vec())))
    }
}

impl SortedEntries<'_> {
    /// The next pair, lent until the next call: what [`Iterator::next`]
    /// gives, without copying it out of the sorter's memory.
    pub fn next_pair(&mut self) -> Option<Result<(&[u8], &[u8])>> {
        if let State::Merge(merger) = &mut self.state {
            match merger.next(&mut self.files) {
                Ok(Some(pair)) => merger.current = Some(pair),
                Ok(None) => {
                    self.finish_merge();
                    return None;
                }
                Err(e) => {
                    self.finish_merge();
                    return Some(Err(e));
                }
            }
        }
        match &mut self.state {
            State::Memory(pairs) => pairs.next_pair().map(Ok),
            State::Merge(merger) => merger
                .current
                .as_ref()
                .map(|(key, value)| Ok((key.as_slice(), value.as_slice()))),
            State::Done => None,
        }
    }

    fn finish_merge(&mut self) {
        self.state = State::Done;
        self.files.release_all();
    }
}

/// The smallest pair of one merge source.
struct Head {
    key: Vec<u8>,
    value: Vec<u8>,
    source: usize,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Head {}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .cmp(&other.key)
            .then(self.source.cmp(&other.source))
    }
}

/// A k-way merge: a min-heap holding the next pair of every source that has
/// one.
struct Merger {
    heap: BinaryHeap<Reverse<Head>>,
    sources: Vec<Source>,
    /// An error met while reading ahead, reported after the pair before it.
    error: Option<Error>,
    /// The pair last taken from the heap, lent by [`SortedEntries::next_pair`].
    current: Option<Pair>,
}

impl Merger {
    fn next(&mut self, files: &mut RunFiles<'_>) -> Result<Option<Pair>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let Some(Reverse(head)) = self.heap.pop() else {
            return Ok(None);
        };
        if let Err(e) = self.advance(head.source, &head.key, files) {
            self.error = Some(e);
        }
        Ok(Some((head.key, head.value)))
    }

    /// Puts the next pair of `source` (whose last key was `prev`) in the
    /// heap; a run read to the end is removed.
    fn advance(&mut self, source: usize, prev: &[u8], files: &mut RunFiles<'_>) -> Result<()> {
        let next = match self.sources.get_mut(source) {
            Some(Source::Memory(pairs)) => pairs.next_owned(),
            Some(Source::Run(reader)) => {
                let next = reader.next_record(prev)?;
                if next.is_none() {
                    files.release(&reader.name);
                }
                next
            }
            None => None, // invariant: heads only name existing sources
        };
        if let Some((key, value)) = next {
            self.heap.push(Reverse(Head { key, value, source }));
        }
        Ok(())
    }
}

enum Source {
    Memory(SortedBuffer),
    Run(RunReader),
}

/// Reads a run's records through a buffer over [`Backend::read_at`],
/// trusting nothing read back beyond the run's written length.
struct RunReader {
    name: String,
    path: PathBuf,
    backend: Arc<dyn Backend>,
    /// Bytes written to the run: records never run past this.
    len: u64,
    /// Capacity of `buf`, allocated at the first read.
    capacity: usize,
    buf: Vec<u8>,
    /// The run offset of `buf[0]`.
    buf_offset: u64,
    /// Bytes of `buf` holding file data.
    filled: usize,
    /// Bytes of `buf` already returned.
    consumed: usize,
}

impl RunReader {
    fn new(dir: &dyn Directory, run: Run, capacity: usize) -> Self {
        Self {
            path: dir.path().join(&run.name),
            name: run.name,
            backend: run.backend,
            len: run.len,
            // A run smaller than the buffer is read in one go.
            capacity: capacity.min(usize::try_from(run.len).unwrap_or(usize::MAX)),
            buf: Vec::new(),
            buf_offset: 0,
            filled: 0,
            consumed: 0,
        }
    }

    fn position(&self) -> u64 {
        self.buf_offset + self.consumed as u64
    }

    fn corrupt(&self, offset: u64) -> Error {
        Error::CorruptRun {
            path: self.path.clone(),
            offset,
        }
    }

    fn io_error(&self, e: io::Error) -> Error {
        Error::io(self.path.clone(), "read sort run", e)
    }

    /// The next record, checked to lie within the run and to have a key not
    /// below `prev`; `None` at the end of the run.
    fn next_record(&mut self, prev: &[u8]) -> Result<Option<Pair>> {
        let at = self.position();
        let remaining = self.len.saturating_sub(at);
        if remaining == 0 {
            return Ok(None);
        }
        if remaining < RECORD_HEADER as u64 {
            return Err(self.corrupt(at));
        }
        let mut header = [0u8; RECORD_HEADER];
        self.read_exact(&mut header)?;
        let key_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let value_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if u64::from(key_len) + u64::from(value_len) > remaining - RECORD_HEADER as u64 {
            return Err(self.corrupt(at));
        }
        // Both fit in the run, which was written from memory.
        let key_len = usize::try_from(key_len).map_err(|_| self.corrupt(at))?;
        let value_len = usize::try_from(value_len).map_err(|_| self.corrupt(at))?;
        let mut key = vec![0u8; key_len];
        self.read_exact(&mut key)?;
        if key.as_slice() < prev {
            return Err(self.corrupt(at));
        }
        let mut value = vec![0u8; value_len];
        self.read_exact(&mut value)?;
        Ok(Some((key, value)))
    }

    /// Fills `out` from the run at the current position; the caller has
    /// checked that the run's written length covers it, so a short read
    /// means the file was truncated.
    fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.consumed == self.filled {
                let want = out.len() - done;
                if want >= self.capacity {
                    // Larger than the buffer: straight into `out`.
                    let at = self.position();
                    let n = self
                        .backend
                        .read_full_at(at, &mut out[done..])
                        .map_err(|e| self.io_error(e))?;
                    if n < want {
                        return Err(self.corrupt(at + n as u64));
                    }
                    self.buf_offset = at + n as u64;
                    self.filled = 0;
                    self.consumed = 0;
                    return Ok(());
                }
                self.fill()?;
            }
            let n = (out.len() - done).min(self.filled - self.consumed);
            out[done..done + n].copy_from_slice(&self.buf[self.consumed..self.consumed + n]);
            self.consumed += n;
            done += n;
        }
        Ok(())
    }

    /// Refills the (empty) buffer from the current position.
    fn fill(&mut self) -> Result<()> {
        let at = self.position();
        if self.buf.len() != self.capacity {
            self.buf = vec![0u8; self.capacity];
        }
        let want = usize::try_from(self.len.saturating_sub(at))
            .unwrap_or(usize::MAX)
            .min(self.capacity);
        let n = self
            .backend
            .read_full_at(at, &mut self.buf[..want])
            .map_err(|e| Error::io(self.path.clone(), "read sort run", e))?;
        if n == 0 {
            return Err(self.corrupt(at));
        }
        self.buf_offset = at;
        self.filled = n;
        self.consumed = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use couchfile::{FaultController, FaultKind, FaultRule, FaultyDirectory, OpKind, OsDirectory};
    use proptest::prelude::*;

    fn by_key(a: &Pair, b: &Pair) -> Ordering {
        a.0.cmp(&b.0)
    }

    /// A buffer of `pairs`, in their order.
    fn buffer_of(pairs: &[Pair]) -> PairBuffer {
        let mut buffer = PairBuffer::default();
        for (k, v) in pairs {
            buffer.push(k, v, k.len() as u32, v.len() as u32);
        }
        buffer
    }

    /// Deterministic pseudo-random numbers (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn faulty() -> FaultyDirectory {
        FaultyDirectory::new(FaultController::new())
    }

    fn names(dir: &dyn Directory) -> Vec<String> {
        let mut names = dir.list().unwrap();
        names.sort();
        names
    }

    /// `n` pairs with distinct keys in a shuffled order.
    fn shuffled_pairs(n: usize, seed: u64) -> Vec<Pair> {
        let mut rng = Rng(seed);
        let mut pairs: Vec<Pair> = (0..n)
            .map(|i| {
                let key = format!("doc-{:08}", rng.next() % 1_000_000_000).into_bytes();
                let value = vec![i as u8; (rng.next() % 40) as usize];
                (key, value)
            })
            .collect();
        pairs.sort_by(by_key);
        pairs.dedup_by(|a, b| a.0 == b.0);
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        pairs
    }

    fn sort_all<'d>(
        dir: &'d dyn Directory,
        prefix: &str,
        budget: usize,
        pairs: &[Pair],
    ) -> (ExternalSorter<'d>, Vec<Pair>) {
        let mut sorter = ExternalSorter::new(dir, prefix, budget);
        for (k, v) in pairs {
            sorter.push(k, v).unwrap();
        }
        let mut expected = pairs.to_vec();
        expected.sort_by(by_key);
        (sorter, expected)
    }

    /// Sorts `keys` (each with its index as value) in a [`PairBuffer`] and
    /// checks the order against `Vec::sort_by`.
    fn assert_sorts_as_a_vec_does(keys: Vec<Vec<u8>>) {
        let pairs: Vec<Pair> = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, vec![i as u8]))
            .collect();
        assert_sorted_buffer_orders_as_a_vec(pairs, false);
    }

    /// Sorts `pairs` in a [`SortedBuffer`] (on rayon's pool if `parallel`)
    /// and checks the order against `Vec::sort_by`.
    fn assert_sorted_buffer_orders_as_a_vec(pairs: Vec<Pair>, parallel: bool) {
        let mut sorted = SortedBuffer::new(buffer_of(&pairs), parallel);
        let mut expected = pairs;
        expected.sort_by(by_key);
        let out: Vec<Pair> = std::iter::from_fn(|| sorted.next_owned()).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_parallel_sort_orders_as_a_vec_does() {
        let pairs = shuffled_pairs(3 * PARALLEL_SORT_MIN_PAIRS, 11);
        assert_sorted_buffer_orders_as_a_vec(pairs, true);
    }

    #[test]
    fn keys_whose_zero_padded_prefixes_tie_sort_by_all_bytes() {
        let keys: Vec<&[u8]> = vec![
            b"prefix__b",
            b"prefix__",
            b"prefix__a",
            b"pre",
            b"",
            b"pre\0",
            b"prefix__\0",
            b"prefix_",
            b"\xff",
        ];
        assert_sorts_as_a_vec_does(keys.into_iter().map(<[u8]>::to_vec).collect());
    }

    #[test]
    fn keys_with_a_long_common_prefix_sort_by_all_bytes() {
        let common: &[u8] = b"tenant-0042::user::";
        let tails: Vec<&[u8]> = vec![
            b"b",
            b"",
            b"a",
            b"0123456789abcdef-2",
            b"0123456789abcdef-1",
            b"0123456789abcdef",
            b"0123456789abcdef\0",
            b"\xff",
        ];
        let keys: Vec<Vec<u8>> = tails.iter().map(|tail| [common, tail].concat()).collect();
        let pairs: Vec<Pair> = keys.iter().map(|k| (k.clone(), Vec::new())).collect();
        assert_eq!(buffer_of(&pairs).common_prefix_len(), common.len());
        assert_sorts_as_a_vec_does(keys);
    }

    #[test]
    fn a_sorted_buffer_stages_its_pairs_in_order_across_stages() {
        let pairs = shuffled_pairs(3 * STAGED_PAIRS + 5, 7);
        let mut sorted = SortedBuffer::new(buffer_of(&pairs), false);
        let mut expected = pairs;
        expected.sort_by(by_key);
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(sorted.remaining(), expected.len() - i);
            let (key, value) = sorted.next_pair().unwrap();
            assert_eq!(
                (key, value),
                (want.0.as_slice(), want.1.as_slice()),
                "pair {i}"
            );
        }
        assert_eq!(sorted.remaining(), 0);
        assert_eq!(sorted.next_pair(), None);
        assert_eq!(sorted.remaining(), 0);
    }

    #[test]
    fn sorts_in_memory_within_the_budget() {
        let dir = faulty();
        let pairs = shuffled_pairs(2000, 1);
        let (sorter, expected) = sort_all(&dir, "0.couch.1.compact", 1 << 20, &pairs);
        assert_eq!(sorter.runs_spilled(), 0);
        assert_eq!(sorter.bytes_spilled(), 0);
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out, expected);
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn spills_many_runs_and_merges_them() {
        let dir = faulty();
        let pairs = shuffled_pairs(5000, 2);
        let (sorter, expected) = sort_all(&dir, "3.couch.2.compact", 1000, &pairs);
        assert!(sorter.runs_spilled() > 100, "{sorter:?}");
        let written: u64 = pairs
            .iter()
            .map(|(k, v)| (RECORD_HEADER + k.len() + v.len()) as u64)
            .sum();
        assert!(sorter.bytes_spilled() > 0 && sorter.bytes_spilled() <= written);
        let on_disk = names(&dir);
        assert_eq!(on_disk.len(), sorter.runs_spilled());
        assert!(on_disk
            .iter()
            .all(|n| n.starts_with("3.couch.2.compact.run")));
        assert!(on_disk.contains(&"3.couch.2.compact.run0".to_owned()));
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out.len(), expected.len());
        assert_eq!(out, expected);
        // Runs read to the end are removed without waiting for the drop.
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn large_values_cross_the_read_and_write_buffers() {
        let dir = faulty();
        let mut pairs = shuffled_pairs(300, 3);
        pairs[7].1 = vec![0xab; WRITE_BUFFER + 12345];
        pairs[100].1 = vec![0xcd; MAX_READ_BUFFER * 2 + 1];
        pairs[200].0 = vec![b'k'; 70_000];
        let (sorter, expected) = sort_all(&dir, "p", 4096, &pairs);
        assert!(sorter.runs_spilled() > 3);
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn empty_input_and_empty_pairs() {
        let dir = faulty();
        let sorter = ExternalSorter::new(&dir, "p", 0);
        assert_eq!(sorter.finish().unwrap().count(), 0);
        assert!(names(&dir).is_empty());

        let mut sorter = ExternalSorter::new(&dir, "p", 0);
        for _ in 0..3 {
            sorter.push(&[], &[]).unwrap();
        }
        sorter.push(b"a", &[]).unwrap();
        assert_eq!(sorter.runs_spilled(), 4);
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out.len(), 4);
        assert!(out[..3].iter().all(|(k, v)| k.is_empty() && v.is_empty()));
        assert_eq!(out[3].0, b"a");
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn equal_keys_are_all_returned() {
        let dir = faulty();
        let mut sorter = ExternalSorter::new(&dir, "p", 100);
        for i in 0..50u8 {
            sorter.push(&[i % 3], &[i]).unwrap();
        }
        assert!(sorter.runs_spilled() > 1);
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert!(out.windows(2).all(|w| w[0].0 <= w[1].0));
        let mut values: Vec<u8> = out.into_iter().map(|(_, v)| v[0]).collect();
        values.sort_unstable();
        assert_eq!(values, (0..50).collect::<Vec<u8>>());
    }

    #[test]
    fn runs_are_removed_on_drop() {
        let dir = faulty();
        let pairs = shuffled_pairs(500, 4);

        // An unfinished sorter.
        let (sorter, _) = sort_all(&dir, "a", 500, &pairs);
        assert!(sorter.runs_spilled() > 1);
        assert_eq!(names(&dir).len(), sorter.runs_spilled());
        drop(sorter);
        assert!(names(&dir).is_empty());

        // A merge read part of the way.
        let (sorter, expected) = sort_all(&dir, "b", 500, &pairs);
        let mut entries = sorter.finish().unwrap();
        for want in &expected[..10] {
            assert_eq!(&entries.next().unwrap().unwrap(), want);
        }
        assert!(!names(&dir).is_empty());
        drop(entries);
        assert!(names(&dir).is_empty());

        // Someone else's file with a run's name is skipped and kept.
        dir.create("c.run0").unwrap().write_at(0, b"x").unwrap();
        let (sorter, expected) = sort_all(&dir, "c", 500, &pairs);
        assert!(names(&dir).contains(&"c.run1".to_owned()));
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out, expected);
        assert_eq!(names(&dir), ["c.run0"]);
    }

    #[test]
    fn failing_removal_and_creation_do_not_panic() {
        let dir = faulty();
        let pairs = shuffled_pairs(200, 5);
        let (sorter, _) = sort_all(&dir, "a", 500, &pairs);
        let runs = sorter.runs_spilled();
        dir.controller()
            .inject(FaultRule::always(OpKind::Remove, FaultKind::Eio));
        drop(sorter);
        assert_eq!(names(&dir).len(), runs); // left behind, no panic
        let (sorter, expected) = sort_all(&dir, "b", 500, &pairs);
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out, expected);
        dir.controller().clear_faults();

        let dir = faulty();
        dir.controller()
            .inject(FaultRule::once(OpKind::Create, FaultKind::NoSpace));
        let mut sorter = ExternalSorter::new(&dir, "c", 0);
        let err = sorter.push(b"k", b"v").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        dir.controller()
            .inject(FaultRule::once(OpKind::Write, FaultKind::NoSpace));
        assert!(sorter.push(b"l", b"v").is_err());
        drop(sorter);
        assert!(names(&dir).is_empty());
    }

    /// Spills one run of 100 records `k000NN` -> 10 bytes (24 bytes each)
    /// and keeps a second run so the merge has more than one source.
    fn two_runs(dir: &FaultyDirectory) -> ExternalSorter<'_> {
        let mut sorter = ExternalSorter::new(dir, "r", 100 * (16 + PAIR_OVERHEAD) - 1);
        for i in 0..100 {
            sorter
                .push(format!("k{i:05}").as_bytes(), &[b'v'; 10])
                .unwrap();
        }
        assert_eq!(sorter.runs_spilled(), 1);
        sorter.push(b"j", &[]).unwrap();
        sorter.push(b"l", &[]).unwrap();
        sorter
    }

    fn collect(sorter: ExternalSorter<'_>) -> Result<Vec<Pair>> {
        sorter.finish()?.collect()
    }

    fn corrupt_offset(result: Result<Vec<Pair>>) -> u64 {
        match result {
            Err(Error::CorruptRun { path, offset }) => {
                assert_eq!(path, std::path::Path::new("/faulty/r.run0"));
                offset
            }
            other => panic!("expected a corrupt run, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_runs_are_reported_not_panicked_on() {
        // Sanity: the setup reads back.
        let dir = faulty();
        assert_eq!(collect(two_runs(&dir)).unwrap().len(), 102);

        // A first header claiming 4 GiB.
        let dir = faulty();
        let sorter = two_runs(&dir);
        dir.open("r.run0").unwrap().write_at(0, &[0xff; 8]).unwrap();
        assert_eq!(corrupt_offset(collect(sorter)), 0);

        // A later header running past the end of the run by one byte.
        let dir = faulty();
        let sorter = two_runs(&dir);
        let at = 50 * 24;
        let mut header = 6u32.to_le_bytes().to_vec();
        header.extend_from_slice(&(10 + 49 * 24 + 1u32).to_le_bytes());
        dir.open("r.run0").unwrap().write_at(at, &header).unwrap();
        assert_eq!(corrupt_offset(collect(sorter)), at);

        // A key out of order.
        let dir = faulty();
        let sorter = two_runs(&dir);
        dir.open("r.run0")
            .unwrap()
            .write_at(30 * 24 + 8, b"k00000")
            .unwrap();
        assert_eq!(corrupt_offset(collect(sorter)), 30 * 24);

        // A truncated run.
        let dir = faulty();
        let sorter = two_runs(&dir);
        dir.open("r.run0").unwrap().truncate(70 * 24 + 5).unwrap();
        assert_eq!(corrupt_offset(collect(sorter)), 70 * 24 + 5);

        // Read errors are reported too, and iteration stops after one.
        let dir = faulty();
        let sorter = two_runs(&dir);
        dir.controller()
            .inject(FaultRule::always(OpKind::Read, FaultKind::Eio));
        assert!(matches!(collect(sorter), Err(Error::Io { .. })));
        dir.controller().clear_faults();
        assert!(names(&dir).is_empty());

        // Corruption in the middle: the items before it, one error, the end.
        let dir = faulty();
        let sorter = two_runs(&dir);
        dir.open("r.run0")
            .unwrap()
            .write_at(40 * 24, &[0xff; 4])
            .unwrap();
        let items: Vec<_> = sorter.finish().unwrap().collect();
        assert_eq!(items.len(), 40 + 1 + 1); // "j", 40 records, the error
        assert!(items[..41].iter().all(Result::is_ok));
        assert!(matches!(items[41], Err(Error::CorruptRun { offset, .. }) if offset == 40 * 24));
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn sorts_on_a_real_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = OsDirectory::new(tmp.path()).unwrap();
        let pairs = shuffled_pairs(20_000, 6);
        let (sorter, expected) = sort_all(&dir, "3.couch.2.compact", 64 << 10, &pairs);
        assert!(sorter.runs_spilled() > 10);
        let on_disk = names(&dir);
        assert_eq!(on_disk.len(), sorter.runs_spilled());
        assert!(tmp.path().join("3.couch.2.compact.run0").is_file());
        let mut entries = sorter.finish().unwrap();
        let mut out = Vec::new();
        for _ in 0..expected.len() / 2 {
            out.push(entries.next().unwrap().unwrap());
        }
        assert_eq!(out[..], expected[..expected.len() / 2]);
        drop(entries);
        assert!(names(&dir).is_empty());

        let (sorter, expected) = sort_all(&dir, "3.couch.2.compact", 64 << 10, &pairs);
        let out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(out, expected);
        assert!(names(&dir).is_empty());
    }

    proptest! {
        #[test]
        fn matches_sorting_a_vec(
            pairs in prop::collection::vec(
                (
                    prop::collection::vec(0u8..4, 0..6),
                    prop::collection::vec(any::<u8>(), 0..30),
                ),
                0..300,
            ),
            budget in 0usize..2000,
        ) {
            let dir = faulty();
            let mut sorter = ExternalSorter::new(&dir, "p", budget);
            for (k, v) in &pairs {
                sorter.push(k, v).unwrap();
            }
            let mut out: Vec<Pair> = sorter.finish().unwrap().map(Result::unwrap).collect();
            prop_assert!(out.windows(2).all(|w| w[0].0 <= w[1].0));
            let mut expected = pairs;
            expected.sort();
            out.sort();
            prop_assert_eq!(out, expected);
            prop_assert!(names(&dir).is_empty());
        }
    }
}
