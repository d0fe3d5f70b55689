//! Chunks and headers on a backend: [`CouchFile`] reads, [`FileWriter`]
//! appends and commits.

use crate::backend::{Backend, InPlace};
use crate::block::{
    add_prefixes, align_up, logical_head, physical_len, strip_prefixes, BlockType, BLOCK_SIZE,
};
use crate::cache::{CacheId, ChunkCache, DecodedChunk};
use crate::codec::{DbHeader, CURRENT_DISK_VERSION, OLDEST_DISK_VERSION};
use crate::crc::CrcKind;
use crate::error::{Error, IoOp, Result};
use crate::writeback::{Writeback, WritebackClient};
use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest data chunk payload accepted (a 28-bit body plus slack; couchstore
/// never writes more). Checked before anything is allocated.
pub const MAX_CHUNK_LEN: u64 = 1 << 28;
/// Largest header body (`MAX_DB_HEADER_SIZE`), CRC included.
pub const MAX_HEADER_LEN: u64 = 1024;
/// Largest decompressed size accepted for a snappy chunk.
pub const MAX_DECOMPRESSED_LEN: u64 = 1 << 28;
/// Bytes read ahead when reading a chunk, so most chunks take one read.
const READ_AHEAD: u64 = 4096;
/// The writer flushes its buffer to the backend beyond this many bytes.
const WRITE_BUFFER: usize = 1 << 20;

const DATA_CHUNK_BIT: u32 = 0x8000_0000;

/// How to treat a corrupt header while looking for the last valid one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// Stop at the first corrupt header with its error, as couchstore does.
    #[default]
    Normal,
    /// Skip corrupt headers and fall back to an older one
    /// (`COUCHSTORE_OPEN_RECOVERY_MODE`).
    Recovery,
}

/// A header and the offset it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedHeader {
    /// Offset of the header's block.
    pub offset: u64,
    /// The header.
    pub header: DbHeader,
}

/// Where an appended chunk went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPos {
    /// Stored offset of the chunk (what pointers and `bp` hold).
    pub offset: u64,
    /// 8 + payload length: what the format counts in sizes.
    pub disk_size: u64,
}

#[derive(Debug)]
struct Shared {
    backend: Arc<dyn Backend>,
    path: PathBuf,
    /// The file length as last seen; grows as the writer flushes.
    known_len: AtomicU64,
    /// Where decompressed chunks read or written through the cache go.
    cache: Option<Arc<ChunkCache>>,
    /// This file's contents in `cache`, shared by every handle on the file.
    cache_id: Arc<CacheId>,
    /// Whether what this handle reads or writes goes into `cache`
    /// ([`CouchFile::with_cache_fill`]).
    fill_cache: bool,
    /// Where its writers ask for background syncs, if anywhere.
    writeback: Option<Writeback>,
}

/// Read access to a couchstore file: chunks, compressed chunks and headers.
///
/// Cheap to clone; clones share the backend, so any number of readers can
/// work while one [`FileWriter`] appends. Data chunks are checked with the
/// checksum set by [`CouchFile::set_crc`] (from the header's disk version).
#[derive(Debug, Clone)]
pub struct CouchFile {
    shared: Arc<Shared>,
    crc: CrcKind,
}

