//! Vbucket file names (`<vbid>.couch.<rev>`, `<vbid>.couch.<rev>.compact`)
//! and recovery at open: the newest complete revision wins, everything else
//! of the vbucket is removed.

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

/// Parses `<vbid>.couch.<rev>` and `<vbid>.couch.<rev>.compact[...]`;
/// `None` for any other name.
pub(crate) fn parse_name(name: &str) -> Option<(Vbid, VbFile)> {
    let (vbid, rest) = name.split_once(".couch.")?;
    // `.compact` and anything after it (the compactor's sort runs) belong
    // to a compaction that will produce revision `rev`.
    let (rev, compact) = match rest.find(".compact") {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(vbid) || !digits(rev) {
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

/// Opens `file` at its last valid header; `None` when it has none (an
/// empty file, or one whose first header never became durable).
fn last_header(file: &CouchFile, options: &DbOptions) -> Result<Option<LocatedHeader>> {
    match file.find_last_header(options.mode) {
        Ok(found) => Ok(found),
        Err(couchfile::Error::NoHeader { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens a file of `dir` as a [`CouchFile`] named by its path, reading its
/// nodes through the store's node cache.
pub(crate) fn open_file(dir: &dyn Directory, name: &str, options: &VbOptions) -> Result<CouchFile> {
    let path = dir.path().join(name);
    let backend = dir.open(name).map_err(|e| Error::io(&path, "open", e))?;
    Ok(with_cache(CouchFile::new(backend, path)?, options))
}

/// `file` reading and writing its nodes through the store's node cache, if
/// it has one.
pub(crate) fn with_cache(file: CouchFile, options: &VbOptions) -> CouchFile {
    match &options.node_cache {
        Some(cache) => file.with_cache(Arc::clone(cache)),
        None => file,
    }
}

/// Opens the newest complete revision of `vbid` (creating revision 1 when
/// there is none), and removes its other revisions and compaction leftovers.
pub(crate) fn open_newest_revision(
    dir: &dyn Directory,
    vbid: Vbid,
    vb_options: &VbOptions,
) -> Result<OpenedRevision> {
    let options = &vb_options.db;
    let _span = tracing::info_span!("recovery", vbid).entered();
    let names = dir.list().map_err(|e| Error::io(dir.path(), "list", e))?;
    let mut files: Vec<(VbFile, &String)> = names
        .iter()
        .filter_map(|n| match parse_name(n) {
            Some((v, kind)) if v == vbid => Some((kind, n)),
            _ => None,
        })
        .collect();
    let mut revisions: Vec<u64> = files
        .iter()
        .filter_map(|(kind, _)| match kind {
            VbFile::Revision(rev) => Some(*rev),
            VbFile::Compact(_) => None,
        })
        .collect();
    revisions.sort_unstable_by(|a, b| b.cmp(a));
    let mut chosen = None;
    for rev in revisions {
        let mut file = open_file(dir, &revision_name(vbid, rev), vb_options)?;
        if file.len()? == 0 {
            tracing::info!(vbid, rev, "revision is empty: incomplete");
            continue;
        }
        match last_header(&file, options)? {
            Some(header) => {
                file.set_crc(CrcKind::for_version(header.header.disk_version));
                tracing::info!(vbid, rev, header = header.offset, "opening revision");
                chosen = Some((rev, file, header));
                break;
            }
            None => tracing::info!(vbid, rev, "revision has no valid header: incomplete"),
        }
    }
    // Everything but the chosen revision goes: older revisions a crash left
    // behind after a compaction's rename, incomplete ones, and .compact files.
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
                with_cache(CouchFile::new(backend, path)?, vb_options),
                options,
            )?;
            tracing::info!(vbid, "created revision 1");
            OpenedRevision { revision: 1, db }
        }
    };
    if !files.is_empty() || created {
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
        for bad in [
            "x.couch.1",
            "1.couch.",
            "1.couch.1x",
            ".couch.1",
            "70000.couch.1",
            "stats.json",
            couchfile::LOCK_FILE_NAME,
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
