//! A bounded cache of decoded chunks, shared by the readers and the writer
//! of any number of files: what the B-tree keeps its nodes in (decoded, so
//! a lookup searches a cached node without parsing it again), so a path read
//! on every commit or lookup is read, checked and decompressed once.

use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};
use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes counted for a cached chunk beyond what its owner weighs it at: the
/// key, the `Arc`'s counts and the cache's own slot.
const ENTRY_OVERHEAD: u64 = 64;

/// Which file and which offset a cached chunk is from. The file part is a
/// [`CacheId`], unique for the life of the process.
type ChunkKey = (u64, u64);

/// A chunk decoded into whatever its reader searches (a B-tree node, say):
/// any type, found again by downcasting
/// ([`CouchFile::read_decoded`](crate::CouchFile::read_decoded)).
pub type DecodedChunk = Arc<dyn Any + Send + Sync>;

/// A cached chunk and the bytes it is counted as.
#[derive(Clone)]
struct Entry {
    value: DecodedChunk,
    weight: u64,
}

/// Weighs a cached chunk by the bytes its owner gave.
#[derive(Debug, Clone, Copy)]
struct ByWeight;

impl Weighter<ChunkKey, Entry> for ByWeight {
    fn weight(&self, _key: &ChunkKey, entry: &Entry) -> u64 {
        entry.weight + ENTRY_OVERHEAD
    }
}

/// Counts the chunks the cache evicts to stay within its bound.
#[derive(Debug, Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<ChunkKey, Entry> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut Self::RequestState, _key: ChunkKey, _entry: Entry) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a [`ChunkCache`] holds and how it has served, so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The most bytes it holds.
    pub capacity: u64,
    /// The bytes it holds now (entries' weights plus a fixed overhead each).
    pub used: u64,
    /// The chunks it holds now.
    pub entries: u64,
    /// Reads it served. (A B-tree walk that goes from a cached node to a
    /// child it has linked does not look the child up, and is not
    /// counted.)
    pub hits: u64,
    /// Reads it did not serve (the chunk was read from the file).
    pub misses: u64,
    /// Chunks it dropped to stay within its capacity.
    pub evictions: u64,
}

