//! Fault injection: a backend wrapper that simulates crashes and I/O errors.
//!
//! A [`FaultController`] is shared by any number of [`FaultyBackend`]s (one per
//! file) and [`crate::FaultyDirectory`]s, so a test can count the mutating
//! operations (writes, truncates, syncs, creates, removes, renames and
//! directory syncs) of a whole workload across files and crash at the N-th one. After a
//! crash every operation on every backend of that controller fails, as if the
//! process had died; [`FaultyBackend::crash_image`] then gives the bytes a disk
//! would hold after the power came back: everything synced, plus optionally a
//! torn prefix of what was written after the last sync.
//!
//! Errors (ENOSPC, EIO) can be injected on any kind of operation without a
//! crash, for a number of times or until cleared.

use crate::backend::Backend;
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The kinds of backend and directory operation a fault can be aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `sync`.
    Sync,
    /// `len`.
    Len,
    /// `truncate`.
    Truncate,
    /// `link_count` (an `fstat`).
    Links,
    /// Directory `list`.
    List,
    /// Directory `open`.
    Open,
    /// Directory `create`.
    Create,
    /// Directory `remove`.
    Remove,
    /// Directory `rename`.
    Rename,
    /// Directory `sync`.
    SyncDir,
}

impl OpKind {
    /// Writes, truncates, syncs, creates, removes, renames and directory
    /// syncs: the operations a crash point counts.
    pub fn is_mutation(self) -> bool {
        match self {
            OpKind::Read | OpKind::Len | OpKind::Links | OpKind::List | OpKind::Open => false,
            OpKind::Write
            | OpKind::Sync
            | OpKind::Truncate
            | OpKind::Create
            | OpKind::Remove
            | OpKind::Rename
            | OpKind::SyncDir => true,
        }
    }
}

/// The error an injected fault produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// No space left on device (ENOSPC).
    NoSpace,
    /// Input/output error (EIO).
    Eio,
}

impl FaultKind {
    fn to_error(self) -> io::Error {
        match self {
            FaultKind::NoSpace => io::Error::from_raw_os_error(28),
            FaultKind::Eio => io::Error::from_raw_os_error(5),
        }
    }
}

/// One injected error: operations of kind `op` (or of any kind when `None`)
/// fail with `kind`, after `skip` of them have succeeded, `times` times (or
/// until cleared when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// The operations this rule applies to; `None` matches every kind.
    pub op: Option<OpKind>,
    /// The error to return.
    pub kind: FaultKind,
    /// How many matching operations succeed before the first failure.
    pub skip: u64,
    /// How many operations fail; `None` means until [`FaultController::clear_faults`].
    pub times: Option<u64>,
}

impl FaultRule {
    /// Every operation of kind `op` fails with `kind` until cleared.
    pub fn always(op: OpKind, kind: FaultKind) -> Self {
        Self {
            op: Some(op),
            kind,
            skip: 0,
            times: None,
        }
    }

    /// The next operation of kind `op` fails with `kind`, once.
    pub fn once(op: OpKind, kind: FaultKind) -> Self {
        Self {
            op: Some(op),
            kind,
            skip: 0,
            times: Some(1),
        }
    }
}

#[derive(Debug, Default)]
struct ControllerState {
    mutations: u64,
    crash_at: Option<u64>,
    crashed: bool,
    rules: Vec<FaultRule>,
    injected: u64,
}

/// Decides which operations of its backends fail. Cheap to clone; clones
/// share the same state.
#[derive(Debug, Clone, Default)]
pub struct FaultController {
    state: Arc<Mutex<ControllerState>>,
}

impl FaultController {
    /// A controller that injects nothing until told to.
    pub fn new() -> Self {
        Self::default()
    }

    /// Crash at the mutating operation numbered `n` (0 = the first mutation
    /// from now on, see [`OpKind::is_mutation`], counted across every backend
    /// and directory of this controller): that operation does not happen, and
    /// every later operation fails.
    pub fn crash_at(&self, n: u64) {
        let mut s = self.state.lock();
        s.crash_at = Some(s.mutations + n);
    }

    /// Crash now: every later operation fails.
    pub fn crash_now(&self) {
        self.state.lock().crashed = true;
    }

    /// Adds an error rule.
    pub fn inject(&self, rule: FaultRule) {
        self.state.lock().rules.push(rule);
    }

    /// Removes every error rule (a pending crash point stays).
    pub fn clear_faults(&self) {
        self.state.lock().rules.clear();
    }

    /// Mutating operations (see [`OpKind::is_mutation`]) seen so far.
    pub fn mutation_count(&self) -> u64 {
        self.state.lock().mutations
    }

