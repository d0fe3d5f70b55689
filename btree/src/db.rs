//! Documents on one couchstore file: read snapshots at a header and the
//! writer that applies batches and commits headers.

use crate::error::{Error, Result};
use crate::indexes::{decode_seq_reduce, ById, BySeq, IdReduce, Local};
use crate::node::Node;
use crate::tree::{Action, ActionOp, BTree, EntryFn, NodeConfig};
use couchfile::{
    encode_seq_key, CouchFile, CrcKind, DbHeader, DocInfo, DocInfoRef, FileWriter, LocatedHeader,
    NodePointer, OpenMode, SequentialReader, CONTENT_META_COMPRESSED, MAX_U48,
};
use std::ops::{Bound, ControlFlow};
use std::sync::{Arc, OnceLock};

/// Which documents a changes fold reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChangesFilter {
    /// Live documents and deletions.
    #[default]
    All,
    /// Live documents only.
    NoDeletes,
    /// Deletions only.
    DeletesOnly,
}

/// The three trees, for reading.
#[derive(Debug, Clone)]
struct Trees {
    by_id: BTree<ById>,
    by_seq: BTree<BySeq>,
    local: BTree<Local>,
}

impl Trees {
    fn new(config: NodeConfig) -> Self {
        Self {
            by_id: BTree::new(ById, config),
            by_seq: BTree::new(BySeq, config),
            local: BTree::new(Local, config),
        }
    }
}

/// A read view of a file at one header. Cheap to clone; any number can be
/// used while a [`Db`] appends to the same file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    file: CouchFile,
    /// Shared by the snapshot's clones: cloning one allocates nothing.
    header: Arc<LocatedHeader>,
    /// The by-id tree's root node once a lookup has read it, shared by the
    /// clones: later lookups start from it without the chunk cache's
    /// lookup (a tenth of a point read's instructions, 2026-12-06).
    by_id_root: Arc<OnceLock<Arc<Node>>>,
    trees: Trees,
}

impl Snapshot {
    /// A snapshot at `header` of `file`.
    pub fn new(mut file: CouchFile, header: LocatedHeader) -> Self {
        file.set_crc(CrcKind::for_version(header.header.disk_version));
        Self {
            file,
            header: Arc::new(header),
            by_id_root: Arc::default(),
            trees: Trees::new(NodeConfig::default()),
        }
    }

    /// A snapshot at the file's last valid header.
    pub fn open_latest(file: CouchFile, mode: OpenMode) -> Result<Self> {
        match file.find_last_header(mode)? {
            Some(header) => Ok(Self::new(file, header)),
            None => Err(couchfile::Error::NoHeader {
                path: file.path().to_path_buf(),
            }
            .into()),
        }
    }

    /// A snapshot at the header whose block starts at `offset`.
    pub fn open_at(file: CouchFile, offset: u64) -> Result<Self> {
        let len = file.len()?;
        if offset >= len {
            return Err(Error::InvalidArgument(format!(
                "header offset {offset} is beyond the end of {} ({len} bytes)",
                file.path().display()
            )));
        }
        match file.read_header_at(offset)? {
            Some(header) => Ok(Self::new(file, LocatedHeader { offset, header })),
            None => Err(Error::InvalidArgument(format!(
                "{}: no header at offset {offset}",
                file.path().display()
            ))),
        }
    }

    /// The file.
    pub fn file(&self) -> &CouchFile {
        &self.file
    }

    /// The header this snapshot reads.
    pub fn header(&self) -> &DbHeader {
        &self.header.header
    }

    /// The header and its offset.
    pub fn located_header(&self) -> &LocatedHeader {
        &self.header
    }

    /// Offset of the header.
    pub fn offset(&self) -> u64 {
        self.header.offset
    }

    /// The by-id reduce of the whole tree: live and deleted counts and the
    /// bytes of their bodies.
    pub fn doc_counts(&self) -> Result<IdReduce> {
        match &self.header.header.by_id_root {
            Some(root) => IdReduce::decode(&root.reduce),
            None => Ok(IdReduce::default()),
        }
    }

