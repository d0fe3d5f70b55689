//! A bounded cache of decompressed chunks, shared by the readers and the
//! writer of any number of files: what the B-tree keeps its nodes in, so a
//! path read on every commit is decompressed once, not once per commit.

use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes counted for a cached chunk beyond its payload: the key, the
/// `Arc`'s counts and the cache's own slot.
const ENTRY_OVERHEAD: u64 = 64;

/// Which file and which offset a cached chunk is from. The file part is a
/// [`CacheId`], unique for the life of the process.
type ChunkKey = (u64, u64);

/// Weighs a cached chunk by its bytes.
#[derive(Debug, Clone, Copy)]
struct ByLen;

impl Weighter<ChunkKey, Arc<Vec<u8>>> for ByLen {
    fn weight(&self, _key: &ChunkKey, value: &Arc<Vec<u8>>) -> u64 {
        value.len() as u64 + ENTRY_OVERHEAD
    }
}

/// A cache of decompressed chunks, keyed by file and offset, holding at most
/// about `capacity` bytes. Files share one through
/// [`CouchFile::with_cache`](crate::CouchFile::with_cache); chunks written
/// through [`FileWriter::append_cached_chunk`](crate::FileWriter::append_cached_chunk)
/// go in as they are written, and chunks read through
/// [`CouchFile::read_cached_chunk`](crate::CouchFile::read_cached_chunk) as
/// they are read. Eviction is S3-FIFO: a chunk used once (such as a by-seq
/// leaf, written and never read again) leaves before one used often (the
/// interior nodes every commit reads).
///
/// Cached chunks are trusted: they were checked against their checksum when
/// read, or are what was written. That holds because a file only grows, but
/// for [`FileWriter::truncate`](crate::FileWriter::truncate), which gives the
/// file a new [`CacheId`] so nothing cached before it is found again.
pub struct ChunkCache {
    chunks: Cache<ChunkKey, Arc<Vec<u8>>, ByLen>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ChunkCache {
    /// A cache holding at most about `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        // Nodes are about a kilobyte: size the index for that.
        let items = usize::try_from(capacity / 1024)
            .unwrap_or(usize::MAX)
            .max(16);
        // A node written now is read again when a later commit changes the
        // same leaf, many commits on, so recency matters more here than
        // the default (3% of the space for new entries) expects: with half,
        // a leaf is still cached when it is next changed.
        let options = OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(capacity)
            .hot_allocation(0.5)
            .build();
        let chunks = match options {
            Ok(options) => {
                Cache::with_options(options, ByLen, Default::default(), Default::default())
            }
            // Only an invalid setting fails, and these are all in range.
            Err(_) => Cache::with_weighter(items, capacity, ByLen),
        };
        Self {
            chunks,
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The most bytes it holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The bytes it holds now.
    pub fn used(&self) -> u64 {
        self.chunks.weight()
    }

    /// The number of chunks it holds now.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Reads served from the cache, and reads that were not, so far.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn get(&self, file: u64, offset: u64) -> Option<Arc<Vec<u8>>> {
        let found = self.chunks.get(&(file, offset));
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub(crate) fn insert(&self, file: u64, offset: u64, chunk: Arc<Vec<u8>>) {
        self.chunks.insert((file, offset), chunk);
    }

    pub(crate) fn remove(&self, file: u64, offset: u64) {
        self.chunks.remove(&(file, offset));
    }
}

impl fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCache")
            .field("capacity", &self.capacity)
            .field("used", &self.used())
            .field("chunks", &self.len())
            .field("hits_and_misses", &self.hits_and_misses())
            .finish()
    }
}

/// A number naming one file's contents in a [`ChunkCache`]; a file gets a
/// new one when it is cut back, since chunks may then be written again at
/// offsets that had others.
#[derive(Debug)]
pub(crate) struct CacheId(AtomicU64);

impl CacheId {
    pub(crate) fn new() -> Self {
        Self(AtomicU64::new(next_cache_id()))
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn renew(&self) {
        self.0.store(next_cache_id(), Ordering::Release);
    }

    pub(crate) fn copy(&self) -> Self {
        Self(AtomicU64::new(self.get()))
    }
}

fn next_cache_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use crate::{ChunkCache, CouchFile, DbHeader, FileWriter, MemBackend};
    use std::sync::Arc;

    fn cached_file(capacity: u64) -> (Arc<ChunkCache>, FileWriter) {
        let cache = Arc::new(ChunkCache::new(capacity));
        let file = CouchFile::new(Arc::new(MemBackend::new()), "cached.couch")
            .unwrap()
            .with_cache(Arc::clone(&cache));
        let (writer, _) = FileWriter::create(file, &DbHeader::new(14)).unwrap();
        (cache, writer)
    }

    #[test]
    fn chunks_written_through_the_cache_are_read_from_it() {
        let (cache, mut w) = cached_file(1 << 20);
        let pos = w.append_cached_chunk(b"node bytes").unwrap();
        w.flush().unwrap();
        let file = w.file().clone();
        assert_eq!(&*file.read_cached_chunk(pos.offset).unwrap(), b"node bytes");
        assert_eq!(cache.hits_and_misses(), (1, 0));
        // A chunk written without the cache is read, then cached.
        let plain = w.append_compressed_chunk(b"other").unwrap();
        w.flush().unwrap();
        for _ in 0..2 {
            assert_eq!(&*file.read_cached_chunk(plain.offset).unwrap(), b"other");
        }
        assert_eq!(cache.hits_and_misses(), (2, 1));
        // A renamed handle shares the cached chunks.
        let renamed = file.renamed("renamed.couch");
        assert_eq!(
            &*renamed.read_cached_chunk(pos.offset).unwrap(),
            b"node bytes"
        );
        assert_eq!(cache.hits_and_misses(), (3, 1));
    }

    #[test]
    fn a_truncated_file_never_serves_a_chunk_cached_before() {
        let (_cache, mut w) = cached_file(1 << 20);
        let start = w.position();
        let first = w.append_cached_chunk(b"before the cut").unwrap();
        w.flush().unwrap();
        w.truncate(start).unwrap();
        let second = w.append_cached_chunk(b"after").unwrap();
        w.flush().unwrap();
        assert_eq!(first.offset, second.offset);
        assert_eq!(
            &*w.file().read_cached_chunk(second.offset).unwrap(),
            b"after"
        );
    }

    #[test]
    fn a_full_cache_evicts_and_still_reads_correctly() {
        let (cache, mut w) = cached_file(8 << 10);
        let chunks: Vec<_> = (0..200u32)
            .map(|i| {
                let data = vec![i as u8; 300 + i as usize];
                (w.append_cached_chunk(&data).unwrap(), data)
            })
            .collect();
        w.flush().unwrap();
        assert!(cache.used() <= cache.capacity());
        for (pos, data) in &chunks {
            assert_eq!(&*w.file().read_cached_chunk(pos.offset).unwrap(), &data[..]);
        }
        let (hits, misses) = cache.hits_and_misses();
        assert_eq!(hits + misses, 200);
        assert!(misses > 0, "an 8 KiB cache cannot hold 200 chunks");
    }

    #[test]
    fn a_file_without_a_cache_reads_plainly() {
        let file = CouchFile::new(Arc::new(MemBackend::new()), "plain.couch").unwrap();
        assert!(file.cache().is_none());
        let (mut w, _) = FileWriter::create(file, &DbHeader::new(14)).unwrap();
        let pos = w.append_cached_chunk(b"x").unwrap();
        w.flush().unwrap();
        assert_eq!(&*w.file().read_cached_chunk(pos.offset).unwrap(), b"x");
    }
}