impl CouchFile {
    /// Wraps a backend. `path` names the file in errors.
    pub fn new(backend: Arc<dyn Backend>, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let len = backend
            .len()
            .map_err(|e| Error::io(&path, IoOp::Len, 0, e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                backend,
                path,
                known_len: AtomicU64::new(len),
                cache: None,
                cache_id: Arc::new(CacheId::new()),
                fill_cache: true,
                writeback: None,
            }),
            crc: CrcKind::Crc32c,
        })
    }

    /// This file reading and writing its cached chunks through `cache`
    /// (which any number of files can share). Only for a new handle: clones
    /// made before keep reading without it.
    pub fn with_cache(self, cache: Arc<ChunkCache>) -> Self {
        self.share(
            self.shared.path.clone(),
            Some(cache),
            self.shared.fill_cache,
            self.shared.writeback.clone(),
        )
    }

    /// A handle on the same file that puts what it reads and writes in the
    /// file's cache (`fill`, as every handle does by default) or does not
    /// (it still reads what the cache holds, and still drops the chunks its
    /// writer replaces): for a pass over many chunks that nobody reads
    /// again soon, such as a compaction's copy, which would otherwise push
    /// out what the file's other readers and its writer keep using.
    pub fn with_cache_fill(&self, fill: bool) -> Self {
        self.share(
            self.shared.path.clone(),
            self.shared.cache.clone(),
            fill,
            self.shared.writeback.clone(),
        )
    }

    /// This file with its writers syncing in the background through
    /// `writeback` ([`crate::Writeback`]). Only for a new handle, as
    /// [`CouchFile::with_cache`].
    pub fn with_writeback(self, writeback: Writeback) -> Self {
        self.share(
            self.shared.path.clone(),
            self.shared.cache.clone(),
            self.shared.fill_cache,
            Some(writeback),
        )
    }

    /// A handle on the same file under another name, after a rename: the
    /// same backend, cached chunks and writeback, with `path` in errors.
    pub fn renamed(&self, path: impl Into<PathBuf>) -> Self {
        self.share(
            path.into(),
            self.shared.cache.clone(),
            self.shared.fill_cache,
            self.shared.writeback.clone(),
        )
    }

    fn share(
        &self,
        path: PathBuf,
        cache: Option<Arc<ChunkCache>>,
        fill_cache: bool,
        writeback: Option<Writeback>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                backend: Arc::clone(&self.shared.backend),
                path,
                known_len: AtomicU64::new(self.shared.known_len.load(Ordering::Acquire)),
                cache,
                cache_id: Arc::clone(&self.shared.cache_id),
                fill_cache,
                writeback,
            }),
            crc: self.crc,
        }
    }

    /// The chunk cache, if the file has one.
    pub fn cache(&self) -> Option<&Arc<ChunkCache>> {
        self.shared.cache.as_ref()
    }

    /// True when the file has a cache and this handle puts what it reads
    /// in it ([`CouchFile::with_cache_fill`]).
    pub fn fills_cache(&self) -> bool {
        self.shared.cache.is_some() && self.shared.fill_cache
    }

    /// Opens a real file read-only.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let backend = crate::FileBackend::open_read_only(path)
            .map_err(|e| Error::io(path, IoOp::Open, 0, e))?;
        Self::new(Arc::new(backend), path)
    }

    /// The path used in errors.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.shared.backend
    }

    /// The checksum data chunks are verified with.
    pub fn crc(&self) -> CrcKind {
        self.crc
    }

    /// Sets the checksum data chunks are verified and written with.
    pub fn set_crc(&mut self, crc: CrcKind) {
        self.crc = crc;
    }

    /// The file's length, asked of the backend (and remembered).
    pub fn len(&self) -> Result<u64> {
        let len = self
            .shared
            .backend
            .len()
            .map_err(|e| Error::io(self.path(), IoOp::Len, 0, e))?;
        self.shared.known_len.fetch_max(len, Ordering::AcqRel);
        Ok(len)
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    fn note_len(&self, len: u64) {
        self.shared.known_len.fetch_max(len, Ordering::AcqRel);
    }

    /// Ensures `[offset, offset + wanted)` lies inside the file.
    fn check_extent(&self, offset: u64, wanted: u64) -> Result<()> {
        let end = offset.saturating_add(wanted);
        if end <= self.shared.known_len.load(Ordering::Acquire) {
            return Ok(());
        }
        let file_len = self.len()?;
        if end <= file_len {
            return Ok(());
        }
        Err(Error::ShortRead {
            path: self.path().to_path_buf(),
            offset,
            wanted,
            file_len,
        })
    }

    /// Reads `physical.len()` physical bytes at `offset` (fewer at the end of
    /// the file); returns how many were read.
    fn read_physical(&self, offset: u64, physical: &mut [u8]) -> Result<usize> {
        self.shared
            .backend
            .read_full_at(offset, physical)
            .map_err(|e| Error::io(self.path(), IoOp::Read, offset, e))
    }

    /// Reads one byte: the block type at a block boundary.
    pub fn read_block_type(&self, block_offset: u64) -> Result<Option<u8>> {
        let mut b = [0u8; 1];
        Ok(match self.read_physical(block_offset, &mut b)? {
            0 => None,
            _ => Some(b[0]),
        })
    }

    /// The checksum field and payload length a chunk's 8-byte prefix at
    /// `pos` gives, checked: the length's high bit set for a data chunk and
    /// clear for a header, and the length within its limit.
    fn parse_prefix(&self, pos: u64, is_header: bool, prefix: [u8; 8]) -> Result<(u32, u64)> {
        let what = if is_header { "header" } else { "chunk" };
        let raw_len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let stored_crc = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        let payload_len = if is_header {
            if raw_len & DATA_CHUNK_BIT != 0 {
                return Err(Error::corrupt(
                    self.path(),
                    pos,
                    what,
                    "data chunk where a header should be",
                ));
            }
            if !(4..=MAX_HEADER_LEN as u32).contains(&raw_len) {
                return Err(Error::corrupt(
                    self.path(),
                    pos,
                    what,
                    format!("header length {raw_len} outside 4..=1024"),
                ));
            }
            u64::from(raw_len - 4)
        } else {
            if raw_len & DATA_CHUNK_BIT == 0 {
                return Err(Error::corrupt(
                    self.path(),
                    pos,
                    what,
                    "data chunk without its high bit",
                ));
            }
            let len = u64::from(raw_len & !DATA_CHUNK_BIT);
            if len > MAX_CHUNK_LEN {
                return Err(Error::corrupt(
                    self.path(),
                    pos,
                    what,
                    format!("length {len} over the limit of {MAX_CHUNK_LEN}"),
                ));
            }
            len
        };
        Ok((stored_crc, payload_len))
    }

    /// Reads the logical bytes of a chunk whose 8-byte prefix starts at `pos`:
    /// returns (checksum field, payload). `is_header` selects which way the
    /// length's high bit must be and which length limit applies.
    fn read_chunk_raw(&self, pos: u64, is_header: bool) -> Result<(u32, Vec<u8>)> {
        self.read_chunk_raw_via(pos, is_header, &mut |offset, physical| {
            self.read_physical(offset, physical)
        })
    }

    /// [`CouchFile::read_chunk_raw`] with the physical reads done by `read`
    /// (which behaves like [`CouchFile::read_physical`]).
    fn read_chunk_raw_via(
        &self,
        pos: u64,
        is_header: bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<usize>,
    ) -> Result<(u32, Vec<u8>)> {
        // One read covering the prefix and, usually, the whole chunk, into
        // the stack; only the payload is copied out of it.
        let ahead = (READ_AHEAD - pos % BLOCK_SIZE).max(physical_len(pos, 8));
        let mut first = [0u8; READ_AHEAD as usize];
        // At most READ_AHEAD: the prefix's 8 bytes and one block byte are
        // fewer than the 4096 read at a block start.
        let ahead = &mut first[..ahead as usize];
        let got = read(pos, ahead)?;
        let physical = &ahead[..got];
        let Some(prefix) = logical_head::<8>(pos, physical) else {
            let file_len = self.len()?;
            return Err(Error::ShortRead {
                path: self.path().to_path_buf(),
                offset: pos,
                wanted: physical_len(pos, 8),
                file_len,
            });
        };
        let (stored_crc, payload_len) = self.parse_prefix(pos, is_header, prefix)?;
        let total_physical = physical_len(pos, 8 + payload_len);
        self.check_extent(pos, total_physical)?;
        // The payload starts after the prefix's physical bytes, which the
        // first read holds since it held the prefix; `payload_len` is at
        // most MAX_CHUNK_LEN, so it fits in memory.
        let prefix_physical = physical_len(pos, 8);
        let have = (physical.len() as u64).min(total_physical);
        let mut payload = Vec::with_capacity(payload_len as usize);
        strip_prefixes(
            pos + prefix_physical,
            &physical[prefix_physical as usize..have as usize],
            &mut payload,
        );
        if have < total_physical {
            // The read-ahead did not cover it: read the rest.
            let rest_physical = total_physical - have;
            let mut more = vec![0u8; rest_physical as usize];
            let got = read(pos + have, &mut more)?;
            if (got as u64) < rest_physical {
                let file_len = self.len()?;
                return Err(Error::ShortRead {
                    path: self.path().to_path_buf(),
                    offset: pos,
                    wanted: total_physical,
                    file_len,
                });
            }
            strip_prefixes(pos + have, &more, &mut payload);
        }
        Ok((stored_crc, payload))
    }

    /// The data chunk at `pos` read from the file's map
    /// ([`Backend::read_in_place`]): its checksum field and payload,
    /// unchecked; `None` when the backend does not map the file, for the
    /// caller to read it instead. A payload that is one run of bytes is
    /// read in place; one with a block boundary inside is copied out of
    /// the map without the boundary's marker bytes.
    fn chunk_in_place(&self, pos: u64) -> Result<Option<(u32, Payload<'_>)>> {
        let backend = &self.shared.backend;
        let prefix_physical = physical_len(pos, 8);
        let in_place = |offset: u64, len: u64| {
            backend
                .read_in_place(offset, len as usize)
                .map_err(|e| Error::io(self.path(), IoOp::Read, offset, e))
        };
        let Some(prefix_physical_bytes) = in_place(pos, prefix_physical)? else {
            return Ok(None);
        };
        // Read by the fallback, which reports a short read.
        let Some(prefix) = logical_head::<8>(pos, &prefix_physical_bytes) else {
            return Ok(None);
        };
        let (stored, payload_len) = self.parse_prefix(pos, false, prefix)?;
        let start = pos + prefix_physical;
        let payload_physical = physical_len(start, payload_len);
        self.check_extent(pos, prefix_physical + payload_physical)?;
        // Usually under the prefix's lock; else asked for again, which may
        // grow the map.
        let physical = match prefix_physical_bytes.moved_to(start, payload_physical as usize) {
            Some(physical) => physical,
            None => match in_place(start, payload_physical)? {
                Some(physical) => physical,
                None => return Ok(None),
            },
        };
        if payload_physical == payload_len {
            return Ok(Some((stored, Payload::InPlace(physical))));
        }
        // `payload_len` is at most MAX_CHUNK_LEN, so it fits in memory.
        let mut payload = Vec::with_capacity(payload_len as usize);
        strip_prefixes(start, &physical, &mut payload);
        Ok(Some((stored, Payload::Copied(payload))))
    }

    /// Asks the processor to start loading the chunk at `offset` (its first
    /// cache line) from the file's map, for a read of it after other work:
    /// a document's body once its info is decoded. Only a hint
    /// ([`Backend::prefetch`]); nothing is read or checked.
    pub fn prefetch_chunk(&self, offset: u64) {
        self.shared.backend.prefetch(offset);
    }

    /// Reads the payload of the data chunk stored at `offset`, checking its
    /// checksum.
    pub fn read_chunk(&self, offset: u64) -> Result<Vec<u8>> {
        if let Some((stored, payload)) = self.chunk_in_place(offset)? {
            self.check(offset, stored, &payload)?;
            return Ok(payload.into_vec());
        }
        let (stored, payload) = self.read_chunk_raw(offset, false)?;
        self.checked(offset, stored, payload)
    }

    /// The payload if its checksum is `stored`.
    fn checked(&self, offset: u64, stored: u32, payload: Vec<u8>) -> Result<Vec<u8>> {
        self.check(offset, stored, &payload)?;
        Ok(payload)
    }

    /// Checks `payload` against its checksum `stored`.
    fn check(&self, offset: u64, stored: u32, payload: &[u8]) -> Result<()> {
        let computed = self.crc.checksum(payload);
        if computed != stored {
            return Err(Error::Checksum {
                path: self.path().to_path_buf(),
                offset,
                stored,
                computed,
            });
        }
        Ok(())
    }

    /// Reads a snappy-compressed data chunk and decompresses it (from the
    /// file's map, without copying the compressed bytes, where it can).
    pub fn read_compressed_chunk(&self, offset: u64) -> Result<Vec<u8>> {
        let decompressed = match self.chunk_in_place(offset)? {
            Some((stored, payload)) => {
                self.check(offset, stored, &payload)?;
                decompress(&payload)
            }
            None => decompress(&self.read_chunk(offset)?),
        };
        decompressed.map_err(|e| e.located(self.path(), offset))
    }

    /// The compressed data chunk at `offset` as `decode` makes it from the
    /// chunk's decompressed bytes, through the file's [`ChunkCache`]: from
    /// the cache when it holds the chunk decoded as a `T`, else read,
    /// checked, decompressed, decoded and cached with the weight `decode`
    /// gives it (about the bytes it holds; not cached by a handle that does
    /// not fill the cache). Without a cache, decoded each time. A lookup in
    /// the cache allocates nothing.
    pub fn read_decoded<T, E>(
        &self,
        offset: u64,
        decode: impl FnOnce(Vec<u8>) -> std::result::Result<(T, u64), E>,
    ) -> std::result::Result<Arc<T>, E>
    where
        T: Any + Send + Sync,
        E: From<Error>,
    {
        let Some(cache) = &self.shared.cache else {
            return Ok(Arc::new(decode(self.read_compressed_chunk(offset)?)?.0));
        };
        let id = self.shared.cache_id.get();
        if let Some(chunk) = cache.get::<T>(id, offset) {
            return Ok(chunk);
        }
        let (value, weight) = decode(self.read_compressed_chunk(offset)?)?;
        let value = Arc::new(value);
        if self.shared.fill_cache {
            cache.insert(id, offset, Arc::clone(&value) as DecodedChunk, weight);
        }
        Ok(value)
    }

    /// Puts the decoded chunk `make` gives (a value and its weight) in the
    /// file's [`ChunkCache`] as the chunk at `offset`, if the file has a
    /// cache and this handle fills it (`make` is not called otherwise; see
    /// [`CouchFile::with_cache_fill`]): for a writer, what it has just
    /// appended, so that a reader finds it without reading it back.
    pub fn cache_decoded<T: Any + Send + Sync>(
        &self,
        offset: u64,
        make: impl FnOnce() -> (T, u64),
    ) {
        if !self.shared.fill_cache {
            return;
        }
        if let Some(cache) = &self.shared.cache {
            let (value, weight) = make();
            cache.insert(
                self.shared.cache_id.get(),
                offset,
                Arc::new(value) as DecodedChunk,
                weight,
            );
        }
    }

    /// Drops the chunk at `offset` from the file's [`ChunkCache`], if it
    /// has one: for a node the writer has just replaced, which the head of
    /// the file no longer reaches (a reader of an older header that still
    /// wants it reads it again). Without this, the superseded versions of
    /// the nodes every commit rewrites fill the cache and push out the live
    /// ones.
    pub fn forget_cached_chunk(&self, offset: u64) {
        if let Some(cache) = &self.shared.cache {
            cache.remove(self.shared.cache_id.get(), offset);
        }
    }

    /// Reads and decodes the header whose block starts at `offset`, checking
    /// the block byte, the checksum (either CRC: the version that decides it
    /// is inside), the version, and the positions it holds. Returns
    /// `Ok(None)` when the block is not a header block.
    pub fn read_header_at(&self, offset: u64) -> Result<Option<DbHeader>> {
        if !offset.is_multiple_of(BLOCK_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "header offset {offset} is not block-aligned"
            )));
        }
        match self.read_block_type(offset)? {
            Some(t) if t == BlockType::Header as u8 => {}
            Some(t) if t == BlockType::Meta as u8 && offset == 0 => {
                return Err(Error::Encrypted {
                    path: self.path().to_path_buf(),
                    offset,
                })
            }
            _ => return Ok(None),
        }
        self.parse_header_block(offset).map(Some)
    }

    /// Reads and checks the header chunk of the block at `offset`, whose
    /// block byte the caller has already found to be a header's.
    fn parse_header_block(&self, offset: u64) -> Result<DbHeader> {
        let (stored, body) = self.read_chunk_raw(offset, true)?;
        let crc32c = CrcKind::Crc32c.checksum(&body);
        if crc32c != stored && CrcKind::Crc32.checksum(&body) != stored {
            return Err(Error::Checksum {
                path: self.path().to_path_buf(),
                offset,
                stored,
                computed: crc32c,
            });
        }
        let version = body.first().copied().unwrap_or(0);
        if !(OLDEST_DISK_VERSION..=CURRENT_DISK_VERSION).contains(&version) {
            return Err(Error::HeaderVersion {
                path: self.path().to_path_buf(),
                offset,
                version,
            });
        }
        let header = DbHeader::decode(&body).map_err(|e| e.located(self.path(), offset))?;
        if header.has_metadata_header {
            return Err(Error::Encrypted {
                path: self.path().to_path_buf(),
                offset,
            });
        }
        if header.purge_ptr > offset {
            return Err(Error::corrupt(
                self.path(),
                offset,
                "header",
                "purge_ptr beyond the header",
            ));
        }
        for root in [&header.by_seq_root, &header.by_id_root, &header.local_root]
            .into_iter()
            .flatten()
        {
            if root.pointer >= offset {
                return Err(Error::corrupt(
                    self.path(),
                    offset,
                    "header",
                    format!("root at {} is not before the header", root.pointer),
                ));
            }
        }
        Ok(header)
    }

    /// Looks for a header in the block at `block` and the blocks before it,
    /// stepping back one block at a time, as couchstore's `find_header`.
    fn scan_back(&self, block: u64, mode: OpenMode) -> Result<Option<LocatedHeader>> {
        let mut pos = block - block % BLOCK_SIZE;
        let mut last_error = None;
        loop {
            match self.read_block_type(pos)? {
                Some(t) if t == BlockType::Header as u8 => match self.parse_header_block(pos) {
                    Ok(header) => {
                        return Ok(Some(LocatedHeader {
                            offset: pos,
                            header,
                        }))
                    }
                    // MB-38788: a header that fails to parse at offset 0
                    // counts as no header.
                    Err(_) if pos == 0 => {}
                    Err(e) if mode == OpenMode::Recovery && e.is_corruption() => {
                        tracing::warn!(offset = pos, error = %e, "skipping corrupt header");
                        last_error = Some(e);
                    }
                    Err(e) => return Err(e),
                },
                Some(t) if t == BlockType::Data as u8 || t == BlockType::Meta as u8 => {}
                Some(t) => {
                    let e = Error::corrupt(
                        self.path(),
                        pos,
                        "block",
                        format!("block type byte {t:#04x}"),
                    );
                    if mode == OpenMode::Normal {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
                None => {}
            }
            if pos == 0 {
                return match last_error {
                    Some(e) => Err(e),
                    None => Ok(None),
                };
            }
            pos -= BLOCK_SIZE;
        }
    }

    /// Finds the last valid header, as couchstore does on open: from the block
    /// holding byte `len - 2` backwards. `Ok(None)` for an empty file;
    /// [`Error::NoHeader`] for a non-empty file without one.
    pub fn find_last_header(&self, mode: OpenMode) -> Result<Option<LocatedHeader>> {
        let _span =
            tracing::debug_span!("find_last_header", path = %self.path().display()).entered();
        let len = self.len()?;
        if len == 0 {
            return Ok(None);
        }
        match self.scan_back(len.saturating_sub(2), mode)? {
            Some(h) => Ok(Some(h)),
            None => Err(Error::NoHeader {
                path: self.path().to_path_buf(),
            }),
        }
    }

    /// The header before `current`: through `prev_header_pos` where the
    /// version has it and it points at a header, else by scanning back.
    /// `Ok(None)` when `current` is the oldest.
    pub fn previous_header(
        &self,
        current: &LocatedHeader,
        mode: OpenMode,
    ) -> Result<Option<LocatedHeader>> {
        if current.offset == 0 {
            return Ok(None);
        }
        if let Some(prev) = current.header.prev_header_pos {
            if prev < current.offset && prev % BLOCK_SIZE == 0 {
                match self.read_header_at(prev) {
                    Ok(Some(header)) => {
                        return Ok(Some(LocatedHeader {
                            offset: prev,
                            header,
                        }))
                    }
                    // Only a hint: a compacted file's first header says 0.
                    Ok(None) => {}
                    Err(_) if prev == 0 => {}
                    Err(e) if mode == OpenMode::Normal => return Err(e),
                    Err(e) => {
                        tracing::warn!(offset = prev, error = %e, "skipping corrupt header");
                    }
                }
            }
        }
        self.scan_back(current.offset - 2, mode)
    }

    /// The next header after `current`, scanning forward block by block.
    /// `Ok(None)` when there is none; a corrupt header on the way is an
    /// error in either mode, as with couchstore's forward seek.
    pub fn next_header(&self, current: &LocatedHeader) -> Result<Option<LocatedHeader>> {
        let len = self.len()?;
        let mut pos = current.offset + BLOCK_SIZE;
        while pos < len {
            if let Some(header) = self.read_header_at(pos)? {
                return Ok(Some(LocatedHeader {
                    offset: pos,
                    header,
                }));
            }
            pos += BLOCK_SIZE;
        }
        Ok(None)
    }

    /// Every header from `start` back to the oldest, newest first.
    pub fn headers_from(&self, start: LocatedHeader, mode: OpenMode) -> Result<Vec<LocatedHeader>> {
        let mut out = Vec::new();
        let mut current = start;
        while let Some(prev) = self.previous_header(&current, mode)? {
            out.push(std::mem::replace(&mut current, prev));
        }
        out.push(current);
        Ok(out)
    }
}

/// Decompresses a snappy block, bounding the size it claims first.
pub fn decompress(compressed: &[u8]) -> Result<Vec<u8>> {
    let len = snap::raw::decompress_len(compressed)
        .map_err(|e| Error::malformed("snappy chunk", e.to_string()))?;
    if len as u64 > MAX_DECOMPRESSED_LEN {
        return Err(Error::malformed(
            "snappy chunk",
            format!("claims {len} bytes decompressed, over {MAX_DECOMPRESSED_LEN}"),
        ));
    }
    // Into a buffer of the length just read and checked (the decoder's own
    // `decompress_vec` would read it a second time).
    let mut out = vec![0u8; len];
    let n = snap::raw::Decoder::new()
        .decompress(compressed, &mut out)
        .map_err(|e| Error::malformed("snappy chunk", e.to_string()))?;
    out.truncate(n);
    Ok(out)
}

/// Compresses with snappy (raw block format, as couchstore).
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut compressor = Compressor::new();
    let len = compressor.compress_len(data);
    let mut out = compressor.out;
    out.truncate(len);
    out
}