    /// Bytes the header's data occupies: body sizes plus the three trees.
    pub fn space_used(&self) -> Result<u64> {
        let h = &self.header.header;
        let tree = |r: &Option<NodePointer>| r.as_ref().map_or(0, |r| r.subtree_size);
        Ok(self.doc_counts()?.size
            + tree(&h.by_id_root)
            + tree(&h.by_seq_root)
            + tree(&h.local_root))
    }

    /// Info of the document `id`.
    pub fn doc_info(&self, id: &[u8]) -> Result<Option<DocInfo>> {
        self.with_doc_info(id, |info| info.to_owned())
    }

    /// Hands the info of the document `id`, decoded in place, to `f`: a
    /// lookup that allocates nothing (with the file's node cache).
    pub fn with_doc_info<R>(
        &self,
        id: &[u8],
        f: impl FnOnce(DocInfoRef<'_>) -> R,
    ) -> Result<Option<R>> {
        let Some((offset, node)) = self.by_id_root_node()? else {
            return Ok(None);
        };
        self.trees
            .by_id
            .lookup_one_from(&self.file, offset, node, id, |value| {
                DocInfoRef::decode_by_id(id, value)
                    .map(f)
                    .map_err(|e| self.located(e))
            })?
            .transpose()
    }

    /// The by-id root's offset and node, which this snapshot and its clones
    /// keep once read; `None` for an empty tree.
    fn by_id_root_node(&self) -> Result<Option<(u64, Arc<Node>)>> {
        let Some(root) = &self.header.header.by_id_root else {
            return Ok(None);
        };
        let node = match self.by_id_root.get() {
            Some(node) => Arc::clone(node),
            None => {
                let node = self.trees.by_id.root_node(&self.file, root.pointer)?;
                Arc::clone(self.by_id_root.get_or_init(|| node))
            }
        };
        Ok(Some((root.pointer, node)))
    }

    /// Infos of several documents; `ids` must be sorted and unique.
    pub fn doc_infos(&self, ids: &[&[u8]]) -> Result<Vec<Option<DocInfo>>> {
        let mut infos = vec![None; ids.len()];
        self.trees.by_id.lookup_each_from(
            &self.file,
            self.by_id_root_node()?,
            ids,
            &mut |index, value| {
                // Decoded from the leaf's bytes: no copy of the value first.
                infos[index] = Some(self.decode_by_id(ids[index], value)?);
                Ok(())
            },
        )?;
        Ok(infos)
    }

    /// Infos of several documents, `ids` in any order and possibly
    /// repeated, returned in `ids`' order: one walk of the by-id tree over
    /// the sorted, unique ids, which reads each node their paths share once
    /// (couchstore's `docinfos_by_id`). Each info is moved to the last of
    /// its id's places and copied only to the others.
    pub fn doc_infos_in_order(&self, ids: &[&[u8]]) -> Result<Vec<Option<DocInfo>>> {
        // The by-id order is bytewise.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_unstable_by(|&a, &b| ids[a].cmp(ids[b]));
        let mut unique: Vec<&[u8]> = Vec::with_capacity(ids.len());
        // Each place's index in `unique`, and how many places each has.
        let mut unique_of = vec![0usize; ids.len()];
        let mut places: Vec<usize> = Vec::with_capacity(ids.len());
        for &i in &order {
            if unique.last() != Some(&ids[i]) {
                unique.push(ids[i]);
                places.push(0);
            }
            let u = unique.len() - 1;
            unique_of[i] = u;
            places[u] += 1;
        }
        let mut infos = self.doc_infos(&unique)?;
        Ok(unique_of
            .iter()
            .map(|&u| {
                places[u] -= 1;
                if places[u] == 0 {
                    infos[u].take()
                } else {
                    infos[u].clone()
                }
            })
            .collect())
    }

    fn decode_by_id(&self, id: &[u8], value: &[u8]) -> Result<DocInfo> {
        DocInfo::decode_by_id(id, value).map_err(|e| self.located(e))
    }

    fn decode_by_seq(&self, key: &[u8], value: &[u8]) -> Result<DocInfo> {
        DocInfo::decode_by_seq(key, value).map_err(|e| self.located(e))
    }

    /// A decoding error of an index value, located at this snapshot's file
    /// and header.
    fn located(&self, e: couchfile::Error) -> Error {
        e.located(self.file.path(), self.header.offset).into()
    }

    /// Info of the document with sequence number `seq`.
    pub fn doc_info_by_seq(&self, seq: u64) -> Result<Option<DocInfo>> {
        let key = encode_seq_key(seq)?;
        let mut v = self.trees.by_seq.lookup(
            &self.file,
            self.header.header.by_seq_root.as_ref(),
            &[&key],
        )?;
        v.pop()
            .flatten()
            .map(|v| self.decode_by_seq(&key, &v))
            .transpose()
    }

    /// The body of a document, decompressed; `None` when it has none.
    pub fn read_body(&self, info: &DocInfo) -> Result<Option<Vec<u8>>> {
        self.read_body_at(info.bp, info.is_compressed())
    }

    /// The body stored at `bp` (0: none), decompressed if `compressed`.
    pub fn read_body_at(&self, bp: u64, compressed: bool) -> Result<Option<Vec<u8>>> {
        if bp == 0 {
            return Ok(None);
        }
        Ok(Some(if compressed {
            self.file.read_compressed_chunk(bp)?
        } else {
            self.file.read_chunk(bp)?
        }))
    }

    /// Asks for the memory of the body stored at `bp` (0: none), for a
    /// [`Snapshot::read_body_at`] after other work
    /// ([`CouchFile::prefetch_chunk`]: only a hint).
    pub fn prefetch_body(&self, bp: u64) {
        if bp != 0 {
            self.file.prefetch_chunk(bp);
        }
    }

    /// The body chunk's payload as stored (compressed stays compressed).
    pub fn read_stored_body(&self, info: &DocInfo) -> Result<Option<Vec<u8>>> {
        if info.bp == 0 {
            return Ok(None);
        }
        Ok(Some(self.file.read_chunk(info.bp)?))
    }

    /// [`Snapshot::read_stored_body`] through `reader`, for bodies read in
    /// ascending file order (a by-seq walk).
    pub fn read_stored_body_sequential(
        &self,
        info: &DocInfo,
        reader: &mut SequentialReader,
    ) -> Result<Option<Vec<u8>>> {
        if info.bp == 0 {
            return Ok(None);
        }
        Ok(Some(reader.read_chunk(&self.file, info.bp)?))
    }

    /// [`Snapshot::read_stored_body_sequential`], keeping the checksum the
    /// body was checked against (for [`couchfile::FileWriter::append_checked_chunk`]).
    pub fn read_checked_body_sequential(
        &self,
        info: &DocInfo,
        reader: &mut SequentialReader,
    ) -> Result<Option<couchfile::CheckedChunk>> {
        if info.bp == 0 {
            return Ok(None);
        }
        Ok(Some(reader.read_checked_chunk(&self.file, info.bp)?))
    }

    /// Calls `f` with every document whose seq is `since` or later, in seq
    /// order (couchstore's `changes_since`: the start is inclusive).
    pub fn changes_since(
        &self,
        since: u64,
        filter: ChangesFilter,
        f: &mut dyn FnMut(DocInfo) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let start = encode_seq_key(since.min(MAX_U48))?;
        self.trees.by_seq.fold(
            &self.file,
            self.header.header.by_seq_root.as_ref(),
            Bound::Included(&start),
            Bound::Unbounded,
            &mut |k, v| {
                let info = self.decode_by_seq(k, v)?;
                let wanted = match filter {
                    ChangesFilter::All => true,
                    ChangesFilter::NoDeletes => !info.deleted,
                    ChangesFilter::DeletesOnly => info.deleted,
                };
                if wanted {
                    f(info)
                } else {
                    Ok(ControlFlow::Continue(()))
                }
            },
        )
    }

    /// Calls `f` with every document whose id is within the bounds, in id order.
    pub fn docs_by_id(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        f: &mut dyn FnMut(DocInfo) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        self.trees.by_id.fold(
            &self.file,
            self.header.header.by_id_root.as_ref(),
            start,
            end,
            &mut |k, v| f(self.decode_by_id(k, v)?),
        )
    }

    /// How many documents (deletions included) have a seq in
    /// `[min_seq, max_seq]`, from the reduce values.
    pub fn count_changes(&self, min_seq: u64, max_seq: u64) -> Result<u64> {
        if min_seq > max_seq {
            return Ok(0);
        }
        let lo = encode_seq_key(min_seq.min(MAX_U48))?;
        let hi = encode_seq_key(max_seq.min(MAX_U48))?;
        let r = self.trees.by_seq.reduce_range(
            &self.file,
            self.header.header.by_seq_root.as_ref(),
            Bound::Included(&lo),
            Bound::Included(&hi),
        )?;
        decode_seq_reduce(&r)
    }

    /// The value of local document `id`.
    pub fn local_doc(&self, id: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .trees
            .local
            .lookup(&self.file, self.header.header.local_root.as_ref(), &[id])?
            .pop()
            .flatten())
    }