    /// Errors injected so far (crashes not included).
    pub fn injected_count(&self) -> u64 {
        self.state.lock().injected
    }

    /// True once the simulated crash has happened.
    pub fn has_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Decides the fate of one operation: `Ok` lets it run.
    pub(crate) fn check(&self, op: OpKind) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.crashed {
            return Err(crashed_error());
        }
        if op.is_mutation() {
            let n = s.mutations;
            s.mutations += 1;
            if s.crash_at == Some(n) {
                s.crashed = true;
                return Err(crashed_error());
            }
        }
        let mut fail = None;
        for rule in s.rules.iter_mut() {
            if rule.op.is_some_and(|o| o != op) || rule.times == Some(0) {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if let Some(t) = rule.times.as_mut() {
                *t -= 1;
            }
            fail = Some(rule.kind);
            break;
        }
        match fail {
            Some(kind) => {
                s.injected += 1;
                Err(kind.to_error())
            }
            None => Ok(()),
        }
    }
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated crash")
}

/// How much of the writes issued after the last sync survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornTail {
    /// None of them: the disk holds exactly what was synced.
    Nothing,
    /// The first `n` bytes of them, in the order they were written (the last
    /// write may survive in part).
    Prefix(u64),
    /// All of them (the page cache reached the disk before the crash).
    Everything,
}

/// One mutation since the last sync, with what it replaced, so it can be undone.
#[derive(Debug)]
enum Unsynced {
    Write {
        offset: u64,
        old_len: u64,
        old: Vec<u8>,
        new: Vec<u8>,
    },
    Truncate {
        old_len: u64,
        old_tail: Vec<u8>,
        new_len: u64,
    },
}

/// A backend wrapper that fails operations as its [`FaultController`] says
/// and remembers unsynced writes, so that a crash image can be computed.
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    controller: FaultController,
    unsynced: Mutex<Vec<Unsynced>>,
    /// False once a [`crate::FaultyDirectory`] removed (or replaced) the
    /// file's name.
    linked: AtomicBool,
}

impl<B: Backend> FaultyBackend<B> {
    /// Wraps `inner`; the contents `inner` holds now count as synced.
    pub fn new(inner: B, controller: FaultController) -> Self {
        Self {
            inner,
            controller,
            unsynced: Mutex::new(Vec::new()),
            linked: AtomicBool::new(true),
        }
    }

    /// Marks the file as having lost (or regained) its name: while
    /// unlinked, [`Backend::link_count`] reports 0.
    pub fn set_linked(&self, linked: bool) {
        self.linked.store(linked, Ordering::Release);
    }

    /// The controller deciding this backend's faults.
    pub fn controller(&self) -> &FaultController {
        &self.controller
    }

    /// The bytes the file would hold after a crash now: what was synced,
    /// plus what `torn` says of the unsynced writes. Works whether or not
    /// the controller has crashed.
    pub fn crash_image(&self, torn: TornTail) -> io::Result<Vec<u8>> {
        let unsynced = self.unsynced.lock();
        let len = self.inner.len()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut image = vec![0u8; len];
        let got = self.inner.read_full_at(0, &mut image)?;
        image.truncate(got);
        // Undo the unsynced mutations, newest first.
        for m in unsynced.iter().rev() {
            match m {
                Unsynced::Write {
                    offset,
                    old_len,
                    old,
                    ..
                } => {
                    let off = *offset as usize;
                    image[off..off + old.len()].copy_from_slice(old);
                    image.truncate(*old_len as usize);
                }
                Unsynced::Truncate {
                    old_len, old_tail, ..
                } => {
                    let keep = *old_len as usize - old_tail.len();
                    image.truncate(keep);
                    image.extend_from_slice(old_tail);
                }
            }
        }
        // Replay what survives, oldest first.
        let mut budget = match torn {
            TornTail::Nothing => 0,
            TornTail::Prefix(n) => n,
            TornTail::Everything => u64::MAX,
        };
        for m in unsynced.iter() {
            if budget == 0 {
                break;
            }
            match m {
                Unsynced::Write { offset, new, .. } => {
                    let n = (new.len() as u64).min(budget) as usize;
                    budget -= n as u64;
                    let off = *offset as usize;
                    if image.len() < off + n {
                        image.resize(off + n, 0);
                    }
                    image[off..off + n].copy_from_slice(&new[..n]);
                }
                Unsynced::Truncate { new_len, .. } => image.resize(*new_len as usize, 0),
            }
        }
        Ok(image)
    }

