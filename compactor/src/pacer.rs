//! Cancellation, progress, throttling and periodic syncs of a compaction.

use crate::error::{Error, Result};
use crate::CompactionConfig;
use couchfile::{Backend, FileWriter};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct ControlState {
    cancelled: AtomicBool,
    docs_total: AtomicU64,
    docs_done: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
}

/// A handle to cancel a running compaction and watch its progress; clones
/// share the same state, so one can be kept by whoever wants to cancel.
#[derive(Debug, Clone, Default)]
pub struct Control {
    state: Arc<ControlState>,
}

/// How far a compaction has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Documents to visit (the source's by-seq count).
    pub docs_total: u64,
    /// Documents visited.
    pub docs_done: u64,
    /// Bytes to read (the source header's space used).
    pub bytes_total: u64,
    /// Bytes read so far.
    pub bytes_done: u64,
}

impl Control {
    /// A fresh handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the compaction to stop; it fails with [`Error::Cancelled`] at
    /// its next check (every document, and while throttled).
    pub fn cancel(&self) {
        self.state.cancelled.store(true, Ordering::SeqCst);
    }

    /// True once [`Control::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// The progress so far.
    pub fn progress(&self) -> Progress {
        let s = &self.state;
        Progress {
            docs_total: s.docs_total.load(Ordering::Relaxed),
            docs_done: s.docs_done.load(Ordering::Relaxed),
            bytes_total: s.bytes_total.load(Ordering::Relaxed),
            bytes_done: s.bytes_done.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    pub(crate) fn add_totals(&self, docs: u64, bytes: u64) {
        self.state.docs_total.fetch_add(docs, Ordering::Relaxed);
        self.state.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_done(&self, docs: u64, bytes: u64) {
        self.state.docs_done.fetch_add(docs, Ordering::Relaxed);
        self.state.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Paces the writes of one copy or replay: syncs every N bytes, sleeps to
/// hold the throttle rate, checks for cancellation, and with
/// [`CompactionConfig::writeback_every_bytes`] has a thread sync the target
/// behind the copy.
#[derive(Debug)]
pub(crate) struct Pacer<'a> {
    control: &'a Control,
    sync_every: u64,
    rate: Option<u64>,
    start: Instant,
    written: u64,
    unsynced: u64,
    writeback_every: u64,
    /// The writer's position at the last writeback asked for.
    writeback_from: Option<u64>,
    writeback: Option<Writeback>,
}

/// A thread that syncs the target whenever asked, so that the disk writes
/// the copy's bytes while the copy goes on, instead of all of them in the
/// final commit's sync. Only an early start of what that commit syncs
/// anyway: its own syncs and their order are unchanged. A failed sync is
/// kept and returned by [`Writeback::finish`], which the copy calls before
/// its commit (a failed `fdatasync` may not be reported again to the next
/// one, so the commit's own sync succeeding proves nothing).
#[derive(Debug)]
struct Writeback {
    path: PathBuf,
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Writeback {
    fn spawn(backend: Arc<dyn Backend>, path: PathBuf) -> Result<Self> {
        // One pending request at most: requests made while a sync runs
        // fold into the next one.
        let (kick, asked) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("compact-writeback".into())
            .spawn(move || {
                while asked.recv().is_ok() {
                    backend.sync()?;
                }
                Ok(())
            })
            .map_err(|e| Error::io(path.clone(), "spawn the writeback thread", e))?;
        Ok(Self {
            path,
            kick: Some(kick),
            thread: Some(thread),
        })
    }

    /// Asks for a sync of what was written so far. False when the thread
    /// has stopped (a sync failed: [`Writeback::finish`] tells).
    fn ask(&self) -> bool {
        match &self.kick {
            Some(kick) => match kick.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => true,
                Err(TrySendError::Disconnected(())) => false,
            },
            None => false,
        }
    }

    /// Stops the thread once its last sync is done; the first error of any
    /// of its syncs.
    fn finish(&mut self) -> Result<()> {
        self.kick = None;
        match self.thread.take() {
            Some(thread) => match thread.join() {
                Ok(synced) => synced.map_err(|e| Error::io(self.path.clone(), "sync", e)),
                Err(_) => Err(Error::io(
                    self.path.clone(),
                    "sync",
                    std::io::Error::other("the writeback thread panicked"),
                )),
            },
            None => Ok(()),
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        // An abandoned copy (an error, a cancel) still waits for the
        // thread, which holds the target open; its error no longer matters.
        let _ = self.finish();
    }
}

/// Longest sleep between cancellation checks while throttled.
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

impl<'a> Pacer<'a> {
    pub(crate) fn new(config: &CompactionConfig, control: &'a Control) -> Self {
        Self {
            control,
            sync_every: config.sync_every_bytes,
            rate: config.throttle_bytes_per_sec.filter(|r| *r > 0),
            start: Instant::now(),
            written: 0,
            unsynced: 0,
            writeback_every: config.writeback_every_bytes,
            writeback_from: None,
            writeback: None,
        }
    }

    /// Waits for the writeback thread, if any, to finish its syncs, and
    /// returns the first error of one. To call before committing.
    pub(crate) fn finish(&mut self) -> Result<()> {
        match &mut self.writeback {
            Some(writeback) => writeback.finish(),
            None => Ok(()),
        }
    }

    /// With writeback on, asks for a sync once the writer has appended
    /// `writeback_every` bytes (bodies and nodes) since the last one.
    fn write_back(&mut self, writer: &mut FileWriter) -> Result<()> {
        if self.writeback_every == 0 {
            return Ok(());
        }
        let pos = writer.position();
        let from = *self.writeback_from.get_or_insert(pos);
        if pos - from < self.writeback_every {
            return Ok(());
        }
        // The sync covers only what reached the file.
        writer.flush()?;
        self.writeback_from = Some(pos);
        if self.writeback.is_none() {
            self.writeback = Some(Writeback::spawn(
                Arc::clone(writer.file().backend()),
                writer.file().path().to_path_buf(),
            )?);
        }
        if let Some(writeback) = &mut self.writeback {
            if !writeback.ask() {
                writeback.finish()?;
            }
        }
        Ok(())
    }

    /// Accounts for `bytes` more written to `writer`.
    pub(crate) fn wrote(&mut self, writer: &mut FileWriter, bytes: u64) -> Result<()> {
        self.control.check()?;
        self.written += bytes;
        self.unsynced += bytes;
        if self.sync_every > 0 && self.unsynced >= self.sync_every {
            writer.sync()?;
            self.unsynced = 0;
        }
        self.write_back(writer)?;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.written as f64 / rate as f64);
            loop {
                let elapsed = self.start.elapsed();
                if elapsed >= due {
                    break;
                }
                std::thread::sleep((due - elapsed).min(THROTTLE_SLICE));
                self.control.check()?;
            }
        }
        Ok(())
    }
}