    /// Calls `f` with every local document (id, value) in id order.
    pub fn local_docs(&self, f: &mut EntryFn<'_>) -> Result<()> {
        self.trees.local.fold(
            &self.file,
            self.header.header.local_root.as_ref(),
            Bound::Unbounded,
            Bound::Unbounded,
            f,
        )
    }
}

/// The body of a document to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// No body (a deletion without one).
    None,
    /// The body's bytes; stored snappy-compressed when the update's
    /// `content_meta` has [`CONTENT_META_COMPRESSED`].
    Plain(Vec<u8>),
    /// The chunk payload exactly as it is to be stored (already compressed
    /// if `content_meta` says so): written verbatim, as compaction copies.
    Stored(Vec<u8>),
}

/// One document to save in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocUpdate {
    /// The key.
    pub id: Vec<u8>,
    /// Keep this sequence number (`None`: assign the next one). A kept seq
    /// must not belong to another document already in the file: the by-seq
    /// entry of that document would be replaced (the caller, which assigns
    /// seqs, guarantees this, as kv-engine does).
    pub seq: Option<u64>,
    /// Revision number; with [`DocUpdate::rev_seq_above_stored`], how far
    /// above the stored one.
    pub rev_seq: u64,
    /// The revision is `rev_seq` above the one the file holds for the id (0
    /// when it holds none), at most 2^48 - 1: for a writer that does not
    /// track revisions (the vbucket's automatic ones). The stored revision
    /// is read by the same walk that replaces it.
    pub rev_seq_above_stored: bool,
    /// Revision metadata (kv-engine: [`couchfile::RevMeta`]).
    pub rev_meta: Vec<u8>,
    /// True for a deletion.
    pub deleted: bool,
    /// Content flags; [`CONTENT_META_COMPRESSED`] stores the body compressed.
    pub content_meta: u8,
    /// The body.
    pub body: Body,
}

