//! Cancellation, progress, throttling and periodic syncs of a compaction.

use crate::error::{Error, Result};
use crate::CompactionConfig;
use couchfile::{FileWriter, Writeback};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
/// behind the copy (the writer's background syncs, [`Writeback`]).
#[derive(Debug)]
pub(crate) struct Pacer<'a> {
    control: &'a Control,
    sync_every: u64,
    rate: Option<u64>,
    start: Instant,
    written: u64,
    unsynced: u64,
    writeback_every: u64,
    /// Whether the writer syncs through this pacer's writeback thread.
    writing_back: bool,
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
            writing_back: false,
        }
    }

    /// Stops the writer's background syncs, if on, once the pending one is
    /// done, and returns the error of any that failed. To call before
    /// committing.
    pub(crate) fn finish(&mut self, writer: &mut FileWriter) -> Result<()> {
        if self.writing_back {
            self.writing_back = false;
            writer.set_writeback(None)?;
        }
        Ok(())
    }

    /// With writeback on, has `writer` sync in the background through a
    /// thread of its own each time it has flushed `writeback_every` bytes
    /// more ([`couchfile::Writeback`]).
    fn write_back(&mut self, writer: &mut FileWriter) -> Result<()> {
        if self.writeback_every == 0 || self.writing_back {
            return Ok(());
        }
        let writeback = Writeback::new(1, self.writeback_every)
            .map_err(|e| Error::io(writer.file().path(), "spawn the writeback thread", e))?;
        writer.set_writeback(Some(writeback))?;
        self.writing_back = true;
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
