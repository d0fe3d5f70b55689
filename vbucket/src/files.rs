//! Vbucket file names (`<vbid>.couch.<rev>`, `<vbid>.couch.<rev>.compact`)
//! and recovery at open: the newest revision wins and the vbucket's other
//! files are removed, unless that revision is damaged ([`DamagedFiles`]).

use crate::error::{Error, Result};
use crate::vbucket::VbOptions;
use btree::{Db, DbOptions};
use couchfile::{CouchFile, CrcKind, Directory, FileWriter, LocatedHeader};
use flusher::Vbid;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Name of revision `rev` of vbucket `vbid`.
pub fn revision_name(vbid: Vbid, rev: u64) -> String {
    format!("{vbid}.couch.{rev}")
}

/// Name of the compaction target that will become revision `rev`.
pub fn compact_name(vbid: Vbid, rev: u64) -> String {
    format!("{}.compact", revision_name(vbid, rev))
}

/// What a file name in the data directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VbFile {
    /// A revision.
    Revision(u64),
    /// A compaction target (complete or not).
    Compact(u64),
}

/// Parses `<vbid>.couch.<rev>` and `<vbid>.couch.<rev>.compact[.<any>]`,
/// the numbers written as [`revision_name`] writes them (decimal, no
/// leading zero); `None` for any other name. The store opens and removes
/// only files of these names: another name (`00.couch.1`, `0.couch.01`)
/// is not one of its files, and is never touched.
pub(crate) fn parse_name(name: &str) -> Option<(Vbid, VbFile)> {
    let (vbid, rest) = name.split_once(".couch.")?;
    // `.compact` and what follows it after a dot (the compactor's sort
    // runs) belong to a compaction that will produce revision `rev`.
    let (rev, compact) = match rest.split_once(".compact") {
        Some((rev, after)) if after.is_empty() || after.starts_with('.') => (rev, true),
        Some(_) => return None,
        None => (rest, false),
    };
    let canonical = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    };
    if !canonical(vbid) || !canonical(rev) {
        return None;
    }
    let vbid: Vbid = vbid.parse().ok()?;
    let rev: u64 = rev.parse().ok()?;
    Some((
        vbid,
        if compact {
            VbFile::Compact(rev)
        } else {
            VbFile::Revision(rev)
        },
    ))
}

/// The vbuckets that have files in `dir`.
pub(crate) fn vbids_in(dir: &dyn Directory) -> Result<BTreeSet<Vbid>> {
    let names = dir.list().map_err(|e| Error::io(dir.path(), "list", e))?;
    Ok(names
        .iter()
        .filter_map(|n| parse_name(n).map(|(vbid, _)| vbid))
        .collect())
}

/// A vbucket's file opened for writing at its last valid header.
pub(crate) struct OpenedRevision {
    pub(crate) revision: u64,
    pub(crate) db: Db,
}

/// What the search for a revision's last valid header found.
enum LastHeader {
    Found(LocatedHeader),
    /// No header: an empty file, or one without a header block.
    Missing,
    /// Bytes that no write of the file protocol leaves, met before any
    /// valid header (a block type byte other than data's or a header's, a
    /// header block failing its checksum), as the search's error says: the
    /// file is damaged, whatever its size.
    Corrupt(String),
}