/// What [`Db::save_docs`] did with one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedDoc {
    /// Its sequence number.
    pub seq: u64,
    /// Its revision.
    pub rev_seq: u64,
    /// The revision the file held for its id before (`None`: no entry).
    pub stored_rev_seq: Option<u64>,
}

/// The revision `increment` above `stored` (0 when the file holds none),
/// at most 2^48 - 1 ([`DocUpdate::rev_seq_above_stored`]).
fn rev_above(stored: Option<u64>, increment: u64) -> u64 {
    stored.unwrap_or(0).saturating_add(increment).min(MAX_U48)
}

/// [`ValuePatch`](crate::ValuePatch) of a by-id value whose revision is an
/// increment: adds the revision of the value it replaces.
fn add_stored_rev(old: Option<&[u8]>, new: &mut [u8]) -> Result<()> {
    let stored = match old {
        Some(old) => Some(DocInfoRef::decode_by_id(&[], old)?.rev_seq),
        None => None,
    };
    let increment = DocInfoRef::decode_by_id(&[], new)?.rev_seq;
    DocInfo::patch_by_id_rev_seq(new, rev_above(stored, increment))?;
    Ok(())
}

/// One local document to set (`Some`) or remove (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUpdate {
    /// The id, such as `_local/vbstate`.
    pub id: Vec<u8>,
    /// The new value, or `None` to remove it.
    pub value: Option<Vec<u8>>,
}