/// A cache of decoded chunks, keyed by file and offset, holding at most
/// about `capacity` bytes. Files share one through
/// [`CouchFile::with_cache`](crate::CouchFile::with_cache); a reader puts
/// in what it decodes a chunk into through
/// [`CouchFile::read_decoded`](crate::CouchFile::read_decoded), and a
/// writer what it has just written through
/// [`CouchFile::cache_decoded`](crate::CouchFile::cache_decoded). Eviction
/// is S3-FIFO: a chunk used once (such as a by-seq leaf, written and never
/// read again) leaves before one used often (the interior nodes every
/// commit and lookup reads).
///
/// Cached chunks are trusted: they were checked against their checksum when
/// read, or are what was written. That holds because a file only grows, but
/// for [`FileWriter::truncate`](crate::FileWriter::truncate), which gives the
/// file a new cache id so nothing cached before it is found again. Every
/// opened file gets its own id, so nothing cached for one file (or one
/// revision of a vbucket) is ever served for another.
pub struct ChunkCache {
    chunks: Cache<ChunkKey, Entry, ByWeight, quick_cache::DefaultHashBuilder, CountEvictions>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
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
        let evictions = CountEvictions::default();
        let counter = Arc::clone(&evictions.0);
        let chunks = match options {
            Ok(options) => Cache::with_options(options, ByWeight, Default::default(), evictions),
            // Only an invalid setting fails, and these are all in range.
            Err(_) => Cache::with(items, capacity, ByWeight, Default::default(), evictions),
        };
        Self {
            chunks,
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: counter,
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

    /// What it holds and how it has served.
    pub fn stats(&self) -> CacheStats {
        let (hits, misses) = self.hits_and_misses();
        CacheStats {
            capacity: self.capacity,
            used: self.used(),
            entries: self.len() as u64,
            hits,
            misses,
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// The chunk cached for `file` at `offset`, if it is a `T`; counted as
    /// a hit or a miss.
    pub(crate) fn get<T: Any + Send + Sync>(&self, file: u64, offset: u64) -> Option<Arc<T>> {
        let found = self
            .chunks
            .get(&(file, offset))
            .and_then(|entry| entry.value.downcast::<T>().ok());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub(crate) fn insert(&self, file: u64, offset: u64, value: DecodedChunk, weight: u64) {
        self.chunks.insert((file, offset), Entry { value, weight });
    }

    pub(crate) fn remove(&self, file: u64, offset: u64) {
        self.chunks.remove(&(file, offset));
    }
}

impl fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCache")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A number naming one file's contents in a [`ChunkCache`]; a file gets a
/// new one when it is cut back, since chunks may then be written again at
/// offsets that had others. Every handle on the file shares it (through an
/// `Arc`), so that none keeps reading under the old number after a cut.
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
}

fn next_cache_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use crate::{ChunkCache, CouchFile, DbHeader, Error, FileWriter, MemBackend};
    use std::sync::Arc;

    fn cached_file(capacity: u64) -> (Arc<ChunkCache>, FileWriter) {
        let cache = Arc::new(ChunkCache::new(capacity));
        let file = CouchFile::new(Arc::new(MemBackend::new()), "cached.couch")
            .unwrap()
            .with_cache(Arc::clone(&cache));
        let (writer, _) = FileWriter::create(file, &DbHeader::new(14)).unwrap();
        (cache, writer)
    }

    /// Appends `data` compressed and caches it decoded (as a `String`), as
    /// the B-tree does with a node it writes.
    fn append_cached(w: &mut FileWriter, data: &[u8]) -> u64 {
        let pos = w.append_compressed_chunk(data).unwrap();
        w.file().cache_decoded(pos.offset, || {
            let text = String::from_utf8_lossy(data).into_owned();
            let weight = text.len() as u64;
            (text, weight)
        });
        pos.offset
    }

    /// Reads the chunk at `offset` decoded as a `String`; counts decodes.
    fn read(file: &CouchFile, offset: u64, decodes: &mut u32) -> String {
        let text = file
            .read_decoded(offset, |bytes| -> Result<(String, u64), Error> {
                *decodes += 1;
                let text = String::from_utf8(bytes).unwrap();
                let weight = text.len() as u64;
                Ok((text, weight))
            })
            .unwrap();
        (*text).clone()
    }

    #[test]
    fn chunks_written_through_the_cache_are_read_from_it() {
        let (cache, mut w) = cached_file(1 << 20);
        let written = append_cached(&mut w, b"node bytes");
        w.flush().unwrap();
        let file = w.file().clone();
        let mut decodes = 0;
        assert_eq!(read(&file, written, &mut decodes), "node bytes");
        assert_eq!((cache.hits_and_misses(), decodes), ((1, 0), 0));
        // A chunk written without the cache is read and decoded once.
        let plain = w.append_compressed_chunk(b"other").unwrap();
        w.flush().unwrap();
        for _ in 0..2 {
            assert_eq!(read(&file, plain.offset, &mut decodes), "other");
        }
        assert_eq!((cache.hits_and_misses(), decodes), ((2, 1), 1));
        // A renamed handle shares the cached chunks.
        let renamed = file.renamed("renamed.couch");
        assert_eq!(read(&renamed, written, &mut decodes), "node bytes");
        assert_eq!(cache.hits_and_misses(), (3, 1));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.hits, stats.misses), (2, 3, 1));
        assert!(stats.used > 0 && stats.used <= stats.capacity, "{stats:?}");
    }