/// A snappy encoder and its output buffer, kept for the next block: a fresh
/// encoder allocates its hash table and output for every block, which for
/// node-sized blocks costs about as much as compressing them. A
/// [`FileWriter`] has one; a thread that compresses chunks for a writer it
/// shares with others (then appending the compressed bytes with
/// [`FileWriter::append_chunk`]) needs its own.
#[derive(Debug)]
pub struct Compressor {
    encoder: snap::raw::Encoder,
    /// The last block compressed, at its start. Never shrinks, so it is
    /// zeroed only when it grows.
    out: Vec<u8>,
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Compressor {
    /// A compressor with empty buffers.
    pub fn new() -> Self {
        Self {
            encoder: snap::raw::Encoder::new(),
            out: Vec::new(),
        }
    }

    /// Compresses `data` with snappy (raw block format, as couchstore); the
    /// result lives until the next call.
    pub fn compress(&mut self, data: &[u8]) -> &[u8] {
        let len = self.compress_len(data);
        &self.out[..len]
    }

    /// Compresses `data` (raw block format) into the start of `out`;
    /// returns its compressed length.
    fn compress_len(&mut self, data: &[u8]) -> usize {
        let max = snap::raw::max_compress_len(data.len());
        if self.out.len() < max {
            self.out.resize(max, 0);
        }
        // Compression of an in-memory slice fails only when the input
        // exceeds snappy's maximum (~4 GiB, where `max` is 0), far above any
        // chunk the format allows; `out` has room for the worst case.
        self.encoder
            .compress(data, &mut self.out)
            .unwrap_or_else(|e| unreachable!("snappy compress of {} bytes: {e}", data.len()))
    }
}

/// Appends chunks and commits headers to one file.
///
/// Writes are buffered and reach the backend on [`FileWriter::flush`], before
/// a header, or when the buffer is large; reads through the writer see
/// everything appended so far. Only one writer per file may exist.
#[derive(Debug)]
pub struct FileWriter {
    file: CouchFile,
    /// Physical position where the next byte goes.
    pos: u64,
    /// Physical bytes not yet written, to go at `flushed`.
    buffer: Vec<u8>,
    /// Physical position of `buffer[0]`.
    flushed: u64,
    /// For [`FileWriter::append_compressed_chunk`].
    compressor: Compressor,
    /// Background syncs, when the file has a [`Writeback`].
    writeback: Option<WritebackClient>,
    /// Commits write the header block as a header at once and sync once
    /// ([`FileWriter::set_unpublished`]).
    unpublished: bool,
}

impl FileWriter {
    /// A writer appending at the end of `file`.
    pub fn new(file: CouchFile) -> Result<Self> {
        let pos = file.len()?;
        let writeback = file.shared.writeback.clone().map(WritebackClient::new);
        Ok(Self {
            file,
            pos,
            buffer: Vec::with_capacity(64 * 1024),
            flushed: pos,
            compressor: Compressor::new(),
            writeback,
            unpublished: false,
        })
    }