/// How to open or create a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbOptions {
    /// How to treat a corrupt last header.
    pub mode: OpenMode,
    /// Node size rules for the trees written.
    pub nodes: NodeConfig,
    /// Disk version of a new file (14; 11 for CRC-32 files).
    pub new_file_version: u8,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            mode: OpenMode::Normal,
            nodes: NodeConfig::default(),
            new_file_version: couchfile::CURRENT_DISK_VERSION,
        }
    }
}

/// The writer of one couchstore file: applies batches of documents and
/// commits headers. Only one may exist per file; readers use [`Snapshot`]s.
#[derive(Debug)]
pub struct Db {
    writer: FileWriter,
    trees: Trees,
    committed: LocatedHeader,
    pending: DbHeader,
}

fn sorted_unique<T>(items: &[T], key: impl Fn(&T) -> &[u8]) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| key(&items[a]).cmp(key(&items[b])));
    for pair in order.windows(2) {
        if key(&items[pair[0]]) == key(&items[pair[1]]) {
            return Err(Error::UnsortedOrDuplicate {
                key: String::from_utf8_lossy(key(&items[pair[1]])).into_owned(),
                index: pair[1],
            });
        }
    }
    Ok(order)
}

impl Db {
    /// Opens `file` at its last valid header, or, if it is empty, creates
    /// it with an empty header at offset 0.
    pub fn open(file: CouchFile, options: &DbOptions) -> Result<Self> {
        let _span = tracing::debug_span!("open_db", path = %file.path().display()).entered();
        match file.find_last_header(options.mode)? {
            Some(header) => Self::at_header(file, header, options),
            None => {
                let header = DbHeader::new(options.new_file_version);
                let (writer, offset) = FileWriter::create(file, &header)?;
                let committed = LocatedHeader { offset, header };
                Ok(Self::from_writer(writer, committed, options.nodes))
            }
        }
    }

    /// Opens `file` at its last valid header; [`couchfile::Error::NoHeader`]
    /// when it has none (an empty file too: unlike [`Db::open`], this never
    /// starts a file).
    pub fn open_existing(file: CouchFile, options: &DbOptions) -> Result<Self> {
        let _span = tracing::debug_span!("open_db", path = %file.path().display()).entered();
        match file.find_last_header(options.mode)? {
            Some(header) => Self::at_header(file, header, options),
            None => Err(couchfile::Error::NoHeader {
                path: file.path().to_path_buf(),
            }
            .into()),
        }
    }

    /// `file` opened for appending after its valid header `header`.
    fn at_header(mut file: CouchFile, header: LocatedHeader, options: &DbOptions) -> Result<Self> {
        file.set_crc(CrcKind::for_version(header.header.disk_version));
        Ok(Self::from_writer(
            FileWriter::new(file)?,
            header,
            options.nodes,
        ))
    }

    /// Wraps a writer positioned after a file prepared by
    /// [`FileWriter::create_without_header`] or after a committed header;
    /// `header` becomes the starting state (a compaction target).
    pub fn from_writer(writer: FileWriter, header: LocatedHeader, nodes: NodeConfig) -> Self {
        Self {
            writer,
            trees: Trees::new(nodes),
            pending: header.header.clone(),
            committed: header,
        }
    }

