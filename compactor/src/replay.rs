//! The catch-up: the changes between two headers of the source, replayed
//! into the new file.

use crate::error::{Error, Result};
use crate::pacer::{Control, Pacer};
use crate::CompactionConfig;
use btree::{Body, ChangesFilter, Db, DocUpdate, LocalUpdate, Snapshot};
use couchfile::{CouchFile, LocatedHeader, SequentialReader};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayStats {
    /// Documents replayed (deletions included).
    pub docs: u64,
    /// Local documents set.
    pub locals_set: u64,
    /// Local documents removed.
    pub locals_removed: u64,
    /// Body bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// How long it took.
    pub duration: Duration,
}

fn local_docs(snapshot: &Snapshot) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut docs = BTreeMap::new();
    snapshot.local_docs(&mut |id, value| {
        docs.insert(id.to_vec(), value.to_vec());
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(docs)
}

/// Replays into `target` what changed in `source` between the headers
/// `from` (already in the target) and `to`: every document whose seq is
/// above `from`'s update seq, as read at `to` (bodies copied as stored,
/// seqs kept), and the local documents set or removed between the two. The
/// target's update seq and purge seq are raised to `to`'s. Nothing is
/// committed: the caller commits the target. The target's modifies are
/// left parallel or not as [`CompactionConfig::parallel_replays`] says.
pub fn replay(
    source: &CouchFile,
    from: &LocatedHeader,
    to: &LocatedHeader,
    target: &mut Db,
    config: &CompactionConfig,
    control: &Control,
) -> Result<ReplayStats> {
    let _span =
        tracing::debug_span!("compact_replay", from = from.offset, to = to.offset).entered();
    let start = Instant::now();
    let since = from.header.update_seq;
    if to.header.update_seq < since {
        return Err(Error::InvalidArgument(format!(
            "replay from header {} (seq {since}) to the older header {} (seq {})",
            from.offset, to.offset, to.header.update_seq
        )));
    }
    let older = Snapshot::new(source.clone(), from.clone());
    let newer = Snapshot::new(source.clone(), to.clone());
    target.set_parallel_modifies(config.parallel_replays);
    let start_pos = target.writer_mut().position();
    let mut pacer = Pacer::new(config, control);
    let mut stats = ReplayStats::default();
    let mut batch: Vec<DocUpdate> = Vec::new();
    let mut failure = None;
    // Bodies below `to` never change; they come in (mostly) file order.
    let mut bodies = SequentialReader::new(crate::BODY_WINDOW);
    let save = |batch: &mut Vec<DocUpdate>, target: &mut Db, pacer: &mut Pacer<'_>| -> Result<()> {
        let before = target.writer_mut().position();
        target.save(batch, &[])?;
        batch.clear();
        let written = target.writer_mut().position() - before;
        pacer.wrote(target.writer_mut(), written)
    };
    newer.changes_since(since + 1, ChangesFilter::All, &mut |info| {
        let step = (|| -> Result<()> {
            control.check()?;
            let body = newer.read_stored_body_sequential(&info, &mut bodies)?;
            let read = body.as_ref().map_or(0, |b| b.len() as u64);
            stats.bytes_read += read;
            stats.docs += 1;
            control.add_done(1, read);
            batch.push(DocUpdate {
                id: info.id,
                seq: Some(info.db_seq),
                rev_seq: info.rev_seq,
                rev_seq_above_stored: false,
                rev_meta: info.rev_meta,
                deleted: info.deleted,
                content_meta: info.content_meta,
                body: body.map_or(Body::None, Body::Stored),
            });
            if batch.len() >= config.replay_batch.max(1) {
                save(&mut batch, target, &mut pacer)?;
            }
            Ok(())
        })();
        match step {
            Ok(()) => Ok(ControlFlow::Continue(())),
            Err(e) => {
                failure = Some(e);
                Ok(ControlFlow::Break(()))
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !batch.is_empty() {
        save(&mut batch, target, &mut pacer)?;
    }
    let old_locals = local_docs(&older)?;
    let new_locals = local_docs(&newer)?;
    let mut locals = Vec::new();
    for (id, value) in &new_locals {
        if old_locals.get(id) != Some(value) {
            stats.locals_set += 1;
            locals.push(LocalUpdate {
                id: id.clone(),
                value: Some(value.clone()),
            });
        }
    }
    for id in old_locals.keys().filter(|id| !new_locals.contains_key(*id)) {
        stats.locals_removed += 1;
        locals.push(LocalUpdate {
            id: id.clone(),
            value: None,
        });
    }
    if !locals.is_empty() {
        target.save(&[], &locals)?;
    }
    // Before the caller commits: an error of a writeback sync fails here.
    pacer.finish(target.writer_mut())?;
    let pending = target.pending_mut();
    pending.update_seq = pending.update_seq.max(to.header.update_seq);
    pending.purge_seq = pending.purge_seq.max(to.header.purge_seq);
    stats.bytes_written = target.writer_mut().position() - start_pos;
    stats.duration = start.elapsed();
    Ok(stats)
}
