//! Background syncs: a writer that has appended enough since it last asked
//! has a pool thread sync its file while it goes on working, so that the
//! disk writes those bytes during the work instead of during the commit's
//! own sync, which then has less left to wait for.
//!
//! Only an early start of what the commit syncs anyway: the commit's own
//! syncs and their order are unchanged. A failed background sync is kept
//! and returned by the writer's next [`crate::FileWriter::sync`] (a failed
//! `fdatasync` may not be reported again to the next one, so that sync
//! succeeding would prove nothing).

use crate::backend::Backend;
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use std::fmt;
use std::io;
use std::sync::Arc;

/// A pool of threads that sync files for their writers
/// ([`crate::CouchFile::with_writeback`]). Clones share the pool; its
/// threads end once every clone, and every file given it, is gone.
#[derive(Clone)]
pub struct Writeback {
    jobs: Sender<Job>,
    min_bytes: u64,
}

impl fmt::Debug for Writeback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writeback")
            .field("min_bytes", &self.min_bytes)
            .finish_non_exhaustive()
    }
}

/// One file to sync, and where its writer waits for the outcome.
struct Job {
    backend: Arc<dyn Backend>,
    state: Arc<SyncState>,
}

impl Writeback {
    /// A pool of `threads` threads (at least one). A writer asks for a sync
    /// each time it has written `min_bytes` more to its file (at least 1).
    pub fn new(threads: usize, min_bytes: u64) -> io::Result<Self> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("writeback-{i}"))
                .spawn(move || {
                    for job in queue {
                        let synced = job.backend.sync();
                        job.state.finish(synced);
                    }
                })?;
        }
        Ok(Self {
            jobs,
            min_bytes: min_bytes.max(1),
        })
    }

    /// Bytes a writer writes between two requests.
    pub fn min_bytes(&self) -> u64 {
        self.min_bytes
    }
}

/// One writer's background sync: at most one asked for at a time.
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    inner: Mutex<SyncInner>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncInner {
    pending: bool,
    error: Option<io::Error>,
}

impl SyncState {
    fn finish(&self, synced: io::Result<()>) {
        let mut inner = self.inner.lock();
        inner.pending = false;
        if let Err(e) = synced {
            // The first error is the one that matters.
            inner.error.get_or_insert(e);
        }
        self.done.notify_all();
    }

    /// Waits for the sync asked for, if any; the error of a failed one
    /// since the last call.
    pub(crate) fn wait(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        while inner.pending {
            self.done.wait(&mut inner);
        }
        match inner.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A writer's side of a [`Writeback`]: the bytes written since it last
/// asked, and its [`SyncState`].
#[derive(Debug)]
pub(crate) struct WritebackClient {
    pool: Writeback,
    state: Arc<SyncState>,
    unasked: u64,
}

impl WritebackClient {
    pub(crate) fn new(pool: Writeback) -> Self {
        Self {
            pool,
            state: Arc::default(),
            unasked: 0,
        }
    }

    /// Notes `bytes` just written to `backend`; asks for a sync once
    /// enough are, unless one is still pending (it is an early start only:
    /// what it misses, the writer's own sync covers).
    pub(crate) fn wrote(&mut self, backend: &Arc<dyn Backend>, bytes: u64) {
        self.unasked += bytes;
        if self.unasked < self.pool.min_bytes {
            return;
        }
        {
            let mut inner = self.state.inner.lock();
            if inner.pending {
                return;
            }
            inner.pending = true;
        }
        self.unasked = 0;
        let job = Job {
            backend: Arc::clone(backend),
            state: Arc::clone(&self.state),
        };
        if let Err(unsent) = self.pool.jobs.send(job) {
            // No thread left to take it (they only end with the pool):
            // nothing is lost, the writer's own sync covers these bytes.
            unsent.0.state.finish(Ok(()));
        }
    }

    /// [`SyncState::wait`].
    pub(crate) fn wait(&self) -> io::Result<()> {
        self.state.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        CouchFile, FaultController, FaultKind, FaultRule, FaultyBackend, FileWriter, MemBackend,
        OpKind,
    };

    fn writer(min_bytes: u64) -> (FileWriter, FaultController) {
        let controller = FaultController::new();
        let backend: Arc<dyn Backend> =
            Arc::new(FaultyBackend::new(MemBackend::new(), controller.clone()));
        let file = CouchFile::new(backend, "wb.couch")
            .unwrap()
            .with_writeback(Writeback::new(1, min_bytes).unwrap());
        (FileWriter::new(file).unwrap(), controller)
    }

    #[test]
    fn a_failed_background_sync_fails_the_next_sync_once() {
        let (mut w, controller) = writer(1);
        controller.inject(FaultRule::once(OpKind::Sync, FaultKind::Eio));
        w.append_chunk(b"bytes a background sync covers").unwrap();
        // The flush asks for the background sync, which fails; the writer's
        // own sync would succeed, but the failure is reported.
        let failed = w.sync().unwrap_err();
        assert!(failed.to_string().contains("sync"), "{failed}");
        assert_eq!(controller.injected_count(), 1);
        // Reported once: the next sync is clean.
        w.append_chunk(b"more").unwrap();
        w.sync().unwrap();
    }

    #[test]
    fn a_writer_asks_only_once_enough_is_written() {
        let (mut w, controller) = writer(1 << 20);
        controller.inject(FaultRule::always(OpKind::Sync, FaultKind::Eio));
        w.append_chunk(&[7; 100]).unwrap();
        w.flush().unwrap();
        // Under the threshold: no background sync was asked for (waiting
        // for the pending one finds none, and no sync failed).
        w.set_writeback(Some(Writeback::new(1, 1 << 20).unwrap()))
            .unwrap();
        assert_eq!(controller.injected_count(), 0);
        controller.clear_faults();
        // Past it: one is. Waiting for it alone (no sync of the writer's
        // own) reports its failure.
        controller.inject(FaultRule::once(OpKind::Sync, FaultKind::Eio));
        w.append_chunk(&vec![7; 1 << 20]).unwrap();
        w.flush().unwrap();
        assert!(w.set_writeback(None).is_err());
        assert_eq!(controller.injected_count(), 1);
        w.sync().unwrap();
    }
}