/// Looks for the last valid header of `file`. A failing device is an error;
/// damage in the file's bytes is [`LastHeader::Corrupt`], for the open to
/// handle as [`DamagedFiles`] says.
fn last_header(file: &CouchFile, options: &DbOptions) -> Result<LastHeader> {
    match file.find_last_header(options.mode) {
        Ok(Some(found)) => Ok(LastHeader::Found(found)),
        Ok(None) | Err(couchfile::Error::NoHeader { .. }) => Ok(LastHeader::Missing),
        Err(e) if e.is_corruption() => Ok(LastHeader::Corrupt(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Opens a file of `dir` as a [`CouchFile`] named by its path, with the
/// store's node cache and background syncs ([`with_store_services`]).
pub(crate) fn open_file(dir: &dyn Directory, name: &str, options: &VbOptions) -> Result<CouchFile> {
    let path = dir.path().join(name);
    let backend = dir.open(name).map_err(|e| Error::io(&path, "open", e))?;
    Ok(with_store_services(CouchFile::new(backend, path)?, options))
}

/// `file` reading and writing its nodes through the store's node cache and
/// its writers syncing through the store's background syncs, for those the
/// store has.
pub(crate) fn with_store_services(file: CouchFile, options: &VbOptions) -> CouchFile {
    with_writeback(with_cache(file, options), options)
}

/// `file` reading and writing its nodes through the store's node cache, if
/// it has one.
pub(crate) fn with_cache(file: CouchFile, options: &VbOptions) -> CouchFile {
    match &options.node_cache {
        Some(cache) => file.with_cache(Arc::clone(cache)),
        None => file,
    }
}

/// `file` with its writers syncing through the store's background syncs,
/// if on. Not for a compaction's target, whose copy syncs as its
/// [`compactor::CompactionConfig`] says, but for its file once it is the
/// vbucket's revision.
pub(crate) fn with_writeback(file: CouchFile, options: &VbOptions) -> CouchFile {
    match &options.writeback {
        Some(writeback) => file.with_writeback(writeback.clone()),
        None => file,
    }
}

/// What opening a vbucket does with a damaged revision file: one that
/// holds no valid header where the file protocol says it must have one,
/// or whose search for its last header meets bytes the protocol never
/// writes (a corrupt block or header).
///
/// A revision gets its name only once it has a durable header: revision 1
/// is created empty and commits its first header at offset 0 before
/// anything else is written to it, and a compaction names its `.compact`
/// file revision `rev + 1` only after that file's last header was synced
/// (and removes the older revision only after the rename is durable). So
/// the one headerless revision a crash can leave is an interrupted creation
/// of revision 1: shorter than a block ([`couchfile::BLOCK_SIZE`]) and the
/// vbucket's only file. It is opened as a new, empty vbucket. Any other
/// revision without a valid header (a file cut short, header blocks
/// overwritten, an empty newer revision) is damage, and acknowledged data
/// may be in it or next to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DamagedFiles {
    /// The open fails with [`Error::DamagedRevision`], naming the file, and
    /// every file of the vbucket is left byte for byte as it is: nothing is
    /// removed or created. The default.
    #[default]
    Fail,
    /// The damaged revision is renamed to `<name>.damaged` (or
    /// `<name>.damaged.<n>` when that is taken), a name the store ignores
    /// and never removes, with a warning in the log; the vbucket then opens
    /// as if the file were absent: from its newest older valid revision, or
    /// as a new, empty vbucket (a new failover entry) when it has none.
    /// Recovery to opt into once the file has been looked at or copied.
    MoveAside,
}

/// Why revision `rev` of a vbucket, `len` bytes with no valid header, is
/// damage; `None` when it is an interrupted creation of revision 1 (shorter
/// than a block, and the vbucket's only file: `vbucket_files` of them).
fn damage(rev: u64, len: u64, vbucket_files: usize) -> Option<String> {
    if rev == 1 && vbucket_files == 1 && len < couchfile::BLOCK_SIZE {
        return None;
    }
    let what = if len == 0 {
        "the file is empty".to_owned()
    } else {
        "no valid header (COUCHSTORE_ERROR_NO_HEADER)".to_owned()
    };
    let why = if len >= couchfile::BLOCK_SIZE {
        "a creation interrupted before its first header is shorter than a block".to_owned()
    } else if rev != 1 {
        format!("revision {rev} is only named once a compaction has synced a header into it")
    } else {
        format!(
            "an interrupted creation of revision 1 is the vbucket's only file, and it has {vbucket_files}"
        )
    };
    Some(format!(
        "{what}, and it cannot be an interrupted write: {why}"
    ))
}

/// A name for `name` moved aside that `names` does not hold.
fn aside_name(name: &str, names: &[String]) -> String {
    let taken = |candidate: &String| names.iter().any(|n| n == candidate);
    let first = format!("{name}.damaged");
    if !taken(&first) {
        return first;
    }
    (1u64..)
        .map(|n| format!("{name}.damaged.{n}"))
        .find(|candidate| !taken(candidate))
        .unwrap_or(first)
}

/// Opens the newest complete revision of `vbid` (creating revision 1 when
/// there is none), and removes its older revisions and compaction
/// leftovers. A revision without a valid header is damage unless it is an
/// interrupted creation of revision 1 ([`DamagedFiles`] says what then).
pub(crate) fn open_newest_revision(
    dir: &dyn Directory,
    vbid: Vbid,
    vb_options: &VbOptions,
) -> Result<OpenedRevision> {
    let options = &vb_options.db;
    let _span = tracing::info_span!("recovery", vbid).entered();
    let mut names = dir.list().map_err(|e| Error::io(dir.path(), "list", e))?;
    let mut files: Vec<(VbFile, String)> = names
        .iter()
        .filter_map(|n| match parse_name(n) {
            Some((v, kind)) if v == vbid => Some((kind, n.clone())),
            _ => None,
        })
        .collect();
    let vbucket_files = files.len();
    let mut revisions: Vec<u64> = files
        .iter()
        .filter_map(|(kind, _)| match kind {
            VbFile::Revision(rev) => Some(*rev),
            VbFile::Compact(_) => None,
        })
        .collect();
    revisions.sort_unstable_by(|a, b| b.cmp(a));
    let mut chosen = None;
    let mut moved_aside = false;
    for rev in revisions {
        let name = revision_name(vbid, rev);
        let mut file = open_file(dir, &name, vb_options)?;
        let len = file.len()?;
        let found = if len == 0 {
            LastHeader::Missing
        } else {
            last_header(&file, options)?
        };
        let damaged = match found {
            LastHeader::Found(header) => {
                file.set_crc(CrcKind::for_version(header.header.disk_version));
                tracing::info!(vbid, rev, header = header.offset, "opening revision");
                chosen = Some((rev, file, header));
                break;
            }
            LastHeader::Missing => damage(rev, len, vbucket_files),
            // Never an interrupted write, which leaves a header block's
            // marker byte unset rather than bad bytes.
            LastHeader::Corrupt(detail) => Some(format!("no valid header: {detail}")),
        };
        let Some(reason) = damaged else {
            tracing::info!(
                vbid,
                rev,
                len,
                "revision 1 has no header yet: an interrupted creation"
            );
            continue;
        };
        let path = dir.path().join(&name);
        match vb_options.damaged_files {
            DamagedFiles::Fail => {
                tracing::error!(file = %path.display(), len, %reason, "damaged revision: not opening the vbucket");
                return Err(Error::DamagedRevision {
                    path,
                    size: len,
                    reason,
                });
            }
            DamagedFiles::MoveAside => {
                let aside = aside_name(&name, &names);
                dir.rename(&name, &aside)
                    .map_err(|e| Error::io(&path, "rename a damaged revision aside", e))?;
                tracing::warn!(
                    file = %path.display(),
                    len,
                    %reason,
                    moved_to = %aside,
                    "damaged revision moved aside; opening the vbucket without it"
                );
                names.push(aside);
                files.retain(|(_, n)| *n != name);
                moved_aside = true;
            }
        }
    }
    // Everything but the chosen revision goes: older revisions a crash left
    // behind after a compaction's rename, an interrupted creation of
    // revision 1, and .compact files.
    let keep = chosen.as_ref().map(|(rev, _, _)| revision_name(vbid, *rev));
    files.retain(|(_, name)| Some(name.as_str()) != keep.as_deref());
    for (_, name) in &files {
        tracing::info!(vbid, file = %name, "removing a stale file");
        dir.remove(name)
            .map_err(|e| Error::io(dir.path().join(name), "remove", e))?;
    }
    let created = chosen.is_none();
    let opened = match chosen {
        Some((revision, file, header)) => OpenedRevision {
            revision,
            db: Db::from_writer(FileWriter::new(file)?, header, options.nodes),
        },
        None => {
            let name = revision_name(vbid, 1);
            let path = dir.path().join(&name);
            let backend = dir
                .create(&name)
                .map_err(|e| Error::io(&path, "create", e))?;
            let db = Db::open(
                with_store_services(CouchFile::new(backend, path)?, vb_options),
                options,
            )?;
            tracing::info!(vbid, "created revision 1");
            OpenedRevision { revision: 1, db }
        }
    };
    if !files.is_empty() || created || moved_aside {
        dir.sync()
            .map_err(|e| Error::io(dir.path(), "sync directory", e))?;
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(revision_name(12, 3), "12.couch.3");
        assert_eq!(compact_name(12, 4), "12.couch.4.compact");
        assert_eq!(parse_name("12.couch.3"), Some((12, VbFile::Revision(3))));
        assert_eq!(
            parse_name("12.couch.4.compact"),
            Some((12, VbFile::Compact(4)))
        );
        assert_eq!(
            parse_name("12.couch.4.compact.run3"),
            Some((12, VbFile::Compact(4)))
        );
        assert_eq!(parse_name("0.couch.0"), Some((0, VbFile::Revision(0))));
        assert_eq!(
            parse_name("10.couch.100"),
            Some((10, VbFile::Revision(100)))
        );
        for bad in [
            "x.couch.1",
            "1.couch.",
            "1.couch.1x",
            ".couch.1",
            "70000.couch.1",
            "stats.json",
            couchfile::LOCK_FILE_NAME,
            "3.couch.2.damaged",
            "3.couch.2.damaged.1",
            "00.couch.1",
            "01.couch.1",
            "1.couch.01",
            "1.couch.00",
            "1.couch.2.compactx",
            "1.couch.02.compact",
            "1.couch.2.x.compact",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_a_short_lone_revision_one_is_an_interrupted_creation() {
        assert_eq!(damage(1, 0, 1), None);
        assert_eq!(damage(1, 4095, 1), None);
        assert!(damage(1, 4096, 1).is_some());
        assert!(damage(1, 100, 2).is_some(), "not the only file");
        assert!(damage(2, 100, 1).is_some(), "a compaction's revision");
        assert!(damage(2, 0, 1).unwrap().contains("empty"));
    }

    #[test]
    fn names_moved_aside_are_free() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(aside_name("0.couch.2", &[]), "0.couch.2.damaged");
        assert_eq!(
            aside_name(
                "0.couch.2",
                &names(&["0.couch.2.damaged", "0.couch.2.damaged.1"])
            ),
            "0.couch.2.damaged.2"
        );
    }
}