    /// A writer on `file`, which must be empty (the start of both creates).
    fn new_empty(file: CouchFile) -> Result<Self> {
        let w = Self::new(file)?;
        if w.pos != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: create on a file of {} bytes",
                w.file.path().display(),
                w.pos
            )));
        }
        Ok(w)
    }

    /// Prepares a new, empty file the way couchstore's create does and
    /// commits `header` (usually [`DbHeader::new`]) at offset 0.
    pub fn create(file: CouchFile, header: &DbHeader) -> Result<(Self, u64)> {
        let mut w = Self::new_empty(file)?;
        w.file.set_crc(CrcKind::for_version(header.disk_version));
        let offset = w.commit(header)?;
        Ok((w, offset))
    }

    /// Prepares a new, empty file without a header (a compaction target):
    /// a single 0x00 at offset 0, since a body offset of 0 means "no body".
    pub fn create_without_header(file: CouchFile) -> Result<Self> {
        let mut w = Self::new_empty(file)?;
        w.buffer.push(BlockType::Data as u8);
        w.pos = 1;
        Ok(w)
    }

    /// The file written to (readers may clone it).
    pub fn file(&self) -> &CouchFile {
        &self.file
    }

    /// Sets the checksum written (CRC-32 for version 11 files).
    pub fn set_crc(&mut self, crc: CrcKind) {
        self.file.set_crc(crc);
    }

    /// Marks the file as unpublished: no reader and no recovery opens it
    /// until it is renamed, after a commit, to a name that is opened (a
    /// compaction target under its temporary name), and a crash before then
    /// discards it. Its commits then need no two-phase protocol: the header
    /// block is written as a header at once and the file synced once, which
    /// is enough for the rename that follows. A writer made afresh on the
    /// renamed file commits in two phases again.
    pub fn set_unpublished(&mut self) {
        self.unpublished = true;
    }

    /// Syncs in the background through `writeback` from now on (`None`:
    /// no longer), instead of what the file was given
    /// ([`CouchFile::with_writeback`]). Waits for the pending background
    /// sync first and fails if one failed since the last [`FileWriter::sync`].
    pub fn set_writeback(&mut self, writeback: Option<Writeback>) -> Result<()> {
        self.wait_writeback()?;
        self.writeback = writeback.map(WritebackClient::new);
        Ok(())
    }

    /// Waits for the pending background sync, if any; fails if one failed
    /// since the last call.
    fn wait_writeback(&self) -> Result<()> {
        match &self.writeback {
            Some(writeback) => writeback
                .wait()
                .map_err(|e| Error::io(self.file.path(), IoOp::Sync, self.pos, e)),
            None => Ok(()),
        }
    }

    /// Physical position of the next byte appended.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn append_logical(&mut self, data: &[u8], block_type: BlockType) {
        self.pos = add_prefixes(self.pos, data, block_type, &mut self.buffer);
    }

    /// Appends a data chunk holding `payload`.
    pub fn append_chunk(&mut self, payload: &[u8]) -> Result<ChunkPos> {
        let checksum = self.file.crc.checksum(payload);
        self.append_with_checksum(payload, checksum)
    }

    /// Appends a data chunk holding `chunk`'s payload, with the checksum it
    /// was read with when that is of this file's kind (a copy between two
    /// files of the same disk version), otherwise computed.
    pub fn append_checked_chunk(&mut self, chunk: &CheckedChunk) -> Result<ChunkPos> {
        let checksum = if chunk.crc == self.file.crc {
            chunk.checksum
        } else {
            self.file.crc.checksum(&chunk.payload)
        };
        self.append_with_checksum(&chunk.payload, checksum)
    }

    fn append_with_checksum(&mut self, payload: &[u8], checksum: u32) -> Result<ChunkPos> {
        if payload.len() as u64 > MAX_CHUNK_LEN {
            return Err(Error::InvalidArgument(format!(
                "chunk of {} bytes is over the limit of {MAX_CHUNK_LEN}",
                payload.len()
            )));
        }
        let offset = self.pos;
        let mut prefix = [0u8; 8];
        prefix[..4].copy_from_slice(&(payload.len() as u32 | DATA_CHUNK_BIT).to_be_bytes());
        prefix[4..].copy_from_slice(&checksum.to_be_bytes());
        self.append_logical(&prefix, BlockType::Data);
        self.append_logical(payload, BlockType::Data);
        if self.buffer.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(ChunkPos {
            offset,
            disk_size: 8 + payload.len() as u64,
        })
    }

    /// Compresses `data` with snappy and appends it as a data chunk.
    pub fn append_compressed_chunk(&mut self, data: &[u8]) -> Result<ChunkPos> {
        let len = self.compressor.compress_len(data);
        // Taken out (no allocation) for the call, then put back.
        let out = std::mem::take(&mut self.compressor.out);
        let pos = self.append_chunk(&out[..len]);
        self.compressor.out = out;
        pos
    }

    /// Writes the buffered bytes to the backend (without syncing).
    pub fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.file
            .shared
            .backend
            .write_at(self.flushed, &self.buffer)
            .map_err(|e| Error::io(self.file.path(), IoOp::Write, self.flushed, e))?;
        self.flushed += self.buffer.len() as u64;
        if let Some(writeback) = &mut self.writeback {
            writeback.wrote(&self.file.shared.backend, self.buffer.len() as u64);
        }
        self.buffer.clear();
        self.file.note_len(self.flushed);
        Ok(())
    }

    /// Flushes and makes everything written durable. Fails if a background
    /// sync of this writer failed since the last call, even if this one
    /// succeeds.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.wait_writeback()?;
        self.file
            .shared
            .backend
            .sync()
            .map_err(|e| Error::io(self.file.path(), IoOp::Sync, self.pos, e))
    }

    /// Reads a data chunk, including one still in the write buffer.
    pub fn read_chunk(&mut self, offset: u64) -> Result<Vec<u8>> {
        if offset >= self.flushed {
            self.flush()?;
        }
        self.file.read_chunk(offset)
    }

    /// Reads a compressed data chunk, including one still in the buffer.
    pub fn read_compressed_chunk(&mut self, offset: u64) -> Result<Vec<u8>> {
        if offset >= self.flushed {
            self.flush()?;
        }
        self.file.read_compressed_chunk(offset)
    }

    /// Commits `header` with couchstore's two-phase protocol: the header is
    /// written at the next block boundary with block byte 0x00, synced, then
    /// the byte is turned into 0x01 and synced again. Returns the header's
    /// offset. Everything appended before is durable when this returns.
    /// An unpublished file ([`FileWriter::set_unpublished`]) skips the first
    /// phase: its header block is a header at once, synced once.
    /// Fails with [`Error::Unlinked`] when, after the sync, the file has no
    /// name left ([`crate::Backend::link_count`] is 0).
    pub fn commit(&mut self, header: &DbHeader) -> Result<u64> {
        let _span =
            tracing::debug_span!("commit_header", path = %self.file.path().display()).entered();
        let body = header.encode()?;
        // Pad to the next block boundary; the gap is a hole, never read.
        let offset = align_up(self.pos);
        if offset != self.pos {
            self.flush()?;
            self.pos = offset;
            self.flushed = offset;
        }
        let mut prefix = [0u8; 8];
        prefix[..4].copy_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        prefix[4..].copy_from_slice(&self.file.crc.checksum(&body).to_be_bytes());
        // An unpublished file's header block is a header at once; a live
        // file's becomes one only once everything before it is synced.
        let first = if self.unpublished {
            BlockType::Header
        } else {
            BlockType::Data
        };
        self.append_logical(&prefix, first);
        self.append_logical(&body, BlockType::Data);
        self.sync()?;
        if !self.unpublished {
            self.file
                .shared
                .backend
                .write_at(offset, &[BlockType::Header as u8])
                .map_err(|e| Error::io(self.file.path(), IoOp::Write, offset, e))?;
            self.file
                .shared
                .backend
                .sync()
                .map_err(|e| Error::io(self.file.path(), IoOp::Sync, offset, e))?;
        }
        // A file removed from its directory (or whose directory was deleted)
        // still syncs: the commit is durable on an inode no name leads to.
        // One fstat tells, so that such a commit is never reported durable.
        let links = self
            .file
            .shared
            .backend
            .link_count()
            .map_err(|e| Error::io(self.file.path(), IoOp::Len, offset, e))?;
        if links == 0 {
            return Err(Error::Unlinked {
                path: self.file.path().to_path_buf(),
                offset,
            });
        }
        tracing::trace!(offset, update_seq = header.update_seq, "header committed");
        Ok(offset)
    }

    /// Cuts the file back to `len` bytes (after a failed commit, to drop a
    /// partial tail) and continues appending there.
    pub fn truncate(&mut self, len: u64) -> Result<()> {
        self.buffer.clear();
        // Chunks may now be written where cached ones were: forget them all.
        self.file.shared.cache_id.renew();
        self.file
            .shared
            .backend
            .truncate(len)
            .map_err(|e| Error::io(self.file.path(), IoOp::Truncate, len, e))?;
        self.pos = len;
        self.flushed = len;
        Ok(())
    }
}

