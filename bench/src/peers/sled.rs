//! sled 0.34: one `Batch` applied per batch, then `Db::flush` (which syncs)
//! for durability. sled has no explicit compaction
//! ([`CompactionKind::None`]): it reclaims space in the background.

use super::{read_each, Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use std::path::Path;

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec { name: "sled", open };

/// An open database.
struct Sled {
    /// The default tree.
    db: ::sled::Db,
}

/// Opens (or creates) the database in `dir`.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    let db = ::sled::Config::new().path(dir).open()?;
    Ok(Box::new(Sled { db }))
}

impl Engine for Sled {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let mut b = ::sled::Batch::default();
        for (key, value) in batch {
            b.insert(key.as_slice(), value.as_slice());
        }
        self.db.apply_batch(b)?;
        self.db.flush()?;
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::None
    }

    fn compact(&self) -> Result<(), BoxError> {
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        read_each(keys, check, |key| self.db.get(key))
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        self.db.flush()?;
        drop(self);
        Ok(())
    }
}
