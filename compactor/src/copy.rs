//! The copy phase: a snapshot's live data into a new file.

use crate::error::Result;
use crate::pacer::{Control, Pacer};
use crate::sort::ExternalSorter;
use crate::{CompactionConfig, ExpiryAction, Hooks, PurgeSeqRule};
use btree::{BTree, ById, BySeq, ChangesFilter, Db, Local, Snapshot};
use couchfile::{
    encode_seq_key, CrcKind, DbHeader, Directory, DocInfo, FileWriter, LocatedHeader, RevMeta,
    SequentialReader,
};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    /// Documents written (deletions included).
    pub docs_copied: u64,
    /// Tombstones the purge policy dropped.
    pub tombstones_purged: u64,
    /// Expired documents dropped by the expiry hook.
    pub expired_dropped: u64,
    /// Expired documents turned into deletions by the expiry hook.
    pub expired_deleted: u64,
    /// Documents the filter hook left out.
    pub docs_filtered: u64,
    /// The purge seqno of the new file.
    pub purge_seq: u64,
    /// Body bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Sorted runs the by-id sort spilled to disk.
    pub runs_spilled: usize,
    /// How long the copy took.
    pub duration: Duration,
}

/// State of one copy, fed document by document in by-seq order.
struct Copier<'a, 't> {
    source: &'a Snapshot,
    writer: FileWriter,
    seq_builder: btree::Builder<'t, BySeq>,
    sorter: ExternalSorter<'a>,
    pacer: Pacer<'a>,
    control: &'a Control,
    config: &'a CompactionConfig,
    hooks: &'a mut dyn Hooks,
    now: u32,
    /// Documents in the source's by-seq tree.
    docs_total: u64,
    stats: CopyStats,
    /// Bodies come in by-seq order, which is (mostly) file order.
    bodies: SequentialReader,
    /// The by-seq and by-id values of the document being copied (one
    /// allocation for the copy, not two per document).
    seq_value: Vec<u8>,
    id_value: Vec<u8>,
}

impl Copier<'_, '_> {
    fn purge(&mut self, seq: u64) {
        self.stats.purge_seq = self.stats.purge_seq.max(seq);
    }

    fn copy_doc(&mut self, mut info: DocInfo) -> Result<()> {
        self.control.check()?;
        self.control.add_done(1, info.physical_size);
        // Files not written by kv-engine may carry other rev_meta: such
        // documents have no exptime as far as compaction is concerned.
        let exptime = RevMeta::decode(&info.rev_meta).map_or(0, |m| m.exptime);
        if info.deleted {
            if self.config.purge.purges(&info, exptime) {
                self.stats.tombstones_purged += 1;
                self.purge(info.db_seq);
                return Ok(());
            }
        } else if exptime != 0 && exptime <= self.now {
            match self.hooks.expired(&info, exptime) {
                ExpiryAction::Keep => {}
                ExpiryAction::Drop => {
                    self.stats.expired_dropped += 1;
                    self.purge(info.db_seq);
                    return Ok(());
                }
                ExpiryAction::Delete => {
                    self.stats.expired_deleted += 1;
                    info.deleted = true;
                    info.bp = 0;
                    info.physical_size = 0;
                }
            }
        }
        if !self.hooks.keep(&info) {
            self.stats.docs_filtered += 1;
            self.purge(info.db_seq);
            return Ok(());
        }
        if let Some(body) = self
            .source
            .read_checked_body_sequential(&info, &mut self.bodies)?
        {
            // The checksum just checked is the new chunk's when both files
            // are of one disk version.
            let pos = self.writer.append_checked_chunk(&body)?;
            info.bp = pos.offset;
            info.physical_size = pos.disk_size;
            self.stats.bytes_read += body.payload.len() as u64;
            self.pacer.wrote(&mut self.writer, pos.disk_size)?;
        }
        let key = encode_seq_key(info.db_seq)?;
        info.encode_by_seq_value_into(&mut self.seq_value)?;
        self.seq_builder
            .push(&mut self.writer, &key, &self.seq_value)?;
        info.encode_by_id_value_into(&mut self.id_value)?;
        if self.stats.docs_copied == 0 {
            // Sized on the first pair: ids of one file are alike.
            let left = usize::try_from(self.docs_total).unwrap_or(usize::MAX);
            self.sorter
                .reserve(left, info.id.len() + self.id_value.len());
        }
        self.sorter.push(&info.id, &self.id_value)?;
        self.stats.docs_copied += 1;
        Ok(())
    }
}