/// A chunk's payload read and checked against its stored checksum, which
/// it keeps: a copy into a file of the same [`CrcKind`] need not compute it
/// again ([`FileWriter::append_checked_chunk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedChunk {
    /// The payload.
    pub payload: Vec<u8>,
    /// The kind of `checksum`.
    pub crc: CrcKind,
    /// The payload's checksum, which matched the stored one.
    pub checksum: u32,
}

/// Reads data chunks that come in ascending file order (a compaction's walk
/// of the by-seq index over an append-only file) through one window of the
/// file, refilled a window at a time: one `pread` serves many chunks instead
/// of one each. Only bytes below the file's end when read are kept, and the
/// file is append-only, so the window never holds stale data chunks.
#[derive(Debug)]
pub struct SequentialReader {
    window: Vec<u8>,
    start: u64,
    capacity: usize,
}

impl SequentialReader {
    /// A reader with a window of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            window: Vec::new(),
            start: 0,
            capacity: capacity.max(BLOCK_SIZE as usize),
        }
    }

    /// Reads the payload of the data chunk of `file` at `offset`, checking
    /// its checksum, like [`CouchFile::read_chunk`].
    pub fn read_chunk(&mut self, file: &CouchFile, offset: u64) -> Result<Vec<u8>> {
        Ok(self.read_checked_chunk(file, offset)?.payload)
    }

    /// [`SequentialReader::read_chunk`], keeping the checksum the payload
    /// was checked against, for [`FileWriter::append_checked_chunk`].
    pub fn read_checked_chunk(&mut self, file: &CouchFile, offset: u64) -> Result<CheckedChunk> {
        let (stored, payload) = match self.read_in_window(file, offset)? {
            Some(read) => read,
            // Whatever the window cannot serve as a well-formed chunk (one
            // too large for it, a bad prefix, the end of the file) takes
            // the general path, which reports it precisely.
            None => file.read_chunk_raw_via(offset, false, &mut |at, physical| {
                self.read(file, at, physical)
            })?,
        };
        file.check(offset, stored, &payload)?;
        Ok(CheckedChunk {
            payload,
            crc: file.crc,
            checksum: stored,
        })
    }

    /// The stored checksum and payload of the data chunk at `offset`, taken
    /// straight from the window (refilled at `offset` if it does not cover
    /// the chunk): the payload is copied out once, where the general path
    /// first copies a whole read-ahead block out of the window. `None` when
    /// the window cannot serve it.
    fn read_in_window(&mut self, file: &CouchFile, offset: u64) -> Result<Option<(u32, Vec<u8>)>> {
        let prefix_len = physical_len(offset, 8);
        if !self.covers(offset, prefix_len) {
            self.refill(file, offset)?;
            if !self.covers(offset, prefix_len) {
                return Ok(None);
            }
        }
        let Some(prefix) = logical_head::<8>(offset, self.slice(offset, prefix_len)) else {
            return Ok(None);
        };
        let raw_len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let stored = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        let len = u64::from(raw_len & !DATA_CHUNK_BIT);
        if raw_len & DATA_CHUNK_BIT == 0 || len > MAX_CHUNK_LEN {
            return Ok(None);
        }
        let total = physical_len(offset, 8 + len);
        if !self.covers(offset, total) {
            if total > self.capacity as u64 / 2 {
                return Ok(None);
            }
            self.refill(file, offset)?;
            if !self.covers(offset, total) {
                return Ok(None);
            }
        }
        // `len` fits in memory: it is at most MAX_CHUNK_LEN.
        let mut payload = Vec::with_capacity(len as usize);
        let after_prefix = offset + prefix_len;
        strip_prefixes(
            after_prefix,
            self.slice(after_prefix, total - prefix_len),
            &mut payload,
        );
        Ok(Some((stored, payload)))
    }

    /// True when the window holds the `len` bytes at `at`.
    fn covers(&self, at: u64, len: u64) -> bool {
        at >= self.start && at + len <= self.start + self.window.len() as u64
    }

    /// The `len` bytes at `at`, which the window covers.
    fn slice(&self, at: u64, len: u64) -> &[u8] {
        // Within the window's length (checked by `covers`), so in usize.
        let from = (at - self.start) as usize;
        &self.window[from..from + len as usize]
    }

    /// Refills the window with the file's bytes from `at` on.
    fn refill(&mut self, file: &CouchFile, at: u64) -> Result<()> {
        self.window.resize(self.capacity, 0);
        let got = file.read_physical(at, &mut self.window)?;
        self.window.truncate(got);
        self.start = at;
        Ok(())
    }

    /// Fills `physical` from the window, refilling it at `at` when it does
    /// not cover the range; larger reads bypass it.
    fn read(&mut self, file: &CouchFile, at: u64, physical: &mut [u8]) -> Result<usize> {
        let end = self.start + self.window.len() as u64;
        let covered = at >= self.start && at + physical.len() as u64 <= end;
        if !covered {
            if physical.len() > self.capacity / 2 {
                return file.read_physical(at, physical);
            }
            self.refill(file, at)?;
        }
        // Within the window, or the window starts at `at` (and ends at the
        // end of the file when it is shorter than asked).
        let from = usize::try_from(at - self.start)
            .unwrap_or(usize::MAX)
            .min(self.window.len());
        let n = physical.len().min(self.window.len() - from);
        physical[..n].copy_from_slice(&self.window[from..from + n]);
        Ok(n)
    }
}

