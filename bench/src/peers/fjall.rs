//! fjall 3: one keyspace; one write batch per batch committed with
//! `PersistMode::SyncAll` (the journal is fsynced). Compaction: the
//! memtable is flushed to a table, then a major compaction merges every
//! table; writers go on meanwhile ([`CompactionKind::Concurrent`]).

use super::{read_each, Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use ::fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec {
    name: "fjall",
    open,
};

/// An open database and its keyspace.
struct Fjall {
    /// The database.
    db: Database,
    /// The one keyspace.
    keyspace: Keyspace,
}

/// Opens (or creates) the database in `dir`.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    let db = Database::builder(dir).open()?;
    let keyspace = db.keyspace("kv", KeyspaceCreateOptions::default)?;
    Ok(Box::new(Fjall { db, keyspace }))
}

impl Engine for Fjall {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        for (key, value) in batch {
            b.insert(&self.keyspace, key.as_slice(), value.as_slice());
        }
        b.commit()?;
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::Concurrent
    }

    fn compact(&self) -> Result<(), BoxError> {
        self.keyspace.rotate_memtable_and_wait()?;
        self.keyspace.major_compact()?;
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        read_each(keys, check, |key| self.keyspace.get(key))
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        self.db.persist(PersistMode::SyncAll)?;
        drop(self);
        Ok(())
    }
}