    /// Bytes written since the last sync (what [`TornTail::Prefix`] counts).
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced
            .lock()
            .iter()
            .map(|m| match m {
                Unsynced::Write { new, .. } => new.len() as u64,
                Unsynced::Truncate { .. } => 0,
            })
            .sum()
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.controller.check(OpKind::Read)?;
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.controller.check(OpKind::Write)?;
        let mut unsynced = self.unsynced.lock();
        let old_len = self.inner.len()?;
        let overlap = old_len.saturating_sub(offset).min(data.len() as u64) as usize;
        let mut old = vec![0u8; overlap];
        let got = self.inner.read_full_at(offset, &mut old)?;
        old.truncate(got);
        self.inner.write_at(offset, data)?;
        unsynced.push(Unsynced::Write {
            offset,
            old_len,
            old,
            new: data.to_vec(),
        });
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.controller.check(OpKind::Sync)?;
        let mut unsynced = self.unsynced.lock();
        self.inner.sync()?;
        unsynced.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.controller.check(OpKind::Len)?;
        self.inner.len()
    }

    fn link_count(&self) -> io::Result<u64> {
        self.controller.check(OpKind::Links)?;
        if self.linked.load(Ordering::Acquire) {
            self.inner.link_count()
        } else {
            Ok(0)
        }
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.controller.check(OpKind::Truncate)?;
        let mut unsynced = self.unsynced.lock();
        let old_len = self.inner.len()?;
        let tail_len = old_len.saturating_sub(len);
        let mut old_tail = vec![0u8; tail_len as usize];
        let got = self.inner.read_full_at(len, &mut old_tail)?;
        old_tail.truncate(got);
        self.inner.truncate(len)?;
        unsynced.push(Unsynced::Truncate {
            old_len,
            old_tail,
            new_len: len,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    #[test]
    fn crash_image_keeps_synced_bytes_and_a_torn_prefix() {
        let c = FaultController::new();
        let b = FaultyBackend::new(MemBackend::from_bytes(b"base".to_vec()), c.clone());
        b.write_at(4, b"-one").unwrap();
        b.sync().unwrap();
        b.write_at(8, b"-two").unwrap();
        b.write_at(0, b"BA").unwrap();
        assert_eq!(b.unsynced_bytes(), 6);
        assert_eq!(b.crash_image(TornTail::Nothing).unwrap(), b"base-one");
        assert_eq!(b.crash_image(TornTail::Prefix(2)).unwrap(), b"base-one-t");
        assert_eq!(b.crash_image(TornTail::Prefix(5)).unwrap(), b"Base-one-two");
        assert_eq!(
            b.crash_image(TornTail::Everything).unwrap(),
            b"BAse-one-two"
        );
    }

    #[test]
    fn crash_image_undoes_an_unsynced_truncate() {
        let b = FaultyBackend::new(
            MemBackend::from_bytes(b"0123456789".to_vec()),
            FaultController::new(),
        );
        b.truncate(3).unwrap();
        b.write_at(3, b"x").unwrap();
        assert_eq!(b.crash_image(TornTail::Nothing).unwrap(), b"0123456789");
        assert_eq!(b.crash_image(TornTail::Everything).unwrap(), b"012x");
    }

    #[test]
    fn crash_point_is_counted_across_backends_and_stops_everything() {
        let c = FaultController::new();
        let a = FaultyBackend::new(MemBackend::new(), c.clone());
        let b = FaultyBackend::new(MemBackend::new(), c.clone());
        c.crash_at(2);
        a.write_at(0, b"a").unwrap();
        b.write_at(0, b"b").unwrap();
        assert!(a.sync().is_err());
        assert!(c.has_crashed());
        let mut buf = [0u8; 1];
        assert!(b.read_at(0, &mut buf).is_err());
        assert_eq!(a.crash_image(TornTail::Nothing).unwrap(), b"");
    }

    #[test]
    fn rules_fail_the_chosen_operations() {
        let c = FaultController::new();
        let b = FaultyBackend::new(MemBackend::new(), c.clone());
        c.inject(FaultRule {
            op: Some(OpKind::Write),
            kind: FaultKind::NoSpace,
            skip: 1,
            times: Some(1),
        });
        b.write_at(0, b"ok").unwrap();
        let e = b.write_at(2, b"no").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        b.write_at(2, b"ok").unwrap();
        c.inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
        assert_eq!(b.sync().unwrap_err().raw_os_error(), Some(5));
        assert_eq!(b.sync().unwrap_err().raw_os_error(), Some(5));
        c.clear_faults();
        b.sync().unwrap();
        assert_eq!(c.injected_count(), 3);
    }
}
