//! Writing safe rebase's differences on a thread of its own, so that the next run is compared
//! while earlier differences are written (with the image opened `O_DIRECT`, each write waits for
//! the device).
//!
//! Jobs touch disjoint units of the image and are written in the order sent; whoever else writes
//! into the image first calls [`DiffWriter::settle`]. A job is handed
//! over only when the thread is ready for it ([`QUEUE`] is 0), so one window is being written
//! while the next is compared and no more: each keeps its mapped pages resident. The first
//! error stops the thread; the next [`DiffWriter::send`] or [`DiffWriter::finish`] returns it.
//! Rebase calls `finish` (all writes returned) before it flushes and renames the backing file.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use blockdev::BlockDriver;

use super::mapped::SideBytes;
use super::write_runs;

/// Jobs waiting beyond the one being written (more cost memory and gained nothing measurable).
const QUEUE: usize = 0;

/// Differences to write: the units of `old` (from `start`) that `mask` marks.
pub(super) struct Job {
    pub start: u64,
    pub old: SideBytes,
    pub mask: Vec<bool>,
    pub unit: u64,
    pub old_size: u64,
}

/// The writing thread and its queue.
pub(super) struct DiffWriter {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<blockdev::Result<()>>>,
}

impl DiffWriter {
    /// Starts the thread writing into `top`.
    pub(super) fn new(top: Arc<dyn BlockDriver>) -> DiffWriter {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let thread = std::thread::spawn(move || {
            for job in rx {
                write_runs(top.as_ref(), job.start, job.old.bytes(), &job.mask, job.unit, job.old_size, false)?;
            }
            Ok(())
        });
        DiffWriter { tx: Some(tx), thread: Some(thread) }
    }

    /// Queues `job`; fails with the thread's error if it has stopped on one.
    pub(super) fn send(&mut self, job: Job) -> blockdev::Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if sent {
            return Ok(());
        }
        self.finish()?;
        Err(blockdev::Error::from_errno("rebase", libc::EIO))
    }

    /// Returns once every job sent so far is written, so that the caller may write into the image
    /// itself without racing the thread (allocation then follows guest order, as it would
    /// without the thread). With [`QUEUE`] 0, handing over an empty job waits exactly for that.
    pub(super) fn settle(&mut self) -> blockdev::Result<()> {
        let empty =
            Job { start: 0, old: SideBytes::Zero(Arc::new(Vec::new()), 0), mask: Vec::new(), unit: 1, old_size: 0 };
        self.send(empty)
    }

    /// Waits until every queued job is written; returns the first error.
    pub(super) fn finish(&mut self) -> blockdev::Result<()> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Ok(()),
        }
    }
}

impl Drop for DiffWriter {
    /// Never leaves writes in flight behind an error return.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