    /// A snapshot at the last committed header.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::new(self.writer.file().clone(), self.committed.clone())
    }

    /// The last committed header and its offset.
    pub fn committed(&self) -> &LocatedHeader {
        &self.committed
    }

    /// The header the next commit writes (roots as of the last save).
    pub fn pending(&self) -> &DbHeader {
        &self.pending
    }

    /// Mutable access to the next header's counters (purge seq, update seq).
    pub fn pending_mut(&mut self) -> &mut DbHeader {
        &mut self.pending
    }

    /// The writer (for appending raw chunks, as compaction does).
    pub fn writer_mut(&mut self) -> &mut FileWriter {
        &mut self.writer
    }

    /// Whether [`Db::save`] may modify a large batch's trees on two threads
    /// (the default; see [`BTree::set_parallel_modifies`]). Background
    /// writers, such as a compaction's catch-up beside the flusher, turn it
    /// off so that they do not occupy the threads a commit waits for.
    pub fn set_parallel_modifies(&mut self, parallel: bool) {
        self.trees.by_id.set_parallel_modifies(parallel);
        self.trees.by_seq.set_parallel_modifies(parallel);
        self.trees.local.set_parallel_modifies(parallel);
    }

    /// Whether [`Db::save`] may modify on two threads
    /// ([`Db::set_parallel_modifies`]).
    pub fn parallel_modifies(&self) -> bool {
        self.trees.by_id.parallel_modifies()
    }

    /// The node size rules of the trees this db writes.
    pub fn node_config(&self) -> NodeConfig {
        self.trees.by_id.config()
    }

    /// Applies one batch: writes the bodies, then updates the by-id, by-seq
    /// and local trees. Nothing is durable until [`Db::commit`]. Document
    /// ids must be unique within the batch (deduplicating is the caller's
    /// job), as must local ids. Returns the sequence number of each document.
    /// On error the pending state is unchanged (bytes appended are garbage
    /// that the next commit leaves unreferenced).
    pub fn save(&mut self, docs: &[DocUpdate], locals: &[LocalUpdate]) -> Result<Vec<u64>> {
        Ok(self
            .save_docs(docs, locals)?
            .into_iter()
            .map(|saved| saved.seq)
            .collect())
    }

    /// [`Db::save`], returning what was saved of each document: its seq,
    /// its revision and the revision it replaced.
    pub fn save_docs(
        &mut self,
        docs: &[DocUpdate],
        locals: &[LocalUpdate],
    ) -> Result<Vec<SavedDoc>> {
        let _span =
            tracing::trace_span!("save", docs = docs.len(), locals = locals.len()).entered();
        // The batch's documents and local documents in id order, the order
        // of their trees' modifies.
        let by_id_order = sorted_unique(docs, |d| &d.id)?;
        let locals_order = sorted_unique(locals, |l| &l.id)?;
        let mut update_seq = self.pending.update_seq;
        let mut infos = Vec::with_capacity(docs.len());
        for doc in docs {
            let seq = match doc.seq {
                Some(seq) => seq,
                None => update_seq + 1,
            };
            if seq == 0 || seq > MAX_U48 {
                return Err(Error::InvalidArgument(format!("sequence number {seq}")));
            }
            update_seq = update_seq.max(seq);
            let (bp, physical_size) = match &doc.body {
                Body::None => (0, 0),
                Body::Plain(body) if doc.content_meta & CONTENT_META_COMPRESSED != 0 => {
                    let pos = self.writer.append_compressed_chunk(body)?;
                    (pos.offset, pos.disk_size)
                }
                Body::Plain(body) | Body::Stored(body) => {
                    let pos = self.writer.append_chunk(body)?;
                    (pos.offset, pos.disk_size)
                }
            };
            infos.push(DocInfo {
                id: doc.id.clone(),
                db_seq: seq,
                rev_seq: doc.rev_seq,
                rev_meta: doc.rev_meta.clone(),
                deleted: doc.deleted,
                content_meta: doc.content_meta,
                bp,
                physical_size,
            });
        }
        // by-id, in id order: fetch the old entries (their seqs leave the
        // by-seq tree, their revisions are the stored ones) while inserting
        // the new ones.
        let id_values: Vec<Vec<u8>> = by_id_order
            .iter()
            .map(|&i| infos[i].encode_by_id_value())
            .collect::<couchfile::Result<_>>()?;
        let id_actions: Vec<Action<'_>> = by_id_order
            .iter()
            .zip(&id_values)
            .map(|(&i, value)| Action {
                key: &docs[i].id,
                op: if docs[i].rev_seq_above_stored {
                    ActionOp::FetchInsertPatched(value, add_stored_rev)
                } else {
                    ActionOp::FetchInsert(value)
                },
            })
            .collect();
        let mut old_seqs = Vec::new();
        // The stored revision of each document, in id order: every action
        // fetches, so the callback runs once per action, in order.
        let mut stored_revs: Vec<Option<u64>> = Vec::with_capacity(docs.len());
        let path = self.writer.file().path().to_path_buf();
        let by_id_root = self.trees.by_id.modify(
            &mut self.writer,
            self.pending.by_id_root.as_ref(),
            &id_actions,
            &mut |id, old| {
                let stored = match old {
                    Some(old) => {
                        let info =
                            DocInfoRef::decode_by_id(id, old).map_err(|e| e.located(&path, 0))?;
                        old_seqs.push(info.db_seq);
                        Some(info.rev_seq)
                    }
                    None => None,
                };
                stored_revs.push(stored);
                Ok(())
            },
        )?;
        let mut saved: Vec<SavedDoc> = infos
            .iter()
            .map(|info| SavedDoc {
                seq: info.db_seq,
                rev_seq: info.rev_seq,
                stored_rev_seq: None,
            })
            .collect();
        // Invariant: the modify fetched every action once (checked, not
        // assumed, since a short count would misplace revisions).
        if stored_revs.len() != docs.len() {
            return Err(Error::InvalidArgument(format!(
                "the by-id modify fetched {} of {} documents",
                stored_revs.len(),
                docs.len()
            )));
        }
        for (&i, stored) in by_id_order.iter().zip(stored_revs) {
            saved[i].stored_rev_seq = stored;
            if docs[i].rev_seq_above_stored {
                let rev = rev_above(stored, docs[i].rev_seq);
                infos[i].rev_seq = rev;
                saved[i].rev_seq = rev;
            }
        }
        // by-seq: remove superseded seqs, insert the new ones.
        let mut new_seqs: Vec<u64> = infos.iter().map(|i| i.db_seq).collect();
        new_seqs.sort_unstable();
        if new_seqs.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(Error::InvalidArgument(
                "two documents of the batch have the same sequence number".into(),
            ));
        }
        let mut seq_entries: Vec<([u8; 6], Option<Vec<u8>>)> =
            Vec::with_capacity(old_seqs.len() + infos.len());
        for seq in old_seqs
            .into_iter()
            .filter(|s| new_seqs.binary_search(s).is_err())
        {
            seq_entries.push((encode_seq_key(seq)?, None));
        }
        for info in &infos {
            seq_entries.push((
                encode_seq_key(info.db_seq)?,
                Some(info.encode_by_seq_value()?),
            ));
        }
        // Keys are unique but for a forged file's repeated seq, which the
        // modify then refuses: the order among equal keys does not matter.
        seq_entries.sort_unstable_by_key(|e| e.0);
        let seq_actions: Vec<Action<'_>> = seq_entries
            .iter()
            .map(|(k, v)| Action::put_or_remove(k, v.as_deref()))
            .collect();
        let by_seq_root = self.trees.by_seq.modify(
            &mut self.writer,
            self.pending.by_seq_root.as_ref(),
            &seq_actions,
            &mut |_, _| Ok(()),
        )?;
        let local_actions: Vec<Action<'_>> = locals_order
            .iter()
            .map(|&i| Action::put_or_remove(&locals[i].id, locals[i].value.as_deref()))
            .collect();
        let local_root = self.trees.local.modify(
            &mut self.writer,
            self.pending.local_root.as_ref(),
            &local_actions,
            &mut |_, _| Ok(()),
        )?;
        self.pending.by_id_root = by_id_root;
        self.pending.by_seq_root = by_seq_root;
        self.pending.local_root = local_root;
        self.pending.update_seq = update_seq;
        Ok(saved)
    }

    /// Commits the pending header (durably: two syncs) with `timestamp` as
    /// its commit time, and returns its offset.
    pub fn commit(&mut self, timestamp: u64) -> Result<u64> {
        let _span = tracing::debug_span!("commit", update_seq = self.pending.update_seq).entered();
        let mut header = self.pending.clone();
        header.timestamp = if header.disk_version >= 13 {
            timestamp
        } else {
            0
        };
        header.prev_header_pos = (header.disk_version >= 14).then_some(self.committed.offset);
        let offset = self.writer.commit(&header)?;
        self.pending = header.clone();
        self.committed = LocatedHeader { offset, header };
        Ok(offset)
    }

    /// Makes `header`, an older header of this file, the pending one, so
    /// that the next [`Db::commit`] commits it again as the newest (with a
    /// new timestamp and `prev_header_pos`): couchstore's
    /// `couchstore_rewind_db_header` followed by a commit. Anything saved
    /// since the last commit is forgotten. Fails when `header` is of
    /// another disk version than the file's last header.
    pub fn rewind_to(&mut self, header: &DbHeader) -> Result<()> {
        if header.disk_version != self.committed.header.disk_version {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind a version {} file to a version {} header",
                self.committed.header.disk_version, header.disk_version
            )));
        }
        self.pending = header.clone();
        Ok(())
    }

    /// Forgets everything saved since the last commit.
    pub fn rollback_pending(&mut self) {
        self.pending = self.committed.header.clone();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use couchfile::{ChunkCache, MemBackend};

    /// A committed file of 3,000 documents on a cached in-memory file.
    fn cached_db(capacity: u64) -> (Arc<ChunkCache>, Db) {
        let cache = Arc::new(ChunkCache::new(capacity));
        let file = CouchFile::new(Arc::new(MemBackend::new()), "root.couch")
            .unwrap()
            .with_cache(Arc::clone(&cache));
        let mut db = Db::open(file, &DbOptions::default()).unwrap();
        let docs: Vec<DocUpdate> = (0..3000u32)
            .map(|i| DocUpdate {
                id: format!("key{i:05}").into_bytes(),
                seq: None,
                rev_seq: 1,
                rev_seq_above_stored: false,
                rev_meta: vec![],
                deleted: false,
                content_meta: 0,
                body: Body::Plain(i.to_be_bytes().to_vec()),
            })
            .collect();
        db.save(&docs, &[]).unwrap();
        db.commit(1).unwrap();
        (cache, db)
    }

    #[test]
    fn a_snapshot_and_its_clones_look_its_root_up_in_the_cache_once() {
        let (cache, db) = cached_db(64 << 20);
        let snapshot = db.snapshot();
        let seq_of = |s: &Snapshot, id: &[u8]| s.with_doc_info(id, |info| info.db_seq).unwrap();
        let all = || (0..3000u32).map(|i| (format!("key{i:05}"), u64::from(i) + 1));
        // The first round links every node below the root.
        for (id, seq) in all() {
            assert_eq!(seq_of(&snapshot, id.as_bytes()), Some(seq));
        }
        let before = cache.hits_and_misses();
        let clone = snapshot.clone();
        for (id, seq) in all() {
            assert_eq!(seq_of(&snapshot, id.as_bytes()), Some(seq));
            assert_eq!(seq_of(&clone, id.as_bytes()), Some(seq));
        }
        assert_eq!(seq_of(&clone, b"key3"), None);
        // Batched lookups start from the same root.
        let ids: Vec<String> = all().map(|(id, _)| id).step_by(7).collect();
        let ids: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
        let infos = clone.doc_infos(&ids).unwrap();
        assert!(infos.iter().all(Option::is_some));
        // 6,001 lookups and a batch, none of them of the root in the cache.
        let hits = before.0;
        assert_eq!(cache.hits_and_misses(), before);
        // A new snapshot reads its root once.
        let fresh = db.snapshot();
        assert_eq!(seq_of(&fresh, b"key00007"), Some(8));
        assert_eq!(cache.hits_and_misses().0, hits + 1);
    }

    #[test]
    fn a_kept_root_serves_lookups_after_the_cache_evicts_it() {
        // Far too small for the tree: every node is evicted again and
        // again, the kept root stays.
        let (cache, db) = cached_db(4 << 10);
        let snapshot = db.snapshot();
        for round in 0..2 {
            for i in (0..3000u32).step_by(13) {
                let id = format!("key{i:05}");
                let seq = snapshot.with_doc_info(id.as_bytes(), |info| info.db_seq);
                assert_eq!(seq.unwrap(), Some(u64::from(i) + 1), "round {round}");
            }
        }
        assert!(cache.stats().evictions > 0);
        let stats = cache.stats();
        assert!(stats.used <= stats.capacity, "{stats:?}");
    }
}