/// A chunk's payload as read from the file's map: in place, or copied
/// without the marker bytes of the block boundaries inside it.
enum Payload<'a> {
    InPlace(InPlace<'a>),
    Copied(Vec<u8>),
}

impl Payload<'_> {
    fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::InPlace(bytes) => bytes.to_vec(),
            Payload::Copied(bytes) => bytes,
        }
    }
}

impl std::ops::Deref for Payload<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::InPlace(bytes) => bytes,
            Payload::Copied(bytes) => bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory file that counts its syncs.
    #[derive(Debug, Default)]
    struct CountingSyncs {
        inner: crate::MemBackend,
        syncs: AtomicU64,
    }

    impl Backend for CountingSyncs {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.inner.write_at(offset, data)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn truncate(&self, len: u64) -> std::io::Result<()> {
            self.inner.truncate(len)
        }
    }

    /// Writes two chunks, each followed by a committed header, to a new
    /// compaction target; returns the backend and the headers' offsets.
    fn write_target(unpublished: bool) -> (std::sync::Arc<CountingSyncs>, Vec<u64>) {
        let backend = std::sync::Arc::new(CountingSyncs::default());
        let file = CouchFile::new(backend.clone(), "t.couch.2.compact").unwrap();
        let mut w = FileWriter::create_without_header(file).unwrap();
        if unpublished {
            w.set_unpublished();
        }
        let mut offsets = Vec::new();
        let mut header = DbHeader::new(CURRENT_DISK_VERSION);
        for (i, chunk) in [vec![1u8; 5000], vec![2u8; 4000]].iter().enumerate() {
            w.append_chunk(chunk).unwrap();
            header.update_seq = i as u64 + 1;
            offsets.push(w.commit(&header).unwrap());
        }
        (backend, offsets)
    }

    #[test]
    fn an_unpublished_files_commits_write_the_same_bytes_with_one_sync_each() {
        let (two_phase, offsets) = write_target(false);
        let (unpublished, same_offsets) = write_target(true);
        assert_eq!(offsets, same_offsets);
        assert_eq!(unpublished.inner.to_bytes(), two_phase.inner.to_bytes());
        assert_eq!(two_phase.syncs.load(Ordering::Relaxed), 4);
        assert_eq!(unpublished.syncs.load(Ordering::Relaxed), 2);
        // The file, once renamed, opens at its last header.
        let file = CouchFile::new(unpublished, "t.couch.2").unwrap();
        let last = file.find_last_header(OpenMode::Normal).unwrap().unwrap();
        assert_eq!((last.offset, last.header.update_seq), (offsets[1], 2));
    }

    #[test]
    fn a_commit_to_a_file_without_a_name_fails() {
        use crate::{Directory, FaultController, FaultyDirectory, OsDirectory};
        let tmp = tempfile::tempdir().unwrap();
        let os = OsDirectory::new(tmp.path().join("data")).unwrap();
        let faulty = FaultyDirectory::new(FaultController::new());
        type Unlink<'a> = Box<dyn Fn() + 'a>;
        let dirs: [(&dyn Directory, Unlink<'_>); 3] = [
            (&os, Box::new(|| os.remove("f").unwrap())),
            // The whole directory deleted underneath (`rm -rf`).
            (
                &os,
                Box::new(|| std::fs::remove_dir_all(tmp.path().join("data")).unwrap()),
            ),
            (&faulty, Box::new(|| faulty.remove("f").unwrap())),
        ];
        for (i, (dir, unlink)) in dirs.into_iter().enumerate() {
            std::fs::create_dir_all(tmp.path().join("data")).unwrap();
            let file = CouchFile::new(dir.create("f").unwrap(), dir.path().join("f")).unwrap();
            let (mut writer, _) = FileWriter::create(file, &DbHeader::new(14)).unwrap();
            writer.append_chunk(b"kept").unwrap();
            let header = DbHeader::new(14);
            let offset = writer.commit(&header).unwrap();
            writer.append_chunk(b"lost").unwrap();
            unlink();
            match writer.commit(&header) {
                Err(Error::Unlinked { path, offset: at }) => {
                    assert_eq!(path, dir.path().join("f"), "case {i}");
                    assert!(at > offset, "case {i}");
                }
                other => panic!("case {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_reused_compressor_gives_each_block_as_a_fresh_one_does() {
        let mut compressor = Compressor::new();
        let text: Vec<u8> = b"a node's keys and values, ".repeat(400);
        let noise: Vec<u8> = (0u32..5000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        // Large, then smaller: the buffer keeps the larger block's tail.
        for block in [&text[..], &noise[..], &text[..10], &[][..], &noise[..300]] {
            let fresh = snap::raw::Encoder::new().compress_vec(block).unwrap();
            assert_eq!(compressor.compress(block), &fresh[..]);
            assert_eq!(decompress(compressor.compress(block)).unwrap(), block);
        }
    }

    #[test]
    fn a_checked_chunk_keeps_its_checksum_only_into_a_file_of_its_kind() {
        let payload: Vec<u8> = (0u32..10_000).map(|i| (i % 253) as u8).collect();
        let source = CouchFile::new(Arc::new(crate::MemBackend::new()), "src").unwrap();
        let mut writer = FileWriter::create_without_header(source).unwrap();
        let at = writer.append_chunk(&payload).unwrap().offset;
        writer.flush().unwrap();
        let mut reader = SequentialReader::new(4096);
        let chunk = reader.read_checked_chunk(writer.file(), at).unwrap();
        assert_eq!(chunk.payload, payload);
        assert_eq!(chunk.crc, CrcKind::Crc32c);
        assert_eq!(chunk.checksum, CrcKind::Crc32c.checksum(&payload));
        for kind in [CrcKind::Crc32c, CrcKind::Crc32] {
            let target = CouchFile::new(Arc::new(crate::MemBackend::new()), "dst").unwrap();
            let mut copy = FileWriter::create_without_header(target).unwrap();
            copy.set_crc(kind);
            let pos = copy.append_checked_chunk(&chunk).unwrap();
            // Read back through the checking path of the target's kind.
            assert_eq!(copy.read_chunk(pos.offset).unwrap(), payload, "{kind:?}");
        }
        // A payload that does not match its checksum is not handed out.
        let mut bytes = writer
            .file()
            .backend()
            .len()
            .map(|n| vec![0u8; n as usize])
            .unwrap();
        writer.file().backend().read_at(0, &mut bytes).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let flipped =
            CouchFile::new(Arc::new(crate::MemBackend::from_bytes(bytes)), "bad").unwrap();
        assert!(SequentialReader::new(4096)
            .read_checked_chunk(&flipped, at)
            .is_err());
    }
}
