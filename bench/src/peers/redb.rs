//! redb: one table in `data.redb`, one write transaction per batch with the
//! default `Durability::Immediate` (synced at commit). Its compaction,
//! `Database::compact`, takes `&mut Database`: writers wait for it
//! ([`CompactionKind::Exclusive`]).

use super::{Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use ::redb::{Database, ReadableDatabase, TableDefinition};
use std::path::Path;
use std::sync::RwLock;

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec { name: "redb", open };

/// The one table.
const TABLE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("kv");

/// Most compaction calls (each returns whether it could do more).
const MAX_COMPACTIONS: usize = 64;

/// An open database; the lock gives compaction its exclusive access.
struct Redb {
    /// The database.
    db: RwLock<Database>,
}

/// Opens (or creates) `data.redb` in `dir`.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    let db = Database::create(dir.join("data.redb"))?;
    Ok(Box::new(Redb {
        db: RwLock::new(db),
    }))
}

/// The error of a poisoned lock.
fn poisoned<T>(_: T) -> BoxError {
    "redb: a thread panicked holding the database lock".into()
}

impl Engine for Redb {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let db = self.db.read().map_err(poisoned)?;
        let tx = db.begin_write()?;
        {
            let mut table = tx.open_table(TABLE)?;
            for (key, value) in batch {
                table.insert(key.as_slice(), value.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::Exclusive
    }

    fn compact(&self) -> Result<(), BoxError> {
        let mut db = self.db.write().map_err(poisoned)?;
        for _ in 0..MAX_COMPACTIONS {
            if !db.compact()? {
                break;
            }
        }
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        let db = self.db.read().map_err(poisoned)?;
        let tx = db.begin_read()?;
        let table = tx.open_table(TABLE)?;
        for (i, key) in keys.iter().enumerate() {
            let value = table.get(key.as_slice())?;
            check(i, value.as_ref().map(|v| v.value()));
        }
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        drop(self);
        Ok(())
    }
}