    #[test]
    fn a_handle_that_does_not_fill_the_cache_reads_from_it_and_adds_nothing() {
        let (cache, mut w) = cached_file(1 << 20);
        let cached = append_cached(&mut w, b"cached");
        w.flush().unwrap();
        let passing = w.file().with_cache_fill(false);
        let mut decodes = 0;
        // What the cache holds is served.
        assert_eq!(read(&passing, cached, &mut decodes), "cached");
        assert_eq!((cache.hits_and_misses(), decodes), ((1, 0), 0));
        // What it reads or writes is not put in.
        let mut passing_writer = FileWriter::new(passing.clone()).unwrap();
        let written = append_cached(&mut passing_writer, b"written");
        passing_writer.flush().unwrap();
        for _ in 0..2 {
            assert_eq!(read(&passing, written, &mut decodes), "written");
        }
        assert_eq!((cache.hits_and_misses(), decodes), ((1, 2), 2));
        assert_eq!(cache.stats().entries, 1);
        // A handle made from it that fills again puts in what it reads.
        let filling = passing.with_cache_fill(true);
        assert_eq!(read(&filling, written, &mut decodes), "written");
        assert_eq!(read(&passing, written, &mut decodes), "written");
        assert_eq!((cache.hits_and_misses(), decodes), ((2, 3), 3));
    }

    #[test]
    fn a_chunk_cached_as_another_type_is_read_again() {
        let (cache, mut w) = cached_file(1 << 20);
        let offset = append_cached(&mut w, b"text");
        w.flush().unwrap();
        let bytes = w
            .file()
            .read_decoded(offset, |bytes| -> Result<(Vec<u8>, u64), Error> {
                Ok((bytes, 4))
            })
            .unwrap();
        assert_eq!(&bytes[..], b"text");
        assert_eq!(cache.hits_and_misses(), (0, 1));
    }

    #[test]
    fn a_truncated_file_never_serves_a_chunk_cached_before() {
        let (_cache, mut w) = cached_file(1 << 20);
        let start = w.position();
        let first = append_cached(&mut w, b"before the cut");
        w.flush().unwrap();
        // Handles made before the cut, sharing the file's contents.
        let renamed = w.file().renamed("renamed.couch");
        let passing = w.file().with_cache_fill(false);
        w.truncate(start).unwrap();
        let second = append_cached(&mut w, b"after");
        w.flush().unwrap();
        assert_eq!(first, second);
        assert_eq!(read(w.file(), second, &mut 0), "after");
        assert_eq!(read(&renamed, second, &mut 0), "after");
        assert_eq!(read(&passing, second, &mut 0), "after");
    }

    #[test]
    fn another_file_never_serves_a_chunk_cached_for_this_one() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let writer = |name: &str| {
            let file = CouchFile::new(Arc::new(MemBackend::new()), name)
                .unwrap()
                .with_cache(Arc::clone(&cache));
            FileWriter::create(file, &DbHeader::new(14)).unwrap().0
        };
        let (mut a, mut b) = (writer("a.couch"), writer("b.couch"));
        let in_a = append_cached(&mut a, b"in a");
        let in_b = b.append_compressed_chunk(b"in b").unwrap().offset;
        b.flush().unwrap();
        assert_eq!(in_a, in_b, "the same offset in two files");
        assert_eq!(read(b.file(), in_b, &mut 0), "in b");
    }

    #[test]
    fn a_full_cache_evicts_and_still_reads_correctly() {
        let (cache, mut w) = cached_file(8 << 10);
        let chunks: Vec<_> = (0..200u32)
            .map(|i| {
                let data = format!("{i:0>width$}", width = 300 + i as usize);
                (append_cached(&mut w, data.as_bytes()), data)
            })
            .collect();
        w.flush().unwrap();
        assert!(cache.used() <= cache.capacity());
        for (offset, data) in &chunks {
            assert_eq!(&read(w.file(), *offset, &mut 0), data);
        }
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, 200);
        assert!(stats.misses > 0, "an 8 KiB cache cannot hold 200 chunks");
        assert!(stats.evictions > 0, "{stats:?}");
        assert!(stats.used <= stats.capacity, "{stats:?}");
    }

    #[test]
    fn a_file_without_a_cache_reads_plainly() {
        let file = CouchFile::new(Arc::new(MemBackend::new()), "plain.couch").unwrap();
        assert!(file.cache().is_none());
        let (mut w, _) = FileWriter::create(file, &DbHeader::new(14)).unwrap();
        let offset = append_cached(&mut w, b"x");
        w.flush().unwrap();
        let mut decodes = 0;
        assert_eq!(read(w.file(), offset, &mut decodes), "x");
        assert_eq!(read(w.file(), offset, &mut decodes), "x");
        assert_eq!(decodes, 2);
    }
}
