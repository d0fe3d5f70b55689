//! Read snapshots: one header of one file revision, read as documents.

use crate::error::{Error, Result};
use crate::history::{AsOf, HeaderIndex, HistoryEntry};
use crate::item::{live_only, meta_of, Document};
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
        // The info is decoded in place: the document's key, value and
        // metadata are all this allocates (with the node cache).
        let path = self.snapshot.file().path();
        let found = self.snapshot.with_doc_info(key, |info| {
            // The body is read next, from another part of the file: its
            // memory is asked for now, while the rest of the info is
            // decoded and the walk unwinds.
            self.snapshot.prefetch_body(info.bp);
            meta_of(path, &info).map(|meta| {
                (
                    meta,
                    info.deleted,
                    info.db_seq,
                    info.bp,
                    info.is_compressed(),
                )
            })
        })?;
        let Some((meta, deleted, seqno, bp, compressed)) = found.transpose()? else {
            return Ok(None);
        };
        Ok(Some(Document {
            key: key.to_vec(),
            value: self
                .snapshot
                .read_body_at(bp, compressed)?
                .unwrap_or_default(),
            deleted,
            seqno,
            meta,
        }))
    }

    /// The live documents `keys` (in any order, repeats allowed), in the
    /// caller's order; `None` where absent or deleted. The by-id tree is
    /// walked once over the sorted keys (each node their paths share is
    /// read once) and the bodies are read in file order.
    pub fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Document>>> {
        Ok(live_only(self.get_many_including_deleted(keys)?))
    }

    /// [`ReadSnapshot::get_many`] with deletions included.
    pub fn get_many_including_deleted(&self, keys: &[&[u8]]) -> Result<Vec<Option<Document>>> {
        let infos = self.snapshot.doc_infos_in_order(keys)?;
        self.documents(infos)
    }

    /// The documents of `infos`, in their order, their bodies read in file
    /// order.
    pub(crate) fn documents(
        &self,
        mut infos: Vec<Option<DocInfo>>,
    ) -> Result<Vec<Option<Document>>> {
        let mut by_offset: Vec<usize> = (0..infos.len()).filter(|&i| infos[i].is_some()).collect();
        by_offset.sort_unstable_by_key(|&i| infos[i].as_ref().map_or(0, |info| info.bp));
        let mut docs: Vec<Option<Document>> = (0..infos.len()).map(|_| None).collect();
        for (n, &i) in by_offset.iter().enumerate() {
            // The next body is fetched while this one is read.
            if let Some(next) = by_offset.get(n + 1).and_then(|&j| infos[j].as_ref()) {
                self.snapshot.prefetch_body(next.bp);
            }
            if let Some(info) = infos[i].take() {
                docs[i] = Some(self.document(info)?);
            }
        }
        Ok(docs)
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
        let meta = meta_of(self.snapshot.file().path(), &info.borrowed())?;
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
