//! RocksDB (the `rocksdb` crate, built without compression libraries): one
//! `WriteBatch` per batch written with `WriteOptions::set_sync(true)` (the
//! WAL is synced). Compaction: a memtable flush, then `compact_range` over
//! every key; writers go on meanwhile ([`CompactionKind::Concurrent`]).

use super::{read_each, Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use ::rocksdb::{Options, WriteBatch, WriteOptions, DB};
use std::path::Path;

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec {
    name: "rocksdb",
    open,
};

/// An open database.
struct Rocks {
    /// The database.
    db: DB,
}

/// Opens (or creates) the database in `dir`.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    let db = DB::open(&options, dir)?;
    Ok(Box::new(Rocks { db }))
}

impl Engine for Rocks {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let mut b = WriteBatch::default();
        for (key, value) in batch {
            b.put(key, value);
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(b, &options)?;
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::Concurrent
    }

    fn compact(&self) -> Result<(), BoxError> {
        self.db.flush()?;
        self.db.compact_range(None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        read_each(keys, check, |key| self.db.get_pinned(key))
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        self.db.flush()?;
        drop(self);
        Ok(())
    }
}
