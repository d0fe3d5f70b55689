//! Read snapshots: one header of one file revision, read as documents.

use crate::error::{Error, Result};
use crate::history::{AsOf, HeaderIndex, HistoryEntry};
use crate::item::{meta_of, Document};
use crate::vbstate::{VbState, VBSTATE_ID};
use btree::{ChangesFilter, Snapshot};
use couchfile::{DocInfo, OpenMode};
use flusher::Vbid;
use std::ops::ControlFlow;

/// A consistent view of a vbucket at one committed header. It holds its file
/// open, so it stays readable while the flusher commits and after the
/// vbucket moves to a new file revision.
#[derive(Debug, Clone)]
pub struct ReadSnapshot {
    vbid: Vbid,
    revision: u64,
    snapshot: Snapshot,
}

impl ReadSnapshot {
    pub(crate) fn new(vbid: Vbid, revision: u64, snapshot: Snapshot) -> Self {
        Self {
            vbid,
            revision,
            snapshot,
        }
    }

    /// The vbucket.
    pub fn vbid(&self) -> Vbid {
        self.vbid
    }

    /// The file revision read.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Offset of the header read.
    pub fn header_offset(&self) -> u64 {
        self.snapshot.offset()
    }

    /// The highest seqno the header covers (its update seq).
    pub fn high_seqno(&self) -> u64 {
        self.snapshot.header().update_seq
    }

    /// The document layer's view, for what this type does not wrap.
    pub fn inner(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The live document `key`; `None` when absent or deleted.
    pub fn get(&self, key: &[u8]) -> Result<Option<Document>> {
        Ok(self.get_including_deleted(key)?.filter(|d| !d.deleted))
    }

    /// The newest mutation of `key`, deletions included.
    pub fn get_including_deleted(&self, key: &[u8]) -> Result<Option<Document>> {
        match self.snapshot.doc_info(key)? {
            Some(info) => self.document(info).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `f` with every document (deletions included) whose seqno is
    /// `since` or later, in seqno order, until it breaks.
    pub fn changes_since(
        &self,
        since: u64,
        f: &mut dyn FnMut(Document) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut failure = None;
        self.snapshot
            .changes_since(
                since,
                ChangesFilter::All,
                &mut |info| match self.document(info) {
                    Ok(doc) => Ok(f(doc)),
                    Err(e) => {
                        failure = Some(e);
                        Ok(ControlFlow::Break(()))
                    }
                },
            )?;
        failure.map_or(Ok(()), Err)
    }

    /// The `_local/vbstate` document, if the header has one.
    pub fn vbstate(&self) -> Result<Option<VbState>> {
        match self.snapshot.local_doc(VBSTATE_ID)? {
            None => Ok(None),
            Some(json) => VbState::from_json(&json)
                .map(Some)
                .map_err(|reason| Error::BadVbstate {
                    path: self.snapshot.file().path().to_path_buf(),
                    reason,
                }),
        }
    }

    /// The snapshot at the header before this one, if any.
    pub fn previous(&self) -> Result<Option<ReadSnapshot>> {
        let file = self.snapshot.file();
        Ok(file
            .previous_header(self.snapshot.located_header(), OpenMode::Normal)?
            .map(|header| {
                ReadSnapshot::new(
                    self.vbid,
                    self.revision,
                    Snapshot::new(file.clone(), header),
                )
            }))
    }

    /// The history of the file from this snapshot's header back to the
    /// oldest, newest first (see [`crate::history`]). Indexes the header
    /// chain afresh; [`crate::VBucket::history`] keeps its index.
    pub fn history(&self) -> Result<Vec<HistoryEntry>> {
        Self::history_of(&self.snapshot)
    }

    /// The snapshot at the newest header, at or before this one, that is at
    /// or before `point` (a binary search over the header chain);
    /// [`Error::NoHeaderAsOf`] when there is none.
    pub fn as_of(&self, point: AsOf) -> Result<ReadSnapshot> {
        let index = self.index()?;
        let header = index.find_or_error(point, self.snapshot.file().path())?;
        Ok(ReadSnapshot::new(
            self.vbid,
            self.revision,
            Snapshot::new(self.snapshot.file().clone(), header.clone()),
        ))
    }

    /// The history of `snapshot`'s file from its header back, newest first
    /// (for a file read without a vbucket, as couchtool does).
    pub fn history_of(snapshot: &Snapshot) -> Result<Vec<HistoryEntry>> {
        HeaderIndex::build(snapshot.file(), snapshot.located_header(), OpenMode::Normal)?.entries()
    }

    fn index(&self) -> Result<HeaderIndex> {
        Ok(HeaderIndex::build(
            self.snapshot.file(),
            self.snapshot.located_header(),
            OpenMode::Normal,
        )?)
    }

    fn document(&self, info: DocInfo) -> Result<Document> {
        let meta = meta_of(self.snapshot.file().path(), &info)?;
        let value = self.snapshot.read_body(&info)?.unwrap_or_default();
        Ok(Document {
            key: info.id,
            value,
            deleted: info.deleted,
            seqno: info.db_seq,
            meta,
        })
    }
}
