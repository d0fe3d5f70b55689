//! heed 0.11 (LMDB): the unnamed database of an environment with a 4 GiB
//! map; one write transaction per batch, durable at commit (LMDB's default
//! flags sync). Compaction: a compacting copy of the environment
//! (`MDB_CP_COMPACT`), synced, then the environment is closed, the copy
//! renamed over `data.mdb` and the environment reopened; writers wait for
//! all of it ([`CompactionKind::Exclusive`]). heed 0.11 is the last heed
//! whose `EnvOpenOptions::open` is safe (later ones make it `unsafe`, which
//! this workspace forbids).

use super::{read_each, Batch, CompactionKind, Engine, EngineSpec, ReadBackCheck};
use crate::BoxError;
use ::heed::types::ByteSlice;
use ::heed::{CompactionOption, Database, Env, EnvOpenOptions};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The engine of the report.
pub const SPEC: EngineSpec = EngineSpec { name: "heed", open };

/// The map size: the most the environment can hold.
const MAP_SIZE: usize = 4 << 30;

/// The environment and its database.
type Open = (Env, Database<ByteSlice, ByteSlice>);

/// An open environment (`None` only if a compaction failed half-way).
struct Heed {
    /// The environment's directory.
    dir: PathBuf,
    /// The environment and its database; compaction takes it exclusively.
    env: RwLock<Option<Open>>,
}

/// Opens (or creates) the environment in `dir`.
fn open_env(dir: &Path) -> Result<Open, BoxError> {
    let env = EnvOpenOptions::new()
        .map_size(MAP_SIZE)
        .max_dbs(1)
        .open(dir)
        .map_err(heed_error)?;
    let db = env.create_database(None).map_err(heed_error)?;
    Ok((env, db))
}

/// Opens (or creates) the engine in `dir`.
fn open(dir: &Path) -> Result<Box<dyn Engine>, BoxError> {
    let env = open_env(dir)?;
    Ok(Box::new(Heed {
        dir: dir.to_path_buf(),
        env: RwLock::new(Some(env)),
    }))
}

/// heed's errors as ours (they need not be `Send`).
fn heed_error(e: ::heed::Error) -> BoxError {
    format!("heed: {e}").into()
}

/// The error of a poisoned lock.
fn poisoned<T>(_: T) -> BoxError {
    "heed: a thread panicked holding the environment lock".into()
}

/// Closes an environment and waits until LMDB has let go of it.
fn close_env(env: Env) {
    env.prepare_for_closing().wait();
}

impl Engine for Heed {
    fn write_batch(&self, batch: &Batch) -> Result<(), BoxError> {
        let guard = self.env.read().map_err(poisoned)?;
        let (env, db) = guard.as_ref().ok_or("heed: the environment is closed")?;
        let mut tx = env.write_txn().map_err(heed_error)?;
        for (key, value) in batch {
            db.put(&mut tx, key.as_slice(), value.as_slice())
                .map_err(heed_error)?;
        }
        tx.commit().map_err(heed_error)?;
        Ok(())
    }

    fn compaction_kind(&self) -> CompactionKind {
        CompactionKind::Exclusive
    }

    fn compact(&self) -> Result<(), BoxError> {
        let mut guard = self.env.write().map_err(poisoned)?;
        let (env, _) = guard.take().ok_or("heed: the environment is closed")?;
        let copy = self.dir.join("data.mdb.compact");
        let copied = env
            .copy_to_path(&copy, CompactionOption::Enabled)
            .map_err(heed_error);
        close_env(env);
        drop(copied?);
        File::open(&copy)?.sync_all()?;
        std::fs::rename(&copy, self.dir.join("data.mdb"))?;
        File::open(&self.dir)?.sync_all()?;
        *guard = Some(open_env(&self.dir)?);
        Ok(())
    }

    fn read_back(&self, keys: &[Vec<u8>], check: &mut ReadBackCheck<'_>) -> Result<(), BoxError> {
        let guard = self.env.read().map_err(poisoned)?;
        let (env, db) = guard.as_ref().ok_or("heed: the environment is closed")?;
        let tx = env.read_txn().map_err(heed_error)?;
        read_each(keys, check, |key| db.get(&tx, key).map_err(heed_error))
    }

    fn close(self: Box<Self>) -> Result<(), BoxError> {
        let env = self.env.into_inner().map_err(poisoned)?;
        if let Some((env, _)) = env {
            close_env(env);
        }
        Ok(())
    }
}
