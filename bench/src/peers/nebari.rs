//! nebari 0.5: one unversioned tree; one transaction per batch (a `modify`
//! of the batch's keys, sorted, with `SetEach`), durable at commit.
//! Compaction: `Tree::compact`, which rewrites the tree file while writers
//! go on ([`CompactionKind::Concurrent`]).

use super::{read_each, Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use ::nebari::io::fs::StdFile;
use ::nebari::tree::{Operation, Root, Unversioned};
use ::nebari::{ArcBytes, Config, Roots, Tree};
use std::path::Path;

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec {
    name: "nebari",
    open,
};

/// An open database and its tree.
struct Nebari {
    /// The database (kept open for the tree's sake).
    _roots: Roots<StdFile>,
    /// The one tree.
    tree: Tree<Unversioned, StdFile>,
}

/// Opens (or creates) the database in `dir`.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    let roots = Config::default_for(dir).open()?;
    let tree = roots.tree(Unversioned::tree("kv"))?;
    Ok(Box::new(Nebari {
        _roots: roots,
        tree,
    }))
}

impl Engine for Nebari {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let mut sorted: Vec<&(Vec<u8>, Vec<u8>)> = batch.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let keys = sorted
            .iter()
            .map(|(k, _)| ArcBytes::from(k.clone()))
            .collect();
        let values = sorted
            .iter()
            .map(|(_, v)| ArcBytes::from(v.clone()))
            .collect();
        // `modify` takes `&mut self`; a clone shares the tree's state.
        let mut tree = self.tree.clone();
        tree.modify(keys, Operation::SetEach(values))?;
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::Concurrent
    }

    fn compact(&self) -> Result<(), BoxError> {
        self.tree.compact()?;
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        read_each(keys, check, |key| self.tree.get(key))
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        drop(self);
        Ok(())
    }
}