/// Copies the live data of `source` into `target` (a writer made by
/// [`FileWriter::create_without_header`]) and commits the new file's first
/// header: same update seq, the purge seq raised by what was purged, disk
/// version 14, or the one [`CompactionConfig::target_disk_version`] gives
/// without [`CompactionConfig::upgrade`] (chunks are checksummed for that
/// version: CRC-32 for 11, CRC-32C otherwise). Sort runs, if the ids outgrow the memory budget, are files
/// of `dir` named `{sort_prefix}.run<N>`, removed when done. Returns the
/// new file's writer as a [`Db`] at that header (ready for [`crate::replay`]).
pub fn copy_snapshot(
    source: &Snapshot,
    mut target: FileWriter,
    dir: &dyn Directory,
    sort_prefix: &str,
    config: &CompactionConfig,
    hooks: &mut dyn Hooks,
    control: &Control,
) -> Result<(Db, CopyStats)> {
    let _span = tracing::info_span!(
        "compact_copy",
        source = %source.file().path().display(),
        header = source.offset()
    )
    .entered();
    let start = Instant::now();
    let src = source.header().clone();
    let version = config.target_disk_version(src.disk_version);
    target.set_crc(CrcKind::for_version(version));
    let start_pos = target.position();
    let docs_total = source.count_changes(0, couchfile::MAX_U48)?;
    control.add_totals(docs_total, source.space_used()?);

    let by_seq = BTree::new(BySeq, config.nodes);
    let by_id = BTree::new(ById, config.nodes);
    let local = BTree::new(Local, config.nodes);
    let mut sorter = ExternalSorter::new(dir, sort_prefix, config.id_sort_memory);
    sorter.set_parallel(config.parallel_sort);
    let mut copier = Copier {
        source,
        writer: target,
        seq_builder: by_seq.builder(),
        sorter,
        pacer: Pacer::new(config, control),
        control,
        config,
        hooks,
        now: config.now(),
        docs_total,
        stats: CopyStats {
            purge_seq: src.purge_seq,
            ..CopyStats::default()
        },
        bodies: SequentialReader::new(crate::BODY_WINDOW),
        seq_value: Vec::new(),
        id_value: Vec::new(),
    };
    let mut failure = None;
    source.changes_since(
        0,
        ChangesFilter::All,
        &mut |info| match copier.copy_doc(info) {
            Ok(()) => Ok(ControlFlow::Continue(())),
            Err(e) => {
                failure = Some(e);
                Ok(ControlFlow::Break(()))
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let Copier {
        mut writer,
        seq_builder,
        sorter,
        mut stats,
        mut pacer,
        ..
    } = copier;
    let by_seq_root = seq_builder.finish(&mut writer)?;
    stats.runs_spilled = sorter.runs_spilled();
    let mut id_builder = by_id.builder();
    let mut sorted = sorter.finish()?;
    while let Some(entry) = sorted.next_pair() {
        let (id, value) = entry?;
        control.check()?;
        id_builder.push(&mut writer, id, value)?;
    }
    let by_id_root = id_builder.finish(&mut writer)?;
    let mut local_builder = local.builder();
    source.local_docs(&mut |id, value| {
        local_builder.push(&mut writer, id, value)?;
        Ok(ControlFlow::Continue(()))
    })?;
    let local_root = local_builder.finish(&mut writer)?;
    control.check()?;
    pacer.finish(&mut writer)?;

    if config.purge_seq_rule == PurgeSeqRule::CountDropDeletes && config.purge.drop_deletes {
        stats.purge_seq = src.purge_seq + 1;
    }
    let mut header = DbHeader::new(version);
    header.update_seq = src.update_seq;
    header.purge_seq = stats.purge_seq;
    header.by_id_root = by_id_root;
    header.by_seq_root = by_seq_root;
    header.local_root = local_root;
    let mut db = Db::from_writer(
        writer,
        LocatedHeader {
            offset: 0,
            header: DbHeader::new(version),
        },
        config.nodes,
    );
    *db.pending_mut() = header;
    db.commit(src.timestamp)?;
    stats.bytes_written = db.writer_mut().position() - start_pos;
    stats.duration = start.elapsed();
    tracing::info!(
        docs = stats.docs_copied,
        purged = stats.tombstones_purged,
        bytes = stats.bytes_written,
        ms = stats.duration.as_millis() as u64,
        "copied"
    );
    Ok((db, stats))
}
